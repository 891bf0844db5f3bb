"""remat_policy="auto": the fastest remat policy whose compiled train step fits a memory budget.

Candidates, fastest first (least recomputation): none (nothing recomputed), branch (the forward
minus each sub-layer's output projections), full (the whole forward), nested (√L nested remat:
the forward twice). Each is compiled for the run's mesh (real devices, or a TPU topology when
AOT-compiling) and its memory measured with `compiled.memory_analysis()`; the first that fits
`config.train.memory_budget_gb` (0 → the device's memory) wins.
"""

from __future__ import annotations

import dataclasses
import os

from keel_jax import builders, compiled

GB = 1e9
# (name, model overrides), fastest first.
CANDIDATES = (
  ("none", dict(remat_policy="none", nested_remat=False)),
  ("branch", dict(remat_policy="branch", nested_remat=False)),
  ("full", dict(remat_policy="full", nested_remat=False)),
  ("nested", dict(remat_policy="full", nested_remat=True)),
)


@dataclasses.dataclass
class Choice:
  name: str  # one of CANDIDATES' names
  budget_bytes: int
  needed: dict  # candidate name → step bytes, for those compiled

  def summary(self) -> str:
    tried = ", ".join(f"{n} needs {b / GB:.3g} GB" for n, b in self.needed.items())
    return (
      f"remat auto: chose {self.name!r}, the least recomputation whose compiled step fits "
      f"the {self.budget_bytes / GB:.3g} GB budget ({tried})"
    )


def available_ram_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int:
  """A device's memory: HBM from the backend (or the vendor table for AOT topologies), RAM on
  CPU."""
  if device.platform == "cpu":
    return available_ram_bytes()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # AOT topology devices have no runtime behind them
    stats = {}
  limit = stats.get("bytes_limit") or compiled.hbm_bytes(device.device_kind)
  if not limit:
    raise ValueError(
      f"cannot tell the memory of {device.device_kind!r}; set config.train.memory_budget_gb"
    )
  return int(limit)


def budget_bytes(config, device) -> int:
  gb = config.train.get("memory_budget_gb", 0.0)
  if gb < 0:
    raise ValueError(f"config.train.memory_budget_gb={gb} must be >= 0 (0: the device's memory)")
  return int(gb * GB) if gb else device_memory_bytes(device)


def step_bytes(s: builders.Setup, backend: str) -> int:
  executable, _ = compiled.compile_train_step(s, backend)
  return compiled.memory_report(executable, None)["total"]


def choose(s: builders.Setup, device, measure=step_bytes) -> tuple[builders.Setup, Choice]:
  """`s` with its remat policy resolved; unchanged (and no Choice) unless it is "auto"."""
  if s.model_cfg.remat_policy != "auto":
    return s, None
  budget = budget_bytes(s.config, device)
  needed = {}
  for name, overrides in CANDIDATES:
    candidate = dataclasses.replace(s, model_cfg=dataclasses.replace(s.model_cfg, **overrides))
    needed[name] = measure(candidate, device.platform)
    if needed[name] <= budget:
      return candidate, Choice(name, budget, needed)
  raise ValueError(
    f"no remat policy fits config.train.memory_budget_gb={budget / GB:.3g} GB (least: nested, "
    f"{needed['nested'] / GB:.3g} GB); raise the budget, or add config.train.grad_accum_steps "
    "or devices"
  )
