"""Compile time, step time/MFU, attention, memory against its floor, remat auto and decode speed.

  python -m experiments.benchmark --config=configs/benchmark.py:cpu --workdir=workdirs/bench_cpu

Writes results.csv and results.md to the workdir and prints the Markdown: one long table
(section, case, metric, value, unit) and PASS/FAIL per target. Every number is measured in this
run on the current backend; model FLOPs are counted by hand (keel_jax.flops) and MFU is
against the matmul peak measured here (and, on TPU/GPU, the nominal peak too).
Step times are the best of `step.repeats` steps, with all variants measured round-robin so that
load from other processes hits them alike; a Keel / Pre-LN time ratio is the median of the
per-round ratios (each pairs two steps run seconds apart), printed with their range. The step
table includes `PeerLM`, a plain Pre-LN Transformer written here the way a minimal Flax LM is
(einsum projections, nn.LayerNorm, learned positions, a Python loop of blocks), as the
yardstick for this codebase's speed.

Memory floor of a step: params + grads + the optimizer's two moments, plus the residual
carries the backward must keep (one [B, T, D] fp32 per block, or groups + group size with
√L nested remat), for one micro-batch.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from configs import default
from keel_jax import attention, builders, flops, loss, memory_floor, remat_auto, residual, sample
from keel_jax import steps as train_steps
from keel_jax.compiled import memory_report
from keel_jax.model import LM

MB = 1e6
COLUMNS = ("section", "case", "metric", "value", "unit")


# ---------------------------------------------------------------- building steps


def make_setup(
  model_overrides: dict, seq_len: int, batch_size: int, train_overrides: dict | None = None
) -> builders.Setup:
  """A one-device Setup with the overrides on configs/default.py (no dataset is built)."""
  config = default.get_config()
  config.model.update(model_overrides)
  config.data.seq_len = seq_len
  config.train.update(batch_size=batch_size, diag_every=0, grad_accum_steps=1)
  config.train.update(train_overrides or {})
  return builders.setup(config, jax.devices()[:1])


def init_state(s: builders.Setup, abstract: bool = False):
  """{step, params, opt_state} on one device (the trainer's init), or its shapes."""
  shapes, _, init_fn = builders.abstract_state(s)
  return shapes if abstract else jax.jit(init_fn)(jax.random.key(0))


def make_batch(s: builders.Setup, seed: int = 0) -> dict:
  shape = (s.config.train.batch_size, s.config.data.seq_len)
  tokens = jax.random.randint(jax.random.key(seed), shape, 0, s.model_cfg.vocab_size)
  return {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(shape)}


def compile_step(s: builders.Setup):
  """(compiled train step, seconds to trace, lower and compile it)."""
  state, batch = init_state(s, abstract=True), jax.eval_shape(lambda: make_batch(s))
  t0 = time.perf_counter()
  compiled = jax.jit(train_steps.make_train_step(s), donate_argnums=0).lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def num_params(s: builders.Setup) -> int:
  return sum(math.prod(a.shape) for a in jax.tree.leaves(init_state(s, abstract=True)["params"]))


def floor_bytes(s: builders.Setup, params: int) -> int:
  return memory_floor.floor_bytes(s.config, s.model_cfg, params)


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


# ---------------------------------------------------------------- sections


def bench_device(c, rows):
  """The measured matmul peak; bench_steps re-measures it between steps and keeps the best."""
  chains = [flops.matmul_chain(n) for n in c.matmul_sizes]
  best = max(fl / min(timed(f, a) for _ in range(3)) for f, a, fl in chains)
  return {"chains": chains, "best": best}


def report_device(rows, peak: dict):
  dev = jax.devices()[0]
  # Best over every measurement in the run: the highest peak gives the most conservative MFU.
  rows.insert(0, ("device", dev.device_kind, "matmul_peak_measured", peak["best"] / 1e9, "GFLOP/s"))
  nominal = flops.nominal_peak(dev)
  if nominal:
    rows.insert(1, ("device", dev.device_kind, "matmul_peak_nominal", nominal / 1e9, "GFLOP/s"))
  return nominal


def bench_compile(c, rows):
  """Trace+lower+compile time of the train step; best of `compile.repeats`, round-robin."""
  cases = {}
  for scan, depths in ((True, c.compile.scan_depths), (False, c.compile.unrolled_depths)):
    for depth in depths:
      model = {**c.compile.model, "num_blocks": residual.blocks(depth), "scan_layers": scan}
      cases[f"{'scan' if scan else 'unrolled'} L={depth}"] = model
  best = {case: float("inf") for case in cases}
  for r in range(c.compile.repeats):
    for case, model in cases.items():
      if r and case.startswith("unrolled"):
        continue  # slow to compile and far from any target: measured once
      s = make_setup(model, c.compile.seq_len, c.compile.batch_size)
      best[case] = min(best[case], compile_step(s)[1])  # a new function: a fresh trace
  for case, seconds in best.items():
    rows.append(("compile", case, "compile_s", seconds, "s"))


def bench_attention(c, rows):
  """Forward+backward of attention alone, at the step benchmark's shape."""
  cfg = make_setup(c.step.model, c.step.seq_len, c.step.batch_size).model_cfg
  b, t = c.step.batch_size, c.step.seq_len
  k, g, e = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, t, k, g, e), dtype)
  keys = jax.random.normal(kk, (b, t, k, e), dtype)
  vals = jax.random.normal(kv, (b, t, k, e), dtype)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  fns = {}
  for impl in c.attention_impls:
    fn = attention.get(impl)
    loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, pos, pos).astype(jnp.float32) ** 2)
    fns[impl] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    fns[impl](q, keys, vals)  # compile
  best = {impl: min(timed(f, q, keys, vals) for _ in range(c.repeats)) for impl, f in fns.items()}
  case_shape = f"B={b} T={t} H={cfg.num_heads} K={k} E={e}"
  for impl, seconds in best.items():
    rows.append(("attention", f"{impl} {case_shape}", "fwd_bwd_ms", seconds * 1e3, "ms"))
    if "reference" in best:
      speedup = best["reference"] / seconds
      rows.append(("attention", f"{impl} {case_shape}", "speedup_vs_reference", speedup, "x"))


