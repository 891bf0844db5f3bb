"""Gradient flow: per-sub-layer gradient norm and activation RMS, at init and after training.

  python -m experiments.grad_flow --config=configs/grad_flow.py:cpu --workdir=experiments/results/grad_flow

For each residual scheme: the L2 norm of each sub-layer's weight gradients (norm scales left
out: at init their gradients dominate and hide the weights') and the residual-stream RMS after
each sub-layer, averaged over fixed validation batches, on the model's own init and again after
training it. Writes profiles.csv (every sub-layer), table.{csv,md} (summary ratios),
grad_flow.png (log scale across depth) and README.md.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import experiment
from experiments import common
from keel_jax import builders, loss, residual, restore, train
from keel_jax.model import LM, sublayer_activation_rms, sublayer_norms

PAPER = (
  "arXiv 2601.19895 (its analysis of the residual Jacobian): Post-LN's residual shrinks "
  "gradients by ~1/√2 per sub-layer on the way down (≈ 2^(−L/2) over L sub-layers); Keel's "
  "weighted carry (α = L) keeps the per-layer Jacobian ≈ 1, so its gradients are uniform "
  "across depth."
)
# One rule for every scheme, stage and sub-layer kind: the weight-gradient norm of the lowest
# sub-layer (first block left out) over the highest's.
VANISH, GROW = 0.5, 2.0


def weights_only(grads):
  """Zeroes norm-scale gradients (leaf paths containing '_norm_')."""
  return jax.tree_util.tree_map_with_path(
    lambda path, g: jnp.zeros_like(g) if "_norm_" in jax.tree_util.keystr(path) else g, grads
  )


@functools.cache
def profile_fn(model_cfg):
  """jit(params, batch) → (per-sub-layer weight-gradient norms, per-sub-layer activation RMS)."""
  model = LM(model_cfg)

  def loss_fn(params, batch):
    logits, state = model.apply({"params": params}, batch["inputs"], mutable=["intermediates"])
    _, nll, count = loss.cross_entropy(logits, batch["targets"], batch["weights"])
    return nll / jnp.maximum(count, 1.0), state["intermediates"]

  @jax.jit
  def profile(params, batch):
    grads, inter = jax.grad(loss_fn, has_aux=True)(params, batch)
    return sublayer_norms(weights_only(grads)), sublayer_activation_rms(inter)

  return profile


def profile(s, params, batches) -> tuple[np.ndarray, np.ndarray]:
  fn = profile_fn(s.model_cfg)
  outs = [jax.device_get(fn(params, b)) for b in batches]
  return tuple(np.mean([o[i] for o in outs], axis=0) for i in range(2))


def scheme_profiles(config, workdir: str, scheme: str) -> dict:
  cfg = experiment.run_config(config, model=dict(residual=scheme, num_blocks=config.num_blocks))
  run_dir = os.path.join(workdir, common.RUNS, common.run_name(scheme, config.num_blocks))
  s = train.setup(cfg, run_dir)
  batches = s.dataset.eval_batches(cfg.train.batch_size, config.profile_batches)
  _, _, init_fn = builders.abstract_state(s)
  params0 = jax.jit(init_fn)(jax.random.key(cfg.train.seed))["params"]  # the run's own init
  out = {"init": profile(s, params0, batches)}
  res = common.train_run(cfg, run_dir)
  if res["status"] == "ok":
    out["trained"] = profile(s, restore.load(run_dir).params, batches)
  else:  # a diverged run has no final checkpoint; its profile is the finding
    nan = np.full(residual.sublayers(config.num_blocks), np.nan)
    out["trained"] = (nan, nan)
  out["result"] = res
  return out


def wide_init_profiles(config, scheme: str) -> tuple[np.ndarray, np.ndarray]:
  """Profiles at init only of the config.wide model (the paper's width): a few sequences."""
  w = config.wide
  cfg = experiment.run_config(
    config,
    model=dict(residual=scheme, **dict(w.model)),
    train=dict(batch_size=w.batch_size),
  )
  cfg.data.seq_len = w.seq_len
  s = train.setup(cfg, workdir=None, devices=jax.devices()[:1])
  batches = s.dataset.eval_batches(w.batch_size, 1)
  _, _, init_fn = builders.abstract_state(s)
  params = jax.jit(init_fn)(jax.random.key(cfg.train.seed))["params"]
  return profile(s, params, batches)


def summary(scheme: str, stage: str, g: np.ndarray, a: np.ndarray) -> dict:
  """Ratios the verdict reads. Attention and FFN sub-layers are compared only among their own
  kind (their gradient scales differ at init), and the first block is left out (Keel's is
  special)."""
  attn, ffn = g[2::2], g[3::2]
  return {
    "scheme": scheme,
    "stage": stage,
    "attn bottom/top": float(attn[0] / attn[-1]),
    "ffn bottom/top": float(ffn[0] / ffn[-1]),
    "attn max/min": float(attn.max() / attn.min()),
    "ffn max/min": float(ffn.max() / ffn.min()),
    "act rms first": float(a[0]),
    "act rms last": float(a[-1]),
    "act rms max/min": float(a.max() / a.min()),
    "attn flow": flow(float(attn[0] / attn[-1])),
    "ffn flow": flow(float(ffn[0] / ffn[-1])),
  }


def flow(ratio: float) -> str:
  if not np.isfinite(ratio):
    return "n/a"
  return "vanishing" if ratio < VANISH else "growing" if ratio > GROW else "flat"


def verdict(rows: dict, label: str) -> list[str]:
  """The same rule for every scheme, stage and sub-layer kind (no min over kinds)."""
  out = []
  for (scheme, stage), r in rows.items():
    kinds = [
      f"{k} {r[f'{k} bottom/top']:.3g} ({flow(r[f'{k} bottom/top'])}, max/min "
      f"{r[f'{k} max/min']:.3g})"
      for k in ("attn", "ffn")
    ]
    out.append(f"{label}, {scheme} {stage}: bottom/top " + "; ".join(kinds) + ".")
  by = lambda stage, kind: {s: r[f"{kind} max/min"] for (s, st), r in rows.items() if st == stage}
  for stage in dict.fromkeys(st for _, st in rows):
    for kind in ("attn", "ffn"):
      m = by(stage, kind)
      if "keel" in m and len(m) > 1:
        flatter = sorted(m, key=m.get)
        out.append(
          f"{label}, {stage}, {kind}: most uniform first (max/min across depth): "
          + ", ".join(f"{s} {m[s]:.3g}" for s in flatter)
          + "."
        )
  return out


def plot(config, profiles: dict, path: str) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
  x = np.arange(residual.sublayers(config.num_blocks))
  for i, (scheme, p) in enumerate(profiles.items()):
    for col, stage in enumerate(("init", "trained")):
      g, a = p[stage]
      axes[0, col].plot(x, g, lw=1, label=scheme, color=f"C{i}")
      axes[1, col].plot(x, a, lw=1, label=scheme, color=f"C{i}")
  for col, stage in enumerate(("at init", f"after {config.train.num_steps} steps")):
    axes[0, col].set_title(f"weight-gradient norm per sub-layer, {stage}", fontsize=10)
    axes[1, col].set_title(f"residual-stream RMS after each sub-layer, {stage}", fontsize=10)
    axes[1, col].set_xlabel("sub-layer (0 = next to the embedding)")
    for row in range(2):
      axes[row, col].set_yscale("log")
  axes[0, 0].legend(fontsize=8)
  return common.save_figure(fig, path)


def run(config, workdir: str) -> dict:
  t0, env = time.perf_counter(), common.environment()
  profiles = {}
  for scheme in config.schemes:
    profiles[scheme] = scheme_profiles(config, workdir, scheme)
    print(f"[grad_flow] {scheme}: done ({profiles[scheme]['result']['status']})", flush=True)
  long_rows, summaries = [], {}
  for scheme, p in profiles.items():
    for stage in ("init", "trained"):
      g, a = p[stage]
      for i in range(len(g)):
        long_rows.append(
          {
            "scheme": scheme,
            "stage": stage,
            "sub_layer": i,
            "kind": ("attn", "ffn")[i % 2],
            "grad_norm": float(g[i]),
            "act_rms": float(a[i]),
          }  # fmt: skip
        )
      if np.all(np.isfinite(g)):
        summaries[(scheme, stage)] = summary(scheme, stage, g, a)
  common.write_table(
    os.path.join(workdir, "profiles"),
    ["scheme", "stage", "sub_layer", "kind", "grad_norm", "act_rms"],
    long_rows,
  )
  cols = list(next(iter(summaries.values())))
  table_md = common.write_table(os.path.join(workdir, "table"), cols, list(summaries.values()), 3)
  plot(config, profiles, os.path.join(workdir, "grad_flow.png"))
  lines = verdict(summaries, f"d={config.model.d_model}")
  wide, wide_rows = {}, []
  for scheme in config.wide.schemes:
    t1 = time.perf_counter()
    g, a = wide_init_profiles(config, scheme)
    wide[(scheme, "init")] = summary(scheme, "init", g, a)
    for i in range(len(g)):
      wide_rows.append(
        {
          "scheme": scheme,
          "sub_layer": i,
          "kind": ("attn", "ffn")[i % 2],
          "grad_norm": float(g[i]),
          "act_rms": float(a[i]),
        }  # fmt: skip
      )
    print(f"[grad_flow] {scheme} at d={config.wide.model.d_model}: init profile "
          f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip
  wide_sections = []
  if wide:
    wm = config.wide.model
    common.write_table(
      os.path.join(workdir, "profiles_wide"),
      ["scheme", "sub_layer", "kind", "grad_norm", "act_rms"],
      wide_rows,
    )
    wide_md = common.write_table(os.path.join(workdir, "table_wide"), cols, list(wide.values()), 3)
    lines += verdict(wide, f"d={wm.d_model}")
    wide_sections.append(
      (
        f"At the paper's width, at init (d={wm.d_model})",
        f"{residual.sublayers(wm.num_blocks)} sub-layers, width {wm.d_model}, FFN {wm.d_ff}, "
        f"{wm.num_heads}/{wm.num_kv_heads} heads; forward and backward of "
        f"{config.wide.batch_size} validation sequences of {config.wide.seq_len} tokens at "
        "init only (no training at this width here). Every value: profiles_wide.csv.\n\n" + wide_md,
      )
    )
  seconds = time.perf_counter() - t0
  first = next(iter(profiles.values()))["result"]
  common.write_readme(
    workdir,
    "Gradient flow across depth",
    PAPER,
    env,
    first["fingerprint"],
    [
      (
        "Rule",
        f"Per scheme, stage and sub-layer kind (attention, FFN) alike: bottom/top = the weight-"
        f"gradient norm of the lowest sub-layer of that kind over the highest's, the first "
        f"block left out; < {VANISH} is 'vanishing' toward the input, > {GROW} 'growing', "
        "otherwise 'flat'. max/min across depth measures (non-)uniformity.",
      ),
      (
        "Profiles (first block left out of the ratios)",
        f"{residual.sublayers(config.num_blocks)} sub-layers, width {config.model.d_model}; averaged over "
        f"{config.profile_batches} validation batches of {config.train.batch_size} × "
        f"{config.data.seq_len}; trained {config.train.num_steps} steps at LR "
        f"{config.train.learning_rate:g}. Every value: profiles.csv.\n\n"
        + table_md
        + "\n![gradient flow](grad_flow.png)",
      ),
      *wide_sections,
    ],
    lines,
    seconds,
  )
  print(table_md + "\n" + "\n".join(lines), flush=True)
  return {"profiles": profiles, "summaries": summaries, "verdict": lines, "seconds": seconds}


def main():
  common.main(run)


if __name__ == "__main__":
  main()
