"""Unwritable storage for the checkpoint and fault tests (a helper module, not a test file)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def read_only(path):
  """Makes a directory unwritable, for root too (chattr +i); skips where that is impossible."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    undo = lambda: os.chmod(path, 0o755)
  elif shutil.which("chattr") and subprocess.run(["chattr", "+i", path]).returncode == 0:
    undo = lambda: subprocess.run(["chattr", "-i", path], check=True)
  else:
    pytest.skip("root without a working chattr +i: cannot make a directory read-only")
  try:
    with contextlib.suppress(OSError):
      open(os.path.join(path, "probe"), "w").close()
      os.remove(os.path.join(path, "probe"))
      pytest.skip(f"{path} is still writable")
    yield
  finally:
    undo()
