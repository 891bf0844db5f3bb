"""Compile time, step time/MFU, attention speed and peak memory of the real train step, one run.

  python -m experiments.benchmark --config=configs/benchmark.py:cpu --workdir=workdirs/bench_cpu

Writes results.csv and results.md to the workdir and prints the Markdown: one long table
(section, case, metric, value, unit) and PASS/FAIL per target. Every number is measured in this
run on the current backend; model FLOPs are counted by hand (keel_jax.flops) and MFU is
against the matmul peak measured here (and, on TPU/GPU, the nominal peak too).
Step times are the best of `repeats` steps, with all variants measured round-robin so that
load from other processes hits them alike.
"""

from __future__ import annotations

import concurrent.futures
import csv
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
from absl import app, flags
from ml_collections import config_flags

from configs import default
from keel_jax import aot_compile, attention, flops, train
from keel_jax.model import LM

MB = 1e6
COLUMNS = ("section", "case", "metric", "value", "unit")


# ---------------------------------------------------------------- building steps


def make_setup(model: dict, seq_len: int, batch_size: int) -> train.Setup:
  """A one-device Setup with `model` overriding configs/default.py (no dataset is built)."""
  config = default.get_config()
  config.model.update(model)
  config.data.seq_len = seq_len
  config.train.update(batch_size=batch_size, diag_every=0, grad_accum_steps=1)
  return aot_compile.setup_without_data(config, jax.devices()[:1], aot_compile.vocab_size(config))


