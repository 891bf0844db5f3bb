"""Downstream tasks: the batched scorer against brute force, a task whose answer is known by
construction, every TFDS task end-to-end under tfds.testing.mock_data, the error paths and
sharded scoring on a fake 8-device mesh.

One tiny model config serves every test, so each scorer shape compiles once per module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from keel_jax import loss, tasks
from keel_jax.data import ByteTokenizer, tokenizers
from keel_jax.model import LM, ModelConfig
from keel_jax.tasks import catalog, scoring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=384, d_model=32, num_heads=2, num_kv_heads=1, num_blocks=2)


@functools.cache
def init_params(seed: int = 0):
  return nn.unbox(LM(CFG).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@functools.cache
def random_params():
  """O(1) random weights: log-likelihoods differ by O(1) between choices."""
  params = init_params()
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(
    treedef, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
  )


@functools.cache
def spm_tokenizer(tmp_dir: str):
  text = open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read()
  return tokenizers.train_sentencepiece([text] * 3, 384, os.path.join(tmp_dir, "t.model"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return spm_tokenizer(str(tmp_path_factory.mktemp("spm")))


@functools.cache
def full_forward(params_id: int):
  params = {id(random_params()): random_params(), id(init_params()): init_params()}[params_id]
  return jax.jit(lambda tokens_1xT: LM(CFG).apply({"params": params}, tokens_1xT)[0])


def brute_force(params, context: list[int], continuation: list[int], seq_len=None) -> float:
  """log p(continuation | context) from one unpadded forward over exactly these tokens."""
  seq = np.asarray(context + continuation)
  if seq_len is not None:
    seq = seq[-(seq_len + 1) :]
  scored = min(len(continuation), len(seq) - 1)
  logits_TxV = np.asarray(full_forward(id(params))(seq[None, :-1]), np.float64)
  logp_TxV = logits_TxV - np.log(np.exp(logits_TxV).sum(-1, keepdims=True))
  t = np.arange(len(seq) - 1 - scored, len(seq) - 1)
  return float(logp_TxV[t, seq[t + 1]].sum())


PAIRS = [
  ("Question: what is 2+2?\nAnswer:", " four"),
  ("short", " x, as everyone knows"),
  ("A much longer context that runs past the sequence length " * 3, " of the model's window"),
  ("ends with spaces  ", "tail"),
]


@pytest.mark.parametrize("which", ["byte", "sentencepiece"])
def test_batched_scorer_equals_unpadded_forward(which, request):
  tok = ByteTokenizer() if which == "byte" else request.getfixturevalue("spm")
  params = random_params()
  model = tasks.Model(CFG, params, tok, batch_size=3, seq_len=48)
  requests = [model.request(c, x) for c, x in PAIRS]
  assert any(len(c) + len(x) - 1 > 48 for c, x in requests)  # one is truncated from the left
  assert len({len(x) for _, x in requests}) > 2  # continuations of different lengths
  ll_N, greedy_N = model.loglikelihoods(PAIRS)
  want = [brute_force(params, c, x, seq_len=48) for c, x in requests]
  np.testing.assert_allclose(ll_N, want, rtol=1e-5, atol=1e-4)
  assert ll_N.dtype == np.float64 and greedy_N.dtype == bool
  # The split keeps every token: context + continuation re-encode the whole text.
  for (c, x), (ids_c, ids_x) in zip(PAIRS, requests, strict=True):
    assert tok.decode(ids_c[1:] + ids_x) == c + x and ids_c[0] == tok.eos_id


def test_greedy_flag_matches_argmax_decoding():
  params = random_params()
  tok = ByteTokenizer()
  context = [tok.eos_id] + tok.encode("abc")
  logits = full_forward(id(params))(np.asarray(context)[None])[-1]
  best = int(jnp.argmax(logits))
  _, greedy_N = scoring.loglikelihoods(CFG, params, [(context, [best]), (context, [best + 1])])
  assert greedy_N.tolist() == [True, False]


def test_window_truncates_from_the_left():
  inputs, targets, first = scoring.window([1, 2, 3, 4, 5], [6, 7], seq_len=4)
  assert inputs == [3, 4, 5, 6] and targets == [4, 5, 6, 7] and first == 2
  inputs, targets, first = scoring.window([1], [2, 3, 4, 5, 6, 7], seq_len=3)
  assert targets == [5, 6, 7] and first == 0  # the continuation's first tokens fall out


# ---------------------------------------------------------------- known by construction

WORDS = (" ok", " no", " up", " it")  # equal byte lengths: acc and acc_norm rank alike


def keyed_word(rng) -> tuple[str, str]:
  """A random word and its answer, which its first letter decides: a → ok, b → no, ..."""
  first = int(rng.integers(len(WORDS)))
  return "abcd"[first] + "".join(rng.choice(list("abcdefghij"), 4)), WORDS[first]


def keyed_task(n: int) -> tasks.MultipleChoice:
  """Context 'word:'; the four answers in a random order, the right one set by the word."""
  rng = np.random.default_rng(0)
  docs = []
  for _ in range(n):
    word, answer = keyed_word(rng)
    choices = [WORDS[i] for i in rng.permutation(len(WORDS))]
    docs.append({"context": f"{word}:", "choices": choices, "gold": choices.index(answer)})
  return tasks.MultipleChoice(
    name="keyed",
    docs=lambda data_dir: docs,
    options=lambda d: [(d["context"], c) for c in d["choices"]],
    gold=lambda d: d["gold"],
  )


def train_on_keyed_corpus(steps: int):
  """A tiny model trained on EOS-separated documents 'word: answer' (the rule of keyed_word)."""
  tok = ByteTokenizer()
  rng = np.random.default_rng(1)
  stream = []
  for _ in range(4000):
    word, answer = keyed_word(rng)
    stream += [tok.eos_id] + tok.encode(f"{word}:{answer}")
  stream = np.asarray(stream, np.int32)
  t = 32
  tx = optax.adam(3e-3)
  params = init_params(2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def f(p):
      logits = LM(CFG).apply({"params": p}, batch[:, :-1])
      _, nll, count = loss.cross_entropy(logits, batch[:, 1:], jnp.ones_like(batch[:, 1:]))
      return nll / count

    grads = jax.grad(f)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  starts = np.arange(0, len(stream) - t - 1)
  for _ in range(steps):
    idx = rng.choice(starts, 16)
    params, opt = step(params, opt, np.stack([stream[s : s + t + 1] for s in idx]))
  return params


def test_trained_model_finds_the_keyed_answer_untrained_is_at_chance():
  task = keyed_task(64)
  tok = ByteTokenizer()
  trained = tasks.run_tasks(CFG, train_on_keyed_corpus(300), tok, [task], batch_size=64)
  untrained = tasks.run_tasks(CFG, init_params(), tok, [task], batch_size=64)
  for metric in ("acc", "acc_norm"):
    assert trained["keyed"][metric]["value"] >= 0.9, trained
    assert 0.05 <= untrained["keyed"][metric]["value"] <= 0.5, untrained  # chance: 0.25
  assert untrained["keyed"]["acc"]["n"] == 64 and untrained["keyed"]["acc"]["stderr"] > 0


# ---------------------------------------------------------------- arith (generative)


def test_arith_problems_are_held_out_and_solvable():
  docs = catalog.arith_docs(num=50, steps=3, val_fraction=0.05)
  assert len(docs) == 50 and len({d["prompt"] for d in docs}) == 50
  from keel_jax.data import arith, sources

  train, _ = sources.arith_corpus(3, 5000, 0.05).splits
  prompts = {d["prompt"] for d in docs}
  assert not prompts & {doc[: doc.index("?") + 1] for doc in train}
  assert all(arith.solve(d["prompt"]) == d["answer"] for d in docs)


def test_generative_scoring_cuts_at_eos_and_stop(monkeypatch):
  docs = [{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}]
  answers = iter(["2", "5", "6\n\nQuestion: junk"])  # right, wrong, right after the stop

  def fake_greedy(self, prompts, max_new_tokens):
    assert prompts == ["Q: 1+1", "Q: 2+2", "Q: 3+3"] and max_new_tokens == 8
    return [next(answers) for _ in prompts]

  monkeypatch.setattr(tasks.Model, "greedy", fake_greedy)
  task = tasks.Generative(
    "toy", lambda _: docs, lambda d: f"Q: {d['q']}", lambda d: d["a"], 8, stop=("\n\n",)
  )
  r = tasks.run_tasks(CFG, None, ByteTokenizer(), [task])
  assert r["toy"]["exact_match"]["value"] == pytest.approx(2 / 3)
  assert catalog.last_number("so 1,234.5 then 72.") == "72"
  assert catalog.last_number("The answer is 1,000") == "1000"


def test_arith_task_runs_through_the_kv_cache():
  r = tasks.run_tasks(CFG, random_params(), ByteTokenizer(), "arith", limit=6, batch_size=4)
  row = r["arith"]["exact_match"]
  assert row["n"] == 6 and round(6 * row["value"]) == 6 * row["value"]
  json.dumps(r)  # plain Python numbers


# ---------------------------------------------------------------- TFDS tasks under mock_data

# One real-schema record per dataset (mock_data's random records break the datasets' own
# invariants, e.g. ARC's answer key among its labels); the keys are checked against each
# builder's features, so a renamed feature fails here.
FAKE = {
  "ai2_arc/ARC-Easy": {
    "id": b"q1",
    "question": b"Which is a liquid?",
    "choices": {"text": np.array([b"rock", b"water", b"iron"]), "label": np.array([0, 1, 2])},
    "answerKey": 1,
  },
  "piqa": {
    "id": b"p",
    "goal": b"Open a jar",
    "sol1": b"twist the lid",
    "sol2": b"eat it",
    "label": 0,
  },
  "hellaswag": {
    "activity_label": b"Cooking",
    "context": b"A man [title] cracks an egg.",
    "endings": np.array([b"He fries it.", b"He flies away.", b"It sings.", b"Rain."]),
    "label": np.int32(0),
    "split_type": b"indomain",
    "source_id": b"x",
  },
  "winogrande": {
    "sentence": b"The cup fell off the table because _ was slippery.",
    "option1": b"the cup",
    "option2": b"the table",
    "label": 0,
  },
  "openbookqa": {
    "question": {
      "stem": b"The sun is a",
      "choice_A": b"star",
      "choice_B": b"planet",
      "choice_C": b"moon",
      "choice_D": b"comet",
    },
    "answerKey": 0,
    "fact1": b"f",
    "humanScore": np.float32(1.0),
    "clarity": np.float32(1.0),
    "turkIdAnonymized": b"t",
  },
  "lambada": {"passage": b"She opened the door and saw her old friend"},
  "gsm8k": {
    "question": b"Tom has 3 apples and buys 4. How many?",
    "answer": b"3+4=7\n#### 7",
    "annotation": b"3+4=7",
    "short_answer": b"7",
  },
}
TFDS_TASKS = {  # task → its dataset (ARC-Challenge shares ARC-Easy's schema)
  "arc_easy": "ai2_arc/ARC-Easy",
  "arc_challenge": "ai2_arc/ARC-Easy",
  "piqa": "piqa",
  "hellaswag": "hellaswag",
  "winogrande": "winogrande",
  "openbookqa": "openbookqa",
  "lambada": "lambada",
  "gsm8k": "gsm8k",
}


def _mock(dataset: str, n: int):
  import tensorflow_datasets as tfds

  def as_data_source(self, split, **kwargs):
    del kwargs
    assert self.name == dataset.split("/")[0], self.name
    assert set(FAKE[dataset]) == set(self.info.features), sorted(self.info.features)
    return [FAKE[dataset]] * n

  return tfds.testing.mock_data(num_examples=n, as_data_source_fn=as_data_source)


@pytest.mark.parametrize("name", sorted(TFDS_TASKS))
def test_tfds_task_end_to_end_under_mock_data(name, tmp_path):
  task = tasks.TASKS[name]
  if isinstance(task, tasks.Generative):  # a few decode steps test the same path as 256
    task = dataclasses.replace(task, max_new_tokens=4)
  with _mock(TFDS_TASKS[name], 3):
    r = tasks.run_tasks(CFG, random_params(), ByteTokenizer(), [task], limit=2, seq_len=64)
  assert set(r) == {name} and set(r[name]) == {*task.metrics, "seconds"}
  for metric in task.metrics:
    assert r[name][metric]["n"] == 2 and 0.0 <= r[name][metric]["value"] <= 1.0
  # The prompt built from the record reads as intended (spot checks).
  doc = catalog.plain(FAKE[TFDS_TASKS[name]])
  if name == "winogrande":
    assert task.options(doc)[1] == (
      "The cup fell off the table because the table",
      " was slippery.",
    )
  if name == "hellaswag":
    assert task.options(doc)[0][0] == "Cooking: A man. cracks an egg."
  if name.startswith("arc"):
    assert task.gold(doc) == 1 and task.options(doc)[1][1] == " water"
  (tmp_path / "r.json").write_text(json.dumps(r))


def test_boolq_prompt_and_scoring(monkeypatch):
  """super_glue's builder needs TensorFlow to load its metadata (not installed here), so its
  records come through the same reader with the builder stubbed."""
  record = {"question": b"is the sky blue", "passage": b"The sky is blue.", "idx": 0, "label": 1}

  class Stub:
    def as_data_source(self, split):
      assert split == "validation"
      return [record] * 3

  monkeypatch.setattr(catalog, "_builder", lambda name, data_dir: Stub())
  task = tasks.TASKS["boolq"]
  r = tasks.run_tasks(CFG, random_params(), ByteTokenizer(), ["boolq"])
  assert r["boolq"]["acc"]["n"] == 3
  doc = catalog.plain(record)
  assert task.options(doc)[1] == ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", " yes")
  assert task.gold(doc) == 1


# ---------------------------------------------------------------- errors


def test_missing_dataset_names_the_build_command(tmp_path):
  import time

  t0 = time.perf_counter()
  with pytest.raises(ValueError) as e:
    tasks.run_tasks(CFG, None, ByteTokenizer(), ["piqa"], data_dir=str(tmp_path))
  assert time.perf_counter() - t0 < 20
  msg = str(e.value)
  assert (
    "\n" not in msg and f"tfds build piqa --file_format=array_record --data_dir={tmp_path}" in msg
  )


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown task 'piqaa'; known tasks: arith, arc_easy"):
    tasks.run_tasks(CFG, None, ByteTokenizer(), "arith,piqaa")


def test_markdown_table_and_average():
  r = {
    "arith": {"exact_match": {"value": 0.5, "stderr": 0.1, "n": 4}, "seconds": 1.0},
    "piqa": {
      "acc": {"value": 0.6, "stderr": 0.1, "n": 4},
      "acc_norm": {"value": 0.7, "stderr": None, "n": 4},
    },
  }
  assert tasks.average(r) == pytest.approx((0.5 + 0.7) / 2)  # piqa's primary is acc_norm
  table = tasks.markdown_table(r)
  assert "| piqa | acc_norm | 0.7000 |  | 4 |" in table and "| **average** |" in table


# ---------------------------------------------------------------- sharded == single device

SHARDED = """
import json, os
import jax
procs = int(os.environ["KEEL_PROCS"])
if procs > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(os.environ["KEEL_COORD"], procs, int(os.environ["KEEL_PROC_ID"]))
import flax.linen as nn, jax.numpy as jnp, numpy as np
from keel_jax import sharding, tasks
from keel_jax.data import ByteTokenizer
from keel_jax.model import LM, ModelConfig
from keel_jax.tasks import scoring
from configs import default

