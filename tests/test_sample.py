"""Generation and checkpoint evaluation: the KV cache against the full forward for every residual
scheme, the sampler's filters and vocab mask, and the sample/evaluate command lines.

Compiled functions are shared: one jit per model config (`cache_case`), sampling settings are
traced (one `generate` compile serves greedy, temperature, top-k and top-p), and one smoke
workdir is trained per module.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel_jax import data, evaluate, metrics, restore, sample
from keel_jax.data import packing
from keel_jax.model import LM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64  # the model's (padded) vocabulary
TINY = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, num_blocks=4)
SCHEMES = ("keel", "pre_ln", "post_ln", "deepnorm", "sandwich", "mix_ln")
LENGTHS = (7, 4, 1)  # prompt lengths: row 0 fills the batch, rows 1 and 2 are left-padded
P, N = max(LENGTHS), 5  # padded prompt length, tokens decoded after the prompt


def make_cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**TINY, **overrides})


@functools.cache
def random_params(cfg: ModelConfig, seed: int = 0):
  """The model's parameter tree with O(1) random values, so logits differ by O(1)."""
  shapes = jax.eval_shape(LM(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys, strict=True):
    name = path[-1].key
    if name == "scale":
      out.append(jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5))
    elif name == "embed":
      out.append(jax.random.normal(key, leaf.shape))
    else:
      out.append(0.2 * jax.random.normal(key, leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def random_sequences(seed=0, vocab=VOCAB):
  return np.asarray(jax.random.randint(jax.random.key(seed), (len(LENGTHS), P + N), 0, vocab))


@functools.cache
def full_forward_fn(cfg: ModelConfig):
  return jax.jit(lambda params, tokens_BxT: LM(cfg).apply({"params": params}, tokens_BxT))


# ---------------------------------------------------------------- cache == full forward


@functools.cache
def cache_case(cfg: ModelConfig):
  """Row i: prompt seq[i, :L_i] (left-padded), then seq[i, L_i:L_i+N] decoded one at a time.

  Returns (full-forward logits [B, P+N, V], prefill logits [B, P, V], decode logits [B, N, V]).
  """
  seq_BxT = random_sequences()
  tokens_BxP = np.full((len(LENGTHS), P), VOCAB - 1, np.int32)  # pad ids must not matter
  positions_BxP = np.full((len(LENGTHS), P), sample.PAD_POS, np.int32)
  for i, n in enumerate(LENGTHS):
    tokens_BxP[i, P - n :] = seq_BxT[i, :n]
    positions_BxP[i, P - n :] = np.arange(n)
  lengths_B = np.array(LENGTHS)
  next_BxN = np.stack([seq_BxT[i, n : n + N] for i, n in enumerate(LENGTHS)])
  next_pos_BxN = lengths_B[:, None] + np.arange(N)

  @jax.jit
  def run(params):
    full = LM(cfg).apply({"params": params}, seq_BxT)
    pre, cache = sample.prefill(cfg, params, tokens_BxP, positions_BxP, P + N)

    def step(cache, tok_pos):
      logits_BxV, cache = sample.decode_step(cfg, params, cache, *tok_pos)
      return cache, logits_BxV

    _, dec_NxBxV = jax.lax.scan(step, cache, (next_BxN.T, next_pos_BxN.T))
    return full, pre, dec_NxBxV.swapaxes(0, 1)

  return jax.tree.map(np.asarray, run(random_params(cfg)))


CASES = {s: make_cfg(residual=s) for s in SCHEMES}
# √L nested remat stores the cache as [groups, group size, ...] plus a tail.
CASES["keel_nested"] = make_cfg(residual="keel", num_blocks=11, nested_remat=True)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_matches_full_forward(case):
  full, pre, dec = cache_case(CASES[case])
  assert np.std(full) > 0.5  # logits vary: the tolerance below is a real constraint
  np.testing.assert_allclose(pre[0], full[0, :P], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dec[0], full[0, P : P + N], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_left_padded_batch_matches_full_forward(case):
  full, pre, dec = cache_case(CASES[case])
  for i, n in enumerate(LENGTHS[1:], start=1):
    np.testing.assert_allclose(pre[i, P - n :], full[i, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dec[i], full[i, n : n + N], rtol=1e-5, atol=1e-5)


def test_decode_with_the_cache_mutable_is_refused():
  """The layer scan no longer returns the cache: mutable=["cache"] would leave it unchanged."""
  cfg = make_cfg(num_blocks=2)
  tokens_Bx1 = jnp.zeros((1, 1), jnp.int32)
  model = LM(cfg, decode=True)
  cache = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["cache"]
  with pytest.raises(ValueError, match="append_to_cache"):
    model.apply({"params": random_params(cfg), "cache": cache}, tokens_Bx1, mutable=["cache"])


def test_decode_program_does_not_grow_with_depth():
  """The lowered decode loop for 64 blocks is the 2-block one with other shapes."""

  def lowered_size(num_blocks):
    cfg = make_cfg(residual="mix_ln", num_blocks=num_blocks)
    params = jax.eval_shape(lambda: random_params.__wrapped__(cfg))
    _, cache = jax.eval_shape(
      lambda p: sample.prefill(
        cfg, p, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32), 8
      ),
      params,
    )
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "vocab": VOCAB}
    tok_B = jnp.zeros((2,), jnp.int32)
    lowered = sample._decode.lower(
      cfg, params, cache, tok_B, tok_B, settings, jax.random.key(0), steps=5
    )
    return len(lowered.as_text())

  small, deep = lowered_size(4), lowered_size(64)
  assert abs(deep - small) < 0.02 * small, (small, deep)


# ---------------------------------------------------------------- generate


KEEL = CASES["keel"]


def keel_generate(prompts, params=None, **kw):
  kw = {"vocab": VOCAB, "temperature": 0.0, **kw}
  params = random_params(KEEL) if params is None else params
  return sample.generate(KEEL, params, prompts, N, **kw)


def prompts_of(seq_BxT):
  return [seq_BxT[i, :n].tolist() for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_greedy_is_argmax_of_full_forward_on_its_own_output(seed):
  seq_BxT = random_sequences(seed)
  prompts = prompts_of(seq_BxT)
  outs = keel_generate(prompts, seed=0)
  assert all(len(o) == N for o in outs)
  # Each row continued by its own output, right-padded: causality keeps the padding unseen.
  text_BxT = np.zeros((len(LENGTHS), P + N), np.int32)
  for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
    text_BxT[i, : len(p) + N] = p + o
  logits = np.asarray(full_forward_fn(KEEL)(random_params(KEEL), text_BxT))
  for i, n in enumerate(LENGTHS):
    assert np.argmax(logits[i, n - 1 : n - 1 + N], axis=-1).tolist() == outs[i], i


def test_pad_to_changes_only_the_compiled_shape():
  """Extra left padding (pad_to, which lets task batches share a compile) is hidden by PAD_POS."""
  cfg = make_cfg()
  prompts = [random_sequences()[0, :7].tolist(), random_sequences()[1, :2].tolist()]
  kw = dict(vocab=VOCAB, temperature=0.0)
  want = sample.generate(cfg, random_params(cfg), prompts, N, **kw)
  assert sample.generate(cfg, random_params(cfg), prompts, N, pad_to=P + 6, **kw) == want


def test_greedy_is_deterministic_and_top_k_1_or_tiny_top_p_equal_greedy():
  prompts = prompts_of(random_sequences(seed=2))
  assert KEEL.remat_policy == "full"  # generate drops remat for its own copy only
  greedy, stats = sample.generate_with_stats(
    KEEL, random_params(KEEL), prompts, N, vocab=VOCAB, temperature=0.0
  )
  assert KEEL.remat_policy == "full"
  assert stats.prompt_tokens == len(LENGTHS) * P and stats.decode_tokens == len(LENGTHS) * (N - 1)
  assert stats.decode_s > 0 and stats.decode_tokens_per_s > 0
  assert keel_generate(prompts, seed=123) == greedy
  assert keel_generate(prompts, temperature=1.0, top_k=1, seed=7) == greedy
  assert keel_generate(prompts, temperature=1.0, top_p=1e-4, seed=7) == greedy
  # Plain sampling does depart from greedy, and a seed reproduces it.
  sampled = keel_generate(prompts, temperature=1.5, seed=7)
  assert sampled != greedy
  assert keel_generate(prompts, temperature=1.5, seed=7) == sampled
  assert keel_generate(prompts, temperature=1.5, seed=8) != sampled


def test_never_emits_ids_outside_the_tokenizer_vocab():
  tok_vocab = 40  # ids 40..63 are head padding
  params = jax.tree.map(lambda x: x, random_params(KEEL))
  params["head"] = params["head"].at[:, tok_vocab:].multiply(30.0)
  prompts = prompts_of(random_sequences(seed=3, vocab=tok_vocab))
  # The model puts almost all its mass on padding ids ...
  logits = np.asarray(full_forward_fn(KEEL)(params, random_sequences(seed=3, vocab=tok_vocab)))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  assert probs[..., tok_vocab:].sum(-1).mean() > 0.95
  # ... and an unmasked sampler emits them.
  assert max(max(o) for o in keel_generate(prompts, params, temperature=1.0)) >= tok_vocab
  for kw in (
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=5.0),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_k=100),
    dict(temperature=2.0, top_p=0.5),
  ):
    for seed in range(3):
      outs = keel_generate(prompts, params, vocab=tok_vocab, seed=seed, **kw)
      assert all(0 <= t < tok_vocab for o in outs for t in o), (kw, outs)


def test_generate_rejects_bad_arguments():
  prompts = [[1, 2]]
  for kw, match in (
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(vocab=VOCAB + 1), "vocab"),
  ):
    with pytest.raises(ValueError, match=match):
      keel_generate(prompts, **kw)
  with pytest.raises(ValueError, match="at least one token"):
    keel_generate([[1], []])
  with pytest.raises(ValueError, match="token ids"):
    keel_generate([[1, 50]], vocab=40)


