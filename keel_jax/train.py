"""The trainer: config → data → model → sharded train step → checkpoints and metrics."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from keel_jax import (
  builders,
  checkpoint,
  data,
  flops,
  metrics,
  optimizer,
  paths,
  remat_auto,
  sample,
  sharding,
  steps,
  tasks,
)
from keel_jax.data import tokenizers


class NonFiniteError(RuntimeError):
  """Raised when the loss or gradients stop being finite and config.train.nonfinite='stop'."""


# ---------------------------------------------------------------- validation


# Model settings that change only how the stack is computed and laid out in memory: a run may
# resume with other values (parameters are stored the same way whatever they say).
MEMORY_SETTINGS = ("scan_layers", "remat_policy", "remat_save_names", "nested_remat",
                   "attention_impl")  # fmt: skip
# Data settings that fix the vocabulary, hence the embedding's shape.
VOCAB_SETTINGS = ("tokenizer", "spm_vocab_size", "spm_model")
# Train settings that fix the stored optimizer state's dtypes ('' when absent from an older run).
STATE_DTYPE_SETTINGS = ("mu_dtype", "nu_dtype")


def check_resumable(workdir: str, config) -> None:
  """Raises ValueError naming the fields that differ when workdir holds checkpoints of
  another model (width, depth, scheme, vocabulary) or optimizer-state dtype than `config`
  describes."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  config_json = paths.join(workdir, "config.json")
  if not paths.exists(config_json) or not any(name.isdigit() for name in paths.listdir(ckpt_dir)):
    return
  old = paths.read_json(config_json)
  new = json.loads(config.to_json_best_effort())
  fields = [("model", k) for k in new["model"] if k not in MEMORY_SETTINGS]
  fields += [("data", k) for k in VOCAB_SETTINGS]
  fields += [("train", k) for k in STATE_DTYPE_SETTINGS]

  def value(cfg, sec, k):
    return cfg.get(sec, {}).get(k, "" if k in STATE_DTYPE_SETTINGS else None)

  differ = [
    f"{sec}.{k}: {value(old, sec, k)!r} → {value(new, sec, k)!r}"
    for sec, k in fields
    if value(old, sec, k) != value(new, sec, k)
  ]
  if differ:
    raise ValueError(
      f"workdir {workdir} holds checkpoints of another model ({'; '.join(differ)}, against "
      f"{config_json}); use a new workdir or set those fields back"
    )