# ---------------------------------------------------------------- the peer model


class PeerBlock(nn.Module):
  """Pre-LN block as a minimal Flax LM writes it: multi-head attention and a GELU MLP."""

  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    h, e = self.num_heads, d // self.num_heads
    init = nn.initializers.normal(0.02)
    y_BxTxD = nn.LayerNorm()(x_BxTxD)
    qkv_Dx3xHxE = self.param("qkv", init, (d, 3, h, e))
    q_BxTxHxE, k_BxTxHxE, v_BxTxHxE = jnp.einsum("btd,dshe->sbthe", y_BxTxD, qkv_Dx3xHxE)
    logits_BxHxTxT = jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxTxHxE) / math.sqrt(e)
    t = x_BxTxD.shape[1]
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    probs_BxHxTxT = jax.nn.softmax(jnp.where(causal_TxT, logits_BxHxTxT, -1e30), axis=-1)
    out_BxTxHxE = jnp.einsum("bhts,bshe->bthe", probs_BxHxTxT, v_BxTxHxE)
    x_BxTxD = x_BxTxD + jnp.einsum("bthe,hed->btd", out_BxTxHxE, self.param("o", init, (h, e, d)))
    y_BxTxD = nn.LayerNorm()(x_BxTxD)
    hidden_BxTxF = nn.gelu(
      jnp.einsum("btd,df->btf", y_BxTxD, self.param("w1", init, (d, self.d_ff)))
    )
    return x_BxTxD + jnp.einsum("btf,fd->btd", hidden_BxTxF, self.param("w2", init, (self.d_ff, d)))


class PeerLM(nn.Module):
  """Token + learned position embeddings, a Python loop of PeerBlocks, LayerNorm, a head."""

  vocab_size: int
  d_model: int
  num_heads: int
  num_blocks: int
  d_ff: int
  max_len: int

  @nn.compact
  def __call__(self, tokens_BxT):
    init = nn.initializers.normal(0.02)
    t = tokens_BxT.shape[1]
    embed_VxD = self.param("embed", init, (self.vocab_size, self.d_model))
    pos_TxD = self.param("pos", init, (self.max_len, self.d_model))
    x_BxTxD = embed_VxD[tokens_BxT] + pos_TxD[:t]
    for _ in range(self.num_blocks):
      x_BxTxD = PeerBlock(self.num_heads, self.d_ff)(x_BxTxD)
    x_BxTxD = nn.LayerNorm()(x_BxTxD)
    return jnp.einsum(
      "btd,dv->btv", x_BxTxD, self.param("head", init, (self.d_model, self.vocab_size))
    )