# ---------------------------------------------------------------- filters and sampling


filter_fn = jax.jit(sample.filter_logits)


def test_top_p_keeps_the_minimal_nucleus():
  rng = np.random.default_rng(0)
  logits_BxV = rng.normal(size=(64, 24)).astype(np.float32) * 2
  for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
    for top_k in (0, 5):
      kept = np.isfinite(np.asarray(filter_fn(logits_BxV, 1.0, top_k, top_p, 20)))
      for row, keep in zip(logits_BxV, kept, strict=True):
        valid = row[:20]
        if top_k:  # top-p applies to the top-k distribution
          valid = np.where(valid >= np.sort(valid)[-top_k], valid, -np.inf)
        probs = np.exp(valid - valid.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        need = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        assert sorted(np.flatnonzero(keep)) == sorted(order[:need]), (top_p, top_k)


def test_filter_examples():
  logits = np.log(np.array([[0.05, 0.4, 0.3, 0.2, 0.05, 0.0001]], np.float32))
  kept = lambda *a: np.flatnonzero(np.isfinite(np.asarray(filter_fn(logits, *a))[0])).tolist()
  assert kept(1.0, 0, 0.65, 6) == [1, 2]
  assert kept(1.0, 0, 0.75, 6) == [1, 2, 3]
  assert kept(1.0, 0, 1.0, 6) == [0, 1, 2, 3, 4, 5]  # top_p = 1 keeps even the tiny one
  assert kept(1.0, 2, 1.0, 6) == [1, 2]
  assert kept(1.0, 0, 1.0, 3) == [0, 1, 2]  # ids >= vocab never survive
  assert kept(1.0, 9, 0.99, 2) == [0, 1]
  np.testing.assert_allclose(np.asarray(filter_fn(logits, 0.5, 0, 1.0, 6)), 2 * logits, rtol=1e-6)


def test_sample_frequencies_follow_temperature_top_k_and_top_p():
  logits_V = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], np.float32)  # id 5 is outside vocab=5
  n = 20_000
  pick = jax.jit(lambda rng, s: sample.pick(rng, jnp.broadcast_to(logits_V, (n, 6)), s))
  for temperature, top_k, top_p in ((0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.8)):
    s = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "vocab": 5}
    counts = np.bincount(np.asarray(pick(jax.random.key(0), s)), minlength=6)
    want = np.exp(logits_V[:5] / temperature)
    if top_k:
      want[np.argsort(-want)[top_k:]] = 0
    if top_p < 1:  # softmax = [.56, .21, .13, .08, .03]: the nucleus of 0.8 is ids 0, 1, 2
      want[3:] = 0
    want = np.append(want / want.sum(), 0.0)
    sigma = np.sqrt(want * (1 - want) / n) + 1e-9
    assert np.all(np.abs(counts / n - want) < 5 * sigma + 1e-4), (temperature, counts / n, want)


