"""One path API for local files and buckets (`gs://...`), on `etils.epath` (what Orbax uses).

Every file the project reads or writes goes through here, so a workdir, data_dir, tokenizer model
or experiment directory may be local or `gs://bucket/...` alike. Paths stay plain strings for
callers; remote paths are handled by epath's fsspec backend (gcsfs), never by TensorFlow.

Local writes keep their guarantees (temporary file + rename). An object store has no rename, but a
single object upload is atomic already: readers see the old object or the new one, never half.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import uuid

import fsspec
from etils import epath

# gcsfs caches directory listings per process; other hosts (and the next run) change the bucket
# underneath, e.g. Orbax would read a checkpoint step pruned since. Listings are read fresh.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


class StorageError(OSError):
  """A bucket read or write failed (after the client's retries); the message is one line."""


def one_line(e: BaseException) -> str:
  """The innermost cause of `e`, first line, with its type."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def _storage(op: str, p):
  """Remote failures (whatever the client raises) become one StorageError naming the path."""
  if not is_remote(p):
    yield
    return
  try:
    yield
  except (FileNotFoundError, StorageError):
    raise
  except Exception as e:
    raise StorageError(f"{op} {p} failed: {one_line(e)}") from e


def _guarded(op: str):
  def wrap(fn):
    @functools.wraps(fn)
    def run(p, *args, **kwargs):
      with _storage(op, p):
        return fn(p, *args, **kwargs)

    return run

  return wrap


def is_remote(path) -> bool:
  """Whether `path` names an object store (`gs://`, `s3://`, ...) rather than a local file."""
  return "://" in str(path)


def resolve(path) -> str:
  """A local path made absolute (with ~ expanded); a remote one unchanged."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
  """`base/part/...`; for `gs://` as for local paths (os.path.join would keep the scheme too,
  but this never turns a remote path into a local one)."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def path(p) -> epath.Path:
  return epath.Path(resolve(p))


@_guarded("checking")
def exists(p) -> bool:
  return path(p).exists()


@_guarded("checking")
def isdir(p) -> bool:
  return path(p).is_dir()


@_guarded("checking")
def isfile(p) -> bool:
  return path(p).is_file()


@_guarded("creating")
def makedirs(p) -> None:
  """Creates the directory and its parents (a no-op on object stores with no directories)."""
  path(p).mkdir(parents=True, exist_ok=True)


@_guarded("listing")
def listdir(p) -> list[str]:
  """Names of the entries of a directory; [] if it does not exist."""
  d = path(p)
  if not d.is_dir():
    return []
  return sorted(child.name for child in d.iterdir())


@_guarded("listing")
def glob(p: str) -> list[str]:
  """Paths matching a pattern whose wildcards are in its last component."""
  head, pattern = os.path.split(resolve(p))
  return sorted(str(m) for m in path(head).glob(pattern)) if exists(head) else []


@_guarded("deleting")
def rmtree(p) -> None:
  path(p).rmtree(missing_ok=True)


@_guarded("reading")
def read_bytes(p) -> bytes:
  return path(p).read_bytes()


@_guarded("reading")
def read_text(p) -> str:
  return path(p).read_text()


def read_json(p):
  return json.loads(read_text(p))


@_guarded("writing")
def write_bytes(p, data: bytes) -> None:
  """Writes a whole file so that a reader sees the old contents or the new, never a mix."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    target.write_bytes(data)  # one object upload: atomic on the store
    return
  tmp = target.parent / f"{target.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p, obj, **kwargs) -> None:
  write_text(p, json.dumps(obj, **kwargs))


@_guarded("writing")
def append_text(p, text: str) -> None:
  """Appends to a file. Object stores cannot append: there the object is rewritten whole."""
  if not is_remote(p):
    with open(resolve(p), "a") as f:
      f.write(text)
    return
  target = path(p)
  old = target.read_bytes() if target.exists() else b""
  target.write_bytes(old + text.encode("utf-8"))


def save_figure(fig, p, **savefig_kwargs) -> str:
  """A matplotlib figure as PNG, rendered into memory and written wherever `p` points."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kwargs)
  write_bytes(p, buf.getvalue())
  return os.fspath(p)


def check_writable(workdir: str) -> None:
  """Raises ValueError (one line) if `workdir` cannot be created or written; writes nothing."""
  if is_remote(workdir):
    bucket = "/".join(resolve(workdir).split("/")[:3])  # scheme://bucket
    try:
      ok = path(bucket).exists()
    except Exception as e:  # network, credentials: the client's own exception types
      raise ValueError(f"workdir {workdir!r}: cannot reach {bucket} ({one_line(e)})") from None
    if not ok:
      raise ValueError(f"workdir {workdir!r}: bucket {bucket} does not exist; create it first")
    return
  p = resolve(workdir)
  while not os.path.exists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p) or not os.access(p, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir!r} is not writable (checked {p}); choose another")