def compile_peer_step(s: builders.Setup):
  """PeerLM at s's width, depth, heads and vocabulary, with s's optimizer; its MLP is 4·d wide,
  so its 12·d² parameters per block equal ours (3·d² of GQA attention, 9·d² of SwiGLU).

  Returns (compiled step, (state, batch), facts) like the step section's variants.
  """
  cfg, t = s.model_cfg, s.config.train
  peer = PeerLM(cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.num_blocks, 4 * cfg.d_model,
                s.config.data.seq_len)  # fmt: skip
  batch = make_batch(s)
  params = jax.jit(peer.init)(jax.random.key(0), batch["inputs"])["params"]
  state = {"params": params, "opt_state": s.tx.init(params)}

  def step(state, batch):
    def loss_fn(params):
      logits_BxTxV = peer.apply({"params": params}, batch["inputs"])
      _, nll, count = loss.cross_entropy(logits_BxTxV, batch["targets"], batch["weights"])
      return nll / count

    value, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = s.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, {
      "train/loss": value
    }

  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  n = sum(a.size for a in jax.tree.leaves(params))
  # Its floor: the same state, and one carry per block (no remat, so far more is kept).
  floor = n * 16 + cfg.num_blocks * t.batch_size * s.config.data.seq_len * cfg.d_model * 4
  return compiled, (state, batch), dict(step_bytes=step_bytes(compiled), floor=floor, params=n)


def step_remats(c) -> tuple[str, ...]:
  """The remat policies the step section measures: "" (the model config's own), then extras."""
  return ("", *c.step.extra_remat_policies)


def bench_steps(c, rows, peak: dict):
  """Train-step time per attention implementation (Keel), and Keel vs Pre-LN at equal shape.

  The matmul peak is measured again in every round, under the same load as the steps.
  """
  auto = attention.resolve("auto")
  # (residual, attention, remat policy); ("peer", "einsum", "none") is PeerLM.
  variants = [("keel", impl, "") for impl in c.step.attention_impls]
  for remat in step_remats(c):
    variants += [(r, auto, remat) for r in c.step.residuals if (r, auto, remat) not in variants]
  steps, states, facts = {}, {}, {}
  for v in variants:
    scheme, impl, remat = v
    overrides = {**c.step.model, "residual": scheme, "attention_impl": impl}
    if remat:
      overrides["remat_policy"] = remat
    s = make_setup(overrides, c.step.seq_len, c.step.batch_size)
    steps[v], _ = compile_step(s)
    states[v] = (init_state(s), make_batch(s))
    params = num_params(s)
    facts[v] = dict(step_bytes=step_bytes(steps[v]), floor=floor_bytes(s, params), params=params)
    if scheme in ("keel", "pre_ln") and impl == auto:
      abstract = init_state(s, abstract=True), jax.eval_shape(lambda s=s: make_batch(s))
      facts[v]["dots"] = flops.count_matmuls(
        jax.make_jaxpr(train_steps.make_train_step(s))(*abstract).jaxpr
      )
  if c.step.peer:
    v = ("peer", "einsum", "none")
    variants.append(v)
    steps[v], states[v], facts[v] = compile_peer_step(s)
  tokens = c.step.batch_size * c.step.seq_len
  # Every variant has the same matmul shapes (norms are not counted): one FLOP count.
  flops_per_step = flops.train_flops_per_token(s.model_cfg, c.step.seq_len) * tokens
  times = {v: [] for v in variants}
  for r in range(c.step.repeats + 1):  # round-robin; the first round warms up
    for f, a, fl in peak["chains"]:
      peak["best"] = max(peak["best"], fl / timed(f, a))
    for v in variants:
      state, batch = states[v]
      t0 = time.perf_counter()
      state, out = steps[v](state, batch)
      jax.block_until_ready(out["train/loss"])
      states[v] = (state, batch)
      if r:
        times[v].append(time.perf_counter() - t0)
  best = {v: min(ts) for v, ts in times.items()}
  nominal = report_device(rows, peak)
  for v, seconds in best.items():
    case = step_case(c, *v)
    rows.append(("step", case, "step_ms", seconds * 1e3, "ms"))
    rows.append(("step", case, "tokens_per_s", tokens / seconds, "tok/s"))
    rows.append(("step", case, "params_m", facts[v]["params"] / 1e6, "M"))
    rows.append(("step", case, "step_bytes_mb", facts[v]["step_bytes"] / MB, "MB"))
    rows.append(("step", case, "floor_mb", facts[v]["floor"] / MB, "MB"))
    if "dots" in facts[v]:
      rows.append(("step", case, "matmuls", facts[v]["dots"], "count"))
    if v[0] == "peer":  # MFU would need its own FLOP count (full multi-head K/V)
      continue
    mfu = flops_per_step / seconds / peak["best"]
    rows.append(("step", case, "mfu_measured_peak", mfu, "fraction"))
    if nominal:
      rows.append(
        ("step", case, "mfu_nominal_peak", flops_per_step / seconds / nominal, "fraction")
      )
  if "pre_ln" in c.step.residuals:
    for remat in step_remats(c):
      keel, pre_ln = ("keel", auto, remat), ("pre_ln", auto, remat)
      case = f"keel/pre_ln attention={auto}" + (f" remat={remat}" if remat else "")
      # Paired within each round: drift in the load between rounds cancels.
      paired = sorted(k / p for k, p in zip(times[keel], times[pre_ln], strict=True))
      rows.append(("step", case, "step_time_ratio", float(np.median(paired)), "x"))
      rows.append(("step", case, "step_time_ratio_min", paired[0], "x"))
      rows.append(("step", case, "step_time_ratio_max", paired[-1], "x"))
      memory = facts[keel]["step_bytes"] / facts[pre_ln]["step_bytes"]
      rows.append(("step", case, "step_bytes_ratio", memory, "x"))
      rows.append(("step", case, "matmul_ratio", facts[keel]["dots"] / facts[pre_ln]["dots"], "x"))
  if c.step.peer:
    ratio = best["peer", "einsum", "none"] / best["keel", auto, ""]
    rows.append(("step", f"keel attention={auto} / peer", "tokens_per_s_ratio", ratio, "x"))