def init_state(s: train.Setup, abstract: bool = False):
  """{step, params, opt_state} on one device; unsharded, so any stack layout works."""
  model = LM(s.model_cfg)
  tokens = jnp.zeros((1, s.config.data.seq_len), jnp.int32)

  def init(rng):
    params = nn.unbox(model.init(rng, tokens)["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": s.tx.init(params)}

  rng = jax.random.key(0)
  return jax.eval_shape(init, rng) if abstract else jax.jit(init)(rng)


def make_batch(s: train.Setup, seed: int = 0) -> dict:
  shape = (s.config.train.batch_size, s.config.data.seq_len)
  tokens = jax.random.randint(jax.random.key(seed), shape, 0, s.model_cfg.vocab_size)
  return {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones(shape)}


def compile_step(s: train.Setup):
  """(compiled train step, seconds to trace, lower and compile it)."""
  state, batch = init_state(s, abstract=True), jax.eval_shape(lambda: make_batch(s))
  t0 = time.perf_counter()
  compiled = jax.jit(train.make_train_step(s), donate_argnums=0).lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def num_params(s: train.Setup) -> int:
  return sum(math.prod(a.shape) for a in jax.tree.leaves(init_state(s, abstract=True)["params"]))


def timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


# ---------------------------------------------------------------- sections


def matmul_chain(n: int, repeats: int = 10):
  """(jitted chain of `repeats` n×n fp32 matmuls, its input, its FLOPs)."""
  a = jnp.ones((n, n), jnp.float32) / n
  f = jax.jit(lambda x: jax.lax.fori_loop(0, repeats, lambda _, y: y @ a, x))
  f(a).block_until_ready()
  return f, a, 2 * n**3 * repeats


def bench_device(c, rows):
  """The measured matmul peak; bench_steps re-measures it between steps and keeps the best."""
  chains = [matmul_chain(n) for n in c.matmul_sizes]
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
      model = {**c.compile.model, "num_blocks": depth // 2, "scan_layers": scan}
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
  for impl in c.step.attention_impls:
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


def step_remats(c) -> tuple[str, ...]:
  """The remat policies the step section measures: "" (the model config's own), then extras."""
  return ("", *c.step.extra_remat_policies)


def bench_steps(c, rows, peak: dict):
  """Train-step time per attention implementation (Keel), and Keel vs Pre-LN at equal shape.

  The matmul peak is measured again in every round, under the same load as the steps.
  """
  auto = attention.resolve("auto")
  # (residual, attention, remat policy)
  variants = [("keel", impl, "") for impl in c.step.attention_impls]
  for remat in step_remats(c):
    variants += [(r, auto, remat) for r in c.step.residuals if (r, auto, remat) not in variants]
  steps, states = {}, {}
  for v in variants:
    residual, impl, remat = v
    model = {**c.step.model, "residual": residual, "attention_impl": impl}
    if remat:
      model["remat_policy"] = remat
    s = make_setup(model, c.step.seq_len, c.step.batch_size)
    steps[v], _ = compile_step(s)
    states[v] = (init_state(s), make_batch(s))
  tokens = c.step.batch_size * c.step.seq_len
  # Every variant has the same matmul shapes (norms are not counted): one FLOP count.
  flops_per_step = flops.train_flops_per_token(s.model_cfg, c.step.seq_len) * tokens
  times = {v: [] for v in variants}
  for r in range(c.repeats + 1):  # round-robin; the first round warms up
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
  for (residual, impl, remat), seconds in best.items():
    remat = f" remat={remat}" if remat else ""
    case = f"{residual} attention={impl}{remat} d={c.step.model['d_model']} T={c.step.seq_len}"
    rows.append(("step", case, "step_ms", seconds * 1e3, "ms"))
    rows.append(("step", case, "tokens_per_s", tokens / seconds, "tok/s"))
    mfu = flops_per_step / seconds / peak["best"]
    rows.append(("step", case, "mfu_measured_peak", mfu, "fraction"))
    if nominal:
      rows.append(
        ("step", case, "mfu_nominal_peak", flops_per_step / seconds / nominal, "fraction")
      )
  if "pre_ln" in c.step.residuals:
    for remat in step_remats(c):
      ratio = best["keel", auto, remat] / best["pre_ln", auto, remat]
      case = f"keel/pre_ln attention={auto}" + (f" remat={remat}" if remat else "")
      rows.append(("step", case, "step_time_ratio", ratio, "x"))


def memory_point(spec: dict) -> dict:
  """Runs in a fresh process: compile and take two train steps; peak RSS and model facts."""
  s = make_setup(spec["model"], spec["seq_len"], spec["batch_size"])
  out = {"params": num_params(s)}
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


def step_bytes(compiled) -> int:
  """XLA's buffers for one step: arguments + outputs − donated + temporaries."""
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


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
  s = make_setup(spec["model"], spec["seq_len"], spec["batch_size"])
  compiled, _ = compile_step(s)
  return {"params": num_params(s), "step_bytes_mb": step_bytes(compiled) / MB}


def _remat(policy: str) -> dict:
  if policy == "nested":
    return {"remat_policy": "full", "nested_remat": True}
  return {"remat_policy": policy, "nested_remat": False}


def bench_memory(c, rows):
  rss = c.memory.method == "rss"
  metric = "peak_rss_mb" if rss else "step_bytes_mb"
  run = _run_point if rss else _analysis_point
  specs = {}
  for depth in c.memory.depths:
    for policy in c.memory.policies:
      model = {**c.memory.model, "num_blocks": depth // 2, **_remat(policy)}
      spec = dict(model=model, seq_len=c.memory.seq_len, batch_size=c.memory.batch_size)
      specs[f"L={depth} remat={policy}"] = spec
  deep = dict(model=dict(c.deep.model), seq_len=c.deep.seq_len, batch_size=c.deep.batch_size)
  if rss:
    specs["baseline (runtime only)"] = dict(
      model=dict(c.memory.model), seq_len=8, batch_size=1, steps=0
    )
  workers = c.memory.parallel if rss else 1
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = dict(zip(specs, pool.map(run, specs.values()), strict=True))
    deep_result = run(deep)  # alone: nothing else competes for memory
  for case, res in results.items():
    rows.append(("memory", case, metric, res[metric], "MB"))
    if rss and "step_bytes_mb" in res:  # XLA's own accounting: no runtime or compiler memory
      rows.append(("memory", case, "step_bytes_mb", res["step_bytes_mb"], "MB"))
  d = c.deep.model
  remat = "nested" if d.get("nested_remat") else d.get("remat_policy", "full")
  case = f"L={2 * d['num_blocks']} d={d['d_model']} remat={remat} B={c.deep.batch_size}"
  case += f" T={c.deep.seq_len}"
  # fp32 params, grads and AdamW's two moments: 16 bytes per parameter, before any activation.
  floor = 16 * deep_result["params"] / MB
  rows.append(("deep", case, "params_m", deep_result["params"] / 1e6, "M"))
  rows.append(("deep", case, "state_floor_mb", floor, "MB"))
  rows.append(("deep", case, metric, deep_result[metric], "MB"))
  if rss:
    rows.append(("deep", case, "step_bytes_mb", deep_result["step_bytes_mb"], "MB"))
  return case, deep_result[metric], floor


# ---------------------------------------------------------------- report


def targets(c, rows, deep) -> list[tuple]:
  """(target, measured, threshold, PASS/FAIL, note) per target; thresholds are never tuned."""
  get = {(r[0], r[1], r[2]): r[3] for r in rows}
  out = []
  first, last = min(c.compile.scan_depths), max(c.compile.scan_depths)
  ratio = (
    get["compile", f"scan L={last}", "compile_s"] / get["compile", f"scan L={first}", "compile_s"]
  )
  thr = c.targets["compile_ratio"]
  out.append((f"compile time L={last} / L={first} (scan)", ratio, f"<= {thr}", ratio <= thr, ""))
  auto = attention.resolve("auto")
  d = c.step.model["d_model"]
  config_remat = {**default.get_config().model.to_dict(), **c.step.model}["remat_policy"]
  # One row per remat policy measured: the config's own (full recomputes the forward, which
  # MFU does not count, so it cannot exceed 0.75) and the extra ones.
  for remat in step_remats(c):
    suffix = f" remat={remat}" if remat else ""
    label = suffix or f" remat={config_remat}"
    case = f"keel attention={auto}{suffix} d={d} T={c.step.seq_len}"
    mfu = get["step", case, "mfu_measured_peak"]
    thr = c.targets["mfu"]
    out.append((f"MFU at d={d},{label} (measured peak)", mfu, f">= {thr}", mfu >= thr, case))
    if "pre_ln" in c.step.residuals:
      ratio = get["step", f"keel/pre_ln attention={auto}{suffix}", "step_time_ratio"]
      thr = c.targets["keel_overhead"]
      name = f"Keel / Pre-LN step time at d={d},{label}"
      out.append((name, ratio, f"<= {thr}", ratio <= thr, ""))
  case, peak_mb, floor_mb = deep
  budget_mb = c.deep.budget_gb * 1e3
  note = f"fp32 params+grads+AdamW (16 B/param) alone need {floor_mb / 1e3:.2f} GB"
  if floor_mb > budget_mb:
    note += ": over budget before any activation, so infeasible at this shape"
  ok = peak_mb <= budget_mb
  out.append((f"peak memory, {case}", peak_mb / 1e3, f"<= {c.deep.budget_gb} GB", ok, note))
  return [(name, value, thr, "PASS" if ok else "FAIL", note) for name, value, thr, ok, note in out]


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def markdown(c, rows, target_rows, seconds) -> str:
  memory = (
    "peak_rss = peak RSS (VmHWM) of a fresh process per point, JAX runtime and compilation "
    "included; step_bytes = compiled.memory_analysis() of the step (args + outputs − donated "
    "+ temporaries)"
    if c.memory.method == "rss"
    else "step_bytes = compiled.memory_analysis(): arguments + outputs − donated + temporaries"
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


def run(c, workdir: str) -> tuple[list, list]:
  """Runs every section of preset `c`; writes results.csv/.md to workdir; returns the tables."""
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  rows: list[tuple] = []

  def section(name, fn, *args):
    t = time.perf_counter()
    out = fn(c, rows, *args)
    print(f"benchmark: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return out

  peak = section("device", bench_device)
  section("compile", bench_compile)
  section("attention", bench_attention)
  section("step", bench_steps, peak)
  deep = section("memory", bench_memory)  # last: its subprocesses would disturb the timings
  target_rows = targets(c, rows, deep)
  bad = [r for r in rows if not np.isfinite(r[3])]
  if bad:
    raise RuntimeError(f"non-finite measurements: {bad}")
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(rows)
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
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "configs/benchmark.py:<preset>.")
  flags.DEFINE_string("workdir", None, "Where results.csv and results.md go.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
