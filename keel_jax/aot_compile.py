"""AOT-compile the real sharded train step for a TPU topology, on any machine (even a laptop).

  python -m keel_jax.aot_compile --config=configs/keel_1024.py --topology=v5p:4x4x8

Needs libtpu (`pip install -e ".[tpu]"`); no TPU and no data. The topology's devices come from
`jax.experimental.topologies`, the mesh and sharding rules from the config, the step from
`keel_jax.steps`, compiled by `keel_jax.compiled`. Prints per-device memory from
`compiled.memory_analysis()` against the chip's HBM, beside the analytic floor
(keel_jax.memory_floor); the last stdout line is JSON with topology, num_devices,
compile_seconds, bytes_per_device, floor_bytes_per_device, hbm_bytes_per_device and fits.

The data is never built (a c4-sized corpus need not exist here): the vocabulary size is the
config's, or derived from the tokenizer settings alone (byte: 256 + specials; sentencepiece: a
given .model file's size, else config.data.spm_vocab_size, which is what the trainer makes).
"""

from __future__ import annotations

import json
import math
import os
import re
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from keel_jax import attention, builders, compiled, memory_floor, remat_auto, sharding
from keel_jax.compiled import GiB


def quiet_libtpu(topology: str) -> None:
  """Environment libtpu reads on start-up; without it, it probes for a TPU VM and logs errors."""
  gen = topology.split(":")[0]
  chips = math.prod(int(n) for n in re.findall(r"\d+", topology.split(":")[-1]))
  # Slice names count chips on v5e/v6e and TensorCores (2 per chip) on v4/v5p.
  per_chip = 1 if gen in ("v5e", "v6e", "v5litepod") else 2
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{chips * per_chip}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Other processes (parallel tests, a training job) may hold libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str) -> list:
  from jax.experimental import topologies

  quiet_libtpu(topology)
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # no libtpu, or a name it does not know
    raise RuntimeError(
      f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); install libtpu "
      f'with `pip install -e ".[tpu]"` and use a name like v5e:2x2 or v5p:4x4x8'
    ) from e


def _compiler_rejection(e: Exception) -> int | None:
  """Bytes the compiler said it needed, when it refused a program too big for HBM."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
  if "RESOURCE_EXHAUSTED" not in str(e) or not m:
    return None
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def run(config, topology: str, vocab: int = 0) -> dict:
  """AOT-compiles config's train step for `topology`; prints the memory table, returns the JSON."""
  devices = topology_devices(topology)
  s = builders.setup(config, devices, vocab or None)
  if s.model_cfg.remat_policy == "auto":
    s, choice = remat_auto.choose(s, devices[0])
    print(choice.summary())
  kind = devices[0].device_kind
  hbm = compiled.hbm_bytes(kind)
  cfg = s.model_cfg
  num_params = sum(
    math.prod(a.shape) for a in jax.tree.leaves(builders.abstract_state(s)[0]["params"])
  )
  t0 = time.perf_counter()
  try:
    executable, seconds = compiled.compile_train_step(s, devices[0].platform)
    mem = compiled.memory_report(executable, hbm)
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler itself refuses programs whose temporaries exceed HBM: report, not crash.
    needed = _compiler_rejection(e)
    if needed is None:
      raise
    seconds, mem = time.perf_counter() - t0, {"temporaries": needed, "total": needed, "fits": False}
    print(f"compiler: {str(e).splitlines()[0]}")
  print(
    f"{topology}: {len(devices)} × {kind}, mesh {dict(s.mesh.shape)}; model "
    f"{cfg.num_sublayers} sub-layers, d={cfg.d_model}, {num_params / 1e9:.2f}B params, remat "
    f"{cfg.remat_policy}{' nested' if cfg.nested_remat else ''}, attention "
    f"{attention.resolve(cfg.attention_impl, devices[0].platform)}; batch "
    f"{config.train.batch_size}×{config.data.seq_len} in {config.train.grad_accum_steps} "
    f"micro-batch(es); compiled in {seconds:.1f} s"
  )
  print("per-device memory (compiled.memory_analysis()):")
  for name in ("arguments", "outputs", "aliased", "temporaries", "code", "total"):
    if name in mem:
      print(f"  {name:12s} {mem[name] / GiB:9.3f} GiB")
  # The floor with the state fully sharded: what no layout of this step can go below.
  dp = sharding.data_parallel_size(s.mesh, s.rules)
  floor = memory_floor.floor_bytes(config, cfg, num_params, len(devices), dp)
  print(f"  {'floor':12s} {floor / GiB:9.3f} GiB  (state sharded over all chips + live carries)")
  hbm_text = f"{hbm / GiB:.1f} GiB" if hbm else "unknown"
  print(f"  {'HBM':12s} {hbm_text:>13s}  → {'fits' if mem['fits'] else 'DOES NOT FIT'}")
  return {
    "topology": topology,
    "num_devices": len(devices),
    "compile_seconds": round(seconds, 2),
    "bytes_per_device": mem["total"],
    "floor_bytes_per_device": floor,
    "hbm_bytes_per_device": hbm,
    "fits": mem["fits"],
  }


def main(argv):
  del argv
  # The host only compiles: never start a local accelerator backend (libtpu would grab the TPU
  # lock file and probe for a TPU VM).
  jax.config.update("jax_platforms", "cpu")
  f = flags.FLAGS
  result = run(f.config, f.topology, f.vocab_size)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  # Defined here, not at import: other CLIs import this module and define their own --config.
  config_flags.DEFINE_config_file("config", None, "Training config file.")
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x2, v5p:4x4x8.")
  flags.DEFINE_integer("vocab_size", 0, "Tokenizer vocabulary (0: derive from the config).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
