"""Depth scaling (the paper's Table 3): eval loss and arith accuracy per residual scheme × depth.

  python -m experiments.depth_scaling --config=configs/depth_scaling.py:cpu --workdir=<root>

Every cell (scheme × sub-layers × LR × seed) is an ordinary training run in <root>/cells/<name>
(experiments/cells.py). Per scheme and depth the LR is chosen at the first seed from a grid that
is extended until the best LR is not at its edge, then the other seeds re-train that LR. The
command trains the missing cells (config.train_missing), one at a time, skipping finished ones,
and then aggregates: runs.csv (every run), table.{csv,md} (mean ± std over seeds beside the
paper's Table 3), depth_vs_metric.png (error bars), missing.md (cells still to train, with the
command for each) and README.md with a verdict computed by Welch's t-test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np

from configs import depth_scaling as cfg_module
from configs import experiment
from experiments import cells, common, provenance
from keel_jax import paths, residual

PAPER = (
  "Table 3 (arXiv 2601.19895): at equal data, Keel beats Pre-LN at every depth on the average "
  "of 14 downstream benchmarks (64 / 128 / 512 / 1024 sub-layers: Pre-LN 37.9 / 45.3 / 54.3 / "
  "57.9, Keel 39.6 / 46.5 / 58.1 / 60.9) and the gap grows with depth; Post-LN is not trainable "
  "at depth."
)
# arXiv 2601.19895 Table 3: average downstream score (higher is better) by sub-layers.
PAPER_TABLE3 = {
  "pre_ln": {64: 37.9, 128: 45.3, 512: 54.3, 1024: 57.9},
  "keel": {64: 39.6, 128: 46.5, 512: 58.1, 1024: 60.9},
}
ALPHA = 0.05  # two-sided significance level of the Welch tests
RECORDS = "records"  # <results_dir>/records/<cell name>.json


def lr_of(log10_lr: float) -> float:
  return float(f"{10**log10_lr:.3g}")


def cell_name(scheme: str, sub_layers: int, lr: float, seed: int) -> str:
  return f"{scheme}_L{sub_layers}_lr{common.fmt_lr(lr)}_seed{seed}"


def cell_arg(config, scheme: str, sub_layers: int, lr: float, seed: int) -> str:
  return f"configs/depth_scaling.py:{config.size},{scheme},{sub_layers},{common.fmt_lr(lr)},{seed}"


def cell_config(config, scheme: str, sub_layers: int, lr: float, seed: int):
  return cfg_module.cell_config(config, scheme, str(sub_layers), common.fmt_lr(lr), str(seed))


# ---------------------------------------------------------------- what has run, what is missing


@dataclasses.dataclass
class Run:
  scheme: str
  sub_layers: int
  lr: float
  seed: int
  record: dict | None  # None: missing
  code: str = ""  # source | behaviour | unrecorded | stale (reused with reuse_stale)

  @property
  def eval_loss(self) -> float:
    if not self.record or self.record["status"] != "ok":
      return math.nan
    return self.record["eval"].get("eval/loss", math.nan)

  @property
  def accuracy(self) -> float:
    """arith exact match, or the downstream suite's average where the run scored it."""
    if not self.record or self.record["status"] != "ok":
      return math.nan
    scores = self.record["eval"]
    return scores.get("eval/exact_match", scores.get("tasks/average", math.nan))


def accuracy_label(config) -> str | None:
  """What the accuracy column holds under `config`, or None when it has none."""
  if config.train.get("task_eval_every", 0) > 0:
    return f"downstream average ({config.train.tasks})"
  return "arith exact match" if config.data.name == "arith" else None


def records_dir(config, root: str) -> str:
  """Where aggregation keeps each finished run's record (config, scores, provenance), beside
  the tables: committed with them, so a sweep resumes on a new machine from a clean root."""
  return paths.join(config.get("results_dir") or root, RECORDS)


