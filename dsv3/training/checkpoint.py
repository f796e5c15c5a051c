"""Checkpoints: an orbax CheckpointManager wrapper with topology-free restore and corruption fallback.

A checkpoint at step N is `DIR/N/` with two items: `state`, the array pytree, which each process writes its
own shards of (orbax StandardSave) and which restores re-sliced onto any topology's abstract target; and
`extras`, a JSON document (data iterator position, seed, flat config). Saves are asynchronous and atomic
(a killed save's temporary directory is never reported, and is removed at the next start). Kept: the last
`keep` steps, and with `best_by` also the `keep_best` best by a saved metric. A damaged step restores its
predecessor with a warning (`fallback`), and once that works is renamed `N.corrupt-<time>`. Readers pass
`read_only=True` and touch nothing. Storage errors (unwritable directory, full disk) fail fast with
CheckpointStorageError naming the directory, the free bytes and the last intact step.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dsv3.training import orbax_errors
from dsv3.training import workdir as workdir_lib
from dsv3.training.saved_step import CheckpointCorruptError, CheckpointMismatchError, SavedStep, leaf_key  # noqa: F401

log = logging.getLogger(__name__)

class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""
  step: int
  state: Any
  extras: dict


class Checkpointer:
  """Saves and restores (state pytree, JSON extras) pairs under `directory`.

  Args:
    directory: where step directories go (made absolute: orbax requires it).
    keep: how many of the latest checkpoints to keep.
    save_every: `save` without force writes only when step % save_every == 0.
    async_save: write in the background (`wait()` joins); False blocks in `save`.
    fallback: default of `restore(fallback=...)`: fall back to an older step if the latest is damaged.
    read_only: only read: the directory must exist, nothing in it is created, cleaned (a live save's
      `N.orbax-checkpoint-tmp-*` survives), renamed or saved.
    best_by: a metric name (e.g. 'val_loss') or '' for none: also keep the `keep_best` steps whose
      `save(..., metrics=)` value of it is best, next to the latest `keep`.
    keep_best: how many best steps to keep (>= 1 with `best_by`).
    best_mode: 'min' (lower is better, as for losses) or 'max'.

  Raises ValueError for keep < 1 or keep_best < 1 with best_by, CheckpointStorageError when (not read_only)
  the directory cannot be created or written, FileNotFoundError when (read_only) it does not exist.
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, save_every: int = 1, async_save: bool = True,
               fallback: bool = True, read_only: bool = False, best_by: str = "", keep_best: int = 0,
               best_mode: str = "min"):
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = max(1, int(save_every))
    self.fallback = fallback
    self.read_only = read_only
    self.best_by, self.best_mode = best_by, best_mode
    self._pending_step: Optional[int] = None
    if keep is not None and int(keep) < 1:
      raise ValueError(f"keep_checkpoints must be >= 1 (got {keep}): the latest checkpoint is what a run "
                       f"resumes from; set keep_checkpoints >= 1")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if best_by and int(keep_best) < 1:
      raise ValueError(f"keep_best must be >= 1 with keep_best_by={best_by!r} (got {keep_best}); set "
                       f"keep_best >= 1 or keep_best_by=''")
    if read_only:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist (or is not a "
                                f"directory)")
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                             enable_async_checkpointing=False, save_interval_steps=0)
    elif best_by:
      self._check_writable()
      # The latest `keep` (so the newest step, which a resume needs, always stays) or the best `keep_best`;
      # best_fn makes orbax write the metrics, the policy alone decides what is deleted.
      metric = lambda m: m[best_by]
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(n=keep),
          ocp.checkpoint_managers.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=int(keep_best),
                                        keep_checkpoints_without_metrics=False)])
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=self.save_every, create=True, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True, best_fn=metric, best_mode=best_mode, preservation_policy=policy)
    else:
      self._check_writable()
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=self.save_every, create=True,
          enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True)  # leftovers of a save killed half-way
    if not read_only:
      orbax_errors.quiet_storage_failures()   # a full disk is reported once, by _storage_errors
    with orbax_errors.quiet_library_logs():  # read_only: orbax warns that the directory is read only
      self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extras"))

  def _check_writable(self) -> None:
    """Creates the directory and writes + removes a probe file, or raises CheckpointStorageError."""
    probe = os.path.join(self.directory, f".dsv3-write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
      if os.path.exists(self.directory) and not os.path.isdir(self.directory):
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", self.directory)
      os.makedirs(self.directory, exist_ok=True)
      with open(probe, "w") as f:
        f.write("probe")
      os.remove(probe)
    except OSError as e:
      raise CheckpointStorageError(
          f"checkpoint directory {self.directory} is not writable: {workdir_lib.os_error_cause(e)}. Fix: "
          f"pass a --workdir on a writable disk, or make that directory writable.") from e

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step (half-written ones never count), or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list:
    return sorted(self._mgr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0 and step not in self._mgr.all_steps()

  def metrics(self, step: int) -> Optional[dict]:
    """The metrics saved with `step` (e.g. {'val_loss': 3.2}), or None if it was saved without."""
    with orbax_errors.quiet_library_logs():
      out = self._mgr.metrics(int(step))
    return dict(out) if isinstance(out, Mapping) else None

  def best_step(self, metric: Optional[str] = None, mode: Optional[str] = None) -> Optional[int]:
    """The step whose saved `metric` (default: best_by) is best by `mode` (default: best_mode; ties: the
    newest), or None when no step carries it."""
    metric, mode = metric or self.best_by, mode or self.best_mode
    if not metric:
      raise ValueError("best_step needs a metric: pass metric='val_loss' or open the Checkpointer with best_by")
    scored = []
    for s in self.all_steps():
      value = (self.metrics(s) or {}).get(metric)
      if isinstance(value, (int, float)) and np.isfinite(value):
        scored.append(((value if mode == "min" else -value), -s))
    return -min(scored)[1] if scored else None

  def save(self, step: int, state: Any, extras: Optional[Mapping[str, Any]] = None,
           force: bool = False, metrics: Optional[Mapping[str, float]] = None) -> bool:
    """Saves `state` and `extras` as step `step` if it is on schedule (or `force`, e.g. on SIGTERM).

    `metrics` (e.g. {'val_loss': 3.2}) rank the step when the Checkpointer keeps the best by one of them;
    without a finite value for best_by the step is kept by recency only. Returns whether a save started; a
    step that already has a checkpoint is not saved again. Raises CheckpointStorageError when the disk is
    full (or otherwise refuses the write), here or in `wait()`.
    """
    if self.read_only:
      raise PermissionError(f"checkpoint directory {self.directory} was opened with read_only=True; "
                            f"open it with read_only=False to save")
    step = int(step)
    if step in self._mgr.all_steps() or not (force or step % self.save_every == 0):
      return False
    self.wait()   # the previous save first: its failure names its own step, not this one
    extras = dict(extras or {})
    for k, v in extras.items():  # fail here, naming the key, rather than in a background thread
      try:
        json.dumps(v)
      except TypeError as e:
        raise TypeError(f"checkpoint extras[{k!r}] is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras))
    ranked = None
    if self.best_by and metrics is not None and self.best_by in metrics:
      value = _to_metric(self.best_by, metrics[self.best_by])
      ranked = {k: _to_metric(k, v) for k, v in metrics.items()} if np.isfinite(value) else None
    # Quiet: orbax warns about a save without metrics, which is how an unranked step is saved.
    quiet = orbax_errors.quiet_library_logs() if self.best_by and ranked is None else contextlib.nullcontext()
    with self._storage_errors(step), quiet:
      started = bool(self._mgr.save(step, args=args, force=force, metrics=ranked))
    if started:
      self._pending_step = step
    return started

  @contextlib.contextmanager
  def _storage_errors(self, step: Optional[int]) -> Iterator[None]:
    """Re-raises a full disk (or a refused write) while saving `step` as CheckpointStorageError."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - re-raised as is unless it is a storage error
      cause = orbax_errors.storage_cause(e)
      if cause is None:
        raise
      try:
        free = f"{shutil.disk_usage(self.directory).free:,} bytes free"
      except OSError:
        free = "free space unknown"
      intact = [s for s in self._mgr.all_steps() if s != step]
      previous = (f"The previous checkpoint (step {max(intact)}, {self.step_dir(max(intact))}) is intact"
                  if intact else "There is no earlier checkpoint")
      raise CheckpointStorageError(
          f"checkpoint step {step} could not be written to {self.directory}: {cause} ({free}). "
          f"{previous}; the half-written step is removed at the next start. Fix: free space (or move "
          f"--workdir to a larger disk) and run again to resume.") from e

  def read_extras(self, step: Optional[int] = None, fallback: Optional[bool] = None) -> dict:
    """Only the JSON extras of `step` (default: latest), e.g. to check the config before restoring.

    With step=None and `fallback` (default: the Checkpointer's), a missing or damaged latest extras
    falls back to the next older step, as `restore` does, with one warning naming the step read.
    """
    return self._newest_good(self._read_extras_one, step, fallback, "reading step {} instead")

  def _read_extras_one(self, step: int) -> dict:
    try:
      with orbax_errors.quiet_library_logs():
        out = self._mgr.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
      return _checked_extras(out["extras"])
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
      raise CheckpointCorruptError(
          f"checkpoint {self.step_dir(step)} extras cannot be read: {orbax_errors.short(e)}") from e

  def restore(self, step: Optional[int] = None, abstract_state: Any = None,
              fallback: Optional[bool] = None, read: Optional[Callable] = None) -> Optional[Restored]:
    """Restores (step, state, extras); None when there is no checkpoint and no `step` was asked for.

    `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with `sharding`) or arrays giving the shapes,
    dtypes and target shardings — the arrays are re-sliced for them, whatever topology wrote them.
    Without it, every array comes back whole on this process's first local device, whatever mesh wrote it.
    `read`: instead, read(SavedStep) -> the state, for readers that choose their target by what was saved
    (dsv3.training.runner.restore); it falls back like orbax's own reads. A CheckpointMismatchError (the
    checkpoint does not fit the target) is raised at once: every step would fail the same way.
    With step=None the latest step is tried first; if it cannot be read and `fallback` holds, a
    warning names its directory and the next older step is tried, and so on. An explicit `step` never
    falls back.
    """
    fallback = self.fallback if fallback is None else fallback
    self.wait()
    if step is not None:
      step = int(step)
      if step not in self._mgr.all_steps():
        raise FileNotFoundError(f"no checkpoint {self.step_dir(step)}; the steps in "
                                f"{self.directory} are {self.all_steps()}")
      try:
        with orbax_errors.quiet_library_logs():
          return self._restore_one(step, abstract_state, read)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise CheckpointCorruptError(
            f"checkpoint {self.step_dir(step)} cannot be restored: {orbax_errors.short(e)}") from e
    steps = sorted(self._mgr.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for s in steps:
      try:
        with orbax_errors.quiet_library_logs():
          result = self._restore_one(s, abstract_state, read)
        ok = True
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any read error means "this step is unusable"
        result, ok, err = None, False, e
      if _all_processes(ok):
        if failures:
          # Only now are the newer steps known to be damaged rather than unreadable with this target
          # (a changed config fails on every step, and must not cost the user their checkpoints).
          moved = [self._quarantine(f) for f, _ in failures]
          log.warning("Restored checkpoint step %d instead of the damaged newer step(s) %s; %s.", s,
                      ", ".join(str(f) for f, _ in failures),
                      "moved aside to " + ", ".join(m for m in moved if m) if any(moved) else "left in place")
          orbax_errors.release_failed_reads([e for _, e in failures])
        return result
      if ok:  # another process failed to read its shards: treat the step as damaged everywhere
        err = RuntimeError("another process could not read its part of this checkpoint")
      failures.append((s, err))
      if not fallback:
        raise CheckpointCorruptError(
            f"checkpoint {self.step_dir(s)} cannot be restored: {orbax_errors.short(err)}\n"
            f"Fix: delete or move that directory to resume from the previous checkpoint, or pass "
            f"fallback=True to do so automatically.") from err
      older = [x for x in steps if x < s]
      log.warning("Checkpoint %s cannot be restored (%s); %s", self.step_dir(s), orbax_errors.short(err),
                  f"falling back to step {older[0]}." if older else "no older checkpoint left.")
    first_step, first_err = failures[0]
    raise CheckpointCorruptError(
        f"no checkpoint in {self.directory} can be restored; the latest, {self.step_dir(first_step)}, "
        f"failed with {orbax_errors.short(first_err)}\nIf every step fails the same way the "
        f"abstract_state probably does not match the saved state (a changed config); else the "
        f"directories are damaged. Nothing was moved or deleted.") from first_err

  def _restore_one(self, step: int, abstract_state: Any, read: Optional[Callable]) -> Restored:
    if read is not None:
      state = read(self.saved(step))      # an explicit step: no fallback here (the caller's loop does it)
      out = self._mgr.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
      return Restored(step, state, _checked_extras(out["extras"]))
    if abstract_state is None:
      abstract_state = self.saved(step).abstract      # idem
    state_args = ocp.args.StandardRestore(abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(state=state_args,
                                                          extras=ocp.args.JsonRestore()))
    return Restored(step, out["state"], _checked_extras(out["extras"]))

  def saved_abstract(self, step: Optional[int] = None, fallback: Optional[bool] = None) -> Any:
    """The saved state's tree of shapes and dtypes (latest readable step by default, falling back past a
    step whose state item is missing or damaged as `read_extras` does), each on this process's first
    device: how to tell which layout wrote it."""
    return self.saved(step, fallback).abstract

  def saved(self, step: Optional[int] = None, fallback: Optional[bool] = None) -> "SavedStep":
    """Step `step`'s state item as saved (shapes, dtypes, block reads), by default the latest readable one
    (falling back as `saved_abstract` does); CheckpointCorruptError if it has none."""
    return self._newest_good(lambda s: SavedStep(s, os.path.join(self.step_dir(s), "state")), step, fallback,
                             "reading step {} instead")

  def _newest_good(self, read, step: Optional[int], fallback: Optional[bool], instead: str):
    """read(step) of `step`, or (step=None) of the newest step it works on: every reader of a step but
    `restore` (which also agrees across processes and moves damaged steps aside) falls back this way, with
    one warning per skipped step (`instead` formats the next step). Raises CheckpointCorruptError naming the
    step, FileNotFoundError when there is no such step or none at all."""
    fallback = self.fallback if fallback is None else fallback
    if step is not None:
      step = int(step)
      if step not in self._mgr.all_steps():
        raise FileNotFoundError(f"no checkpoint {self.step_dir(step)}; the steps in "
                                f"{self.directory} are {self.all_steps()}")
      return read(step)
    steps = sorted(self._mgr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    for i, s in enumerate(steps):
      try:
        return read(s)
      except CheckpointCorruptError as e:
        if not fallback or i + 1 == len(steps):
          raise
        log.warning("%s; %s.", e, instead.format(steps[i + 1]))

  def _quarantine(self, step: int) -> Optional[str]:
    """Renames a damaged step directory out of orbax's sight, so that the step can be saved again;
    returns the new name (None when read_only, or not moved)."""
    if self.read_only:
      return None
    dest = f"{self.step_dir(step)}.corrupt-{int(time.time())}"
    if jax.process_index() == 0:
      try:
        os.rename(self.step_dir(step), dest)
      except OSError as e:
        log.warning("Could not move the damaged checkpoint %s aside: %s", self.step_dir(step), e)
        dest = None
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"dsv3_checkpoint_quarantine_{step}")
    self._mgr.reload()
    return dest

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk; see `save` for the errors."""
    step, self._pending_step = self._pending_step, None
    with self._storage_errors(step):
      self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    try:
      self.wait()
    finally:
      self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class CheckpointStorageError(RuntimeError):
  """The checkpoint directory cannot be written (not writable, disk full); the message says why."""


def _to_metric(name: str, value: Any) -> float:
  try:
    return float(np.asarray(value).reshape(()))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint metrics[{name!r}] must be a number, got {value!r}") from e


def _checked_extras(extras: Any) -> dict:
  if not isinstance(extras, Mapping):
    raise ValueError(f"the extras item is missing or not a JSON object (read {type(extras).__name__})")
  return dict(extras)


def _all_processes(ok: bool) -> bool:
  """True iff `ok` on every process, so that all processes fall back (or not) together."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))
