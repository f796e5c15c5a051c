"""How dsv3.training.checkpoint reads orbax's failures: which are storage errors (a full disk, a read-only file
system), a one-line summary of any, and the libraries' logs kept quiet while we report them ourselves."""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import sys
from typing import Iterable, Iterator, Optional

# Loggers that print kilobytes of tracebacks when a read fails; a failed restore is reported by us.
_NOISY_LOGGERS = ("absl", "orbax", "orbax.checkpoint", "tensorstore", "asyncio", "jax._src.distributed")


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
  """Silences the libraries' logging (below CRITICAL) for the block: we report the failure ourselves."""
  loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def release_failed_reads(errors: Iterable[BaseException]) -> None:
  """A failed restore leaves orbax's sibling reads as futures whose errors nobody retrieves; asyncio logs
  each one ("Future exception was never retrieved") whenever they are garbage-collected. We have reported
  the failure already, so drop the tracebacks that keep them alive and collect them now, quietly."""
  for err in errors:
    while err is not None:
      err.__traceback__ = None
      err = err.__cause__ or err.__context__
  with quiet_library_logs():
    gc.collect()


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.EFBIG: "file too large (a file size limit, ulimit -f)"}
_STORAGE_TEXTS = (("RESOURCE_EXHAUSTED", "no space left on device (RESOURCE_EXHAUSTED)"),
                  ("No space left on device", "no space left on device"),
                  ("Disk quota exceeded", "disk quota exceeded"),
                  ("Read-only file system", "read-only file system"),
                  ("File too large", "file too large (a file size limit, ulimit -f)"))


def storage_cause(err: BaseException) -> Optional[str]:
  """'no space left on device' etc. if `err` (or an error it wraps) is one, else None."""
  seen, todo = set(), [err]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
      return _STORAGE_ERRNOS[e.errno]
    text = str(e)
    for needle, cause in _STORAGE_TEXTS:
      if needle in text:
        return cause
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def short(err: BaseException) -> str:
  """The error's type and first line, capped: tensorstore errors embed kilobytes of spec JSON."""
  text = (str(err).splitlines() or [""])[0]
  return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class _StorageFailureRecords(logging.Filter):
  """Drops orbax's ERROR records of a storage failure (a full disk): its background save threads log one
  traceback per array and per commit thread, and the Checkpointer reports the failure itself, in one line
  naming the step (CheckpointStorageError). Every other record passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname.replace("\\", "/"):
      return True
    err = record.exc_info[1] if record.exc_info else None
    text = record.getMessage()
    return not ((err is not None and storage_cause(err)) or any(n in text for n, _ in _STORAGE_TEXTS))


_FILTER = _StorageFailureRecords()


def _closed_loop_hook(previous):
  """sys.unraisablehook without asyncio's 'Event loop is closed': tensorstore's callbacks of a write that
  failed (a full disk) land after orbax has closed the save thread's event loop, once per pending write."""
  def hook(unraisable):
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
      return
    previous(unraisable)
  hook.dsv3_closed_loop = True
  return hook


def quiet_storage_failures() -> None:
  """Keeps a failed asynchronous save's noise (orbax's per-thread tracebacks, asyncio's closed-loop errors)
  off the console, leaving the one-line CheckpointStorageError. Idempotent; other records and errors pass."""
  for name in ("absl", "orbax", "orbax.checkpoint"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
  if not getattr(sys.unraisablehook, "dsv3_closed_loop", False):
    sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)