# Two KV heads: the tensor axis (2) splits them.
cfg = ModelConfig(vocab_size=384, d_model=32, num_heads=2, num_kv_heads=2, num_blocks=2)
boxed = jax.eval_shape(LM(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
mc = default.get_config().mesh
mc.shape = (2, 2, 2)
mesh, rules = sharding.make_mesh(mc), sharding.rules(mc)
shardings = sharding.logical_to_sharding(boxed, mesh, rules)

def init():
  params = nn.unbox(LM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape)
                                      for a, k in zip(leaves, keys)])

params = jax.jit(init, out_shardings=shardings)()  # the same values on any mesh
tok = ByteTokenizer()
pairs = [("Question: %d?" % i + " x" * i, " answer %d" % (i * 7)) for i in range(11)]
sharded = tasks.Model(cfg, params, tok, batch_size=4, seq_len=32, mesh=scoring.Mesh(mesh, rules))
ll, greedy = sharded.loglikelihoods(pairs)
out = {"sharded": ll.tolist(), "greedy": greedy.tolist(), "dp": sharded.mesh.data_parallel}
prompts = ["a=1,b=2,c=3;a+=b;a?", "b=9,c=0,a=4;c=b;c?", "a=5,b=5,c=5;b*=3;b?", "c=7;c-=1;c?"]
out["gen_sharded"] = sharded.greedy(prompts, 4)  # each host decodes its rows, gets them all
if procs == 1:  # single device
  local = jax.device_get(params)
  single = tasks.Model(cfg, local, tok, batch_size=4, seq_len=32)
  out["single"], out["single_greedy"] = [x.tolist() for x in single.loglikelihoods(pairs)]
  out["gen_single"] = single.greedy(prompts, 4)
