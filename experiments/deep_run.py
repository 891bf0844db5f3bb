"""1000+ layers: Keel, Pre-LN and Post-LN at 1024 sub-layers, one recipe, beside a unigram model.

  python -m experiments.deep_run --config=configs/deep_run.py:cpu --workdir=experiments/results/deep_run

Trains with the real trainer and reports the loss curve, XLA compile time (summed from JAX's
compile events, persistent cache off so they are real), median step time and the process's
peak resident memory. Writes table.{csv,md}, loss_curve.png and README.md.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from configs import experiment
from experiments import common, provenance
from keel_jax import metrics, residual

PAPER = (
  "arXiv 2601.19895 ('1000+ layers', Table 3 at 1024 sub-layers): a 1024-sub-layer (512-block) "
  "Keel model trains stably with the plain recipe (no depth-dependent init, no tricks) and "
  "beats Pre-LN at that depth, where Post-LN cannot train."
)
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileTimer:
  """Collects the duration of every XLA backend compile while active."""

  def __init__(self):
    self.durations: list[float] = []

  def _listen(self, event: str, duration: float, **kwargs):
    del kwargs
    if event == BACKEND_COMPILE:
      self.durations.append(duration)

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def train_scheme(config, workdir: str, scheme: str, seed: int = 0) -> dict:
  cfg = experiment.run_config(
    config, model=dict(residual=scheme, num_blocks=config.num_blocks), train=dict(seed=seed)
  )
  name = common.run_name(scheme, config.num_blocks) + (f"_seed{seed}" if seed else "")
  run_dir = os.path.join(workdir, common.RUNS, name)
  # The run's behavioural fingerprint compiles a tiny model: do it before timing compiles.
  provenance.current(scheme, os.path.join(workdir, "provenance"))
  with CompileTimer() as timer:
    res = common.train_run(cfg, run_dir)
  rows = metrics.read(run_dir)
  train_rows = [r for r in rows if "train/loss" in r]
  tokens = config.train.batch_size * config.data.seq_len
  # The first window holds the compile-time stall; later windows are steady steps.
  steady = [tokens / r["train/tokens_per_sec"] for r in train_rows[1:]] or [math.nan]
  final = res["final"]
  info = next((r for r in rows if "info/num_params" in r), {})
  return {
    "scheme": scheme,
    "seed": seed,
    "code": res["code"],
    "sub_layers": residual.sublayers(config.num_blocks),
    "params_M": info.get("info/num_params", math.nan) / 1e6,
    "status": res["status"],
    "steps": train_rows[-1]["step"] if train_rows else 0,
    "first_loss": train_rows[0]["train/loss"] if train_rows else math.nan,
    "final_train_loss": final.get("train/loss", math.nan),
    "eval_loss": final.get("eval/loss", math.nan),
    "bits_per_byte": final.get("eval/bits_per_byte", math.nan),
    # Reused runs (result.json already there) compile nothing here: report what they recorded.
    "compile_s": sum(timer.durations) if timer.durations else res.get("compile_s", math.nan),
    "largest_compile_s": max(timer.durations, default=res.get("largest_compile_s", math.nan)),
    "step_s": float(np.median(steady)),
    "wall_min": res["seconds"] / 60,
    "curve": [(r["step"], r["train/loss"]) for r in train_rows],
    "eval_curve": [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r],
    "run_dir": run_dir,
    "fingerprint": res["fingerprint"],
  }


def verdict(config, rows: list[dict], rss_mb: float, unigram: float) -> list[str]:
  out = [
    f"Baseline: a unigram model (training-token frequencies) scores {unigram:.4f} nats/token on "
    f"this validation set; 'trains' means an eval loss at least {config.min_gain} nats below it "
    "(learning more than token frequencies), with no non-finite step."
  ]
  for r in rows:
    ok = r["status"] == "ok" and math.isfinite(r["eval_loss"])
    gain = unigram - r["eval_loss"] if ok else math.nan
    out.append(
      f"{r['scheme']} at {r['sub_layers']} sub-layers, seed {r['seed']}: "
      + (
        f"{r['steps']} steps, train loss {r['first_loss']:.3f} → {r['final_train_loss']:.3f}, "
        f"eval {r['eval_loss']:.4f}, {gain:+.3f} nats below unigram: "
        + ("TRAINS." if gain > config.min_gain else "does NOT learn beyond token frequencies.")
        if ok
        else f"did NOT train ({r['status']})."
      )
    )
  by = {}
  for r in rows:
    by.setdefault(r["scheme"], []).append(r["eval_loss"])
  if "keel" in by and len(by) > 1:
    mean = {s: float(np.mean(v)) for s, v in by.items()}
    out.append(
      "Mean eval loss, best first: "
      + " < ".join(f"{s} {mean[s]:.4f}" for s in sorted(mean, key=mean.get))
      + (f" (over seeds {tuple(config.seeds)})." if len(config.seeds) > 1 else " (one seed).")
    )
  for r in rows:
    out.append(
      f"{r['scheme']} seed {r['seed']}: compile {r['compile_s']:.1f} s in all (largest single "
      f"compile {r['largest_compile_s']:.1f} s), {r['step_s']:.2f} s per step of "
      f"{config.train.batch_size} × {config.data.seq_len} tokens."
    )
  out.append(f"Peak resident memory of the whole process: {rss_mb:.0f} MB.")
  return out


def plot(rows: list[dict], path: str) -> str:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, r in enumerate(rows):
    if r["curve"]:
      ax.plot(
        *zip(*r["curve"], strict=True), color=f"C{i}", label=f"{r['scheme']} s{r['seed']} train"
      )
    if r["eval_curve"]:
      ax.plot(
        *zip(*r["eval_curve"], strict=True),
        "o",
        color=f"C{i}",
        label=f"{r['scheme']} s{r['seed']} eval",
      )
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(f"{rows[0]['sub_layers']} sub-layers")
  ax.legend()
  return common.save_figure(fig, path)


def run(config, workdir: str) -> dict:
  t0, env = time.perf_counter(), common.environment()
  rows = []
  unigram = common.unigram_loss(experiment.run_config(config))
  for scheme, seed in [(s, k) for k in config.seeds for s in config.schemes]:
    rows.append(train_scheme(config, workdir, scheme, seed))
    r = rows[-1]
    common.annotate(
      r["run_dir"], compile_s=r["compile_s"], largest_compile_s=r["largest_compile_s"]
    )
    print(
      f"[deep_run] {scheme}: eval loss {r['eval_loss']:.4f}, {r['step_s']:.2f} s/step", flush=True
    )
  rss = common.peak_rss_mb()
  cols = ["scheme", "seed", "sub_layers", "params_M", "status", "steps", "first_loss",
          "final_train_loss", "eval_loss", "bits_per_byte", "compile_s", "largest_compile_s",
          "step_s", "wall_min", "code"]  # fmt: skip
  table_md = common.write_table(os.path.join(workdir, "table"), cols, rows)
  plot(rows, os.path.join(workdir, "loss_curve.png"))
  lines = verdict(config, rows, rss, unigram)
  seconds = time.perf_counter() - t0
  m, t = config.model, config.train
  common.write_readme(
    workdir,
    "1000+ layers",
    PAPER,
    env,
    rows[0]["fingerprint"],
    [
      (
        "Result",
        f"Width {m.d_model}, {t.num_steps} steps of {t.batch_size} × {config.data.seq_len} "
        f"tokens, LR {t.learning_rate:g} ({t.schedule}, {t.warmup_steps} warm-up), remat "
        f"{m.remat_policy}, the same for every scheme and seed; unigram baseline "
        f"{unigram:.4f} nats/token; peak RSS {rss:.0f} MB.\n\n"
        + table_md
        + "\n![loss](loss_curve.png)",
      )
    ],
    lines,
    seconds,
  )
  print(table_md + "\n" + "\n".join(lines), flush=True)
  return {"rows": rows, "peak_rss_mb": rss, "verdict": lines, "seconds": seconds}


def main():
  common.main(run)


if __name__ == "__main__":
  main()
