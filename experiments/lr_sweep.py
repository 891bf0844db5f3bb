"""Maximum tolerable learning rate (the paper's Table 1 protocol), per residual scheme and depth.

  python -m experiments.lr_sweep --config=configs/lr_sweep.py:cpu --workdir=experiments/results/lr_sweep

Each run warms the LR up linearly from 0 toward a large peak for the whole run and logs the
loss every step. Divergence is found in the loss curve (`divergence`): a non-finite loss, an
unrecovered rise above the best smoothed loss, or a plateau (no improvement for `patience`);
the max tolerable LR is the LR at the step where the smoothed loss first reached its best, i.e.
the step before it stopped improving. Writes table.{csv,md}, runs.{csv,md}, lr_curves.png and
README.md.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from experiments import common

PAPER = (
  "Table 1 (warm-up 0 → 5e-2 over 5,000 steps): max LR at 64 / 512 sub-layers is Post-LN "
  "3.0e-4 / 2.8e-4, DeepNorm 3.5e-4 / 3.5e-4, Mix-LN 8.6e-4 / 3.5e-4, Pre-LN 7.65e-3 / 4.67e-3, "
  "Keel 1.01e-2 / 6.31e-3: Keel tolerates the largest LR, ~1.3× Pre-LN, and every Post-LN "
  "variant an order of magnitude less."
)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Centered running median (robust to single-batch outliers); edges use shorter windows."""
  half = window // 2
  return np.array([np.median(x[max(0, i - half) : i + half + 1]) for i in range(len(x))])


def divergence(
  losses, lrs, *, window: int, rise_tol: float, min_delta: float, patience: int, noise_k: float = 2
):
  """Where a warm-up run stops being trainable.

  losses/lrs: per step, in order (the run may end early at a non-finite loss: then `losses`
  ends there or holds NaN). Improvements smaller than `delta` = max(min_delta, noise_k × the
  noise of the smoothed curve) do not count: per-batch losses vary by tenths of a nat, so the
  lowest dip of a flat curve is no progress. Returns {diverged, reason, index, max_lr, delta}:
  reason is 'nonfinite', 'rise' (the smoothed loss ends more than rise_tol above its best),
  'plateau' (no improvement by delta in the last `patience` steps) or ''; index is the step
  where the smoothed loss first came within delta of its best, and max_lr the LR there.
  """
  losses, lrs = np.asarray(losses, float), np.asarray(lrs, float)
  bad = ~np.isfinite(losses)
  n = int(np.argmax(bad)) if bad.any() else len(losses)
  if n == 0:
    return {"diverged": True, "reason": "nonfinite", "index": 0, "max_lr": 0.0, "delta": min_delta}
  s = smooth(losses[:n], window)
  # Robust per-step noise (MAD), then the noise of a running median of `window` steps.
  sigma = 1.4826 * float(np.median(np.abs(losses[:n] - s)))
  delta = max(min_delta, noise_k * 1.25 * sigma / np.sqrt(window))
  best = float(s.min())
  index = int(np.argmax(s <= best + delta))
  reason = ""
  if bad.any():
    reason = "nonfinite"
  elif s[-1] > best + rise_tol:
    reason = "rise"
  elif n - 1 - index >= patience:
    reason = "plateau"
  return {
    "diverged": bool(reason),
    "reason": reason,
    "index": index,
    "max_lr": float(lrs[index]),
    "delta": delta,
  }


def detect(config, losses, lrs, window: int) -> dict:
  """`divergence` with the config's thresholds and a given smoothing window."""
  return divergence(
    losses,
    lrs,
    window=window,
    rise_tol=config.rise_tol,
    min_delta=config.min_delta,
    patience=max(1, round(config.patience_fraction * config.train.num_steps)),
  )


