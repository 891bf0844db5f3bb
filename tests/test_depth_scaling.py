"""The depth-scaling planner (LR bracketing, seeds, failure), cells' config matching and the
provenance rule, on made-up losses: no training."""

from __future__ import annotations

import json
import math

import pytest

from configs import depth_scaling as cfg_module
from experiments import cells, provenance
from experiments import depth_scaling as ds

UNIGRAM = 3.0


class FakeCells:
  """Finished cells on demand: loss(scheme, sub_layers, lr) or None (non-finite)."""

  def __init__(self, loss):
    self.loss, self.done, self.order = loss, set(), []

  def get(self, scheme, sub_layers, lr, seed):
    key = (scheme, sub_layers, lr, seed)
    run = ds.Run(scheme, sub_layers, lr, seed, None)
    if key in self.done:
      v = self.loss(scheme, sub_layers, lr)
      status = "ok" if v is not None else "nonfinite"
      run.record = {"status": status, "eval": {"eval/loss": v + 0.01 * seed if v else math.nan}}
      run.code = "source"
    return run

  def sweep(self, config, limit=500):
    """Trains the first missing run until none is missing, as experiments.depth_scaling does."""
    for _ in range(limit):
      todo = [r for c in ds.plan(config, self, UNIGRAM) for r in c.missing()]
      if not todo:
        return ds.plan(config, self, UNIGRAM)
      r = todo[0]
      key = (r.scheme, r.sub_layers, r.lr, r.seed)
      assert key not in self.done, f"{key} asked for twice"
      self.done.add(key)
      self.order.append(key)
    raise AssertionError("the plan never finished")


def config(schemes=None, num_blocks=None, **kw):
  c = cfg_module.get_config("cpu")
  if schemes is not None:
    c.sweep.residual = schemes
  if num_blocks is not None:
    c.sweep.num_blocks = num_blocks
  c.update(kw)
  return c


def bowl(opt_log10):
  """Loss with its minimum at lr = 10**opt_log10(scheme, sub_layers)."""
  return lambda s, d, lr: 2.0 + (math.log10(lr) - opt_log10(s, d)) ** 2


def test_grid_extends_until_the_optimum_is_bracketed():
  # Optimum far above the first grid (-3, -2.5, -2): needs two extensions up.
  fake = FakeCells(bowl(lambda s, d: -1.0))
  cells_ = fake.sweep(config(schemes=("keel",), num_blocks=(32,)))
  (cell,) = cells_
  assert cell.state == "done" and "bracketed" in cell.note and "NOT" not in cell.note
  assert cell.best.lr == pytest.approx(0.1)
  assert [round(math.log10(r.lr), 3) for r in cell.grid] == [-3, -2.5, -2, -1.5, -1, -0.5]
  assert [r.seed for r in cell.seeds] == [1, 2] and all(r.lr == 0.1 for r in cell.seeds)


def test_extension_limit_reports_an_unbracketed_edge():
  fake = FakeCells(lambda s, d, lr: 2.0 - lr)  # the larger the better: never bracketed
  (cell,) = fake.sweep(config(schemes=("keel",), num_blocks=(32,), max_extend=2))
  assert "NOT bracketed" in cell.note and len(cell.grid) == 5
  c = config(schemes=("keel",), num_blocks=(32,), max_extend=2)
  assert any("not bracketed" in v for v in ds.verdict(c, {("keel", 64): cell}, [64]))


def test_divergence_above_brackets_the_optimum():
  # Best at the top of the grid, but the next LR diverges: bracketed by the divergence.
  fake = FakeCells(lambda s, d, lr: None if lr > 0.011 else 2.0 - lr)
  (cell,) = fake.sweep(config(schemes=("keel",), num_blocks=(32,)))
  assert cell.best.lr == 0.01 and "NOT" not in cell.note
  assert cell.grid[-1].record["status"] == "nonfinite"


def test_deeper_grid_follows_the_shallower_best_and_runs_depth_major():
  fake = FakeCells(bowl(lambda s, d: -2.5 if s == "keel" else -3.0))
  cells_ = fake.sweep(config(schemes=("keel", "pre_ln"), num_blocks=(32, 64)))
  deep_keel = [c for c in cells_ if c.scheme == "keel" and c.sub_layers == 128][0]
  assert sorted(round(math.log10(r.lr), 3) for r in deep_keel.grid) == [-3, -2.5, -2]
  depths = [k[1] for k in fake.order]
  assert depths == sorted(depths)  # every 64-sub-layer run before any 128-sub-layer one


def test_post_ln_stops_after_the_depth_where_it_fails():
  def loss(s, d, lr):
    return UNIGRAM - 0.01 if s == "post_ln" and d >= 128 else 2.0 + (math.log10(lr) + 2.5) ** 2

  fake = FakeCells(loss)
  cells_ = fake.sweep(config(schemes=("keel", "post_ln"), num_blocks=(32, 64, 128)))
  state = {(c.scheme, c.sub_layers): c.state for c in cells_}
  assert state[("post_ln", 64)] == "done" and state[("post_ln", 128)] == "failed"
  assert state[("post_ln", 256)] == "skipped" and state[("keel", 256)] == "done"
  assert not [k for k in fake.order if k[0] == "post_ln" and k[1] == 256]


