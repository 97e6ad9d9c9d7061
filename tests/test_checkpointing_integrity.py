"""Train-state Checkpointer: host states, no copies, URLs kept, corrupt checkpoints fall back."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glmjax import sharding
from glmjax.checkpoints import CheckpointError, paths
from glmjax.checkpoints.orbax_io import config_to_json
from glmjax.models import create_model, flat_params, preset
from glmjax.checkpoints import step_checkpoints
from glmjax.checkpoints.training_runs import load_trained_model
from glmjax.checkpoints.step_checkpoints import array_digests
from glmjax.training.checkpointing import Checkpointer
from glmjax.training.state import TrainState


class Position:
    """A Checkpointable host state."""

    def __init__(self, value=0):
        self.value = value

    def get_state(self):
        return {"value": self.value}

    def set_state(self, state):
        self.value = state["value"]


def _state(seed: int) -> TrainState:
    mesh = sharding.make_mesh((2, 2, 2, 1))

    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"w": put(jax.random.normal(keys[0], (64, 32)), "data", "fsdp"),
              "e": put(jax.random.normal(keys[1], (16, 8)).astype(jnp.bfloat16), None, "tensor")}
    opt_state = jax.tree.map(lambda x: put(x, *x.sharding.spec) if hasattr(x.sharding, "spec") else put(x),
                             optax.adam(1e-3).init(params))
    bits = put(jax.random.bits(keys[2], (32, 128), jnp.uint32), "data")  # incompressible
    return TrainState(step=put(jnp.int32(seed)), params=params, opt_state=opt_state,
                      rng=put(jax.random.key_data(keys[2])), extra={"bits": bits})


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture
def two_steps(tmp_path):
    """Checkpoints of steps 1 and 2 (different values) with a host state."""
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory))
    states = {1: _state(1), 2: _state(2)}
    position = Position(10)
    for step, state in states.items():
        checkpointer.save(state, step=step, host_states={"data": position})
        position.value += 10  # after the save started: must not leak into it
    checkpointer.close()
    return directory, states


def _restore(directory, states, abstract=None, key="data", **kwargs):
    """(state, step, restored position, steps afterwards) of a fresh Checkpointer's restore."""
    checkpointer = Checkpointer(str(directory))
    try:
        position = Position()
        abstract = _abstract(states[1]) if abstract is None else abstract
        state, step = checkpointer.restore(abstract, host_states={key: position}, **kwargs)
        return state, step, position.value, checkpointer.all_steps()
    finally:
        checkpointer.close()


def test_round_trip_with_host_states(two_steps):
    directory, states = two_steps
    state, step, position, steps = _restore(directory, states)
    assert (step, position, steps) == (2, 20, [1, 2])
    _assert_equal(state, states[2])
    assert state.params["w"].sharding == states[2].params["w"].sharding
    state, step, position, _ = _restore(directory, states, step=1)
    assert (step, position) == (1, 10)
    _assert_equal(state, states[1])


def test_save_hands_orbax_the_states_own_arrays(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path))
    received = []
    save = checkpointer._manager.save
    monkeypatch.setattr(checkpointer._manager, "save",
                        lambda step, args, **kw: (received.append(args), save(step, args=args, **kw)))
    state = _state(3)
    checkpointer.save(state, step=3)
    checkpointer.close()
    handed = step_checkpoints.leaves_by_path(received[0]["state"].item)
    originals = step_checkpoints.leaves_by_path(state)
    assert sorted(handed) == sorted(originals) and len(handed) == 10
    assert all(handed[path] is leaf for path, leaf in originals.items())


def test_url_directory_is_never_made_local(monkeypatch, tmp_path):
    received = []

    class Recorder:
        def __init__(self, directory, **kwargs):
            received.append(directory)

    monkeypatch.setattr(step_checkpoints.ocp, "CheckpointManager", Recorder)
    Checkpointer("gs://bucket/run/checkpoints")
    assert str(received[0]) == "gs://bucket/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    Checkpointer("relative/checkpoints")
    assert str(received[1]) == str(tmp_path / "relative" / "checkpoints")
    assert str(paths.as_path("gs://bucket/x") / "3") == "gs://bucket/x/3"


def test_digest_is_independent_of_sharding_and_sees_one_flipped_bit():
    params = _state(4).params
    host = jax.device_get(params)
    assert array_digests(params) == array_digests(host)
    bits = host["w"].view(np.uint32).copy()
    bits[17, 3] ^= 1 << 30
    assert array_digests({"w": bits.view(np.float32)})["w"] != array_digests(host)["w"]


