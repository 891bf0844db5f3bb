"""The trainer: config → data → model → sharded train step → checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from keel_jax import checkpoint, data, flops, loss, metrics, optimizer, paths, sharding
from keel_jax.model import LM, ModelConfig, sublayer_norms


class NonFiniteError(RuntimeError):
  """Raised when the loss or gradients stop being finite and config.train.nonfinite='stop'."""


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before a single file is written."""

  config: Any
  model_cfg: ModelConfig
  dataset: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule


# ---------------------------------------------------------------- validation


def model_config(config, vocab_size: int) -> ModelConfig:
  d = config.model.to_dict()
  if d["vocab_size"] == 0:
    d["vocab_size"] = -(-vocab_size // 64) * 64  # round up: friendlier matmul shapes
  elif d["vocab_size"] < vocab_size:
    raise ValueError(
      f"config.model.vocab_size={d['vocab_size']} is smaller than the tokenizer's "
      f"{vocab_size}; set it to 0 (automatic) or >= {vocab_size}"
    )
  return ModelConfig.from_dict(d)


# Model settings that change only how the stack is computed and laid out in memory: a run may
# resume with other values (parameters are stored the same way whatever they say).
MEMORY_SETTINGS = ("scan_layers", "remat_policy", "remat_save_names", "nested_remat",
                   "attention_impl")  # fmt: skip
# Data settings that fix the vocabulary, hence the embedding's shape.
VOCAB_SETTINGS = ("tokenizer", "spm_vocab_size", "spm_model")


def check_resumable(workdir: str, config) -> None:
  """Raises ValueError naming the fields that differ when workdir holds checkpoints of
  another model (width, depth, scheme, vocabulary) than `config` describes."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  config_json = paths.join(workdir, "config.json")
  if not paths.exists(config_json) or not any(name.isdigit() for name in paths.listdir(ckpt_dir)):
    return
  old = paths.read_json(config_json)
  new = json.loads(config.to_json_best_effort())
  fields = [("model", k) for k in new["model"] if k not in MEMORY_SETTINGS]
  fields += [("data", k) for k in VOCAB_SETTINGS]
  differ = [
    f"{sec}.{k}: {old.get(sec, {}).get(k)!r} → {new[sec].get(k)!r}"
    for sec, k in fields
    if old.get(sec, {}).get(k) != new[sec].get(k)
  ]
  if differ:
    raise ValueError(
      f"workdir {workdir} holds checkpoints of another model ({'; '.join(differ)}, against "
      f"{config_json}); use a new workdir or set those fields back"
    )


def setup(config, workdir: str | None, devices=None) -> Setup:
  """Validates the whole config and builds data, model config, mesh and optimizer.

  Raises ValueError with one line saying what to change; writes nothing to workdir.
  With workdir=None (reading a finished run) the training-only checks are skipped.
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
  mesh, rules = mesh_and_rules(config, devices, check_batch=workdir is not None)
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
  model_cfg = model_config(config, dataset.tokenizer.vocab_size)
  return Setup(
    config, model_cfg, dataset, mesh, rules, optimizer.optimizer(t), optimizer.schedule(t)
  )


def mesh_and_rules(config, devices=None, check_batch: bool = True):
  """The config's mesh over `devices` and its logical-axis rules; with check_batch, that the
  global batch splits over data parallelism × micro-batches."""
  t = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  dp = sharding.data_parallel_size(mesh, rules)
  if check_batch and t.batch_size % (dp * t.grad_accum_steps):
    raise ValueError(
      f"config.train.batch_size={t.batch_size} must divide by data parallelism ({dp}) × "
      f"grad_accum_steps ({t.grad_accum_steps}); use a multiple of {dp * t.grad_accum_steps}"
    )
  return mesh, rules


def task_list(config) -> list:
  """The downstream tasks config.train.task_eval_every runs ([] when off), checked: names
  known, TFDS data prepared (opened, not read), generation on one host only."""
  t = config.train
  every = t.get("task_eval_every", 0)
  if every < 0:
    raise ValueError(f"config.train.task_eval_every={every} must be >= 0 (0 disables)")
  if t.get("task_limit", 0) < 0:
    raise ValueError(f"config.train.task_limit={t.task_limit} must be >= 0 (0 = all examples)")
  if not every:
    return []
  from keel_jax import tasks

  try:
    chosen = tasks.for_config(t.get("tasks", "arith"), config)
  except ValueError as e:
    raise ValueError(f"config.train.tasks: {e}") from None
  for task in chosen:
    task.docs(config.data.data_dir or None)
    if isinstance(task, tasks.Generative) and jax.process_count() > 1:
      raise ValueError(
        f"config.train.tasks: {task.name!r} generates, which runs on one host only; drop it "
        "from the training loop and score it afterwards with keel_jax.evaluate"
      )
  return chosen


def task_eval(s: Setup, params, chosen: list) -> dict:
  """Scores `chosen` tasks → {tasks/<name>/<metric>: value, tasks/average: ...}."""
  from keel_jax import tasks

  t = s.config.train
  results = tasks.run_tasks(
    s.model_cfg,
    params,
    s.dataset.tokenizer,
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


# ---------------------------------------------------------------- state and steps


def abstract_state(s: Setup):
  """Shapes and shardings of {step, params, opt_state} for the current mesh, and init fn."""
  model = LM(s.model_cfg)
  tokens = jnp.zeros((1, s.config.data.seq_len), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens)["params"]
    # Optax maps over the logical boxes, so the optimizer state inherits axis names.
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": s.tx.init(params)}

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_sharding(boxed, s.mesh, s.rules)
  abstract = jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), nn.unbox(boxed), shardings
  )
  return abstract, shardings, lambda rng: nn.unbox(init(rng))


