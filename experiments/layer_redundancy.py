"""Layer redundancy: eval-loss increase when one sub-layer (or block) of a trained model is removed.

  python -m experiments.layer_redundancy --config=configs/layer_redundancy.py:cpu --workdir=experiments/results/layer_redundancy

Removing sub-layer l means x_{l+1} = x_l (the model's `sublayer_mask`), so one compiled eval
function scores every removal. Models come from a depth_scaling workdir (config.source: each
scheme's best-LR run at config.num_blocks) or, when there is none, are trained here. Writes
table.{csv,md} (Δ loss per position), summary.{csv,md}, redundancy.png and README.md.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import numpy as np

from configs import experiment
from experiments import common
from keel_jax import data, loss, paths, residual, restore
from keel_jax.model import LM

PAPER = (
  "Figures (ΔPPL when one layer is removed, per depth position): the first layers are critical "
  "for every model; Keel's shallow layers matter more than Pre-LN's (less redundancy, larger "
  "effective depth)."
)


@functools.cache
def masked_eval_fn(model_cfg):
  """jit(params, batch, keep mask [2·num_blocks]) → (summed nll, token count)."""
  model = LM(model_cfg)

  @jax.jit
  def f(params, batch, keep):
    logits = model.apply({"params": params}, batch["inputs"], sublayer_mask=keep)
    _, nll, count = loss.cross_entropy(logits, batch["targets"], batch["weights"])
    return nll, count

  return f


def masks(num_sublayers: int, unit: str) -> list[tuple[str, np.ndarray]]:
  """(label, keep mask) for every single removal: sub-layers, or blocks (both sub-layers)."""
  step = 1 if unit == "sublayer" else 2
  out = []
  for start in range(0, num_sublayers, step):
    keep = np.ones(num_sublayers, np.float32)
    keep[start : start + step] = 0
    out.append((str(start // step), keep))
  return out


def source_run(config, scheme: str) -> str | None:
  """The lowest-eval-loss finished seed-0 cell of `scheme` at this depth in config.source (a
  depth_scaling workdir), if its checkpoint is there."""
  if not config.source:
    return None
  name = f"{scheme}_L{residual.sublayers(config.num_blocks)}_lr*_seed0"
  best, best_loss = None, math.inf
  for d in paths.glob(paths.join(config.source, "cells", name)):
    path = paths.join(d, "cell.json")
    if not paths.exists(path) or not paths.isdir(paths.join(d, "checkpoints")):
      continue
    res = common.read_json(path)
    loss_value = res["eval"].get("eval/loss", math.inf) if res["status"] == "ok" else math.inf
    if loss_value < best_loss:
      best, best_loss = d, loss_value
  return best


def trained_run(config, workdir: str, scheme: str) -> str:
  run_dir = source_run(config, scheme)
  if run_dir is None:
    if config.source:
      print(f"[layer_redundancy] no {scheme} run in {config.source}; training one", flush=True)
    lr = dict(config.lrs)[scheme]
    cfg = experiment.run_config(
      config,
      model=dict(residual=scheme, num_blocks=config.num_blocks),
      train=dict(learning_rate=lr),
    )
    run_dir = os.path.join(workdir, common.RUNS, common.run_name(scheme, config.num_blocks, lr))
    res = common.train_run(cfg, run_dir)
    if res["status"] != "ok":
      raise RuntimeError(f"{scheme} diverged ({res['error']}); lower config.lrs for it")
  return run_dir


def removal_losses(config, run_dir: str) -> tuple[float, list[float], dict]:
  """(eval loss of the whole model, eval loss with each unit removed, run facts)."""
  run = restore.load(run_dir)
  s = run.setup
  dataset = data.make(s.config.data, seed=s.config.train.seed)
  batches = dataset.eval_batches(s.config.train.batch_size, config.eval_batches)
  fn = masked_eval_fn(s.model_cfg)

  def loss_with(keep) -> float:
    nll = count = 0.0
    for b in batches:
      n, c = jax.device_get(fn(run.params, b, keep))
      nll, count = nll + float(n), count + float(c)
    return nll / max(count, 1.0)

  n = s.model_cfg.num_sublayers
  base = loss_with(np.ones(n, np.float32))
  removed = [loss_with(keep) for _, keep in masks(n, config.unit)]
  facts = {
    "run": run_dir if paths.is_remote(run_dir) else os.path.relpath(run_dir),
    "lr": s.config.train.learning_rate,
    "steps": run.step,
    "fingerprint": dataset.fingerprint,
  }
  return base, removed, facts


def verdict(config, deltas: dict[str, np.ndarray]) -> list[str]:
  out = []
  first = 1 if config.unit == "block" else 2  # the first block's units
  for s, d in deltas.items():
    top = np.argsort(-d)[:3]
    ok = bool(np.any(top < first))
    out.append(
      f"{s}: the three most critical {config.unit}s are {sorted(top.tolist())} (0 = bottom); the "
      + (
        "first block is among them, as the paper says." if ok else "first block is NOT among them."
      )
    )
  if "keel" in deltas and "pre_ln" in deltas:
    n = len(deltas["keel"])
    shallow = slice(first, n // 2)
    k, p = float(deltas["keel"][shallow].mean()), float(deltas["pre_ln"][shallow].mean())
    tol = config.threshold
    if max(k, p) < tol:
      what = (
        f"both below {tol:g} nats: past the first block every {config.unit} is individually "
        "redundant in both models, so the paper's difference cannot show at this scale "
        "(NOT reproduced)."
      )
    elif k > p + tol:
      what = "Keel's shallow layers matter more — REPRODUCED."
    else:
      what = f"Keel's shallow layers do NOT matter more (tolerance {tol:g} nats)."
    out.append(
      f"Mean Δ loss of the shallow half (first block excluded): Keel {k:.4f}, Pre-LN {p:.4f}: "
      + what
    )
    deep = slice(n // 2, n)
    k2, p2 = float(deltas["keel"][deep].mean()), float(deltas["pre_ln"][deep].mean())
    out.append(f"Deep half: Keel {k2:.4f}, Pre-LN {p2:.4f}.")
  return out


def plot(config, deltas: dict, path: str) -> str:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for s, d in deltas.items():
    ax.plot(np.arange(len(d)), d, "o-", ms=2.5, lw=1, label=s)
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_xlabel(f"removed {config.unit} (0 = next to the embedding)")
  ax.set_ylabel("Δ eval loss (nats/token)")
  ax.set_title(f"layer redundancy, {residual.sublayers(config.num_blocks)} sub-layers")
  ax.legend()
  return common.save_figure(fig, path)


def run(config, workdir: str) -> dict:
  t0, env = time.perf_counter(), common.environment()
  deltas, summary, fingerprint = {}, [], None
  for scheme in config.schemes:
    base, removed, facts = removal_losses(config, trained_run(config, workdir, scheme))
    fingerprint = facts.pop("fingerprint")
    deltas[scheme] = np.asarray(removed) - base
    d = deltas[scheme]
    summary.append(
      {
        "scheme": scheme,
        "eval_loss": base,
        "max Δ": float(d.max()),
        "argmax": int(d.argmax()),
        "mean Δ": float(d.mean()),
        f"{config.unit}s with Δ > {config.threshold:g}": int((d > config.threshold).sum()),
        **facts,
      }  # fmt: skip
    )
    print(f"[layer_redundancy] {scheme}: base {base:.4f}, max Δ {d.max():.4f}", flush=True)
  n = len(next(iter(deltas.values())))
  rows = []
  for i in range(n):
    row = {config.unit: i}
    if config.unit == "sublayer":
      row["kind"] = ("attn", "ffn")[i % 2]
    for s, d in deltas.items():
      row[f"{s} Δ loss"] = float(d[i])
    rows.append(row)
  table_md = common.write_table(os.path.join(workdir, "table"), list(rows[0]), rows, 3)
  summary_md = common.write_table(os.path.join(workdir, "summary"), list(summary[0]), summary)
  plot(config, deltas, os.path.join(workdir, "redundancy.png"))
  lines = verdict(config, deltas)
  seconds = time.perf_counter() - t0
  common.write_readme(
    workdir,
    "Layer redundancy",
    PAPER,
    env,
    fingerprint,
    [
      (
        "Summary",
        f"{residual.sublayers(config.num_blocks)} sub-layers; Δ = eval loss with one {config.unit} removed minus "
        f"the whole model's, over {config.eval_batches} validation batches.\n\n"
        + summary_md
        + "\n![redundancy](redundancy.png)",
      ),
      ("Δ eval loss per position", table_md),
    ],
    lines,
    seconds,
  )
  print(summary_md + "\n" + "\n".join(lines), flush=True)
  return {"deltas": deltas, "summary": summary, "verdict": lines, "seconds": seconds}


def main():
  common.main(run)


if __name__ == "__main__":
  main()