def test_welch_verdict_needs_a_gap_beyond_the_seed_spread():
  def cell(scheme, d, losses):
    runs = [ds.Run(scheme, d, 1e-3, i, {"status": "ok", "eval": {"eval/loss": v}}) for i, v in
            enumerate(losses)]  # fmt: skip
    return ds.Cell(scheme, d, runs[:1], runs[1:], best=runs[0], state="done")

  c = config(schemes=("keel", "pre_ln"), num_blocks=(32, 64))
  table = {
    ("keel", 64): cell("keel", 64, [2.0, 2.3, 1.7]),  # noisy: a 0.1 gap is within noise
    ("pre_ln", 64): cell("pre_ln", 64, [2.1, 2.4, 1.8]),
    ("keel", 128): cell("keel", 128, [2.0, 2.01, 1.99]),
    ("pre_ln", 128): cell("pre_ln", 128, [2.5, 2.51, 2.49]),
  }
  lines = ds.verdict(c, table, [64, 128])
  assert "beyond seed noise at: [128]" in lines[1]
  assert "Grows beyond noise" in lines[-1] or "Not beyond noise" in lines[-1]
  # With the unigram loss known, a seed of a training cell that stayed near it is named.
  table[("pre_ln", 128)] = cell("pre_ln", 128, [2.5, 2.51, 3.0])
  c.fail_margin = 0.05
  stuck = [v for v in ds.verdict(c, table, [64, 128], unigram=3.02) if "unigram" in v]
  assert stuck == [
    "pre_ln: runs no better than the unigram loss 3.020 (less than 0.05 nats below it, or "
    "non-finite) in cells that train: 128 (LR 0.001, seed 2: 3.000)."
  ]


def test_same_config_ignores_bookkeeping_and_added_fields():
  c = cfg_module.get_config("ci,keel,2,0.00316,0")
  stored = json.loads(json.dumps(c.to_dict()))  # as cell.json gives it back
  assert cells.same_config(stored, c.to_dict())
  c.train.log_every = 7  # changes no number
  assert cells.same_config(stored, c.to_dict())
  stored["model"].pop("remat_policy")  # a field a refactor added since
  assert cells.same_config(stored, c.to_dict())
  c.train.learning_rate = 0.01
  assert not cells.same_config(stored, c.to_dict())


def test_provenance_reuses_by_source_or_behaviour_only():
  now = {"source_hash": "a", "fingerprint": [3.0, 2.5, 10.0]}
  assert provenance.same_code({"source_hash": "a", "fingerprint": [9.0]}, now) == "source"
  near = [3.0 * (1 + 1e-6), 2.5, 10.0]  # a reordered sum after a refactor
  assert provenance.same_code({"source_hash": "b", "fingerprint": near}, now) == "behaviour"
  assert provenance.same_code({"source_hash": "b", "fingerprint": [3.01, 2.5, 10.0]}, now) is None
  assert provenance.same_code(None, now) is None


def test_cell_config_is_what_the_sweep_trains():
  c = cfg_module.get_config("cpu,pre_ln,128,0.00316,2")
  assert (c.model.residual, c.model.num_blocks) == ("pre_ln", 64)
  assert (c.train.learning_rate, c.train.seed, c.data.name) == (0.00316, 2, "pycode")
  with pytest.raises(ValueError, match="multiple of 2"):
    cfg_module.get_config("cpu,keel,3,0.001,0")


def test_paper_cells_score_the_downstream_suite(tmp_path):
  """`paper` cells run the task suite at the end of training; a cell's accuracy is its average."""
  paper = cfg_module.get_config("paper")
  assert paper.train.task_eval_every == paper.train.num_steps and paper.train.task_limit == 0
  assert ds.accuracy_label(paper).startswith("downstream average (arc_easy,")
  assert ds.accuracy_label(cfg_module.get_config("cpu")) is None
  # A cell trained on a pod with the plain commands: config.json, the eval report, metrics.
  d = tmp_path / cells.CELLS / "keel_L64"
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({"train": {"num_steps": 3}}))
  (d / "eval_step_3.json").write_text(json.dumps({"eval/loss": 2.5}))
  rows = [{"step": 2, "train/loss": 3.0}, {"step": 3, "tasks/average": 0.4, "tasks/piqa/acc": 0.6}]
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  record = cells.read(str(tmp_path), "keel_L64")
  assert record["eval"] == {"eval/loss": 2.5, "tasks/average": 0.4, "tasks/piqa/acc": 0.6}
  run = ds.Run("keel", 64, 1e-3, 0, record)
  assert run.accuracy == 0.4 and run.eval_loss == 2.5