def step_case(c, scheme: str, impl: str, remat: str) -> str:
  shape = f"d={c.step.model['d_model']} T={c.step.seq_len}"
  if scheme == "peer":
    return f"peer (plain Pre-LN, einsum, no scan, no remat) {shape}"
  return f"{scheme} attention={impl}" + (f" remat={remat}" if remat else "") + f" {shape}"


def memory_point(spec: dict) -> dict:
  """Runs in a fresh process: compile and take two train steps; peak RSS and model facts."""
  s = make_setup(spec["model"], spec["seq_len"], spec["batch_size"], spec.get("train"))
  out = {"params": num_params(s)}
  out["floor_mb"] = floor_bytes(s, out["params"]) / MB
  if spec.get("steps", 2):
    compiled, _ = compile_step(s)
    out["step_bytes_mb"] = step_bytes(compiled) / MB
    state, batch = init_state(s), make_batch(s)
    for _ in range(spec.get("steps", 2)):
      state, metrics = compiled(state, batch)
    out["loss"] = float(metrics["train/loss"])
  else:  # baseline: the runtime alone, with one trivial jitted function
    jax.jit(lambda x: x + 1)(jnp.ones(())).block_until_ready()
  out["peak_rss_mb"] = peak_rss_bytes() / MB
  return out


def step_bytes(executable) -> int:
  """XLA's buffers for one step (what AOT compilation reports): arguments + outputs − donated +
  temporaries + code."""
  return memory_report(executable, None)["total"]


def peak_rss_bytes() -> int:
  """This process's peak RSS since it started.

  Linux's getrusage() maxrss survives exec: a child started by a big parent reports at least
  the parent's RSS at fork. VmHWM belongs to the new address space, so it starts from zero.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run_point(spec: dict) -> dict:
  code = (
    "import json, sys; from experiments.benchmark import memory_point; "
    "print(json.dumps(memory_point(json.loads(sys.argv[1]))))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, cwd=_ROOT
  )
  if proc.returncode:
    raise RuntimeError(f"memory point {spec} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _analysis_point(spec: dict) -> dict:
  """In this process, compile only: XLA's buffer sizes (no process RSS)."""
  s = make_setup(spec["model"], spec["seq_len"], spec["batch_size"], spec.get("train"))
  compiled, _ = compile_step(s)
  params = num_params(s)
  return {
    "params": params,
    "step_bytes_mb": step_bytes(compiled) / MB,
    "floor_mb": floor_bytes(s, params) / MB,
  }


