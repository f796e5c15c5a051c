"""Training workdirs: creation with clear errors, an exclusive lock, and what tools must never overwrite.

  with workdir.lock(path):            # or: held = workdir.acquire(path); ...; held.release()
    train(...)

`acquire` creates the workdir (an error naming --workdir and the fix, never a raw OSError) and takes an
exclusive `fcntl.flock` on `DIR/.dsv3.lock`, whose text names the owner (pid, host, start time). A second
trainer on the same workdir fails at once naming that owner. The kernel drops the lock when its process
dies, so the lock of a crashed run is simply taken over (and logged). Only process 0 of a multi-process
run locks.

`is_workdir`, `is_orbax_checkpoint` and `check_destination` let export tools (dsv3.convert,
hf.save_checkpoint) refuse destinations whose contents they did not create; `install` moves a finished
export into place, deleting only the files of a previous HF export.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import logging
import os
import socket
import tempfile
import time
from typing import Iterator, Optional

import jax

log = logging.getLogger(__name__)

LOCK_NAME = ".dsv3.lock"
# What a training run writes at the top of its workdir.
_WORKDIR_MARKERS = ("checkpoints", "metrics.jsonl", LOCK_NAME)
# What orbax writes: a CheckpointManager's step dirs and root metadata, a Checkpointer's item dirs.
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "_sharding", "commit_success.txt",
                  "variables", "state", "extras", "*.orbax-checkpoint-tmp-*")
# The files of an HF export (hf.save_checkpoint): the only files `install` ever deletes.
_HF_EXPORT_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors",
                    "model.safetensors.index.json")


class WorkdirError(ValueError):
  """A workdir or destination that cannot be used; the message names the path and the fix."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir's lock; the message names its pid and host."""


# --------------------------------------------------------------------------------------------------
class Lock:
  """An acquired workdir lock; `release()` (or leaving the `with` block) gives it back.

  It remembers what the workdir held when it was taken, so that a run that fails before writing anything
  leaves no trace: `release(clean=True)` then removes the lock file, the empty directories and the workdir
  itself where this run created them, and nothing else.
  """

  def __init__(self, path: str, fd: Optional[int], workdir: Optional[str] = None, created: Optional[str] = None,
               before: frozenset = frozenset()):
    self.path, self._fd = path, fd
    self.workdir, self.created, self.before = workdir, created, before

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self, clean: bool = False) -> None:
    """Empties the owner record (so the next owner logs no takeover) and unlocks. Idempotent. With `clean`
    (the run failed), first removes what the run created if it holds no file (`_remove_leftovers`)."""
    if self._fd is None:
      return
    removed = False
    if clean and self.workdir is not None:
      removed = self._remove_leftovers()
    if not removed:
      try:
        os.ftruncate(self._fd, 0)
      except OSError:
        pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    if removed and self.created is not None:
      _remove_empty_parents(self.workdir, self.created)

  def _remove_leftovers(self) -> bool:
    """If the run wrote no file in the workdir, removes what it created there (empty directories, and the lock
    file while still holding it); a run that wrote anything keeps all of it. Returns whether the lock went."""
    try:
      new = [os.path.join(self.workdir, n) for n in os.listdir(self.workdir) if n not in self.before]
      if LOCK_NAME in self.before or any(_holds_a_file(p) for p in new if p != self.path):
        return False
      for path in new:
        if path != self.path:
          _remove_empty_dirs(path)
      os.remove(self.path)
      return True
    except OSError:
      return False

  def __enter__(self) -> "Lock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holds_a_file(path: str) -> bool:
  """Whether `path` is, or (a directory) holds anywhere below it, something other than a directory."""
  if os.path.islink(path) or not os.path.isdir(path):
    return True
  return any(_holds_a_file(os.path.join(path, n)) for n in os.listdir(path))