def make_train_step(s: Setup):
  model, t = LM(s.model_cfg), s.config.train
  accum = t.grad_accum_steps

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    total, nll, count = loss.cross_entropy(logits, batch["targets"], batch["weights"], t.z_loss)
    return total, (nll, count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]
    if accum == 1:
      (_, (nll, count)), grads = grad_fn(params, batch)
    else:
      # Strided micro-batches: every data shard holds a slice of each one.
      micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
      )

      def body(carry, mb):
        (_, (nll, count)), grads = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (grads, nll, count)), None

      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
      (grads, nll, count), _ = jax.lax.scan(body, zeros, micro)
    # Sums over tokens, normalized once: accumulation equals one big batch.
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss_value = nll / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = s.tx.update(grads, state["opt_state"], params)
    new = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(params, updates),
      "opt_state": opt_state,
    }
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    if t.nonfinite == "skip":
      kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
      new = {**kept, "step": state["step"] + 1}
    out = {
      "train/loss": loss_value,
      "train/grad_norm": grad_norm,
      "train/param_norm": optax.tree.norm(params),
      "train/update_norm": optax.tree.norm(updates),
      "train/learning_rate": s.schedule(state["step"]),
      "train/tokens": count,
      "finite": finite,
    }
    if t.diag_every:
      out["diag/grad_norm_per_sublayer"] = sublayer_norms(grads)
      out["diag/grad_rms_per_sublayer"] = sublayer_norms(grads, rms=True)
      out["diag/param_rms_per_sublayer"] = sublayer_norms(params, rms=True)
    return new, out

  return step


def make_eval_step(s: Setup):
  model = LM(s.model_cfg)

  def step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    _, nll, count = loss.cross_entropy(logits, batch["targets"], batch["weights"])
    return nll, count

  return step


def evaluate(s: Setup, eval_fn, params, batches) -> dict:
  nll, count = 0.0, 0.0
  for b in batches:
    n, c = jax.device_get(eval_fn(params, b))
    nll, count = nll + float(n), count + float(c)
  loss_value = nll / max(count, 1.0)
  return {
    "eval/loss": loss_value,
    "eval/perplexity": math.exp(min(loss_value, 50.0)),
    "eval/bits_per_byte": loss_value / math.log(2) / s.dataset.bytes_per_token,
  }


