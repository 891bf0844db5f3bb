"""keel_jax picks JAX platforms: hosts without a TPU start quietly, TPU hosts are untouched."""

import os
import subprocess
import sys

import pytest

from keel_jax import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _touch(root, rel, text=""):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_no_tpu_host_gets_cpu(tmp_path):
  assert platforms.choose_platforms(environ={}, root=str(tmp_path)) == "cpu"


@pytest.mark.parametrize(
  "rel,text",
  [
    ("dev/accel0", ""),  # v4/v5e
    ("dev/vfio/0", ""),  # v5p/v6e
    ("sys/bus/pci/devices/0000:00:04.0/vendor", "0x1ae0\n"),  # a Google PCI device
  ],
)
def test_tpu_host_is_left_to_jax(tmp_path, rel, text):
  _touch(tmp_path, rel, text)
  assert platforms.choose_platforms(environ={}, root=str(tmp_path)) is None


def test_other_pci_vendor_is_not_a_tpu(tmp_path):
  _touch(tmp_path, "sys/bus/pci/devices/0000:00:04.0/vendor", "0x10de\n")
  assert platforms.choose_platforms(environ={}, root=str(tmp_path)) == "cpu"


@pytest.mark.parametrize("value", ["", "cpu", "tpu"])
def test_explicit_jax_platforms_wins(tmp_path, value):
  assert platforms.choose_platforms(environ={"JAX_PLATFORMS": value}, root=str(tmp_path)) is None


def test_gpu_listed_only_with_its_plugin(tmp_path, monkeypatch):
  _touch(tmp_path, "dev/nvidia0")
  monkeypatch.setattr(platforms, "_plugin_names", lambda: set())
  assert platforms.choose_platforms(environ={}, root=str(tmp_path)) == "cpu"
  monkeypatch.setattr(platforms, "_plugin_names", lambda: {"jax-cuda12-plugin"})
  assert platforms.choose_platforms(environ={}, root=str(tmp_path)) == "cuda,cpu"


@pytest.mark.skipif(platforms.host_may_have_tpu(), reason="this host may have a TPU")
def test_cli_starts_quietly_without_jax_platforms():
  """The README's commands run without JAX_PLATFORMS: no libtpu start-up errors on stderr."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import keel_jax.sample, jax; print(jax.default_backend())"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split()[-1] in ("cpu", "gpu", "cuda", "rocm")
  assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