def _remat(policy: str) -> dict:
  if policy == "nested":
    return {"remat_policy": "full", "nested_remat": True}
  return {"remat_policy": policy, "nested_remat": False}


def bench_memory(c, rows) -> list[dict]:
  """Peak memory vs depth and remat policy, and the deep model per optimizer-moment dtype; each
  beside its floor. Returns the deep rows' facts for the targets."""
  rss = c.memory.method == "rss"
  metric = "peak_rss_mb" if rss else "step_bytes_mb"
  run = _run_point if rss else _analysis_point
  specs = {}
  for depth in c.memory.depths:
    for policy in c.memory.policies:
      model_overrides = {**c.memory.model, "num_blocks": residual.blocks(depth), **_remat(policy)}
      spec = dict(model=model_overrides, seq_len=c.memory.seq_len, batch_size=c.memory.batch_size)
      specs[f"L={depth} remat={policy}"] = spec
  if rss:
    specs["baseline (runtime only)"] = dict(
      model=dict(c.memory.model), seq_len=8, batch_size=1, steps=0
    )
  workers = c.memory.parallel if rss else 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = dict(zip(specs, pool.map(run, specs.values()), strict=True))
  for case, res in results.items():
    rows.append(("memory", case, metric, res[metric], "MB"))
    if "step_bytes_mb" in res:
      if rss:  # XLA's own accounting: no runtime or compiler memory
        rows.append(("memory", case, "step_bytes_mb", res["step_bytes_mb"], "MB"))
      rows.append(("memory", case, "floor_mb", res["floor_mb"], "MB"))
      rows.append(("memory", case, "peak_over_floor", res[metric] / res["floor_mb"], "x"))
  d = c.deep.model
  remat = "nested" if d.get("nested_remat") else d.get("remat_policy", "full")
  deep = []
  for moments in c.deep.moment_dtypes:
    train_overrides = {"mu_dtype": moments, "nu_dtype": moments}
    spec = dict(model=dict(d), seq_len=c.deep.seq_len, batch_size=c.deep.batch_size,
                train=train_overrides)  # fmt: skip
    res = run(spec)  # one at a time: nothing else competes for memory
    case = f"L={2 * d['num_blocks']} d={d['d_model']} remat={remat} B={c.deep.batch_size}"
    case += f" T={c.deep.seq_len} moments={moments or 'float32'}"
    rows.append(("deep", case, "params_m", res["params"] / 1e6, "M"))
    rows.append(("deep", case, "floor_mb", res["floor_mb"], "MB"))
    rows.append(("deep", case, metric, res[metric], "MB"))
    if rss:
      rows.append(("deep", case, "step_bytes_mb", res["step_bytes_mb"], "MB"))
    rows.append(("deep", case, "peak_over_floor", res[metric] / res["floor_mb"], "x"))
    deep.append(dict(case=case, peak_mb=res[metric], floor_mb=res["floor_mb"]))
  return deep


def bench_auto(c, rows) -> dict:
  """remat_policy="auto" at the deepest memory shape, per budget; returns budget → choice.

  Each candidate is compiled once and its step bytes reused across budgets.
  """
  overrides = {
    **c.memory.model,
    "num_blocks": residual.blocks(max(c.memory.depths)),
    "remat_policy": "auto",
  }
  needed = {}

  def measure(s, backend):
    key = (s.model_cfg.remat_policy, s.model_cfg.nested_remat)
    if key not in needed:
      needed[key] = remat_auto.step_bytes(s, backend)
    return needed[key]

  chosen = {}
  for gb in c.auto.budgets_gb:
    s = make_setup(overrides, c.memory.seq_len, c.memory.batch_size, {"memory_budget_gb": gb})
    budget = remat_auto.budget_bytes(s.config, jax.devices()[0])
    case = f"L={max(c.memory.depths)} budget={budget / 1e9:.3g} GB" + ("" if gb else " (RAM)")
    try:
      _, choice = remat_auto.choose(s, jax.devices()[0], measure=measure)
      print(f"benchmark: {choice.summary()}", file=sys.stderr, flush=True)
      chosen[gb] = choice.name
      rows.append(("auto", f"{case} chose {choice.name}", "step_bytes_mb",
                   choice.needed[choice.name] / MB, "MB"))  # fmt: skip
    except ValueError as e:  # nothing fits: a result too
      print(f"benchmark: remat auto: {e}", file=sys.stderr, flush=True)
      chosen[gb] = "nothing fits"
      rows.append(("auto", f"{case} nothing fits", "budget_mb", budget / MB, "MB"))
  return chosen


