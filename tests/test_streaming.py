"""The Grain streaming pipeline for TFDS datasets (`keel_jax.data.streaming`), on mocked records."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import smoke
from keel_jax import data
from keel_jax.data import streaming

# Documents of different lengths whose text says which one it is ("<7>xxxx...").
DOCS = [f"<{i}>" + "abcdefghij"[i % 10] * (20 + 7 * (i % 13)) for i in range(60)]


class CountingRecords(list):
  """The records of a split; remembers which indices were read."""

  def __init__(self, records):
    super().__init__(records)
    self.read: set[int] = set()

  def __getitem__(self, i):
    self.read.add(int(i))
    return super().__getitem__(i)


@pytest.fixture
def make(tmp_path):
  splits = {}

  def source(self, split, **kw):
    del self, kw
    for name in split:
      splits.setdefault(name, CountingRecords([{"text": d.encode()} for d in DOCS]))
    return [splits[name] for name in split]

  def build(**overrides):
    cfg = smoke.get_config().data
    cfg.update(name="tiny_shakespeare", cache_dir=str(tmp_path), seq_len=16, **overrides)
    with tfds.testing.mock_data(as_data_source_fn=source):
      return data.make(cfg, seed=3)

  build.splits = splits
  return build


def doc_ids(ds, batch) -> set[int]:
  """Which documents a batch's tokens came from (their '<i>' tags)."""
  rows = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
  text = ds.tokenizer.decode(rows.ravel())
  return {int(t.split(">")[0]) for t in text.split("<")[1:] if ">" in t}


def test_tfds_streams_and_step_is_a_pure_function_of_seed_step_host(make):
  ds = make()
  assert isinstance(ds, streaming.StreamingDataset)
  assert ds.fingerprint["pipeline"] == "grain-stream"
  run = [ds.train_batch(s, 8) for s in range(6)]  # consecutive: the prefetching iterator
  fresh = make().train_batch(4, 8)  # a resumed run asks for step 4 first
  for k in fresh:
    assert fresh[k].tobytes() == run[4][k].tobytes()
  assert ds.train_batch(2, 8)["inputs"].tobytes() == run[2]["inputs"].tobytes()  # a jump back
  assert run[0]["inputs"].tobytes() != run[1]["inputs"].tobytes()
  other_seed = make()
  other_seed.seed = 4
  assert other_seed.train_batch(0, 8)["inputs"].tobytes() != run[0]["inputs"].tobytes()


def test_hosts_read_disjoint_records_and_rows_are_packed_documents(make):
  ds = make()
  train = make.splits["train"]
  train.read.clear()  # element s of steps() is what train_batch(s) returns, without prefetching
  h0 = [ds.steps(8, 0, 2)[s] for s in range(3)]
  read0, train.read = set(train.read), set()
  h1 = [ds.steps(8, 1, 2)[s] for s in range(3)]
  read1 = set(train.read)
  assert read0 and read1 and not read0 & read1  # each host reads only its own records
  assert all(b["inputs"].shape == (4, 16) for b in h0 + h1)
  assert not set().union(*(doc_ids(ds, b) for b in h0)) & set().union(*(doc_ids(ds, b) for b in h1))
  # Rows are consecutive tokens of documents separated by EOS; targets are inputs shifted.
  b = h0[0]
  assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
  assert set(np.unique(b["weights"])) <= {0.0, 1.0}


def test_an_epoch_visits_every_document_once_per_host_shard(make):
  ds = make()
  k = ds.docs_per_step(8)
  steps = ds.steps(8)
  seen = [doc for s in range(len(DOCS) // k) for doc in doc_ids(ds, steps[s])]
  assert len(seen) == len(set(seen)) > len(DOCS) // 2  # no document twice within the epoch


def test_eval_set_is_fixed_and_padding_has_weight_zero(make):
  ds = make()
  a, b = ds.eval_batches(8, 2), make().eval_batches(8, 2)
  assert all(x["inputs"].tobytes() == y["inputs"].tobytes() for x, y in zip(a, b, strict=True))
  big = ds.eval_batches(8, ds.num_val_windows // 8 + 2)
  assert big[-1]["weights"].sum() == 0
  assert ds.bytes_per_token > 0 and ds.fingerprint["num_val_docs"] == len(DOCS)


def test_cache_pipeline_is_still_available_for_tfds(make):
  ds = make(pipeline="cache")
  assert isinstance(ds, data.Dataset) and ds.fingerprint["num_train_docs"] == len(DOCS)
