"""APFed with in-process channels: what crosses, the combined gradient, learning, lost passive
parties, resume after a crash, id and config mismatches."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glmjax.federated import losses
from glmjax.federated.active import ActiveParty
from glmjax.federated.channel import (HandshakeReply, HandshakeRequest, InProcessChannel, PartyConfigError, StepReply,
                                      StepRequest, decode)
from glmjax.federated.checkpoints import load_party_checkpoint, read_party_checkpoint_meta
from glmjax.federated.data import IdMismatchError, PartyData, builtin_party, train_test_split
from glmjax.federated.modules import ContrastiveModel, ReconstructionModel
from glmjax.federated.optim import PartyOptimizer
from glmjax.federated.passive import PassiveConfig, PassiveParty
from glmjax.federated.training import ActiveConfig, restore_active, train_active


def _parties(variant, views=(1, 2), dataset="digits", num_views=3, active_view=0, checkpoint_dir=None,
             record=None, **passive_kwargs):
    active = builtin_party(dataset, active_view, num_views, with_labels=True)
    channels = []
    for view in views:
        config = PassiveConfig(name=f"view{view}", variant=variant, hidden=(16,), rep_dim=16, seed=view,
                               checkpoint_dir=checkpoint_dir, **passive_kwargs)
        channels.append(InProcessChannel(config.name, PassiveParty(builtin_party(dataset, view, num_views, False),
                                                                   config), record))
    return active, channels


def _config(variant, **kwargs):
    base = dict(variant=variant, encoder_hidden=(32,), rep_dim=16, proj_dim=8, epochs=2, batch_size=256)
    return ActiveConfig(**{**base, **kwargs})


def test_only_the_representation_and_its_gradient_cross():
    calls = []
    active, channels = _parties("R", record=lambda m, req, rep: calls.append((m, req, rep)))
    result = train_active(active, channels, _config("R", epochs=1))
    assert result.step == 5 and not result.lost
    methods = [m for m, _, _ in calls]
    assert methods == ["Handshake", "Handshake"] + ["Step", "Step"] * 5 + ["Finish", "Finish"]
    for method, request, reply in calls:
        req, rep = decode(request), decode(reply)
        if method == "Handshake":
            assert set(req) == {"variant", "sent_dim", "ids", "resume_step"} and set(rep) == {"party", "restored_step"}
            np.testing.assert_array_equal(req["ids"], active.ids)
        elif method == "Step":
            assert set(req) == {"step", "index", "sent"} and set(rep) == {"grad", "loss"}
            assert req["sent"].shape == (256, 16) == rep["grad"].shape
            assert req["index"].dtype == np.int32 and req["index"].shape == (256,)
            # nothing else travels: the bytes are the arrays plus a short header
            assert len(request) < req["sent"].nbytes + req["index"].nbytes + 200
            assert len(reply) < rep["grad"].nbytes + 100
            assert not np.allclose(rep["grad"], 0.0)
        else:
            assert set(req) == {"step"} == set(rep)


def _bind_plain_sgd(lr):
    gin.clear_config()
    gin.bind_parameter("party_optimizer.name", "sgd")
    gin.bind_parameter("party_optimizer.learning_rate", lr)
    gin.bind_parameter("party_optimizer.momentum", 0.0)
    gin.bind_parameter("party_optimizer.weight_decay", 0.0)


@pytest.mark.parametrize("variant", ["R", "C"])
def test_one_step_follows_the_joint_objective(tmp_path, variant):
    """The active update is grad of L_task + sum_p lambda_p L_p (passive gradients pulled back
    through g_A and f_A by jax.vjp); each passive update is grad of its own L_p."""
    lr, lambdas = 0.5, {"view1": 0.3, "view2": 2.0}
    _bind_plain_sgd(lr)
    try:
        rng = np.random.default_rng(0)
        n = 32
        ids = np.array([f"s{i}" for i in range(n)])
        active = PartyData(ids, rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32), "a")
        views = {"view1": rng.normal(size=(n, 4)).astype(np.float32), "view2": rng.normal(size=(n, 6)).astype(np.float32)}
        perm = rng.permutation(n)  # the passive parties hold their rows in another order
        channels = [InProcessChannel(name, PassiveParty(
            PartyData(ids[perm], x[perm], None, name),
            PassiveConfig(name=name, variant=variant, hidden=(7,), rep_dim=5, seed=s, temperature=0.5,
                          checkpoint_dir=str(tmp_path))))
            for s, (name, x) in enumerate(views.items())]
        config = ActiveConfig(variant=variant, encoder_hidden=(6,), rep_dim=4, proj_dim=3, head_hidden=(),
                              trade_off=99.0, trade_offs=lambdas, epochs=1, batch_size=25, test_fraction=0.2,
                              checkpoint_dir=str(tmp_path))
        result = train_active(active, channels, config)
        assert result.step == 1
        batch = np.random.default_rng([config.seed, 0]).permutation(
            np.setdiff1d(np.arange(n), np.flatnonzero(np.isin(ids, ids[_test_rows(ids, config)]))))[:25]

        start = ActiveParty(5, 3, variant=variant, encoder_hidden=(6,), rep_dim=4, head_hidden=(), proj_dim=3, seed=0)
        sent_dim = 3 if variant == "C" else 4
        passive_models = {}
        for s, (name, x) in enumerate(views.items()):
            if variant == "R":
                passive_models[name] = ReconstructionModel(sent_dim, x.shape[1], hidden=(7,), rngs=nnx.Rngs(s))
            else:
                passive_models[name] = ContrastiveModel(x.shape[1], sent_dim, encoder_hidden=(7,), rep_dim=5,
                                                        rngs=nnx.Rngs(s))
        passive_params = {k: nnx.split(m, nnx.Param) for k, m in passive_models.items()}

        def passive_loss(name, p_params, sent):
            graphdef, _ = passive_params[name]
            model = nnx.merge(graphdef, p_params)
            x = jnp.asarray(views[name][batch])
            if variant == "R":
                return losses.reconstruction_mse(model(sent), x)
            return losses.nt_xent(sent, model(x), 0.5)

        def joint(a_params):
            model = nnx.merge(start._graphdef, a_params)
            z = model.encode(jnp.asarray(active.x[batch]))
            sent = model.project(z) if variant == "C" else z
            total = losses.cross_entropy(model.logits(z), jnp.asarray(active.labels[batch]))
            for name in views:
                total = total + lambdas[name] * passive_loss(name, passive_params[name][1], sent)
            return total

        grads = jax.jit(jax.grad(joint))(start.params)
        want = jax.tree.map(lambda p, g: p - lr * g, start.params, grads)
        trained, _ = restore_active(5, 3, config)
        for got_leaf, want_leaf in zip(jax.tree.leaves(trained.params), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5, atol=1e-6)

        sent0 = start.sent(active.x[batch])
        for name in views:
            p_grads = jax.jit(jax.grad(lambda p: passive_loss(name, p, jnp.asarray(sent0))))(passive_params[name][1])
            want_p = jax.tree.map(lambda p, g: p - lr * g, passive_params[name][1], p_grads)
            state, meta = load_party_checkpoint(str(tmp_path / f"{name}.npz"),
                                                {"params": want_p, "opt_state": optax_state_like(want_p)})
            assert meta["step"] == 1
            for got_leaf, want_leaf in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(want_p)):
                np.testing.assert_allclose(got_leaf, np.asarray(want_leaf), rtol=1e-5, atol=1e-6)
    finally:
        gin.clear_config()


def optax_state_like(params):
    return PartyOptimizer().build().init(params)


def _test_rows(ids, config):
    return train_test_split(ids, config.test_fraction, config.split_seed)[1]


@pytest.mark.parametrize("variant", ["R", "C"])
def test_in_process_training_beats_chance(variant):
    gin.clear_config()
    gin.bind_parameter("party_optimizer.learning_rate", 1e-2)
    try:
        active, channels = _parties(variant)
        result = train_active(active, channels, _config(variant, epochs=8, batch_size=128))
    finally:
        gin.clear_config()
    assert result.step == 8 * 11 and result.lost == [] and result.stopped is None
    assert result.test_accuracy > 0.5  # 10 classes: chance is 0.1
    assert set(result.passive_losses) == {"view1", "view2"} and all(np.isfinite(list(result.passive_losses.values())))


def test_lost_passive_continue_policy(tmp_path):
    active, channels = _parties("R", checkpoint_dir=str(tmp_path))
    config = _config("R", epochs=4, on_passive_loss="continue", checkpoint_dir=str(tmp_path), checkpoint_every=3)

    def lose_view2(step):
        if step == 4:
            channels[1].disconnect()

    result = train_active(active, channels, config, on_step=lose_view2)
    assert result.step == result.total_steps == 20 and result.stopped is None
    assert result.lost == ["view2"] and set(result.passive_losses) == {"view1", "view2"}
    lines = [e for e in result.events if "lost" in e]
    assert lines == ["active: passive party 'view2' lost at step 4 (passive party 'view2' unavailable: disconnected); "
                     "on_passive_loss=continue: training continues without it (1 passive parties left)"]
    # its checkpoint stopped at the last save before the loss, view1's went on to the end
    assert read_party_checkpoint_meta(str(tmp_path / "view2.npz"))["step"] == 3
    assert read_party_checkpoint_meta(str(tmp_path / "view1.npz"))["step"] == 20
    assert read_party_checkpoint_meta(str(tmp_path / "active.npz"))["lost"] == ["view2"]


def test_lost_passive_stop_policy_saves_and_a_restart_resumes(tmp_path):
    active, channels = _parties("R", checkpoint_dir=str(tmp_path))
    config = _config("R", epochs=4, on_passive_loss="stop", checkpoint_dir=str(tmp_path), checkpoint_every=3)

    def lose_view1(step):
        if step == 7:
            channels[0].disconnect()

    result = train_active(active, channels, config, on_step=lose_view1)
    assert result.stopped == "passive_lost" and result.step == 7 and result.lost == ["view1"]
    assert any("on_passive_loss=stop: saving a checkpoint at step 7 and stopping" in e for e in result.events)
    assert read_party_checkpoint_meta(str(tmp_path / "active.npz"))["step"] == 7
    # restart: a new view1 process (its checkpoint is from step 6), view2 from its step 6 too
    active, channels = _parties("R", checkpoint_dir=str(tmp_path))
    resumed = train_active(active, channels, dataclasses.replace(config), on_step=None)
    assert resumed.resumed_from == 7 and resumed.step == 20 and resumed.stopped is None
    assert "active: passive party 'view1' joined (its restored step 6)" in resumed.events


class _Crash(Exception):
    pass


@pytest.mark.parametrize("variant", ["R", "C"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, variant):
    config = _config(variant, epochs=3, batch_size=200, checkpoint_every=5)
    straight_dir, crash_dir = tmp_path / "straight", tmp_path / "crash"
    active, channels = _parties(variant, checkpoint_dir=str(straight_dir))
    straight = train_active(active, channels, dataclasses.replace(config, checkpoint_dir=str(straight_dir)))

    def crash(step):
        if step == 6:
            raise _Crash

    crashed_config = dataclasses.replace(config, checkpoint_dir=str(crash_dir))
    active, channels = _parties(variant, checkpoint_dir=str(crash_dir))
    with pytest.raises(_Crash):
        train_active(active, channels, crashed_config, on_step=crash)
    active, channels = _parties(variant, checkpoint_dir=str(crash_dir))  # fresh processes
    resumed = train_active(active, channels, crashed_config)
    assert resumed.resumed_from == 5 and resumed.step == straight.step == 21
    assert resumed.test_accuracy == straight.test_accuracy
    a, _ = restore_active(24, 10, dataclasses.replace(config, checkpoint_dir=str(straight_dir)))
    b, _ = restore_active(24, 10, crashed_config)
    for x, y in zip(jax.tree.leaves(a.state()), jax.tree.leaves(b.state())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_id_mismatch_and_variant_mismatch_fail_at_the_handshake():
    active = builtin_party("digits", 0, 3, with_labels=True)
    passive = builtin_party("digits", 1, 3, with_labels=False)
    short = passive.take(np.arange(3, len(passive.ids)))
    channel = InProcessChannel("view1", PassiveParty(short, PassiveConfig(name="view1")))
    with pytest.raises(IdMismatchError, match=r"\(1797 ids\) and passive party 'view1' \(1794 ids\): 3 only in the "
                                              r"active party \(e.g. \['digits-00000', 'digits-00001', 'digits-00002'\]\)"):
        train_active(active, [channel], _config("R"))
    channel = InProcessChannel("view1", PassiveParty(passive, PassiveConfig(name="view1", variant="C")))
    with pytest.raises(PartyConfigError, match="active party runs APFed-R, passive party 'view1' is configured for APFed-C"):
        train_active(active, [channel], _config("R"))
    channel = InProcessChannel("view9", PassiveParty(passive, PassiveConfig(name="view1")))
    with pytest.raises(PartyConfigError, match="configured as 'view9' calls itself 'view1'"):
        train_active(active, [channel], _config("R"))
    with pytest.raises(PartyConfigError, match="must not carry labels"):
        PassiveParty(active, PassiveConfig())
    with pytest.raises(PartyConfigError, match="on_passive_loss='later'"):
        ActiveConfig(on_passive_loss="later")


def test_lambda_zero_calls_no_passive_party_and_step_before_handshake_is_refused():
    calls = []
    active, channels = _parties("R", record=lambda m, *_: calls.append(m))
    result = train_active(active, channels, _config("R", trade_off=0.0, epochs=1))
    assert calls == [] and result.passive_losses == {}
    assert any("lambda = 0, not called" in e for e in result.events)
    party = PassiveParty(builtin_party("digits", 1, 3, False), PassiveConfig())
    with pytest.raises(PartyConfigError, match="Step before Handshake"):
        party.step(StepRequest(0, np.zeros(2, np.int32), np.zeros((2, 4), np.float32)))
    reply = party.handshake(HandshakeRequest("R", 4, active.ids, 0))
    assert reply == HandshakeReply("passive", 0)
    assert isinstance(party.step(StepRequest(0, np.arange(2, dtype=np.int32), np.ones((2, 4), np.float32))), StepReply)