# ---------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so the step in flight completes and is saved.

  With several processes each must save the same step (a save is collective; one host saving
  alone deadlocks), so there JAX's preemption service catches SIGTERM and picks the step.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._sync = jax.process_count() > 1

  def poll(self, step: int) -> bool:
    """Whether to save `step` and stop; call it at every step (the hosts compare steps)."""
    if self._sync and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __enter__(self):
    if self._sync:  # our handler would hide SIGTERM from the preemption service
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. notebooks): no preemption handling
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

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
    from keel_jax import remat_auto  # it compiles steps with the AOT code, which imports this

    s, choice = remat_auto.choose(s, s.mesh.devices.flat[0])
    if lead:
      print(choice.summary(), flush=True)
  paths.makedirs(workdir)
  if lead:
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    paths.write_json(paths.join(workdir, "data_fingerprint.json"), s.dataset.fingerprint, indent=2)

  # ---- Sharded state: created directly on the mesh, or restored onto it.
  abstract, shardings, init_fn = abstract_state(s)
  batch_sharding = sharding.batch_sharding(s.mesh, s.rules)
  block = host_block(batch_sharding, t.batch_size, config.data.seq_len)
  ckpt = checkpoint.Checkpointer(paths.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    if ckpt.latest_step() is not None:
      state, start = ckpt.restore(abstract)
      if jax.process_index() == 0:
        print(f"resumed from the checkpoint at step {start}", flush=True)
    else:
      state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(t.seed))
      start = 0
    train_fn = jax.jit(
      make_train_step(s),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    eval_fn = jax.jit(make_eval_step(s), in_shardings=(shardings["params"], batch_sharding))

  num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"]))
  flops_per_token = flops.train_flops_per_token(s.model_cfg, config.data.seq_len)
  peak, peak_kind = flops.device_peak()
  tokens_per_step = t.batch_size * config.data.seq_len
  writer = metrics.Writer(workdir, t.num_steps, enabled=lead)
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
  last: dict = {}
  # Throughput window; time spent in eval and checkpointing is excluded from tokens/s.
  window = {"loss": [], "t0": time.perf_counter(), "steps": 0, "excluded": 0.0}
  skipped = 0

  def fetch(step: int, out) -> None:
    """Host side of step `step` (its metrics were computed on device already)."""
    nonlocal skipped, last
    out = jax.device_get(out)
    if not bool(out["finite"]):
      if t.nonfinite == "stop":
        raise NonFiniteError(
          f"non-finite loss or gradient at step {step}; stopped. Last good checkpoint: "
          f"step {ckpt.latest_step()} in {ckpt.directory}. Lower config.train.learning_rate "
          f"or set config.train.nonfinite='skip'"
        )
      skipped += 1
    window["loss"].append(float(out["train/loss"]))
    window["steps"] += 1
    if t.log_every and (step % t.log_every == 0 or step == t.num_steps):
      dt = time.perf_counter() - window["t0"] - window["excluded"]
      tps = window["steps"] * tokens_per_step / max(dt, 1e-9)
      row = {k: v for k, v in out.items() if k.startswith("train/")}
      row["train/loss"] = float(np.mean(window["loss"]))
      row["train/tokens_per_sec"] = tps
      row["train/mfu"] = tps * flops_per_token / peak
      row["train/skipped_steps"] = skipped
      if t.diag_every and (step % t.diag_every == 0 or step == t.num_steps):
        row.update({k: v for k, v in out.items() if k.startswith("diag/")})
      writer.write(step, row)
      writer.progress(step, row["train/loss"], tps)
      last = {**last, **row}
      window.update(loss=[], t0=time.perf_counter(), steps=0, excluded=0.0)

  pending = None
  # The steps trace at their first call: the rules must be active here, not only at jit().
  with _Preemption() as preempt, jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    try:
      for step in range(start, t.num_steps):
        batch = _global_batch(s.dataset.train_batch(step, t.batch_size, *block), batch_sharding)
        state, out = train_fn(state, batch)
        # Fetch step-1's metrics only now, with step queued: the device never waits on the host.
        if pending is not None:
          fetch(*pending)
        pending = (step + 1, out)
        done = step + 1
        save = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.num_steps
        stop = preempt.poll(done)
        if save or stop:
          fetch(*pending)  # never checkpoint a state that has not been checked finite
          pending = None
          t_aside = time.perf_counter()
          ckpt.save(done, state, force=True)
          window["excluded"] += time.perf_counter() - t_aside
        if (t.eval_every and done % t.eval_every == 0) or done == t.num_steps:
          t_aside = time.perf_counter()
          if eval_batches is None:
            eval_batches = [
              _global_batch(b, batch_sharding)
              for b in s.dataset.eval_batches(t.batch_size, t.eval_batches, *block)
            ]
          row = evaluate(s, eval_fn, state["params"], eval_batches)
          writer.write(done, row)
          last = {**last, **row}
          if lead:
            print(
              f"\nstep {done}: eval loss {row['eval/loss']:.4f}, "
              f"{row['eval/bits_per_byte']:.3f} bits/byte",
              flush=True,
            )
        every = t.get("task_eval_every", 0)
        if chosen_tasks and (done % every == 0 or done == t.num_steps):
          t_aside = time.perf_counter()
          row = task_eval(s, state["params"], chosen_tasks)
          writer.write(done, row)
          last = {**last, **row}
          window["excluded"] += time.perf_counter() - t_aside
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
        fetch(*pending)
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
  return {k: metrics.plain(v) for k, v in last.items()}


def _print_sample(s: Setup, params, prompt: str) -> None:
  from keel_jax import sample

  tok = s.dataset.tokenizer
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