def sweep_one(config, workdir: str, scheme: str, num_blocks: int) -> dict:
  t = config.train
  cfg = common.run_config(
    config,
    model=dict(residual=scheme, num_blocks=num_blocks),
    # The whole run is warm-up: LR(step) = peak · step / num_steps.
    train=dict(schedule="constant", warmup_steps=t.num_steps, learning_rate=config.peak_lr),
  )
  run_dir = os.path.join(workdir, common.RUNS, common.run_name(scheme, num_blocks))
  res = common.train_run(cfg, run_dir)
  from keel_jax import metrics

  rows = [r for r in metrics.read(run_dir) if "train/loss" in r]
  losses = [r["train/loss"] for r in rows]
  lrs = [r["train/learning_rate"] for r in rows]
  if res["status"] == "nonfinite":  # the trainer stopped at the first non-finite step
    losses.append(math.nan)
    lrs.append(config.peak_lr * len(lrs) / t.num_steps)
  found = detect(config, losses, lrs, config.window)
  return {
    "scheme": scheme,
    "sub_layers": 2 * num_blocks,
    "max_lr": found["max_lr"] if found["diverged"] else math.nan,
    "reason": found["reason"] or "none (≥ peak)",
    "step": found["index"] + 1,
    "delta": found["delta"],
    "best_loss": float(smooth(np.asarray(losses[: found["index"] + 1]), config.window).min()),
    "steps_run": len(rows),
    "minutes": res["seconds"] / 60,
    "losses": losses,
    "lrs": lrs,
    # The same detection with other smoothing windows: how much the answer depends on it.
    "by_window": {w: detect(config, losses, lrs, w)["max_lr"] for w in config.check_windows},
    "fingerprint": res["fingerprint"],
  }


def verdict(config, results: dict) -> list[str]:
  depths = sorted(2 * n for n in config.num_blocks)
  res = config.peak_lr / config.train.num_steps
  out = [
    f"LR resolution: {res:.2g} per step (peak {config.peak_lr:g} over {config.train.num_steps} steps)."
  ]

  def lr(s, d):  # undiverged runs count as tolerating the peak
    r = results[(s, d)]
    return r["max_lr"] if math.isfinite(r["max_lr"]) else config.peak_lr

  for d in depths:
    order = sorted(config.schemes, key=lambda s: -lr(s, d))
    out.append(
      f"{d} sub-layers, largest to smallest max LR: "
      + " > ".join(f"{s} {lr(s, d):.2g}" for s in order)
    )
  if "keel" in config.schemes and "pre_ln" in config.schemes:
    ok = [d for d in depths if lr("keel", d) > lr("pre_ln", d) + res]
    tie = [d for d in depths if abs(lr("keel", d) - lr("pre_ln", d)) <= res]
    out.append(
      f"Keel tolerates a larger LR than Pre-LN (paper: 1.32× at 64, 1.35× at 512 sub-layers; "
      f"here, window {config.window}: "
      + ", ".join(f"{lr('keel', d) / lr('pre_ln', d):.2f}× at {d}" for d in depths)
      + "): "
      + (
        "REPRODUCED at every depth."
        if len(ok) == len(depths)
        else f"reproduced at {ok or 'no depth'}; tie (within one step) at {tie or 'no depth'}; "
        "otherwise NOT reproduced."
      )
    )
    flips = [
      (d, w)
      for d in depths
      for w in config.check_windows
      if not results[("keel", d)]["by_window"][w] > results[("pre_ln", d)]["by_window"][w]
    ]
    out.append(
      "Across smoothing windows "
      + f"{tuple(config.check_windows)}: "
      + (
        "Keel > Pre-LN every time (robust)."
        if not flips
        else f"Keel is NOT above Pre-LN for (depth, window) {flips}: not robust at this scale."
      )
    )
  post = [s for s in ("post_ln", "deepnorm", "mix_ln") if s in config.schemes]
  if post and "keel" in config.schemes:
    ok = all(lr("keel", d) > lr(s, d) for s in post for d in depths)
    out.append(
      f"Keel's max LR exceeds {', '.join(post)} at every depth: "
      + ("REPRODUCED." if ok else "NOT reproduced.")
    )
  if len(depths) > 1:
    fall = [s for s in config.schemes if lr(s, depths[-1]) < lr(s, depths[0]) - res]
    out.append(f"Max LR falls with depth (paper: for most schemes) for: {fall or 'none'}.")
  return out