class Cells:
  """Finished cells under root (or recorded in the results), checked against config and code."""

  def __init__(self, config, root: str):
    self.config, self.root = config, root
    self.records_dir = records_dir(config, root)
    self.fingerprint_dir = os.path.join(root, "provenance")
    self._now: dict[str, dict] = {}

  def now(self, scheme: str) -> dict:
    if scheme not in self._now:
      self._now[scheme] = provenance.current(scheme, self.fingerprint_dir)
    return self._now[scheme]

  def get(self, scheme: str, sub_layers: int, lr: float, seed: int) -> Run:
    name = cell_name(scheme, sub_layers, lr, seed)
    rec = cells.read(self.root, name)
    if rec is None:  # finished in another session (committed records)
      path = paths.join(self.records_dir, f"{name}.json")
      rec = paths.read_json(path) if paths.exists(path) else None
    run = Run(scheme, sub_layers, lr, seed, None)
    cfg = cell_config(self.config, scheme, sub_layers, lr, seed)
    if rec is None or not cells.same_config(rec["config"], cfg.to_dict()):
      return run
    prov = rec.get("provenance")
    if prov is None:
      run.record, run.code = rec, "unrecorded"  # trained elsewhere with the plain commands
    elif prov["source_hash"] == provenance.source_hash():
      run.record, run.code = rec, "source"
    elif code := provenance.same_code(prov, self.now(scheme)):
      run.record, run.code = rec, code
    elif self.config.reuse_stale:
      run.record, run.code = rec, "stale"
    return run


@dataclasses.dataclass
class Cell:
  """One (scheme, depth): its LR search at the first seed and the re-trained seeds."""

  scheme: str
  sub_layers: int
  grid: list[Run]
  seeds: list[Run]
  best: Run | None = None
  state: str = "pending"  # pending | done | failed | skipped | waiting (for a shallower LR)
  note: str = ""

  def missing(self) -> list[Run]:
    return [r for r in self.grid + self.seeds if r.record is None]


def plan(config, found: Cells, unigram: float) -> list[Cell]:
  """Every (scheme, depth) cell with its runs so far, in training order (depth-major)."""
  step, seeds = config.log10_lr_step, list(config.seeds)
  follow = config.lr_follow_depth
  out, last_best, failed_at, waiting_on = [], {}, {}, {}
  for sub_layers in sorted(residual.sublayers(n) for n in config.sweep.num_blocks):
    for scheme in config.sweep.residual:
      if scheme in failed_at:
        out.append(Cell(scheme, sub_layers, [], [], state="skipped"))
        out[-1].note = f"not run: failed at {failed_at[scheme]} sub-layers"
        continue
      if scheme in waiting_on:  # its grid starts from a shallower depth's best LR
        out.append(Cell(scheme, sub_layers, [], [], state="waiting"))
        out[-1].note = f"waits for the LR chosen at {waiting_on[scheme]} sub-layers"
        continue
      if follow and scheme in last_best:
        x = last_best[scheme]
        xs = [x - step, x, x + step]
      else:
        xs = sorted(config.log10_lrs)
      cell = search(config, found, scheme, sub_layers, xs, seeds[0], unigram)
      out.append(cell)
      if cell.state == "failed" and scheme in config.stop_after_failure:
        failed_at[scheme] = sub_layers
      if cell.best is not None:
        last_best[scheme] = math.log10(cell.best.lr)
        cell.seeds = [found.get(scheme, sub_layers, cell.best.lr, s) for s in seeds[1:]]
        if not cell.missing():
          cell.state = "done"
      elif cell.state == "pending" and follow:
        waiting_on[scheme] = sub_layers
  return out


def search(config, found, scheme, sub_layers, xs, seed, unigram) -> Cell:
  """The LR grid at `seed`, extended at an edge that holds the best loss until bracketed."""
  step = config.log10_lr_step
  xs = [round(x, 6) for x in xs]
  lo = hi = 0
  while True:
    grid = [found.get(scheme, sub_layers, lr_of(x), seed) for x in xs]
    cell = Cell(scheme, sub_layers, grid, [])
    if any(r.record is None for r in grid):
      return cell
    losses = [r.eval_loss for r in grid]
    i = min(range(len(xs)), key=lambda j: losses[j] if math.isfinite(losses[j]) else math.inf)
    if i == 0 and len(xs) > 1 or len(xs) == 1:
      if lo < config.max_extend:
        xs, lo = [round(xs[0] - step, 6)] + xs, lo + 1
        continue
    if i == len(xs) - 1 and hi < config.max_extend:
      xs, hi = xs + [round(xs[-1] + step, 6)], hi + 1
      continue
    if not losses[i] < unigram - config.fail_margin:  # also when every run is non-finite
      cell.state = "failed"
      cell.note = (
        f"failed: at every LR tried ({', '.join(common.fmt_lr(r.lr) for r in grid)}) non-finite "
        f"or within {config.fail_margin} nats of the unigram loss {unigram:.3f}"
      )
      return cell
    cell.best = grid[i]
    edge = i in (0, len(xs) - 1)
    cell.note = (
      f"LR {common.fmt_lr(grid[i].lr)} at the grid's edge after {config.max_extend} extensions: "
      "NOT bracketed"
      if edge
      else f"LR {common.fmt_lr(grid[i].lr)} bracketed"
    )
    return cell


