"""offline_distill_data: the stored teacher lands at the right positions through windows and
packing, the batch spec declares it, and a dump of other data is refused."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_helpers import CONFIG

from glmjax.checkpoints.orbax_io import save_model
from glmjax.data.distill_data import offline_distill_data
from glmjax.data.sources import DataFormatError, write_token_records
from glmjax.data.spec import FeatureSpec, batch_spec_of
from glmjax.data.teacher_logits import LogitsFormat, TeacherLogitsError
from glmjax.models import create_model
from glmjax.objectives.alpha import ConstantAlpha
from glmjax.objectives.base import StateContext, StepInputs
from glmjax.objectives.distill import DistillObjective
from glmjax.objectives.distill_losses import truncate_with_tail
from glmjax.sharding import make_mesh
from glmjax.training.state import model_graph, param_shardings, random_params
from launch.dump_logits import DumpConfig, dump

TRUNCATION = {"top_p": 0.9, "top_k": 6, "temperature": 0.7}
DUMP_SEQ = 64  # >= every document: the teacher sees each document whole


def _documents(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, CONFIG.vocab_size, int(rng.integers(4, DUMP_SEQ))).astype(np.int32)
            for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_data")
    model = create_model(CONFIG, seed=5)
    save_model(model, root / "teacher")
    documents = _documents(0, 24)
    corpus = str(root / "corpus.array_record")
    write_token_records(corpus, documents)
    dump(DumpConfig(corpus=[corpus], output_dir=str(root / "logits"), teacher_orbax_dir=str(root / "teacher"),
                    data_format="tokens", batch_size=4, seq_len=DUMP_SEQ, documents_per_shard=10,
                    **TRUNCATION))
    teacher = jax.jit(lambda row: truncate_with_tail(model(row), **TRUNCATION))
    expected = {}
    for index, tokens in enumerate(documents):
        row = np.zeros((1, DUMP_SEQ), np.int32)
        row[0, :len(tokens) - 1] = tokens[:-1]
        ids, probs, tail = (np.asarray(x)[0, :len(tokens) - 1] for x in teacher(jnp.asarray(row)))
        expected[index] = (ids, probs, tail)
    return root, documents, corpus, expected


def _factory(root, corpus, **kwargs):
    args = dict(seed=0, process_index=0, process_count=1, paths=corpus, logits_dir=str(root / "logits"),
                data_format="tokens", seq_len=16, global_batch_size=4, shuffle=False, num_epochs=1)
    args.update(kwargs)
    return offline_distill_data(**args)


def _locate(documents, seq_len):
    """(tokens of a window + its last target) -> (document, first position): every window the
    pipeline can cut (random documents: no two windows share their tokens)."""
    table = {}
    for index, tokens in enumerate(documents):
        for start in range(0, len(tokens) - 1, seq_len):
            stop = min(start + seq_len, len(tokens) - 1)
            table[tuple(tokens[start:stop + 1])] = (index, start)
    return table


@pytest.mark.parametrize("packing", [True, False])
def test_teacher_aligned_through_windows_and_packing(setup, packing):
    root, documents, corpus, expected = setup
    dataset = _factory(root, corpus, packing=packing, with_tail=True)
    fmt = LogitsFormat(CONFIG.vocab_size, TRUNCATION["top_k"])
    table = _locate(documents, 16)
    seen, rows_with_many_segments = set(), 0
    for batch in dataset:
        batch_spec_of(dataset).check(batch)
        for r in range(batch["inputs"].shape[0]):
            segments = batch["segment_ids"][r]
            rows_with_many_segments += segments.max() > 1
            assert np.all(batch["teacher_probs"][r][segments == 0] == 0)
            assert np.all(batch["teacher_tail"][r][segments == 0] == 0)
            for segment in range(1, segments.max() + 1):
                at = np.flatnonzero(segments == segment)
                window = (*batch["inputs"][r, at], batch["targets"][r, at[-1]])
                document, start = table[window]
                seen.add((document, start))
                want_ids, want_probs, want_tail = (x[start:start + len(at)] for x in expected[document])
                got_ids, got_probs = batch["teacher_ids"][r, at], batch["teacher_probs"][r, at]
                kept = want_probs > 0
                assert kept.any(-1).all()  # every input position has a next token
                np.testing.assert_array_equal(got_probs > 0, kept)
                np.testing.assert_array_equal(got_ids[kept], want_ids[kept])
                assert np.all(np.abs(got_probs - want_probs) <= fmt.prob_error_bound(want_probs) + 1e-6)
                np.testing.assert_allclose(batch["teacher_tail"][r, at], want_tail, atol=2e-5)
    assert len(seen) > 0.7 * len(table)  # the final partial batch is dropped
    assert sum(len(d) > 17 for d in documents) > 5  # windows were cut
    if packing:
        assert rows_with_many_segments > 0


def test_batch_spec_declares_teacher_keys(setup):
    root, _, corpus, _ = setup
    spec = batch_spec_of(_factory(root, corpus)).features
    assert spec["teacher_ids"] == FeatureSpec("int32", ("act_batch", "act_seq", None))
    assert spec["teacher_probs"] == FeatureSpec("float32", ("act_batch", "act_seq", None))
    assert "teacher_tail" not in spec
    batch = next(iter(_factory(root, corpus)))
    assert batch["teacher_ids"].shape == batch["teacher_probs"].shape == (4, 16, TRUNCATION["top_k"])


def test_other_corpus_refused(setup, tmp_path):
    root, documents, corpus, _ = setup
    fewer = str(tmp_path / "fewer.array_record")
    write_token_records(fewer, documents[:-1])
    with pytest.raises(TeacherLogitsError, match="dumped for 24 documents, the corpus has 23"):
        _factory(root, fewer)
    first_changed = str(tmp_path / "first.array_record")
    write_token_records(first_changed, [documents[0][::-1], *documents[1:]])
    with pytest.raises(TeacherLogitsError, match="record 0.*another document"):
        _factory(root, first_changed)
    later_changed = str(tmp_path / "later.array_record")
    write_token_records(later_changed, [*documents[:5], documents[5][:-1], *documents[6:]])
    with pytest.raises(DataFormatError, match="record 5.*another document"):
        for _ in _factory(root, later_changed, shuffle=False):
            pass
    with pytest.raises(TeacherLogitsError, match="field None, reading 'tokens' field 'ids'"):
        _factory(root, corpus, field="ids")


def test_incomplete_dump_refused(setup, tmp_path):
    root, _, corpus, _ = setup
    copy = tmp_path / "logits"
    os.makedirs(copy)
    for name in os.listdir(root / "logits"):
        if name != "shard-00001-of-00003.done.json":
            (copy / name).write_bytes((root / "logits" / name).read_bytes())
    with pytest.raises(TeacherLogitsError, match="shard-00001-of-00003.array_record: shard incomplete"):
        _factory(root, corpus, logits_dir=str(copy))


@pytest.mark.parametrize("loss_type", ["kl", "soft_ce"])
def test_stored_teacher_gives_the_online_loss(setup, loss_type):
    """DistillObjective offline on the factory's batches == online with the same teacher, within
    the stored precision (whole documents per segment: both teachers see the same context)."""
    root, _, corpus, _ = setup
    batch = {k: jnp.asarray(v) for k, v in next(iter(_factory(root, corpus, seq_len=DUMP_SEQ))).items()}
    assert int(batch["segment_ids"].max()) > 1
    settings = dict(top_k=TRUNCATION["top_k"], top_p=TRUNCATION["top_p"],
                    temperature=TRUNCATION["temperature"], loss_type=loss_type, alpha=ConstantAlpha(0.9))
    online = DistillObjective(mode="online", teacher=CONFIG, teacher_orbax_dir=str(root / "teacher"), **settings)
    mesh = make_mesh((1, 1, 1, 1), jax.devices()[:1])
    frozen = online.frozen_state(StateContext(mesh, CONFIG, lambda: None, param_shardings(CONFIG, mesh), False))
    graphdef, _ = model_graph(CONFIG)
    params = random_params(CONFIG, 7)

    def mean_loss(objective, batch, frozen):
        inputs = StepInputs(jax.random.key(0), jnp.asarray(0, jnp.int32), frozen)
        out = objective.loss(nnx.merge(graphdef, params), batch, inputs)
        return float(out.total / out.weight)

    offline_loss = mean_loss(DistillObjective(**settings), batch, None)
    online_loss = mean_loss(online, {k: v for k, v in batch.items() if not k.startswith("teacher_")}, frozen)
    assert abs(offline_loss - online_loss) < 1e-3, (offline_loss, online_loss)


@pytest.mark.slow  # the trainer end to end on 8 devices
def test_trainer_runs_on_the_stored_teacher(setup, tmp_path):
    root, _, corpus, _ = setup
    from training_helpers import metric_rows

    from glmjax.training.trainer import train

    data = functools.partial(offline_distill_data, paths=corpus, logits_dir=str(root / "logits"),
                             data_format="tokens", seq_len=32, global_batch_size=8)
    objective = DistillObjective(top_k=TRUNCATION["top_k"], loss_type="kl", alpha=ConstantAlpha(0.9))
    train(model_dir=str(tmp_path / "run"), model_config=CONFIG, train_data=data, train_steps=3,
          objective=objective, mesh_shape=(4, 2, 1, 1), log_every=1, checkpoint_every=100)
    rows = [r for r in metric_rows(str(tmp_path / "run")) if r["step"] > 0]
    assert len(rows) == 3 and all(np.isfinite(r["kd_token_loss"]) and r["kd_token_loss"] > 0 for r in rows)