print(json.dumps(out))
"""


def test_sharded_scoring_equals_single_device_and_every_host_agrees():
  """1 process × 8 fake devices and 2 processes × 4, both on a (2, 2, 2) mesh."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  base = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  runs = [
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "KEEL_PROCS": "1"},
    *[
      {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "KEEL_PROCS": "2",
        "KEEL_PROC_ID": str(i),
        "KEEL_COORD": f"127.0.0.1:{port}",
      }
      for i in range(2)
    ],
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", SHARDED],
      cwd=ROOT,
      env={**base, **extra},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for extra in runs
  ]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      assert p.returncode == 0, stderr[-3000:]
      outs.append(json.loads(stdout.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  one, *hosts = outs
  assert one["dp"] == 4
  np.testing.assert_allclose(one["sharded"], one["single"], rtol=1e-5, atol=1e-4)
  assert one["greedy"] == one["single_greedy"] and one["gen_single"] == one["gen_sharded"]
  assert len(set(one["gen_single"])) > 1  # answers differ: a row mix-up would show
  for h in hosts:  # each host scored its rows; every host has every score
    np.testing.assert_allclose(h["sharded"], one["sharded"], rtol=1e-5, atol=1e-5)
    assert h["greedy"] == one["greedy"] and h["gen_sharded"] == one["gen_single"]


def test_training_config_checks_its_tasks_before_training(tmp_path):
  from configs import default
  from keel_jax import train

  c = default.get_config()
  assert train.task_list(c) == []  # off by default
  c.train.task_eval_every = 5
  c.train.tasks = "arith,nope"
  with pytest.raises(ValueError, match="config.train.tasks: unknown task 'nope'"):
    train.task_list(c)
  c.train.tasks = "piqa"
  c.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match="tfds build piqa"):
    train.task_list(c)
  c.train.task_eval_every = -1
  with pytest.raises(ValueError, match="task_eval_every=-1 must be >= 0"):
    train.task_list(c)