def decode_point(c, depth: int) -> tuple[float, float, float]:
  """(prefill, KV-cache decode, re-forward) tokens/s at `depth` sub-layers."""
  d = c.decode
  s = make_setup({**d.model, "num_blocks": residual.blocks(depth)}, d.prompt_len, d.batch_size)
  cfg = dataclasses.replace(s.model_cfg, remat_policy="none")
  lm = LM(cfg)
  prompt_BxP = jax.random.randint(jax.random.key(1), (d.batch_size, d.prompt_len), 0, 256)
  params = jax.jit(lambda k: nn.unbox(lm.init(k, prompt_BxP)["params"]))(jax.random.key(0))
  prompts = np.asarray(prompt_BxP).tolist()
  stats = [  # compilation is excluded from each; best of two
    sample.generate_with_stats(cfg, params, prompts, d.new_tokens, vocab=256, temperature=0.0)[1]
    for _ in range(2)
  ]
  kv_tps = max(st.decode_tokens_per_s for st in stats)
  prefill_tps = max(st.prompt_tokens / st.prefill_s for st in stats)

  @jax.jit
  def forward(params, tokens_BxS, n):
    logits_BxSxV = lm.apply({"params": params}, tokens_BxS)
    return jnp.argmax(logits_BxSxV[:, n - 1], axis=-1)

  buckets = {}  # padded length → how many generated tokens re-run at it
  for n in range(d.prompt_len, d.prompt_len + d.new_tokens):  # the length before each token
    b = -(-n // d.bucket) * d.bucket
    buckets[b] = buckets.get(b, 0) + 1
  total = 0.0
  for b, count in buckets.items():
    tokens_BxS = jnp.zeros((d.batch_size, b), jnp.int32)
    forward(params, tokens_BxS, b).block_until_ready()  # compile
    total += count * min(timed(forward, params, tokens_BxS, b) for _ in range(c.repeats))
  return prefill_tps, kv_tps, d.batch_size * d.new_tokens / total


def bench_decode(c, rows) -> dict:
  """KV-cache generation (keel_jax.sample) vs re-running the whole growing sequence per token.

  The re-forward pads each length up to a multiple of `c.decode.bucket` (one compile per
  bucket, as a plain implementation would) and takes that position's logits; its time is the
  sum over generated tokens of its bucket's measured forward time. Returns depth → speed-up.
  """
  d = c.decode
  speedups = {}
  for depth in d.depths:
    prefill_tps, kv_tps, reforward_tps = decode_point(c, depth)
    case = f"L={depth} d={d.model['d_model']} B={d.batch_size} prompt={d.prompt_len}"
    case += f" new={d.new_tokens}"
    rows.append(("decode", case, "prefill_tokens_per_s", prefill_tps, "tok/s"))
    rows.append(("decode", case, "kv_decode_tokens_per_s", kv_tps, "tok/s"))
    rows.append(("decode", case, "reforward_tokens_per_s", reforward_tps, "tok/s"))
    speedups[depth] = kv_tps / reforward_tps
    rows.append(("decode", case, "kv_speedup", speedups[depth], "x"))
  return speedups


# ---------------------------------------------------------------- report


def measured_facts(rows) -> tuple[list, dict, dict]:
  """(deep rows, remat auto's choice per budget in GB (0: RAM), decode speed-up per depth),
  read back from the rows, so that targets can come from an earlier run's results.csv."""
  get = {(r[0], r[1], r[2]): r[3] for r in rows}
  deep = [
    dict(case=case, peak_mb=value, floor_mb=get["deep", case, "floor_mb"])
    for section, case, metric, value, _ in rows
    if section == "deep" and metric in ("peak_rss_mb", "step_bytes_mb")
    and (metric == "peak_rss_mb" or ("deep", case, "peak_rss_mb") not in get)
  ]  # fmt: skip
  chosen = {}
  for section, case, *_ in rows:
    if section == "auto":
      gb = 0.0 if "(RAM)" in case else float(case.split("budget=")[1].split()[0])
      chosen[gb] = case.split(" chose ")[1] if " chose " in case else "nothing fits"
  speedups = {
    int(case.split()[0][2:]): value
    for section, case, metric, value, _ in rows
    if section == "decode" and metric == "kv_speedup"
  }
  return deep, chosen, speedups


def targets(c, rows) -> list[tuple]:
  """(target, measured, threshold, PASS/FAIL, note) per target; thresholds are never tuned."""
  get = {(r[0], r[1], r[2]): r[3] for r in rows}
  deep, chosen, speedups = measured_facts(rows)
  thr = c.targets
  out = []
  first, last = min(c.compile.scan_depths), max(c.compile.scan_depths)
  if ("compile", f"scan L={last}", "compile_s") in get:  # a run of other sections has none
    ratio = (
      get["compile", f"scan L={last}", "compile_s"] / get["compile", f"scan L={first}", "compile_s"]
    )
    limit = thr["compile_ratio"]
    out.append(
      (f"compile time L={last} / L={first} (scan)", ratio, f"<= {limit}", ratio <= limit, "")
    )
  auto = attention.resolve("auto")
  d = c.step.model["d_model"]
  config_remat = {**default.get_config().model.to_dict(), **c.step.model}["remat_policy"]
  stepped = any(r[0] == "step" for r in rows)
  # One row per remat policy measured: the config's own (full recomputes the forward, which
  # MFU does not count, so it cannot exceed 0.75) and the extra ones.
  for remat in step_remats(c) if stepped else ():
    suffix = f" remat={remat}" if remat else ""
    label = suffix or f" remat={config_remat}"
    case = step_case(c, "keel", auto, remat)
    mfu = get["step", case, "mfu_measured_peak"]
    out.append((f"MFU at d={d},{label} (measured peak)", mfu, f">= {thr['mfu']}",
                mfu >= thr["mfu"], case))  # fmt: skip
    if "pre_ln" in c.step.residuals:
      key = f"keel/pre_ln attention={auto}{suffix}"
      ratio = get["step", key, "step_time_ratio"]
      lo, hi = get["step", key, "step_time_ratio_min"], get["step", key, "step_time_ratio_max"]
      limit = thr["keel_overhead"]
      name = f"1. Keel / Pre-LN step time at d={d},{label}"
      note = f"median of per-round ratios (range {lo:.3f}–{hi:.3f})"
      out.append((name, ratio, f"<= {limit}", ratio <= limit, note))
      if not remat:  # the config's own policy: memory and matmul count too
        mem = get["step", key, "step_bytes_ratio"]
        limit = thr["keel_memory"]
        out.append((f"1. Keel / Pre-LN step bytes at d={d},{label}", mem, f"<= {limit}",
                    mem <= limit, "compiled.memory_analysis()"))  # fmt: skip
        dots = get["step", key, "matmul_ratio"]
        keel_dots = get["step", step_case(c, "keel", auto, ""), "matmuls"]
        pre_dots = get["step", step_case(c, "pre_ln", auto, ""), "matmuls"]
        out.append((f"1. Keel / Pre-LN matmuls in the train step,{label}", dots, "<= 1.0",
                    dots <= 1.0, f"{keel_dots:.0f} vs {pre_dots:.0f}, scan bodies × length"))  # fmt: skip
  for row in deep:
    ratio = row["peak_mb"] / row["floor_mb"]
    limit = thr["deep_over_floor"]
    note = f"floor {row['floor_mb'] / 1e3:.2f} GB, peak {row['peak_mb'] / 1e3:.2f} GB"
    out.append((f"2. peak / floor, {row['case']}", ratio, f"<= {limit}", ratio <= limit, note))
  small, large = min([gb for gb in chosen if gb] or [0.0]), 0.0  # 0: the RAM
  if small and large in chosen:
    ok = chosen[small] in ("full", "nested") and chosen[large] in ("none", "branch")
    note = f"{small} GB → {chosen[small]}; RAM → {chosen[large]}"
    out.append(("3. remat auto: small budget → full/nested, large → none/branch",
                float(ok), "1", ok, note))  # fmt: skip
  for depth, speedup in speedups.items():
    limit = thr["decode_speedup"]
    out.append((f"4. KV-cache decode / re-forward tokens/s, L={depth}, "
                f"{c.decode.new_tokens} new tokens", speedup, f">= {limit}", speedup >= limit, ""))  # fmt: skip
  if c.step.peer and stepped:
    ratio = get["step", f"keel attention={auto} / peer", "tokens_per_s_ratio"]
    limit = thr["peer_speedup"]
    note = f"ours with remat={config_remat}; the peer keeps every activation"
    out.append((f"5. tokens/s ours / plain Pre-LN peer at d={d}", ratio, f">= {limit}",
                ratio >= limit, note))  # fmt: skip
  return [(name, value, thr, "PASS" if ok else "FAIL", note) for name, value, thr, ok, note in out]


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def markdown(c, rows, target_rows, seconds) -> str:
  memory = (
    "peak_rss = peak RSS (VmHWM) of a fresh process per point, JAX runtime and compilation "
    "included; step_bytes = compiled.memory_analysis() of the step (args + outputs − donated "
    "+ temporaries + code)"
    if c.memory.method == "rss"
    else "step_bytes = compiled.memory_analysis(): arguments + outputs − donated + temporaries + "
    "code"
  )
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  lines = [
    f"## Benchmark `{c.preset}` on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"{seconds:.0f} s",
    "",
    f"Host: {os.cpu_count()} CPUs, load average (1, 5, 15 min) at the end {load}: timings are "
    "only comparable on a quiet machine.",
    f"Memory: {memory}. Depth L counts sub-layers. Targets are stated for the `cpu` preset.",
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
  lines += ["", "| target | measured | threshold | result | note |", "|---|---|---|---|---|"]
  lines += ["| " + " | ".join(_fmt(v) for v in t) + " |" for t in target_rows]
  return "\n".join(lines) + "\n"


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SECTIONS = ("compile", "attention", "step", "decode", "auto", "memory")
# The row sections each benchmark section writes (the step section reports the device too).
ROW_SECTIONS = {"step": ("device", "step"), "memory": ("memory", "deep")}


def read_rows(path: str, skip: set[str]) -> list[tuple]:
  """Rows of an earlier run's results.csv, less those of the row sections in `skip`."""
  with open(path, newline="") as f:
    return [
      (r["section"], r["case"], r["metric"], float(r["value"]), r["unit"])
      for r in csv.DictReader(f)
      if r["section"] not in skip
    ]


def run(c, workdir: str, sections=SECTIONS, rows_from: str = "") -> tuple[list, list]:
  """Runs `sections` of preset `c` (the rest's rows read from `rows_from`, an earlier run's
  results.csv, if given); writes results.csv/.md to workdir; returns the tables."""
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise ValueError(f"--sections has unknown {unknown}; choose from {SECTIONS}")
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  rows: list[tuple] = []

  def write_rows():
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(COLUMNS)
      w.writerows(rows)

  def section(name, fn, *args):
    if name not in sections and name != "device":
      return {}
    t = time.perf_counter()
    out = fn(c, rows, *args)
    print(f"benchmark: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    write_rows()  # what is measured so far survives an interrupted run
    return out

  peak = section("device", bench_device) if "step" in sections else None
  section("compile", bench_compile)
  section("attention", bench_attention)
  section("step", bench_steps, peak)
  section("decode", bench_decode)
  section("auto", bench_auto)
  section("memory", bench_memory)  # last: its subprocesses would disturb the timings
  if rows_from:
    ran = {r for name in sections for r in ROW_SECTIONS.get(name, (name,))}
    order = [r for name in SECTIONS for r in ROW_SECTIONS.get(name, (name,))]
    rows = sorted(read_rows(rows_from, ran) + rows, key=lambda r: order.index(r[0]))
    write_rows()
  target_rows = targets(c, rows)
  bad = [r for r in rows if not np.isfinite(r[3])]
  if bad:
    raise RuntimeError(f"non-finite measurements: {bad}")
  with open(os.path.join(workdir, "targets.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("target", "measured", "threshold", "result", "note"))
    w.writerows(target_rows)
  md = markdown(c, rows, target_rows, time.perf_counter() - t0)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  print(md, flush=True)
  return rows, target_rows


def main(argv):
  del argv
  f = flags.FLAGS
  run(f.config, f.workdir, tuple(f.sections), f.rows_from)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "configs/benchmark.py:<preset>.")
  flags.DEFINE_string("workdir", None, "Where results.csv and results.md go.")
  flags.DEFINE_list("sections", list(SECTIONS), "Sections to measure.")
  flags.DEFINE_string(
    "rows_from", "", "An earlier run's results.csv: rows of the sections not measured now."
  )
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