def setup(config, workdir: str | None, devices=None) -> builders.Setup:
  """Validates the whole config and builds data, model config, mesh and optimizer.

  Raises ValueError with one line saying what to change; writes nothing to workdir.
  With workdir=None (a run that is not trained, e.g. a benchmark) the training-only checks
  are skipped.
  """
  t = config.train
  if workdir is not None:
    paths.check_writable(workdir)
  optimizer.validate(t)
  for name in ("log_every", "eval_every", "checkpoint_every", "diag_every"):
    if t[name] < 0:
      raise ValueError(f"config.train.{name}={t[name]} must be >= 0 (0 disables)")
  if t.nonfinite not in ("stop", "skip"):
    raise ValueError(f"config.train.nonfinite={t.nonfinite!r}: use 'stop' or 'skip'")
  if t.grad_accum_steps < 1:
    raise ValueError(f"config.train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
  # Mesh and batch first: a mistake there fails before a corpus is read.
  builders.mesh_and_rules(config, devices, check_batch=workdir is not None)
  if workdir is not None:
    task_list(config)  # a bad task name or an unprepared dataset fails before training
  dataset = data.make(config.data, seed=t.seed)
  if workdir is not None and dataset.num_train_windows < t.batch_size:  # rarely what was meant
    logging.warning(
      "the train split has %d sequences of config.data.seq_len + 1 tokens, fewer than "
      "config.train.batch_size=%d: every batch repeats sequences",
      dataset.num_train_windows,
      t.batch_size,
    )
  s = builders.setup(config, devices, tokenizer=dataset.tokenizer, check_batch=workdir is not None)
  s.dataset = dataset
  return s


def task_list(config) -> list:
  """The downstream tasks config.train.task_eval_every runs ([] when off), checked: names
  known, TFDS data prepared (opened, not read)."""
  t = config.train
  every = t.get("task_eval_every", 0)
  if every < 0:
    raise ValueError(f"config.train.task_eval_every={every} must be >= 0 (0 disables)")
  if t.get("task_limit", 0) < 0:
    raise ValueError(f"config.train.task_limit={t.task_limit} must be >= 0 (0 = all examples)")
  if not every:
    return []
  try:
    chosen = tasks.for_config(t.get("tasks", "arith"), config)
  except ValueError as e:
    raise ValueError(f"config.train.tasks: {e}") from None
  for task in chosen:
    task.docs(config.data.data_dir or None)
  return chosen


def task_eval(s: builders.Setup, params, chosen: list) -> dict:
  """Scores `chosen` tasks → {tasks/<name>/<metric>: value, tasks/average: ...}."""
  t = s.config.train
  results = tasks.run_tasks(
    s.model_cfg,
    params,
    s.tokenizer,
    chosen,
    limit=t.get("task_limit", 0) or None,
    batch_size=t.batch_size,
    seq_len=s.config.data.seq_len,
    mesh=s.mesh,
    rules=s.rules,
    data_dir=s.config.data.data_dir or None,
  )
  row = {
    f"tasks/{name}/{metric}": v["value"]
    for name, r in results.items()
    for metric, v in r.items()
    if metric != "seconds"
  }
  if len(results) > 1:
    row["tasks/average"] = tasks.average(results)
  return row


# ---------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so the step in flight completes and is saved.

  With several processes each must save the same step (a save is collective; one host saving
  alone deadlocks), so every step gathers all hosts' flags and stops once any is set: the hosts
  see the same flags at the same step, however far apart the signals arrive. Not JAX's
  preemption sync point: orbax calls it too, with older steps from its background finalize,
  which can rewind a host's step count so that it misses the step the others stop at.
  """

  def __init__(self):
    self.requested = False
    self._signalled = False
    self._old = None
    self._hosts = jax.process_count()

  def poll(self) -> bool:
    """Whether to save the step just run and stop; every host must call it at every step."""
    if not self.requested:
      flag = np.int32(self._signalled)
      flags = multihost_utils.process_allgather(flag) if self._hosts > 1 else flag
      self.requested = bool(np.any(flags))
    return self.requested

  def __enter__(self):
    try:  # replaces JAX's own SIGTERM handler (its preemption notifier): this flag decides
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. notebooks): no preemption handling
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def host_block(batch_sharding, batch_size: int, seq_len: int) -> tuple[int, int]:
  """(index, count) of the contiguous block of global batch rows this process feeds.

  Read off the sharding rather than assumed from the process index: the mesh's
  device order decides which rows land on this host's devices.
  """
  index_map = batch_sharding.addressable_devices_indices_map((batch_size, seq_len))
  ranges = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  lo, hi = ranges[0][0], ranges[-1][1]
  contiguous = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
  if not contiguous or batch_size % (hi - lo) or lo % (hi - lo):
    raise ValueError(
      f"this host's batch rows {ranges} are not one aligned block of {batch_size}; "
      "order config.mesh.axes so that 'data'/'fsdp' follow the host boundaries"
    )
  return lo // (hi - lo), batch_size // (hi - lo)


def _global_batch(local: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


class _Bookkeeping:
  """The loop's host side: NaN policy, throughput window, logging cadence, last metrics.

  Time spent on eval, tasks and checkpoints (`aside`) is excluded from tokens/s.
  """

  def __init__(self, config, writer, ckpt, tokens_per_step: int, flops_per_token, peak):
    self.t, self.writer, self.ckpt = config.train, writer, ckpt
    self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
    self.last: dict = {}
    self.skipped = 0
    self._new_window()

  def _new_window(self):
    self.losses, self.t0, self.excluded = [], time.perf_counter(), 0.0

  @contextlib.contextmanager
  def aside(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - t0

  def write(self, step: int, row: dict) -> None:
    self.writer.write(step, row)
    self.last.update(row)

  def step(self, step: int, out) -> None:
    """Host side of step `step`: its metrics were computed on device already."""
    t = self.t
    out = jax.device_get(out)
    if not bool(out["finite"]):
      if t.nonfinite == "stop":
        raise NonFiniteError(
          f"non-finite loss or gradient at step {step}; stopped. Last good checkpoint: "
          f"step {self.ckpt.latest_step()} in {self.ckpt.directory}. Lower "
          "config.train.learning_rate or set config.train.nonfinite='skip'"
        )
      self.skipped += 1
    self.losses.append(float(out["train/loss"]))
    if not t.log_every or (step % t.log_every and step != t.num_steps):
      return
    seconds = time.perf_counter() - self.t0 - self.excluded
    tps = len(self.losses) * self.tokens_per_step / max(seconds, 1e-9)
    row = {k: v for k, v in out.items() if k.startswith("train/")}
    row["train/loss"] = float(np.mean(self.losses))
    row["train/tokens_per_sec"] = tps
    row["train/mfu"] = tps * self.flops_per_token / self.peak
    row["train/skipped_steps"] = self.skipped
    if t.diag_every and (step % t.diag_every == 0 or step == t.num_steps):
      row.update({k: v for k, v in out.items() if k.startswith("diag/")})
    self.write(step, row)
    self.writer.progress(step, row["train/loss"], tps)
    self._new_window()


def train(config, workdir: str) -> dict:
  """Trains to config.train.num_steps, resuming from the newest checkpoint in workdir.

  Returns the last logged train and eval metrics.
  """
  # ---- Validate everything first: a bad config writes nothing.
  s = setup(config, workdir)
  check_resumable(workdir, config)
  t = config.train
  lead = jax.process_index() == 0
  if s.model_cfg.remat_policy == "auto":
    s, choice = remat_auto.choose(s, s.mesh.devices.flat[0])
    if lead:
      print(choice.summary(), flush=True)
  paths.makedirs(workdir)

  # ---- Sharded state: created directly on the mesh, or restored onto it.
  abstract, shardings, init_fn = builders.abstract_state(s)
  batch_sharding = sharding.batch_sharding(s.mesh, s.rules)
  block = host_block(batch_sharding, t.batch_size, config.data.seq_len)
  ckpt = checkpoint.Checkpointer(paths.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    if ckpt.latest_step() is not None:
      state, start = ckpt.restore(abstract)
      if lead:
        print(f"resumed from the checkpoint at step {start}", flush=True)
    else:
      state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(t.seed))
      start = 0
    # Written once the checkpoints restored: a failed resume leaves the run's files as they were.
    if lead:
      paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
      fingerprint = s.dataset.fingerprint
      paths.write_json(paths.join(workdir, "data_fingerprint.json"), fingerprint, indent=2)
      if s.tokenizer.name == "sentencepiece":  # sampling and evaluation read it, not the corpus
        paths.write_bytes(paths.join(workdir, tokenizers.RUN_FILE), s.tokenizer.model_proto)
    train_fn = jax.jit(
      steps.make_train_step(s),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    eval_fn = jax.jit(steps.make_eval_step(s), in_shardings=(shardings["params"], batch_sharding))

  num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"]))
  peak, peak_kind = flops.device_peak()
  writer = metrics.Writer(workdir, t.num_steps, enabled=lead)
  book = _Bookkeeping(
    config,
    writer,
    ckpt,
    t.batch_size * config.data.seq_len,
    flops.train_flops_per_token(s.model_cfg, config.data.seq_len),
    peak,
  )
  if lead:
    print(
      f"keel_jax: {s.model_cfg.residual} model, {s.model_cfg.num_sublayers} sub-layers, "
      f"{num_params / 1e6:.2f}M params, mesh {dict(s.mesh.shape)}, data {config.data.name}, "
      f"steps {start}→{t.num_steps}",
      flush=True,
    )
  if start == 0:
    writer.write(
      0,
      {
        "info/num_params": num_params,
        "info/peak_flops": peak,
        "info/peak_kind": peak_kind,
        "info/data_fingerprint": json.dumps(s.dataset.fingerprint, sort_keys=True),
      },
    )

  eval_batches = None
  chosen_tasks = task_list(config)
  pending = None  # (step, metrics) not yet fetched to the host
  # The steps trace at their first call: the rules must be active here, not only at jit().
  with _Preemption() as preempt, jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    try:
      for step in range(start, t.num_steps):
        batch = _global_batch(s.dataset.train_batch(step, t.batch_size, *block), batch_sharding)
        state, out = train_fn(state, batch)
        # Fetch step-1's metrics only now, with step queued: the device never waits on the host.
        if pending is not None:
          book.step(*pending)
        pending = (step + 1, out)
        done = step + 1
        save = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.num_steps
        stop = preempt.poll()
        if save or stop:
          book.step(*pending)  # never checkpoint a state that has not been checked finite
          pending = None
          with book.aside():
            ckpt.save(done, state, force=True)
        if (t.eval_every and done % t.eval_every == 0) or done == t.num_steps:
          with book.aside():
            if eval_batches is None:
              eval_batches = [
                _global_batch(b, batch_sharding)
                for b in s.dataset.eval_batches(t.batch_size, t.eval_batches, *block)
              ]
            row = steps.evaluate(eval_fn, state["params"], eval_batches, s.dataset.bytes_per_token)
            book.write(done, row)
          if lead:
            print(
              f"\nstep {done}: eval loss {row['eval/loss']:.4f}, "
              f"{row['eval/bits_per_byte']:.3f} bits/byte",
              flush=True,
            )
        every = t.get("task_eval_every", 0)
        if chosen_tasks and (done % every == 0 or done == t.num_steps):
          with book.aside():
            row = task_eval(s, state["params"], chosen_tasks)
            book.write(done, row)
          if lead:
            scores = ", ".join(f"{k[6:]} {v:.3f}" for k, v in row.items())
            print(f"step {done}: {scores}", flush=True)
        if preempt.requested:
          ckpt.wait()
          if lead:
            print(
              f"SIGTERM: saved checkpoint at step {done} in {ckpt.directory}; exiting.", flush=True
            )
          break
      if pending is not None:
        book.step(*pending)
      ckpt.wait()
    except BaseException:
      writer.abandon()
      raise
    finally:
      ckpt.close()
      writer.close()
  if lead and paths.exists(writer.path):
    path = metrics.plot_loss(workdir)
    print(f"loss curve: {path}", flush=True)
  if lead and t.sample_prompt and not preempt.requested:
    _print_sample(s, state["params"], t.sample_prompt)
  return {k: metrics.plain(v) for k, v in book.last.items()}


def _print_sample(s: builders.Setup, params, prompt: str) -> None:
  tok = s.tokenizer
  (out,) = sample.generate(
    s.model_cfg,
    jax.device_get(params),
    [sample.encode_prompt(tok, prompt)],
    256,
    vocab=tok.vocab_size,
    temperature=0.7,
    top_k=40,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
  )
  print(f"sample (temperature 0.7, top-k 40):\n{prompt}{tok.decode(out)}", flush=True)