# ---------------------------------------------------------------- statistics and verdict


def stats(values) -> tuple[float, float, int]:
  v = [x for x in values if math.isfinite(x)]
  if not v:
    return math.nan, math.nan, 0
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def welch(a, b) -> tuple[float, float]:
  """(t, two-sided p) of Welch's unequal-variance t-test; nan with fewer than 2 per side."""
  from scipy import stats as st

  a = [x for x in a if math.isfinite(x)]
  b = [x for x in b if math.isfinite(x)]
  if len(a) < 2 or len(b) < 2:
    return math.nan, math.nan
  r = st.ttest_ind(a, b, equal_var=False)
  return float(r.statistic), float(r.pvalue)


def seed_values(cell: Cell, metric: str) -> list[float]:
  if cell.best is None:
    return []
  return [getattr(r, metric) for r in [cell.best] + cell.seeds if r.record is not None]


def verdict(config, table: dict[tuple[str, int], Cell], depths, unigram=math.nan) -> list[str]:
  out = [
    f"Test: Welch's unequal-variance t-test over the seeds at each scheme's chosen LR, two-sided, "
    f"α = {ALPHA}; a difference is 'beyond seed noise' when p < α. The LR is chosen at seed "
    f"{config.seeds[0]}, which is also one of the seeds averaged."
  ]
  if "keel" in config.sweep.residual and "pre_ln" in config.sweep.residual:
    gaps, beyond, parts = [], [], []
    for d in depths:
      k, p = table[("keel", d)], table[("pre_ln", d)]
      kl, pl = seed_values(k, "eval_loss"), seed_values(p, "eval_loss")
      if not kl or not pl:
        parts.append(f"{d}: keel {k.state}, pre_ln {p.state}")
        continue
      gap = float(np.mean(pl) - np.mean(kl))
      _, pv = welch(pl, kl)
      gaps.append((d, gap, kl, pl))
      if math.isfinite(pv) and pv < ALPHA and gap > 0:
        beyond.append(d)
      parts.append(f"{d}: {gap:+.4f} (p={pv:.3g}, n={len(kl)}/{len(pl)})")
    out.append(
      "Keel vs Pre-LN, eval loss (Pre-LN minus Keel; positive = Keel better): "
      + "; ".join(parts)
      + f". Keel better beyond seed noise at: {beyond or 'no depth'}."
    )
    acc_parts = []
    for d in depths:
      ka = seed_values(table[("keel", d)], "accuracy")
      pa = seed_values(table[("pre_ln", d)], "accuracy")
      if ka and pa and all(map(math.isfinite, ka + pa)):
        _, pv = welch(ka, pa)
        acc_parts.append(f"{d}: {np.mean(ka) - np.mean(pa):+.3f} (p={pv:.3g})")
    if acc_parts:
      out.append(
        "Keel vs Pre-LN, arith exact match (Keel minus Pre-LN): " + "; ".join(acc_parts) + "."
      )
    if len(gaps) >= 2:
      (d0, g0, k0, p0), (d1, g1, k1, p1) = gaps[0], gaps[-1]
      # The gap's standard error at one depth: both schemes' seed spreads, as in Welch's test.
      se = lambda k, p: math.sqrt(np.var(k, ddof=1) / len(k) + np.var(p, ddof=1) / len(p))
      z = (g1 - g0) / max(math.hypot(se(k0, p0), se(k1, p1)), 1e-12)
      slope = np.polyfit([math.log2(d) for d, *_ in gaps], [g for _, g, *_ in gaps], 1)[0]
      out.append(
        f"Does the gap grow with depth? From {d0} to {d1} sub-layers it changes by "
        f"{g1 - g0:+.4f} nats (z = {z:.2f} against the two gaps' combined standard error; "
        f"|z| > 1.96 is beyond noise); least-squares slope {slope:+.4f} nats per doubling. "
        + (
          "Grows beyond noise."
          if z > 1.96
          else "Shrinks beyond noise."
          if z < -1.96
          else "Not beyond noise."
        )
      )
  for s in config.sweep.residual:
    # Runs of a cell that trains which still did not learn beyond token frequencies.
    stuck = (
      [
        f"{d} (LR {r.lr:.3g}, seed {r.seed}: {r.eval_loss:.3f})"
        for d in depths
        if table[(s, d)].state == "done"
        for r in table[(s, d)].grid + table[(s, d)].seeds
        if r.record is not None and not r.eval_loss < unigram - config.fail_margin
      ]
      if math.isfinite(unigram)
      else []
    )
    if stuck:
      out.append(
        f"{s}: runs no better than the unigram loss {unigram:.3f} (less than "
        f"{config.fail_margin} nats below it, or non-finite) in cells that train: "
        f"{', '.join(stuck)}."
      )
    fails = [d for d in depths if table[(s, d)].state in ("failed", "skipped")]
    if fails:
      out.append(f"{s}: fails (or is not run after failing) at {fails} sub-layers.")
    edge = [d for d in depths if "NOT bracketed" in table[(s, d)].note]
    if edge:
      out.append(f"{s}: chosen LR at a grid edge (not bracketed) at {edge} sub-layers.")
  return out


