"""remat_policy="auto" picks by the compiled step's memory: none under a large budget, full or
nested remat under a small one."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from configs import default
from keel_jax import builders, remat_auto


@pytest.fixture(scope="module")
def setup_and_bytes():
  c = default.get_config()
  # Many tokens per parameter: saved activations, not the state, decide the memory.
  c.model.update(d_model=32, num_heads=2, num_kv_heads=1, num_blocks=4, remat_policy="auto")
  c.data.seq_len = 128
  c.train.update(batch_size=8, diag_every=0)
  s = builders.setup(c, jax.devices()[:1], 256)
  needed = {}
  for name, overrides in remat_auto.CANDIDATES[:3]:  # nested compiles as slowly and adds nothing
    candidate = dataclasses.replace(s, model_cfg=dataclasses.replace(s.model_cfg, **overrides))
    needed[name] = remat_auto.step_bytes(candidate, "cpu")
  return s, needed


def choose(s, budget_bytes: float, needed: dict):
  s.config.train.memory_budget_gb = budget_bytes / remat_auto.GB
  measure = lambda c, _: needed.get(_name(c.model_cfg), needed["full"])
  return remat_auto.choose(s, jax.devices()[0], measure=measure)


def _name(cfg) -> str:
  return "nested" if cfg.nested_remat else cfg.remat_policy


def test_small_budget_picks_full_remat_large_picks_none(setup_and_bytes):
  s, needed = setup_and_bytes
  assert needed["none"] > needed["branch"] > needed["full"]  # what remat is for
  resolved, choice = choose(s, needed["none"], needed)
  assert choice.name == "none" and resolved.model_cfg.remat_policy == "none"
  resolved, choice = choose(s, needed["full"], needed)
  assert choice.name in ("full", "nested") and resolved.model_cfg.remat_policy == "full"
  assert set(choice.needed) >= {"none", "branch"}  # the faster ones were tried and did not fit
  assert "chose 'full'" in choice.summary() or "chose 'nested'" in choice.summary()


def test_nothing_fits_is_one_clear_line(setup_and_bytes):
  s, needed = setup_and_bytes
  with pytest.raises(ValueError, match="no remat policy fits config.train.memory_budget_gb"):
    choose(s, min(needed.values()) - 1, needed)


def test_policy_other_than_auto_is_left_alone(setup_and_bytes):
  s, _ = setup_and_bytes
  fixed = dataclasses.replace(s, model_cfg=dataclasses.replace(s.model_cfg, remat_policy="full"))
  assert remat_auto.choose(fixed, jax.devices()[0]) == (fixed, None)


def test_default_budget_is_available_ram_on_cpu():
  c = default.get_config()
  budget, ram = remat_auto.budget_bytes(c, jax.devices()[0]), remat_auto.available_ram_bytes()
  assert 0 < budget and abs(budget - ram) < 0.2 * ram  # other processes move it a little
  c.train.memory_budget_gb = 1.5
  assert remat_auto.budget_bytes(c, jax.devices()[0]) == 1.5e9