def _remove_empty_dirs(path: str) -> None:
  """Removes `path`, a directory tree holding no file, bottom-up."""
  if os.path.islink(path) or not os.path.isdir(path):
    return
  for name in os.listdir(path):
    _remove_empty_dirs(os.path.join(path, name))
  try:
    os.rmdir(path)
  except OSError:
    pass          # not empty: it holds a file


def _remove_empty_parents(path: str, top: str) -> None:
  """Removes `path` and its parents up to `top` (the first directory this run created), while empty."""
  while True:
    try:
      os.rmdir(path)
    except OSError:
      return
    if path == top:
      return
    path = os.path.dirname(path)


def _first_missing(path: str) -> Optional[str]:
  """The outermost directory of `path` that does not exist yet (what makedirs would create first), or None."""
  missing = None
  while not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def prepare(path: str, flag: str = "--workdir") -> str:
  """Creates `path` (and parents) as a directory and returns it absolute; WorkdirError says why not."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{flag} {path} is an existing file, not a directory; pass a new or existing "
                       f"directory as {flag}")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"{flag} {path} cannot be created: {os_error_cause(e)}; pass a {flag} under a directory "
                       f"you can write to") from e
  return path


def acquire(path: str, process_index: Optional[int] = None, flag: str = "--workdir") -> Lock:
  """Creates the workdir and locks it for this run; raises WorkdirLockedError if a live run holds it.

  `process_index` defaults to jax.process_index(); processes other than 0 only create the directory and
  get a Lock that holds nothing.
  """
  created = _first_missing(os.path.abspath(os.fspath(path)))
  path = prepare(path, flag)
  before = frozenset(_names(path))
  if process_index is None:
    process_index = jax.process_index()
  lock_path = os.path.join(path, LOCK_NAME)
  if process_index != 0:
    return Lock(lock_path, None)
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"{flag} {path} is not writable ({os_error_cause(e)} creating {lock_path}); pass a {flag} "
                       f"you can write to") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    owner = _read_owner(fd)
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirLockedError(
          f"{flag} {path} is in use by another run ({_describe(owner)}); wait for it to finish or stop it, "
          f"or pass a different {flag}. (The lock is {lock_path}; it is released when its process "
          f"exits.)") from e
    log.warning("Cannot lock %s (%s); this filesystem has no file locks, so nothing stops a second run "
                "from using %s at the same time.", lock_path, os_error_cause(e), path)
    return Lock(lock_path, None)
  previous = _read_owner(fd)
  if previous.get("pid") and previous.get("host") == socket.gethostname() and not _alive(previous["pid"]):
    log.warning("Took over the stale lock %s of a run that is gone (%s).", lock_path, _describe(previous))
  elif previous.get("pid"):
    log.warning("Took over the lock %s, last held by %s, which exited without releasing it.", lock_path,
                _describe(previous))
  record = f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={time.strftime('%Y-%m-%d %H:%M:%S')}\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, record.encode(), 0)
  os.fsync(fd)
  return Lock(lock_path, fd, path, created, before)


@contextlib.contextmanager
def lock(path: str, process_index: Optional[int] = None, flag: str = "--workdir") -> Iterator[Lock]:
  """`with lock(workdir):` holds the workdir lock for the block (see `acquire`). A block that fails (a refused
  setting, a missing init_from) before writing any file there leaves the workdir as it found it: a directory
  the run created is removed again, the lock file too (`Lock.release(clean=True)`)."""
  held = acquire(path, process_index, flag)
  failed = True
  try:
    yield held
    failed = False
  finally:
    held.release(clean=failed)


def _read_owner(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
  except OSError:
    return {}
  owner = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
  if owner.get("pid", "").isdigit():
    owner["pid"] = int(owner["pid"])
  else:
    owner.pop("pid", None)
  return owner


def _describe(owner: dict) -> str:
  if not owner.get("pid"):
    return "owner unknown"
  return f"pid {owner['pid']} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def os_error_cause(e: OSError) -> str:
  """A plain-words cause for the usual storage errors."""
  words = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a directory",
           errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EEXIST: "a file of that name exists"}
  return words.get(e.errno, e.strerror or str(e)) + (f" ({e.filename})" if e.filename else "")


# --------------------------------------------------------------------------------------------------
def _names(path: str) -> list:
  try:
    return sorted(os.listdir(path))
  except OSError:
    return []


def is_workdir(path: str) -> bool:
  """Whether `path` holds a dsv3 training workdir (checkpoints/, metrics.jsonl or the workdir lock)."""
  names = _names(path)
  return os.path.isdir(path) and any(m in names for m in _WORKDIR_MARKERS)


def is_orbax_checkpoint(path: str) -> bool:
  """Whether `path` is, or directly holds, an orbax checkpoint (numeric step dirs included)."""
  def marked(d):
    return any(fnmatch.fnmatchcase(n, m) for n in _names(d) for m in _ORBAX_MARKERS)
  if not os.path.isdir(path):
    return False
  return marked(path) or any(n.isdigit() and marked(os.path.join(path, n)) for n in _names(path))


def _is_hf_export_file(name: str) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in _HF_EXPORT_FILES)


def check_destination(path: str, overwrite: bool = False, flag: str = "--dst") -> str:
  """Checks that an export may be written to `path`; returns it absolute. WorkdirError says why not.

  Allowed: a new or empty directory; with `overwrite`, a previous HF export (config.json + *.safetensors
  and nothing else). Never, even with `overwrite`: a training workdir or an orbax checkpoint, or a
  directory holding any other file (nothing this tool did not write is ever deleted).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    return path
  if not os.path.isdir(path):
    raise WorkdirError(f"{flag} {path} is an existing file; choose a new or empty directory as {flag}")
  if is_workdir(path):
    raise WorkdirError(f"{flag} {path} holds a dsv3 training workdir (checkpoints, metrics, lock); an export "
                       f"never writes there, even with --overwrite. Choose a new or empty {flag}")
  if is_orbax_checkpoint(path):
    raise WorkdirError(f"{flag} {path} holds an orbax checkpoint; an export never replaces it, even with "
                       f"--overwrite. Choose a new or empty {flag} (or delete {path} yourself)")
  names = _names(path)
  if not names:
    return path
  if not overwrite:
    raise WorkdirError(f"{flag} {path} is not empty ({_listing(names)}); pass --overwrite (overwrite=True) "
                       f"to replace a previous HF export there, or choose an empty {flag}")
  unexpected = [n for n in names if not _is_hf_export_file(n) or not os.path.isfile(os.path.join(path, n))]
  if unexpected or "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
    raise WorkdirError(f"{flag} {path} is not a previous HF export (config.json + *.safetensors only); it holds "
                       f"{_listing(unexpected or names)}. --overwrite only replaces a previous export, so "
                       f"nothing there was touched: choose an empty {flag}")
  return path


def _listing(names: list) -> str:
  return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def staging_dir(path: str) -> str:
  """A new, empty sibling directory of `path` to write an export into before `install`."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  except OSError as e:
    raise WorkdirError(f"cannot write next to {path}: {os_error_cause(e)}; choose a destination you can write "
                       f"to") from e


def install(staged: str, path: str) -> None:
  """Moves the finished export `staged` to `path` (new, empty, or a previous HF export).

  A previous export is renamed aside first and its files deleted one by one only after the swap, so a
  crash leaves one complete export on disk; files that are not part of an HF export are never deleted.
  """
  path = os.path.abspath(os.fspath(path))
  old = None
  if os.path.isdir(path) and os.listdir(path):
    old = f"{path}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(path, old)
  os.replace(staged, path)  # replaces a missing or empty directory
  if old is not None:
    for name in os.listdir(old):
      if _is_hf_export_file(name) and os.path.isfile(os.path.join(old, name)):
        os.remove(os.path.join(old, name))
    try:
      os.rmdir(old)
    except OSError:
      log.warning("Left %s in place: it holds files that are not part of an HF export.", old)