# ---------------------------------------------------------------- outputs


def pm(mean: float, std: float, n: int, digits: int = 4) -> str:
  if n == 0:
    return ""
  s = f"{mean:.{digits}f}"
  return s + (f" ± {std:.{digits}f}" if n > 1 else "") + f" (n={n})"


def run_row(config, r: Run, chosen: bool) -> dict:
  rec = r.record or {}
  prov = rec.get("provenance") or {}
  status = rec.get("status", "missing")
  secs = rec.get("seconds")
  return {
    "scheme": r.scheme,
    "sub_layers": r.sub_layers,
    "seed": r.seed,
    "lr": r.lr,
    "status": status,
    "eval_loss": r.eval_loss,
    "accuracy": r.accuracy,
    "steps": config.train.num_steps if status == "ok" else "",
    "tokens": config.train.num_steps * config.train.batch_size * config.data.seq_len
    if status == "ok"
    else "",
    "minutes": secs / 60 if secs is not None else math.nan,
    "chosen_lr": chosen,
    "code": r.code,
    "commit": prov.get("commit", ""),
    "source_hash": prov.get("source_hash", ""),
    "fingerprint": prov.get("fingerprint_hash", ""),
  }


RUN_COLUMNS = [
  "scheme", "sub_layers", "seed", "lr", "status", "eval_loss", "accuracy", "steps", "tokens",
  "minutes", "chosen_lr", "code", "commit", "source_hash", "fingerprint",
]  # fmt: skip