def plot(config, results: dict, path: str) -> str:
  plt = common.pyplot()
  depths = sorted(2 * n for n in config.num_blocks)
  fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.8), squeeze=False)
  for ax, d in zip(axes[0], depths, strict=True):
    for i, s in enumerate(config.schemes):
      r = results[(s, d)]
      x, y = np.asarray(r["lrs"]), np.asarray(r["losses"])
      keep = np.isfinite(y) & (x > 0)
      (line,) = ax.plot(x[keep], smooth(y[keep], config.window), lw=1.2, label=s, color=f"C{i}")
      if math.isfinite(r["max_lr"]):
        ax.axvline(r["max_lr"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (linear warm-up)")
    ax.set_ylabel("train loss (smoothed)")
    ax.set_title(f"{d} sub-layers (dashed: max tolerable LR)")
    ax.legend(fontsize=8)
  return common.save_figure(fig, path)


def run(config, workdir: str) -> dict:
  t0, env = time.perf_counter(), common.environment()
  results = {}
  for num_blocks in sorted(config.num_blocks):
    for scheme in config.schemes:
      r = sweep_one(config, workdir, scheme, num_blocks)
      results[(scheme, r["sub_layers"])] = r
      print(
        f"[lr_sweep] {scheme} {r['sub_layers']} sub-layers: max LR {r['max_lr']:.3g} "
        f"({r['reason']}, step {r['step']})",
        flush=True,
      )
  depths = sorted(2 * n for n in config.num_blocks)
  cell = lambda r: r["max_lr"] if math.isfinite(r["max_lr"]) else f">= {config.peak_lr:g}"
  table = [
    {"scheme": s, **{f"{d} sub-layers": cell(results[(s, d)]) for d in depths}}
    for s in config.schemes
  ]
  table_md = common.write_table(
    os.path.join(workdir, "table"), ["scheme"] + [f"{d} sub-layers" for d in depths], table, 3
  )
  cols = ["scheme", "sub_layers", "max_lr", "reason", "step", "delta", "best_loss", "steps_run"]
  cols.append("minutes")
  runs_md = common.write_table(os.path.join(workdir, "runs"), cols, list(results.values()))
  windows = tuple(config.check_windows)
  sens = [
    {
      "scheme": s,
      "sub_layers": d,
      **{f"window {w}": results[(s, d)]["by_window"][w] for w in windows},
    }
    for d in depths
    for s in config.schemes
  ]
  sens_md = common.write_table(
    os.path.join(workdir, "window_sensitivity"),
    ["scheme", "sub_layers"] + [f"window {w}" for w in windows],
    sens,
    3,
  )
  plot(config, results, os.path.join(workdir, "lr_curves.png"))
  lines = verdict(config, results)
  seconds = time.perf_counter() - t0
  m, t = config.model, config.train
  common.write_readme(
    workdir,
    "Maximum tolerable learning rate (Table 1)",
    PAPER,
    env,
    next(iter(results.values()))["fingerprint"],
    [
      (
        "Max tolerable LR (>= peak: no divergence)",
        f"Width {m.d_model}, {t.batch_size} × {config.data.seq_len} tokens per step, LR 0 → "
        f"{config.peak_lr:g} linearly over {t.num_steps} steps; smoothing window "
        f"{config.window}, rise tolerance {config.rise_tol} nats, plateau patience "
        f"{config.patience_fraction:.0%} of the run.\n\n"
        + table_md
        + "\n![loss vs LR](lr_curves.png)",
      ),
      ("Detection per run", runs_md),
      (
        "Sensitivity to the smoothing window",
        "The LR at which the smoothed loss stopped improving, for other running-median windows "
        "(same thresholds); a conclusion that flips here is not robust at this scale.\n\n"
        + sens_md,
      ),
    ],
    lines,
    seconds,
  )
  print(table_md + "\n" + "\n".join(lines), flush=True)
  return {"results": results, "verdict": lines, "seconds": seconds}


def main():
  common.main(run)


if __name__ == "__main__":
  main()