def test_prompts_open_like_training_documents():
  """The stream packs documents as `doc EOS doc EOS`: a document follows an EOS, never a BOS."""
  tok = smoke_tokenizer()
  stream = packing.pack([np.array(tok.encode("x=1;")), np.array(tok.encode("a?"))], tok.eos_id)
  ids = sample.encode_prompt(tok, "a?")
  k = len(tok.encode("x=1;"))
  assert stream[k : k + len(ids)].tolist() == ids


# ---------------------------------------------------------------- workdir and command lines


def smoke_tokenizer():
  from keel_jax.data import ByteTokenizer

  return ByteTokenizer()


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}  # no accelerator probing noise on stderr


def cli(module, *args):
  cmd = [sys.executable, "-m", f"keel_jax.{module}", *args]
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One smoke run on arith (so evaluate also scores exact match), shared by the module."""
  path = str(tmp_path_factory.mktemp("smoke_arith"))
  r = cli(
    "main",
    "--config=configs/smoke.py",
    f"--workdir={path}",
    "--config.data.name=arith",
    "--config.data.arith_num_problems=3000",
    "--config.train.task_eval_every=6",  # the training loop's downstream-task hook
    "--config.train.task_limit=8",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return path


@pytest.fixture(scope="module")
def smoke_run(workdir):
  return restore.load(workdir)


def test_sample_cli_prints_greedy_continuations_and_speed(workdir, smoke_run, tmp_path):
  texts = ["a=1,b=2,c=3;a+=b;a?", "b=9,c=0,a=4;c=b;c?"]
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(texts[:1] + [""] + texts[1:]) + "\n")  # blank lines skipped
  r = cli(
    "sample", f"--workdir={workdir}", f"--prompts_file={prompts_file}",
    "--temperature=0", "--max_new_tokens=12",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert "compile" in r.stderr and "tokens/s" in r.stderr, r.stderr
  tok = smoke_run.setup.tokenizer
  outs = sample.generate(
    smoke_run.setup.model_cfg,
    smoke_run.params,
    [sample.encode_prompt(tok, t) for t in texts],
    12,
    vocab=tok.vocab_size,
    temperature=0.0,
    eos_id=tok.eos_id,
  )
  for text, out in zip(texts, outs, strict=True):
    assert f"--- prompt {text!r} (step 12)\n{text}{tok.decode(out)}\n" in r.stdout, r.stdout


def test_evaluate_cli_writes_report(workdir):
  r = cli("evaluate", f"--workdir={workdir}", "--num_prompts=24")
  assert r.returncode == 0, r.stderr[-3000:]
  path = os.path.join(workdir, "eval_step_12.json")
  assert f"report: {path}" in r.stdout and "eval/exact_match" in r.stdout
  with open(path) as f:
    report = json.load(f)
  assert set(report) == {
    "step",
    "eval/loss",
    "eval/perplexity",
    "eval/bits_per_byte",
    "eval/exact_match",
    "exact_match_prompts",
    "eval_sequences",
    "data_fingerprint",
  }
  assert report["step"] == 12 and report["exact_match_prompts"] == 24
  # The trainer evaluated the same parameters on the same batches at step 12.
  (logged,) = [m for m in metrics.read(workdir) if m["step"] == 12 and "eval/loss" in m]
  assert report["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)
  assert report["eval/perplexity"] == pytest.approx(math.exp(report["eval/loss"]))
  fp = report["data_fingerprint"]
  bpt = fp["val_bytes"] / fp["num_val_tokens"]
  assert report["eval/bits_per_byte"] == pytest.approx(report["eval/loss"] / math.log(2) / bpt)
  assert fp["name"] == "arith"
  assert round(24 * report["eval/exact_match"], 6) in range(25)


def test_evaluate_tasks_cli_matches_the_training_loop(workdir):
  r = cli("evaluate", f"--workdir={workdir}", "--tasks=arith", "--limit=8", "--batch_size=8")
  assert r.returncode == 0, r.stderr[-3000:]
  path = os.path.join(workdir, "eval", "tasks_12.json")
  assert f"report: {path}" in r.stdout
  with open(path) as f:
    report = json.load(f)
  row = report["results"]["arith"]["exact_match"]
  assert report["step"] == 12 and report["tasks"] == ["arith"] and row["n"] == 8
  assert f"| arith | exact_match | {row['value']:.4f} |" in r.stdout
  # The trainer scored the same problems with the same parameters at step 12 (and at step 6).
  logged = [m for m in metrics.read(workdir) if "tasks/arith/exact_match" in m]
  assert [m["step"] for m in logged] == [6, 12]
  assert logged[-1]["tasks/arith/exact_match"] == row["value"]


def test_exact_match_scores_the_answer_up_to_eos(smoke_run, monkeypatch):
  tok = smoke_run.setup.tokenizer
  dataset = data.make(smoke_run.setup.config.data)
  problems = dataset.eval_prompts(8)

  def fake_generate(cfg, params, prompts, max_new_tokens, **kw):
    assert kw["temperature"] == 0.0 and kw["eos_id"] == tok.eos_id
    outs = []
    for i, (p, (q, a)) in enumerate(zip(prompts, problems, strict=True)):
      assert p == sample.encode_prompt(tok, q)
      assert max_new_tokens >= len(tok.encode(a)) + 1  # room for the answer and its EOS
      outs.append(tok.encode(a if i % 4 else a + "0"))  # every 4th answer is wrong
    return outs

  monkeypatch.setattr(sample, "generate", fake_generate)
  assert evaluate.exact_match_accuracy(smoke_run, dataset, 8) == 0.75


@pytest.mark.parametrize(
  "module,args,message",
  [
    ("sample", ["--workdir={tmp}/missing"], "error: no config.json in"),
    ("evaluate", ["--workdir={tmp}/no_ckpt"], "error: no checkpoint in"),
    ("sample", ["--workdir={workdir}", "--step=999"], "error: no checkpoint for step 999"),
    ("evaluate", ["--workdir={workdir}", "--step=999"], "error: no checkpoint for step 999"),
    ("sample", ["--workdir={workdir}", "--top_p=1.5"], "error: top_p=1.5 must be in (0, 1]"),
    ("sample", ["--workdir={workdir}", "--prompts_file={tmp}/none"], "error: cannot read"),
    (
      "evaluate",
      ["--workdir={workdir}", "--tasks=arith,nope"],
      "error: unknown task 'nope'; known tasks: arith, arc_easy",
    ),
    (
      "evaluate",
      ["--workdir={workdir}", "--tasks=piqa", "--data_dir={tmp}/tfds"],
      "error: TFDS dataset 'piqa' is not prepared",
    ),
  ],
)
def test_cli_errors_are_one_line(module, args, message, workdir, tmp_path):
  os.makedirs(tmp_path / "no_ckpt")
  with open(os.path.join(workdir, "config.json")) as src:
    (tmp_path / "no_ckpt" / "config.json").write_text(src.read())
  r = cli(module, *(a.format(tmp=tmp_path, workdir=workdir) for a in args))
  assert r.returncode != 0
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-3000:]
  assert not os.path.exists(tmp_path / "no_ckpt" / "checkpoints")  # nothing created


def test_importing_the_command_lines_defines_no_flags():
  """The trainer imports `sample` while its own --workdir flag exists: importing must not clash."""
  from absl import flags

  assert "prompts_file" not in flags.FLAGS and "num_prompts" not in flags.FLAGS
  assert callable(sample.define_flags) and callable(evaluate.define_flags)


def test_sample_and_tasks_need_no_training_data(tmp_path):
  """A SentencePiece run on a TFDS corpus keeps its tokenizer in the workdir: with the corpus and
  every cache deleted, sampling and task scoring still work, with the run's own tokenizer."""
  import shutil

  import tiny_tfds

  data_dir, cache, run = tmp_path / "tfds", tmp_path / "cache", str(tmp_path / "run")
  tiny_tfds.build(str(data_dir))
  r = cli(
    "main", "--config=configs/smoke.py", f"--workdir={run}", "--config.train.num_steps=2",
    f"--config.data.name={tiny_tfds.NAME}", f"--config.data.data_dir={data_dir}",
    f"--config.data.cache_dir={cache}", "--config.data.tokenizer=sentencepiece",
    "--config.data.spm_vocab_size=512", "--config.train.sample_prompt=",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  trained_with = json.load(open(os.path.join(run, "data_fingerprint.json")))["spm_sha256"]
  shutil.rmtree(data_dir)
  shutil.rmtree(cache)
  loaded = restore.load(run)
  tok = loaded.setup.tokenizer
  assert tok.name == "sentencepiece" and tok.fingerprint["spm_sha256"] == trained_with
  (out,) = sample.generate(
    loaded.setup.model_cfg, loaded.params, [sample.encode_prompt(tok, "def f(")], 4,
    vocab=tok.vocab_size, temperature=0.0, eos_id=tok.eos_id,
  )  # fmt: skip
  assert len(out) <= 4 and all(0 <= i < loaded.setup.model_cfg.vocab_size for i in out)
  report = evaluate.evaluate_tasks(run, "arith", limit=4, batch_size=4)
  assert report["results"]["arith"]["exact_match"]["n"] == 4
  with pytest.raises(ValueError, match="tfds build"):  # the eval loss does need the corpus
    evaluate.evaluate_run(run)
