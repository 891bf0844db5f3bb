"""Keeps libtpu from starting on hosts without a TPU, so CPU/GPU runs start quietly.

With the `tpu` extra installed, JAX tries the TPU backend on every host, and on a machine without
a TPU libtpu prints several lines of start-up errors before JAX falls back to the CPU. When
JAX_PLATFORMS is unset and the host shows no sign of a TPU, this sets it to the other platforms JAX
could use, before JAX starts its backends. A TPU host, or any explicit JAX_PLATFORMS (even empty),
is left alone.
"""

import glob
import importlib.metadata
import os
import sys

# TPU chips appear as /dev/accel* (v2-v5e) or as numbered VFIO groups (v5p, v6e); all are Google PCI
# devices. Any of these means "maybe a TPU": then JAX decides, as without this module.
_TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def host_may_have_tpu(root: str = "/") -> bool:
  """True if TPU device files or a Google PCI device are present under `root`."""
  for pattern in _TPU_DEVICE_GLOBS:
    if glob.glob(os.path.join(root, pattern.lstrip("/"))):
      return True
  for vendor_file in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
    try:
      with open(vendor_file) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _plugin_names() -> set[str]:
  """Names of the installed distributions (JAX's GPU plugins are separate packages)."""
  return {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}


def _installed_gpu_platforms(root: str = "/") -> list[str]:
  """GPU platforms whose JAX plugin is installed and whose devices are visible."""
  names = _plugin_names()
  platforms = []
  if any(n.startswith(("jax-cuda", "jax_cuda")) for n in names) and glob.glob(
    os.path.join(root, "dev/nvidia[0-9]*")
  ):
    platforms.append("cuda")
  if any(n.startswith(("jax-rocm", "jax_rocm")) for n in names) and os.path.exists(
    os.path.join(root, "dev/kfd")
  ):
    platforms.append("rocm")
  return platforms


def choose_platforms(environ=None, root: str = "/") -> str | None:
  """The JAX_PLATFORMS value to set on this host, or None to leave JAX's choice alone."""
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" in environ or host_may_have_tpu(root):
    return None
  return ",".join(_installed_gpu_platforms(root) + ["cpu"])


def skip_tpu_without_tpu() -> None:
  """Sets JAX_PLATFORMS (and JAX's config, if JAX is already imported) on hosts without a TPU."""
  platforms = choose_platforms()
  if platforms is None:
    return
  os.environ["JAX_PLATFORMS"] = platforms  # also for child processes
  if "jax" in sys.modules:  # imported before keel_jax: the flag was read already, backends were not
    sys.modules["jax"].config.update("jax_platforms", platforms)
