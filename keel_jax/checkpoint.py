"""Checkpoints: an Orbax `CheckpointManager` that saves asynchronously and restores past corruption.

  ckpt = Checkpointer(workdir + "/checkpoints", keep=3)
  if ckpt.latest_step() is not None:
    state, step = ckpt.restore(abstract_state)  # ShapeDtypeStructs for the CURRENT mesh
  ckpt.save(step, state)  # returns once the arrays are copied to host; writes in the background
  ckpt.close()  # waits, and raises if a background save failed

Each step is written to a temporary directory that Orbax renames into place only when complete, so
a crash mid-save never leaves a half-written step that looks finished. Steps are never overwritten
or deleted except by keep-K pruning; unreadable or superseded ones are renamed `<step>.<reason>`.
Each step records a digest of its arrays' bits; one whose contents no longer match is unreadable.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from keel_jax import paths

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored; the message says which and why."""


# TensorStore (Orbax's array I/O) retries a failing GCS request 32 times, up to 32 s apart: a
# run whose bucket is gone would wait ~15 min before saying so. Six tries ~1-8 s apart ride out
# transient errors and give up within a minute. Orbax copies these dicts into each context.
GCS_REQUEST_RETRIES = {"max_retries": 6, "initial_delay": "1s", "max_delay": "8s"}


def _bound_gcs_retries() -> None:
  from orbax.checkpoint._src.serialization import tensorstore_utils

  for ctx in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
    ctx.setdefault("gcs_request_retries", dict(GCS_REQUEST_RETRIES))


_bound_gcs_retries()