def plot(config, table, depths, path: str) -> str:
  plt = common.pyplot()
  metrics = [("eval_loss", "eval loss (nats/token)")]
  if accuracy_label(config):
    metrics.append(("accuracy", accuracy_label(config)))
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics) + 1, 4), squeeze=False)
  axes = axes[0]
  for s in config.sweep.residual:
    for ax, (metric, _) in zip(axes, metrics, strict=True):
      xs, ys, es = [], [], []
      for d in depths:
        m, sd, n = stats(seed_values(table[(s, d)], metric))
        if n:
          xs.append(d), ys.append(m), es.append(sd if n > 1 else 0.0)
      if xs:
        ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=s)
  for ax, (_, label) in zip(axes, metrics, strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth (sub-layers)")
    ax.set_ylabel(label + ", mean ± std over seeds")
    ax.legend()
  fig.suptitle(
    f"depth scaling: d={config.model.d_model}, {config.train.num_steps} steps, chosen LR per cell"
  )
  return common.save_figure(fig, path)


def aggregate(
  config, root: str, out_dir: str, cell_list: list[Cell], unigram: float, env, seconds: float
) -> dict:
  depths = sorted(residual.sublayers(n) for n in config.sweep.num_blocks)
  table = {(c.scheme, c.sub_layers): c for c in cell_list}
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  records = records_dir(config, root)
  paths.makedirs(records)
  for c in cell_list:
    for r in c.grid + c.seeds:
      if r.record is not None:
        rows.append(run_row(config, r, c.best is not None and r.lr == c.best.lr))
        name = cell_name(r.scheme, r.sub_layers, r.lr, r.seed)
        paths.write_json(paths.join(records, f"{name}.json"), r.record, indent=1)
  runs_md = common.write_table(os.path.join(out_dir, "runs"), RUN_COLUMNS, rows)

  table_rows = []
  for d in depths:
    row = {"sub_layers": d}
    for s in config.sweep.residual:
      c = table[(s, d)]
      chosen = [c.best] + c.seeds if c.best else []
      # † marks a cell with runs made by other sources (same numbers) or unrecorded code.
      older = any(r.record is not None and r.code != "source" for r in chosen)
      row[f"{s} loss"] = pm(*stats(seed_values(c, "eval_loss"))) + (" †" if older else "")
      if accuracy_label(config):
        row[f"{s} acc"] = pm(*stats(seed_values(c, "accuracy")), digits=3)
      row[f"{s} lr"] = common.fmt_lr(c.best.lr) if c.best else ""
      row[f"{s} state"] = c.state
      if s in PAPER_TABLE3:
        row[f"paper {s} avg score"] = PAPER_TABLE3[s].get(d, "")
    table_rows.append(row)
  table_md = common.write_table(os.path.join(out_dir, "table"), list(table_rows[0]), table_rows)

  missing = []
  for c in cell_list:
    for r in c.missing():
      missing.append(
        {
          "cell": cell_name(r.scheme, r.sub_layers, r.lr, r.seed),
          "command": "`"
          + cells.commands(
            cell_arg(config, r.scheme, r.sub_layers, r.lr, r.seed),
            root,
            cell_name(r.scheme, r.sub_layers, r.lr, r.seed),
            config.num_prompts,
          )
          + "`",
        }
      )
  missing_md = ""
  if missing:
    missing_md = common.write_table(os.path.join(out_dir, "missing"), ["cell", "command"], missing)
  else:  # a finished sweep has no missing table (and no stale one from an earlier aggregation)
    for stale in (paths.join(out_dir, "missing" + ext) for ext in (".csv", ".md")):
      if paths.exists(stale):
        paths.path(stale).unlink()  # epath: a gs:// results dir too
  plot(config, table, depths, os.path.join(out_dir, "depth_vs_metric.png"))
  lines = verdict(config, table, depths, unigram)
  notes = "\n".join(f"* {c.scheme} at {c.sub_layers}: {c.state}. {c.note}" for c in cell_list)
  older = sum(r["code"] != "source" for r in rows)
  stale_note = (
    f"\n\n{older} run(s) were not made by this source (column `code`): `behaviour` = older "
    "source, same numbers (the behavioural fingerprint matches); `unrecorded` = trained "
    "elsewhere with the plain commands; `stale` = other numbers, reused with reuse_stale. † in "
    "the table marks the cells that hold them."
    if older
    else ""
  )
  finished = sum(c.state in ("done", "failed", "skipped") for c in cell_list)
  fingerprint = None
  for r in rows:  # every run trains on the same data; show the first one's fingerprint
    path = paths.join(
      cells.cell_dir(root, cell_name(r["scheme"], r["sub_layers"], r["lr"], r["seed"])),
      "data_fingerprint.json",
    )
    if paths.exists(path):
      fingerprint = common.read_json(path)
      break
  common.write_readme(
    out_dir,
    "Depth scaling (Table 3)",
    PAPER,
    env,
    fingerprint,
    [
      (
        "Mean ± std over seeds at the chosen LR",
        f"Width {config.model.d_model}, {config.train.num_steps} steps × "
        f"{config.train.batch_size} × {config.data.seq_len} tokens of `{config.data.name}`; "
        "eval loss in nats/token"
        + (
          f"; `acc` = exact match of greedy answers to {config.num_prompts} validation problems "
          f"(arith_steps={config.data.arith_steps}; chance ≈ 0.1)"
          if config.data.name == "arith"
          else f"; `acc` = {accuracy_label(config)}"
          if accuracy_label(config)
          else ""
        )
        + f". Unigram loss of this data: {unigram:.4f}. Paper columns: arXiv 2601.19895 Table 3, "
        "average score of 14 downstream benchmarks at width 1024 (higher is better; not the same "
        f"metric). {finished} of {len(cell_list)} (scheme, depth) cells finished.\n\n"
        + table_md
        + "\n![depth vs metric](depth_vs_metric.png)",
      ),
      ("Learning-rate choice per cell", notes),
      ("Every run", runs_md + stale_note),
      (
        "Missing",
        (missing_md if missing else "Nothing: every cell has finished.")
        + "\n\nOnly runs whose LR is already known are listed: a `waiting` cell gets its grid "
        "when the shallower depth's LR is chosen. Running this experiment's command again trains "
        f"them (finished cells are skipped). Cells live under `{root}`.",
      ),
    ],
    lines,
    seconds,
    run_seconds=sum(r["minutes"] * 60 for r in rows if math.isfinite(r["minutes"])),
  )
  return {"rows": rows, "table": table_rows, "missing": missing, "verdict": lines}


# ---------------------------------------------------------------- driver


def train_cell(config, root: str, spec: str) -> dict:
  """--config.cell=<scheme>,<sub_layers>,<lr>,<seed>: trains that one cell."""
  try:
    scheme, sub_layers, lr, seed = spec.split(",")
    cfg = cell_config(config, scheme, int(sub_layers), float(lr), int(seed))
  except ValueError as e:
    raise ValueError(
      f"--config.cell={spec!r}: expected <scheme>,<sub_layers>,<lr>,<seed> ({e})"
    ) from e
  name = cell_name(scheme, int(sub_layers), float(lr), int(seed))
  print(f"[depth_scaling] cell {name}: training", flush=True)
  rec = cells.train(cfg, root, name, config.num_prompts, os.path.join(root, "provenance"))
  print(
    f"[depth_scaling] cell {name}: {rec['status']} eval {rec['eval']} "
    f"({rec['seconds'] / 60:.1f} min)",
    flush=True,
  )
  return rec


def run(config, workdir: str) -> dict:
  if config.cell:
    return train_cell(config, workdir, config.cell)
  started = time.perf_counter()
  env = common.environment()
  unigram = common.unigram_loss(experiment.run_config(config))
  found = Cells(config, workdir)
  log = os.path.join(workdir, "cells.log")
  trained: set[str] = set()
  while True:
    cell_list = plan(config, found, unigram)
    todo = [r for c in cell_list for r in c.missing()]
    print(f"[depth_scaling] {len(todo)} runs to train next", flush=True)
    if not todo or not config.train_missing:
      break
    r = todo[0]
    name = cell_name(r.scheme, r.sub_layers, r.lr, r.seed)
    if name in trained:  # its record does not match what the plan asks for: a bug, not a rerun
      raise RuntimeError(f"cell {name} was trained but is still missing; see {log}")
    trained.add(name)
    spec = f"{r.scheme},{r.sub_layers},{common.fmt_lr(r.lr)},{r.seed}"
    t0 = time.perf_counter()
    if config.isolate:
      with open(log, "a") as f:
        rc = cells.train_in_subprocess("depth_scaling", config_args(), workdir, spec, f)
      if rc != 0:
        raise RuntimeError(f"cell {name} failed (exit {rc}); see {log}")
    else:
      train_cell(config, workdir, spec)
    print(f"[depth_scaling] {name} done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
  out_dir = config.get("results_dir") or workdir
  res = aggregate(config, workdir, out_dir, cell_list, unigram, env, time.perf_counter() - started)
  print(paths.read_text(paths.join(out_dir, "table.md")), flush=True)
  print("\n".join(res["verdict"]), flush=True)
  return res


def config_args() -> list[str]:
  """This command's --config flags: a cell's subprocess trains with the same overrides."""
  return [a for a in sys.argv[1:] if a.startswith("--config")]


def main():
  common.main(run)


if __name__ == "__main__":
  main()
