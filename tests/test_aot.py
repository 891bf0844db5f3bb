"""AOT compilation of the real sharded train step for TPU topologies (libtpu, no TPU needed).

Each compile runs in a fresh process: libtpu reads its environment once, at start-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from keel_jax import aot_compile, builders, compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu is not installed: pip install -e ".[tpu]" (jax[tpu]==0.10.2) to AOT-compile',
)


def run_python(args: list[str]) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@needs_libtpu
def test_cli_compiles_smoke_for_v5e():
  proc = run_python(
    ["-m", "keel_jax.aot_compile", "--config=configs/smoke.py", "--topology=v5e:2x2"]
  )
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result) == {
    "topology", "num_devices", "compile_seconds", "bytes_per_device", "floor_bytes_per_device",
    "hbm_bytes_per_device", "fits",
  }  # fmt: skip
  assert 0 < result["floor_bytes_per_device"] < result["bytes_per_device"]
  assert result["topology"] == "v5e:2x2" and result["num_devices"] == 4
  assert result["hbm_bytes_per_device"] == 16 * GiB
  assert 0 < result["bytes_per_device"] < result["hbm_bytes_per_device"]
  assert result["fits"] is True and result["compile_seconds"] > 0
  assert "temporaries" in proc.stdout and "fits" in proc.stdout


SPLASH_SCRIPT = """
import json, jax
jax.config.update("jax_platforms", "cpu")
from configs import smoke
from keel_jax import aot_compile, attention, builders
from keel_jax.compiled import compile_train_step
c = smoke.get_config()
# A corpus that is not here and a tokenizer never trained: AOT must not touch the data.
c.data.update(name="no_such_corpus/en", tokenizer="sentencepiece", seq_len=128)
devices = aot_compile.topology_devices("v5p:2x2x1")
s = builders.setup(c, devices)
compiled, seconds = compile_train_step(s, "tpu")
kernel = "tpu_custom_call" in compiled.as_text()

# Splash alone on a 4-device mesh: one kernel per batch shard under the rules, and plain-JAX
# flash attention (partitioned by XLA) when no rules say how to split.
import flax.linen as nn, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(devices), ("data",))
spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
  shape, dtype, sharding=NamedSharding(mesh, P("data")))
args = (spec(4, 128, 1, 2, 128), spec(4, 128, 1, 128), spec(4, 128, 1, 128),
        spec(4, 128, dtype=jnp.int32))
# A fresh jit per context: the trace cache does not key on flax's axis rules.
f = lambda: jax.jit(lambda q, k, v, p: attention.splash_attention(q, k, v, p, p))
with jax.set_mesh(mesh):
  bare = "tpu_custom_call" in f().lower(*args).as_text()
  with nn.logical_axis_rules((("batch", "data"),)):
    ruled = "tpu_custom_call" in f().lower(*args).as_text()
print(json.dumps({"vocab": s.model_cfg.vocab_size, "num_devices": len(devices),
                  "kernel": kernel, "kernel_without_rules": bare, "kernel_with_rules": ruled}))
"""


@needs_libtpu
def test_splash_kernel_compiles_for_v5p_without_data():
  """With seq_len a multiple of 128, "auto" attention on TPU is the Pallas Splash kernel."""
  result = json.loads(run_python(["-c", SPLASH_SCRIPT]).stdout.strip().splitlines()[-1])
  assert result == {
    "vocab": 8192, "num_devices": 4, "kernel": True, "kernel_without_rules": False,
    "kernel_with_rules": True,
  }  # fmt: skip


def smoke_config():
  """configs/smoke.py, loaded by path (the repo root may not be on sys.path)."""
  sys.path.insert(0, ROOT)  # smoke.py imports configs.default
  try:
    spec = importlib.util.spec_from_file_location(
      "smoke", os.path.join(ROOT, "configs", "smoke.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(ROOT)
  return module.get_config()


def test_vocab_size_from_config_alone():
  c = smoke_config()
  assert builders.vocab_size(c) == 259  # bytes + pad, bos, eos
  c.data.update(tokenizer="sentencepiece", spm_vocab_size=4096)
  assert builders.vocab_size(c) == 4096
  c.model.vocab_size = 1000
  assert builders.vocab_size(c) == 1000


def test_memory_report_arithmetic():
  stats = types.SimpleNamespace(
    argument_size_in_bytes=10,
    output_size_in_bytes=10,
    alias_size_in_bytes=8,
    temp_size_in_bytes=100,
    generated_code_size_in_bytes=1,
  )
  executable = types.SimpleNamespace(memory_analysis=lambda: stats)
  assert compiled.memory_report(executable, 113)["total"] == 113
  assert compiled.memory_report(executable, 113)["fits"] is True
  assert compiled.memory_report(executable, 112)["fits"] is False
  assert compiled.memory_report(executable, None)["fits"] is False


def test_hbm_table():
  assert compiled.hbm_bytes("TPU v5 lite") == 16 * GiB
  assert compiled.hbm_bytes("TPU v5") == 95 * GiB
  assert compiled.hbm_bytes("TPU v9000") is None


def test_compiler_rejection_is_reported():
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (18.76G) exceeds available HBM (15.75G)."
  )
  assert aot_compile._compiler_rejection(RuntimeError(msg)) == int(18.76 * GiB)
  assert aot_compile._compiler_rejection(RuntimeError("INTERNAL: something else")) is None
