"""A local GCS JSON API (gcp-storage-emulator) for the gs:// tests (a helper module, not tests).

The server runs in its own process so that a test can stop it (a storage outage) and start it
again on the same port and data. Gaps of the emulator are filled at start-up, both behaviours
of the real service that clients rely on:
* suffix ranges (`Range: bytes=-N`, the last N bytes), which array_record's reader sends to find a
  file's footer; the emulator would answer with the whole object;
* the object generation in the `x-goog-generation` header of a download, which TensorStore (Orbax)
  reads to version what it has read (`Malformed StorageGeneration` without it);
* the clients are told where it is through their documented settings (`env`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

BUCKET = "keel-test"

_SERVER = r"""
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

download = objects.download

def download_with_suffix_ranges(request, response, storage, *args, **kwargs):
  headers = request._request_handler.headers
  r = headers.get("range", "")
  if r.replace(" ", "").startswith("bytes=-"):
    size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
    start = max(0, size - int(r.split("-", 1)[1]))
    headers.replace_header("Range", f"bytes={start}-")
  download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the handler has answered already
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj["metageneration"]

objects.download = download_with_suffix_ranges  # objects.get serves ?alt=media through it
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is download:
      methods[method] = download_with_suffix_ranges
# Every fail_every-th request is answered 503 (a transient error the clients must retry).
fail_every, count = int(sys.argv[4]), [0]
for verb in ("GET", "POST", "PUT", "DELETE", "PATCH"):
  def flaky(self, handle=getattr(server.RequestHandler, f"do_{verb}")):
    count[0] += 1
    if fail_every and count[0] % fail_every == 0:
      self.rfile.read(int(self.headers.get("content-length") or 0))
      self.send_response(503)
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    handle(self)
  setattr(server.RequestHandler, f"do_{verb}", flaky)
port, data_dir, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]
server.create_server("127.0.0.1", port, default_bucket=bucket, data_dir=data_dir).run()
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """`start()`/`stop()` a GCS emulator on 127.0.0.1 whose objects live under `data_dir`."""

  def __init__(self, data_dir: str, port: int | None = None):
    self.data_dir, self.port = data_dir, port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = None

  @property
  def env(self) -> dict:
    """Settings that point gcsfs, TensorStore (Orbax) and array_record (TFDS) at the emulator."""
    return {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs (etils.epath), google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore's gcs kvstore: Orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # google-cloud-cpp: array_record reads
      # gcsfs would ask the (absent) control API whether the bucket is hierarchical.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def start(self, timeout: float = 30.0, fail_every: int = 0) -> Emulator:
    """Starts serving (the objects of an earlier start are kept); with fail_every=k, every k-th
    request fails with 503."""
    os.makedirs(self.data_dir, exist_ok=True)
    self._proc = subprocess.Popen(
      [sys.executable, "-c", _SERVER, str(self.port), self.data_dir, BUCKET, str(fail_every)],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited at start-up (code {self._proc.returncode})")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1):
          return self
      except urllib.error.HTTPError:  # up, and failing this request on purpose
        return self
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not answer on {self.url} within {timeout} s")

  def stop(self) -> None:
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._proc = None

  def __enter__(self) -> Emulator:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