def _one_line(e: BaseException) -> str:
  """The innermost cause, first line, without TensorStore's multi-kilobyte spec dump."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
  if len(text) > 500:  # TensorStore names the cause last, after long paths: keep both ends
    text = f"{text[:200]} ... {text[-300:]}"
  return f"{type(e).__name__}: {text}"


def _mix(v):
  """A 32-bit integer hash (lowbias32), applied elementwise."""
  v = (v ^ (v >> 16)) * jnp.uint32(0x7FEB352D)
  v = (v ^ (v >> 15)) * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)


@jax.jit
def _leaf_digests(leaves):
  """Per leaf, the sum mod 2^32 of hash(bits, global index): any mesh gives the same value."""
  out = []
  for x in leaves:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    v = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    if v.dtype == jnp.uint64:
      v = v ^ (v >> 32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for d in reversed(range(x.ndim)):  # iota, not a reshape: keeps the leaf's sharding
      index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
      stride *= x.shape[d]
    out.append(jnp.sum(_mix(v.astype(jnp.uint32) ^ _mix(index)), dtype=jnp.uint32))
  return out


def digest(state) -> dict[str, int]:
  """{leaf path: 32-bit digest of its contents}: saved with each step, checked on restore.

  Orbax stores no checksum of array data, so flipped bytes would otherwise restore silently.
  """
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0], strict=True)
  values = _leaf_digests(list(leaves))
  # Replicated scalars: every process reads its own copy.
  return {
    jax.tree_util.keystr(p): int(np.asarray(v.addressable_data(0)))
    for p, v in zip(paths, values, strict=True)
  }


def _check_digest(state, saved: dict | None) -> None:
  if not saved or "keel_digest" not in saved:
    return  # written before digests were recorded
  now, then = digest(state), saved["keel_digest"]
  bad = [k for k in then if now.get(k) != then[k]] or sorted(set(now) - set(then))
  if bad:
    raise CheckpointError(
      f"contents differ from the digest saved with them ({len(bad)} arrays, e.g. {bad[0]})"
    )


def _all_processes(ok: bool) -> bool:
  """True only if `ok` holds on every process, so all hosts fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a training-state pytree under `directory`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep={keep}: keep at least 1 checkpoint (config.train.keep_checkpoints)")
    # Orbax resolves relative paths against the cwd of each host; make it explicit.
    self.directory = paths.path(directory)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
      enable_async_checkpointing=async_save,
      # Orbax 0.12 creates the step directory in a background thread by default; when that fails
      # (read-only or full disk) its sibling threads wait 300 s for a signal that never comes and
      # hold up interpreter exit. Creating it up front makes such errors raise from save() at once.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      create=True,
      cleanup_tmp_directories=True,  # drop half-written steps left by a crash
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:
      raise CheckpointError(
        f"cannot open checkpoint directory {self.directory}: {_one_line(e)}"
      ) from e
    self._pending: int | None = None  # step of the save still running in the background
    self._failed: set[int | None] = set()  # steps whose failed save has been raised

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, *, force: bool = False) -> None:
    """Starts saving `state` as `step`; returns once the arrays are on host (safe to donate).

    A step that exists already is not saved again. A step older than the latest checkpoint is
    skipped with a warning, unless `force`: the run has branched from an older checkpoint, so
    the newer steps are renamed `<step>.superseded` (kept, but never resumed from) first.
    """
    self.wait()  # a failure of the previous save is reported as that step's, not this one's
    steps = self.all_steps()
    if step in steps:
      log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
      return
    newer = [s for s in steps if s > step]
    if newer and not force:
      log.warning(
        "not saving step %d: %s already holds newer steps %s (force=True moves them aside)",
        step,
        self.directory,
        newer,
      )
      return
    if newer:
      self._move_aside(newer, "superseded")
    try:
      # force=True: we have decided; Orbax's own policy silently skips steps <= its latest.
      self._manager.save(
        step,
        args=ocp.args.StandardSave(state),
        force=True,
        custom_metadata={"keel_digest": digest(state)},
      )
    except Exception as e:
      raise self._save_failed(step, e) from e
    self._pending = step

  def wait(self) -> None:
    """Blocks until the background save is on disk; raises CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(step, e) from e

  def _save_failed(self, step: int | None, e: Exception) -> CheckpointError:
    """Cleans up after a failed save and returns the error to raise."""
    self._failed.add(step)
    if paths.is_remote(self.directory):
      # Nothing to clean on a bucket (see _remove_partial), and a reload would wait out the
      # client's retries again when the bucket is what failed.
      return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {_one_line(e)}"
      )
    try:
      # Orbax dropped the steps this save would have pruned from its list (not from disk).
      self._manager.reload()
      self._remove_partial(step)
    except Exception as cleanup_error:  # e.g. the bucket is unreachable: report the save's error
      log.warning("after the failed save, %s: %s", self.directory, _one_line(cleanup_error))
    return CheckpointError(
      f"saving checkpoint step {step} to {self.directory} failed: {_one_line(e)}"
    )

  def _remove_partial(self, step: int | None) -> None:
    """Deletes a failed save's temporary directory: it can be most of a full disk."""
    if step is None or jax.process_index() != 0 or paths.is_remote(self.directory):
      # Object stores get no temporary directory: Orbax marks a finished step with a commit file,
      # ignores unmarked ones and deletes them when the next run opens the directory.
      return
    for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      try:
        partial.rmtree()
      except OSError as cleanup_error:
        log.warning("could not remove partial checkpoint %s: %s", partial, cleanup_error)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, int]:
    """Returns (state, step) for `step`, or for the newest readable checkpoint.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` built for the
    current mesh, so a checkpoint written on any mesh restores onto this one. Without `step`, an
    unreadable checkpoint is logged and the previous one tried; once one restores, the unreadable
    newer ones are renamed `<step>.corrupt`. Raises CheckpointError if none can be read.
    """
    # Orbax would quietly put a leaf without a sharding whole on one device.
    unplaced = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
      if getattr(x, "sharding", None) is None
    ]
    if unplaced:
      raise ValueError(
        f"abstract_state has leaves without a sharding, e.g. {unplaced[:3]}: build it as "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...) for the current mesh"
      )
    self.wait()
    self._manager.reload()  # the directory may have changed on disk since we listed it
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {self.directory}")
    if step is not None:
      if step not in steps:
        raise CheckpointError(
          f"no checkpoint step {step} in {self.directory}; it has {steps[::-1]}"
        )
      steps = [step]  # an explicitly requested step does not fall back
    failed: list[tuple[int, Exception]] = []
    for s in steps:
      error = None
      try:
        state = self._manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
        saved = self._manager.metadata(s).custom_metadata
      except Exception as e:  # which error a damaged file raises depends on the file
        error = e
      if _all_processes(error is None):
        try:  # a collective computation: only once every process holds the state
          _check_digest(state, saved)
        except CheckpointError as e:
          error = e
      if _all_processes(error is None):
        if failed:  # so that training can write those steps again
          self._move_aside([f for f, _ in failed], "corrupt")
        return state, s
      error = error or CheckpointError("another process could not read it")
      failed.append((s, error))
      if s != steps[-1]:
        log.warning(
          "checkpoint step %d in %s is unreadable (%s); trying the previous one",
          s,
          self.directory,
          _one_line(error),
        )
    newest, error = failed[0]
    raise CheckpointError(
      f"no readable checkpoint in {self.directory} (tried steps {steps}); "
      f"step {newest}: {_one_line(error)}"
    ) from error

  def _move_aside(self, steps: list[int], reason: str) -> None:
    """Renames steps to `<step>.<reason>`: kept for inspection, invisible to Orbax."""
    if jax.process_index() == 0:
      for s in steps:
        dst, n = self.directory / f"{s}.{reason}", 0
        while dst.exists():
          n += 1
          dst = self.directory / f"{s}.{reason}.{n}"
        (self.directory / str(s)).rename(dst)
        log.warning("moved checkpoint step %d aside to %s (%s)", s, dst, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"keel_jax.checkpoint.move_aside.{reason}")
    self._manager.reload()

  def close(self) -> None:
    """Waits for the background save (raising if it failed) and releases Orbax's threads."""
    try:
      self.wait()
    finally:
      try:
        # Orbax awaits its start-up tmp-dir clean-up only inside save(); a manager closed
        # without saving would otherwise race that thread at interpreter exit.
        self._manager._maybe_await_cleanup_tmp_directory()
        self._manager.close()
      except Exception as e:
        # After a failed save Orbax raises its error again here, from leftover threads; it has
        # been reported, and raising now would replace the CheckpointError being propagated.
        if not self._failed:
          raise CheckpointError(f"closing {self.directory} failed: {_one_line(e)}") from e
        log.info("closing %s after a failed save: %s", self.directory, _one_line(e))
      for step in self._failed:  # again: writers still running then may have recreated parts
        self._remove_partial(step)
