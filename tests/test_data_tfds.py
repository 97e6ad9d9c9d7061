"""TFDS datasets (array_record file format) as record sources, built and read without TensorFlow."""

import pickle
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from glmjax.data.encoders import RecordField  # noqa: E402
from glmjax.data.factories import lm_data  # noqa: E402
from glmjax.data.pipeline import make_lm_dataset  # noqa: E402
from glmjax.data.spec import batch_spec_of  # noqa: E402
from glmjax.data.tfds_source import TfdsSource  # noqa: E402
from glmjax.data.tokenizer import build_default_tokenizer, load_tokenizer  # noqa: E402

NAME = "glmjax_tiny_records"
NUM_RECORDS = 6
ONE_HOST = {"process_index": 0, "process_count": 1}


class GlmjaxTinyRecords(tfds.core.GeneratorBasedBuilder):
    """Text, chat and token records with a per-token and a per-example feature."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "messages": tfds.features.Sequence(
                {"role": tfds.features.Text(), "content": tfds.features.Text()}),
            "ids": tfds.features.Sequence(np.int32),
            "teacher": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            "score": np.float32,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(NUM_RECORDS), "test": self._generate_examples(1)}

    def _generate_examples(self, count):
        for i in range(count):
            ids = 100 * (i + 1) + np.arange(i + 3, dtype=np.int32)
            yield i, {
                "text": f"document {i}",
                "messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}],
                "ids": ids,
                "teacher": np.stack([ids, -ids], -1).astype(np.float32),
                "score": i / 2,
            }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tfds.disable_progress_bar()
    directory = tmp_path_factory.mktemp("tfds")
    GlmjaxTinyRecords(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_default_tokenizer(tmp_path_factory.mktemp("tok")))


def test_source_decodes_records_without_tensorflow(data_dir):
    source = TfdsSource(NAME, split="train", data_dir=data_dir)
    assert len(source) == NUM_RECORDS
    records = [source[i] for i in range(len(source))]
    assert sorted(r["text"] for r in records) == [f"document {i}" for i in range(NUM_RECORDS)]
    for record in records:
        i = int(record["text"].split()[1])
        assert record["messages"] == [{"role": "user", "content": f"question {i}"},
                                      {"role": "assistant", "content": f"answer {i}"}]
        np.testing.assert_array_equal(record["ids"], 100 * (i + 1) + np.arange(i + 3))
        assert record["teacher"].shape == (i + 3, 2) and record["score"] == i / 2
    assert source.location(0).endswith(f"{NAME}-train.array_record-00000-of-00001 record 0")
    assert pickle.loads(pickle.dumps(source))[1]["text"] == records[1]["text"]
    assert len(TfdsSource(NAME, split="test", data_dir=data_dir)) == 1
    with pytest.raises(IndexError):
        source[NUM_RECORDS]
    assert "tensorflow" not in sys.modules


def test_text_and_chat_datasets(data_dir, tokenizer):
    common = dict(tokenizer=tokenizer, tfds_name=NAME, tfds_data_dir=data_dir, seq_len=32,
                  global_batch_size=1, shuffle=False, num_epochs=1, packing=False, **ONE_HOST)
    texts = {tokenizer.decode(b["inputs"][0][b["segment_ids"][0] > 0].tolist())
             for b in make_lm_dataset(None, "text", **common)}
    assert texts == {f"[gMASK]<sop>document {i}" for i in range(NUM_RECORDS)}
    ds = make_lm_dataset(None, "chat", **common)
    answers = set()
    for batch in ds:
        batch_spec_of(ds).check(batch)
        answers.add(tokenizer.decode(batch["targets"][0][batch["loss_mask"][0] == 1].tolist()))
    assert answers == {f"\nanswer {i}<|user|>" for i in range(NUM_RECORDS)}
    assert "tensorflow" not in sys.modules


def test_tokens_with_features_through_the_factory(data_dir):
    ds = lm_data(
        seed=0, process_index=0, process_count=1, data_format="tokens", field="ids",
        tfds_name=NAME, tfds_data_dir=data_dir, seq_len=16, global_batch_size=2,
        num_epochs=1, shuffle=False, token_features={"teacher": RecordField("float32", (2,))},
        example_features={"score": RecordField("float32")}, max_segments_per_row=4)
    scores = []
    for batch in ds:
        batch_spec_of(ds).check(batch)
        real = batch["segment_ids"] > 0
        np.testing.assert_array_equal(batch["teacher"][..., 0], np.where(real, batch["inputs"], 0))
        for row in range(2):
            for j, score in enumerate(batch["score"][row]):
                docs = np.unique(batch["inputs"][row][batch["segment_ids"][row] == j + 1] // 100)
                assert score == ((docs[0] - 1) / 2 if len(docs) else 0)
                scores.append(float(score))
    assert len(scores) == 8 and set(scores) - {0.0} <= {i / 2 for i in range(NUM_RECORDS)}
    with pytest.raises(ValueError, match="either data paths or tfds_name"):
        make_lm_dataset("x.jsonl", "tokens", tfds_name=NAME, seq_len=8, global_batch_size=1,
                        **ONE_HOST)
