"""Checkpoints: an orbax CheckpointManager wrapper with topology-free restore and corruption fallback.

A checkpoint at step N is a directory `DIR/N/` with two items:
- `state`: the array pytree (params, optimizer state, EMA, ...), written by orbax's StandardSave
  (tensorstore/OCDBT). Each process writes the shards it holds, so a 671B state never passes through one
  host, and restoring onto an abstract target (`jax.ShapeDtypeStruct`s carrying shardings) re-slices the
  arrays for the new topology: a checkpoint written on 8 devices restores on 1, and the reverse.
- `extras`: a JSON document for everything that is not an array — the data iterator position, RNG seed
  and key data as lists, the flat config (for `check_compatible`).

Saving is asynchronous by default: `save` returns once the arrays are copied off the devices and the
writing continues on background threads, so training resumes at once. Orbax writes each step into
`N.orbax-checkpoint-tmp-*` and renames it to `N` only when every item is complete (or, on object stores,
marks it with a commit file), so a run killed mid-save leaves a temporary directory that
`latest_step()` never reports; leftovers are removed at the next start. Only the last `keep` steps are
kept.

A finished checkpoint can still be damaged later (a disk error, a file deleted or truncated by hand).
`restore()` then names the step directory that failed and, with `fallback=True`, warns and restores
the previous step instead. Once an older step has restored with the same target, the newer ones are
known to be damaged (not merely unreadable with this target, as after a config change, which fails on
every step and moves nothing), and each is renamed `N.corrupt-<time>` — kept for inspection, invisible to
orbax — so that the re-run of step N can save there again.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Config fields that may change between a run and its resumption: schedule lengths, logging cadence,
# paths, the mesh (checkpoints are topology-free) and the pipeline schedule (a pipelined step computes the
# unpipelined step's gradients). Shell-style patterns over dotted names.
DEFAULT_IGNORE = ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
                  "keep_checkpoints", "workdir", "*workdir*", "mesh.*", "pipeline.*")


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
  """

  def __init__(self, directory: str, keep: int = 3, save_every: int = 1, async_save: bool = True,
               fallback: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = max(1, int(save_every))
    self.fallback = fallback
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=self.save_every, create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # leftovers of a save killed half-way
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extras"))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step (half-written ones never count), or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list:
    return sorted(self._mgr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0 and step not in self._mgr.all_steps()

  def save(self, step: int, state: Any, extras: Optional[Mapping[str, Any]] = None,
           force: bool = False) -> bool:
    """Saves `state` and `extras` as step `step` if it is on schedule (or `force`, e.g. on SIGTERM).

    Returns whether a save started; a step that already has a checkpoint is not saved again.
    """
    step = int(step)
    if step in self._mgr.all_steps() or not (force or step % self.save_every == 0):
      return False
    extras = dict(extras or {})
    for k, v in extras.items():  # fail here, naming the key, rather than in a background thread
      try:
        json.dumps(v)
      except TypeError as e:
        raise TypeError(f"checkpoint extras[{k!r}] is not JSON-serialisable: {e}") from e
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(extras))
    return bool(self._mgr.save(step, args=args, force=force))

  def read_extras(self, step: Optional[int] = None) -> dict:
    """Only the JSON extras of `step` (default: latest), e.g. to check the config before restoring."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return dict(self._mgr.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))["extras"])

  def restore(self, step: Optional[int] = None, abstract_state: Any = None,
              fallback: Optional[bool] = None) -> Optional[Restored]:
    """Restores (step, state, extras); None when there is no checkpoint and no `step` was asked for.

    `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with `sharding`) or arrays giving the shapes,
    dtypes and target shardings — the arrays are re-sliced for them, whatever topology wrote them.
    Without it, every array comes back whole on this process's first local device, whatever mesh wrote it.
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
        return self._restore_one(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise CheckpointCorruptError(
            f"checkpoint {self.step_dir(step)} cannot be restored: {_short(e)}") from e
    steps = sorted(self._mgr.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for s in steps:
      try:
        result = self._restore_one(s, abstract_state)
        ok = True
      except Exception as e:  # noqa: BLE001 - any read error means "this step is unusable"
        result, ok, err = None, False, e
      if _all_processes(ok):
        if failures:
          # Only now are the newer steps known to be damaged rather than unreadable with this target
          # (a changed config fails on every step, and must not cost the user their checkpoints).
          for f, _ in failures:
            self._quarantine(f)
          log.warning("Restored checkpoint step %d instead of the damaged newer step(s) %s.", s,
                      ", ".join(str(f) for f, _ in failures))
        return result
      if ok:  # another process failed to read its shards: treat the step as damaged everywhere
        err = RuntimeError("another process could not read its part of this checkpoint")
      failures.append((s, err))
      if not fallback:
        raise CheckpointCorruptError(
            f"checkpoint {self.step_dir(s)} cannot be restored: {_short(err)}\n"
            f"Fix: delete or move that directory to resume from the previous checkpoint, or pass "
            f"fallback=True to do so automatically.") from err
      older = [x for x in steps if x < s]
      log.warning("Checkpoint %s cannot be restored (%s); %s", self.step_dir(s), _short(err),
                  f"falling back to step {older[0]}." if older else "no older checkpoint left.")
    first_step, first_err = failures[0]
    raise CheckpointCorruptError(
        f"no checkpoint in {self.directory} can be restored; the latest, {self.step_dir(first_step)}, "
        f"failed with {_short(first_err)}\nIf every step fails the same way the "
        f"abstract_state probably does not match the saved state (a changed config); else the "
        f"directories are damaged. Nothing was moved or deleted.") from first_err

  def _restore_one(self, step: int, abstract_state: Any) -> Restored:
    if abstract_state is None:
      abstract_state = self._local_target(step)
    state_args = ocp.args.StandardRestore(abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(state=state_args,
                                                          extras=ocp.args.JsonRestore()))
    return Restored(step, out["state"], dict(out["extras"] or {}))

  def _local_target(self, step: int) -> Any:
    """The saved state's shapes and dtypes, every array on this process's first device: a target that
    restores whatever mesh wrote the checkpoint (orbax refuses to guess a layout for other devices)."""
    with ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(os.path.join(self.step_dir(step), "state"))
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
                        if is_array(m) else m, metadata, is_leaf=is_array)

  def _quarantine(self, step: int) -> None:
    """Renames a damaged step directory out of orbax's sight, so that the step can be saved again."""
    if jax.process_index() == 0:
      dest = f"{self.step_dir(step)}.corrupt-{int(time.time())}"
      try:
        os.rename(self.step_dir(step), dest)
        log.warning("Moved the damaged checkpoint %s to %s.", self.step_dir(step), dest)
      except OSError as e:
        log.warning("Could not move the damaged checkpoint %s aside: %s", self.step_dir(step), e)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"dsv3_checkpoint_quarantine_{step}")
    self._mgr.reload()

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step directory exists but cannot be restored; the message names it."""


def _short(err: BaseException) -> str:
  """The error's type and first line, capped: tensorstore errors embed kilobytes of spec JSON."""
  text = (str(err).splitlines() or [""])[0]
  return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _all_processes(ok: bool) -> bool:
  """True iff `ok` on every process, so that all processes fall back (or not) together."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


# --------------------------------------------------------------------------------------------------
def flatten_config(config: Any, prefix: str = "") -> dict:
  """A (nested) dict or ml_collections ConfigDict as a flat {'a.b.c': value} dict of JSON values."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  flat = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if hasattr(v, "to_dict") or isinstance(v, Mapping):
      flat.update(flatten_config(v, name + "."))
    else:
      flat[name] = _json_value(v)
  return flat


def _json_value(v: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists), so saved and live configs compare."""
  try:
    return json.loads(json.dumps(v))
  except TypeError:
    return str(v)


_MISSING = object()  # a field present in one config only


def check_compatible(saved_config: Mapping[str, Any], new_config: Mapping[str, Any],
                     ignore: Iterable[str] = DEFAULT_IGNORE) -> None:
  """Raises ValueError naming every field (other than `ignore` patterns) that differs.

  Both configs may be flat ({'model.hidden_size': 64}) or nested; they are flattened first.
  """
  saved, new = flatten_config(saved_config), flatten_config(new_config)
  ignore = tuple(ignore)
  diffs = []
  for name in sorted(set(saved) | set(new)):
    if any(fnmatch.fnmatchcase(name, pat) for pat in ignore):
      continue
    a, b = saved.get(name, _MISSING), new.get(name, _MISSING)
    if a != b:
      diffs.append((name, a, b))
  if diffs:
    show = lambda v: "no value" if v is _MISSING else repr(v)
    lines = "\n".join(f"  {n}: checkpoint has {show(a)}, current config has {show(b)}"
                      for n, a, b in diffs)
    fixes = " ".join(f"--config.{n}={a}" for n, a, _ in diffs if a is not _MISSING)
    raise ValueError(
        f"The checkpoint was written with a different config in {len(diffs)} field(s) that cannot "
        f"change on resume:\n{lines}\nFix: restore the saved value(s)"
        + (f" (e.g. {fixes})" if fixes else "")
        + ", or start a fresh run with a new --workdir.")
