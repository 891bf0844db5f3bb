"""Colab notebooks: stored without outputs, and run top to bottom on CPU with small settings."""

import os
import sys
import time

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = ("quickstart.ipynb", "depth_scaling.ipynb")
# Budget under KEEL_NOTEBOOK_SMALL=1 is ~90 s each on 2 quiet cores; the bound leaves room for
# a loaded machine but still catches a notebook that forgot to shrink itself.
MAX_SECONDS = 240
# What each notebook must show: figures drawn, and text that only a working run prints.
EXPECT = {
  "quickstart.ipynb": {
    "figures": 2,  # loss curve, gradient profile
    "text": (
      "keel_jax is already importable",  # the install cell did not reinstall
      "def apply(rule",  # the source of residual.apply
      "eval loss",
      "max/min over sub-layers",
      "temperature 0.7",  # the sample
    ),
  },
  "depth_scaling.ipynb": {
    "figures": 2,  # depth scaling, LR sweep
    "text": ("keel_jax is already importable", "Table 1", "Table 3"),
  },
}


def read(name):
  return nbformat.read(os.path.join(COLAB, name), as_version=4)


def texts(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.output_type == "stream":
        out.append(o.text)
      elif "text/plain" in o.get("data", {}):
        out.append(o.data["text/plain"])
  return "\n".join(out)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{name} has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{name}: code cell {i} has stored outputs; strip them"
    assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
    assert "execution" not in cell.metadata, f"{name}: code cell {i} has execution timings"
  assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_installs_only_when_needed(name):
  first = next(c for c in read(name).cells if c.cell_type == "code").source
  assert 'importlib.util.find_spec("keel_jax")' in first
  assert "pip" in first and "git+" in first and "EDIT ME" in first


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch):
  monkeypatch.setenv("KEEL_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("KEEL_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = read(name)
  client = nbclient.NotebookClient(
    nb,
    timeout=MAX_SECONDS,
    kernel_name="python3",  # jupyter_client runs it with this interpreter (the venv's)
    resources={"metadata": {"path": COLAB}},
  )
  t0 = time.perf_counter()
  client.execute()  # raises CellExecutionError if any cell fails
  seconds = time.perf_counter() - t0
  print(f"{name}: {seconds:.0f} s", file=sys.stderr)
  assert seconds < MAX_SECONDS, f"{name} took {seconds:.0f} s under KEEL_NOTEBOOK_SMALL=1"
  outputs = [o for c in nb.cells for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  figures = sum("image/png" in o.get("data", {}) for o in outputs)
  assert figures >= EXPECT[name]["figures"], f"{name} drew {figures} figures"
  text = texts(nb)
  for needle in EXPECT[name]["text"]:
    assert needle in text, f"{name}: {needle!r} not in the outputs"
  assert "Traceback" not in text