def _check_fallback(directory, states, caplog, reason):
    with caplog.at_level(logging.WARNING):
        state, step, position, steps = _restore(directory, states)
    assert (step, position, steps) == (1, 10, [1])
    _assert_equal(state, states[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{directory / '2'}: corrupt checkpoint" in warnings[0] and reason in warnings[0]
    assert (directory / "2.corrupt" / "state").is_dir()  # kept, not deleted


def _file_holding_bits(step_dir, state):
    """(file, offset) of a stretch of extra/bits' values: random bits are stored as they are."""
    needle = np.asarray(state.extra["bits"]).tobytes()[4000:4032]
    found = [(path, path.read_bytes().find(needle)) for path in (step_dir / "state").rglob("*")
             if path.is_file() and needle in path.read_bytes()]
    assert len(found) == 1
    return found[0]


def test_flipped_bytes_fall_back_to_previous_step(two_steps, caplog):
    directory, states = two_steps
    path, at = _file_holding_bits(directory / "2", states[2])
    data = bytearray(path.read_bytes())
    for i in range(at, at + 8):  # array values, not OCDBT's b-tree nodes (those have a checksum)
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    _check_fallback(directory, states, caplog, "checksum mismatch in extra/bits")


def test_truncated_file_falls_back(two_steps, caplog):
    directory, states = two_steps
    path, at = _file_holding_bits(directory / "2", states[2])
    path.write_bytes(path.read_bytes()[:at])
    _check_fallback(directory, states, caplog, "(unreadable array")


def test_missing_metadata_falls_back(two_steps, caplog):
    directory, states = two_steps
    (directory / "2" / "state" / "_METADATA").unlink()
    _check_fallback(directory, states, caplog, "unreadable array metadata")


def test_corrupt_host_state_falls_back(two_steps, caplog):
    directory, states = two_steps
    path = directory / "2" / "host" / "process_0-of-1.json"
    path.write_text(path.read_text().replace('"value": 20', '"value": 99'))
    _check_fallback(directory, states, caplog, "CRC32 mismatch")


def test_all_corrupt_is_one_line_error(two_steps):
    directory, states = two_steps
    for step in (1, 2):
        (directory / str(step) / "digest" / "digest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        _restore(directory, states)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{directory}: no good checkpoint, all 2 are corrupt")
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["1", "2"]  # nothing moved


def test_explicitly_requested_corrupt_step_is_an_error(two_steps):
    directory, states = two_steps
    (directory / "1" / "digest" / "digest.json").unlink()
    with pytest.raises(CheckpointError, match=r"/1: corrupt checkpoint: digest/digest.json is missing"):
        _restore(directory, states, step=1)


def test_config_mismatch_names_the_leaf_and_does_not_fall_back(two_steps):
    directory, states = two_steps
    abstract = _abstract(states[1])
    abstract.params["w"] = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=abstract.params["w"].sharding)
    with pytest.raises(CheckpointError) as info:
        _restore(directory, states, abstract)
    assert str(info.value) == (f"{directory / '2'}: checkpoint does not match the current config: "
                               "params/w is float32[64, 32] in the checkpoint, float32[64, 16] expected")
    smaller = _abstract(states[1])
    for tree in (smaller.params, smaller.opt_state[0].mu, smaller.opt_state[0].nu):
        del tree["e"]
    with pytest.raises(CheckpointError, match=r"/2: checkpoint does not match the current config: the "
                                              r"checkpoint has opt_state/0/mu/e \(bfloat16\[16, 8\]\) which"):
        _restore(directory, states, smaller)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing set aside


def test_missing_host_state_is_a_config_error(two_steps):
    directory, states = two_steps
    with pytest.raises(CheckpointError, match=r"/2/host: no host state 'hook' \(saved: \['data'\]\)"):
        _restore(directory, states, key="hook")


def test_load_trained_model_verifies_and_falls_back(tmp_path, caplog):
    config = preset("glm4-tiny")
    (tmp_path / "model_config.json").write_text(json.dumps(config_to_json(config)))
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    models = {}
    for step in (1, 2):
        models[step] = create_model(config, seed=step)
        params = nnx.to_pure_dict(nnx.state(models[step], nnx.Param))
        checkpointer.save(TrainState(step=jnp.int32(step), params=params, opt_state=optax.sgd(0.1).init(params),
                                     rng=jnp.zeros(2, jnp.uint32)), step=step)
    checkpointer.close()
    digest_file = tmp_path / "checkpoints" / "2" / "digest" / "digest.json"
    digest = json.loads(digest_file.read_text())
    digest["leaves"]["params/embedding"][0] ^= 1  # as if the stored embedding had changed
    digest_file.write_text(json.dumps(digest))
    with caplog.at_level(logging.WARNING):
        model = load_trained_model(str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{tmp_path / 'checkpoints' / '2'}: corrupt checkpoint (checksum mismatch in params/embedding); "
        "trying the previous step"]
    for name, variable in flat_params(models[1]).items():
        np.testing.assert_array_equal(np.asarray(flat_params(model)[name][...]), np.asarray(variable[...]))
    assert (tmp_path / "checkpoints" / "2").is_dir()  # read-only: nothing renamed
    with pytest.raises(CheckpointError, match=r"checkpoints/2: corrupt checkpoint: checksum mismatch in params/emb"):
        load_trained_model(str(tmp_path), step=2)
