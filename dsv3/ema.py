"""Exponential moving average (EMA) of the parameters, kept in host memory and updated off the step.

DeepSeek-V3 (report §3.2.3) keeps an EMA of the model parameters to estimate the quality of the model
after learning-rate decay without extra evaluation runs. The EMA is a full copy of the parameters, so it
lives in CPU (host) memory — never in accelerator memory — and is updated asynchronously after each
training step, so neither its memory nor its arithmetic slows the step down.

The EMA is the standard one, without bias correction, initialised to the parameters at step 0:

    ema_0 = p_0,    ema_n = decay * ema_{n-1} + (1 - decay) * p_n
          = decay^n p_0 + (1 - decay) * sum_{k=1..n} decay^(n-k) p_k

How one `update(params, step)` works, and what each backend does:

1. Snapshot (on the calling thread; only *dispatches* work, never waits for the step to finish):
   - transfer='memory_kind' (chosen by 'auto' when every device holding the params exposes a
     `pinned_host` memory — GPU and TPU, and also XLA:CPU in current JAX): one jitted `device_put` of the
     whole parameter tree to the same shardings with `memory_kind='pinned_host'`. On GPU/TPU this is an
     asynchronous DMA from accelerator to page-locked host RAM, enqueued after the step that produced the
     params; on CPU it is a plain host memcpy. Either way the result is a *new* buffer, so the next
     training step may donate the params while the copy is still pending (the runtime orders donation
     after pending reads).
   - transfer='copy' (chosen by 'auto' on backends without memory kinds): a jitted on-device copy of
     the tree (again a new buffer, so donation is safe) followed by `copy_to_host_async()` on each
     distinct local shard. This costs one transient device copy of the params per step.
2. Host arithmetic (on one background worker thread): it materialises the snapshot's local shards as
   numpy (waiting there, not on the training thread, for the copy to land) and updates the float32 EMA
   in place. numpy releases the GIL during the arithmetic, so the Python training loop keeps running.

Sharded params: each process keeps only the shards of each parameter that its own devices hold (one
copy per distinct shard: replicas across local devices are stored once). A 671B model's EMA is thus
spread over the hosts like the params are, instead of a full replicated copy per host. `value()`
returns full numpy arrays when the params are fully addressable (single process); in a multi-process
run it returns global `jax.Array`s built from the local shards, with the params' shardings placed in
`pinned_host` memory when available — what orbax needs to checkpoint them.

Back-pressure: at most `max_pending` updates are in flight. If the host falls behind the device, the
next `update()` waits for the oldest pending one; this bounds host memory to `max_pending` snapshots.
"""
from __future__ import annotations

import concurrent.futures
import collections
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def _supports_pinned_host(devices) -> bool:
  try:
    return all("pinned_host" in [m.kind for m in d.addressable_memories()] for d in devices)
  except Exception:  # noqa: BLE001 - older plugins raise instead of listing memories
    return False


def _index_key(index, shape) -> tuple:
  """A hashable (start, stop) per dimension for a shard's index (a tuple of slices)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


class _Layout:
  """Which distinct shards of one leaf this process holds: keys of (start, stop) per dimension."""

  def __init__(self, leaf):
    self.shape = tuple(leaf.shape)
    self.sharding = getattr(leaf, "sharding", None)
    if self.sharding is None:
      self.keys = [tuple((0, n) for n in self.shape)]
      self.fully_addressable = True
    else:
      idx = self.sharding.addressable_devices_indices_map(self.shape)
      self.keys = sorted({_index_key(i, self.shape) for i in idx.values()})
      self.fully_addressable = self.sharding.is_fully_addressable

  def local_pieces(self, arr) -> dict:
    """Maps each key to a host (numpy) view of that piece of `arr`.

    `arr`: a numpy array, a jax.Array, or a snapshot's {index key: single-device array} dict.
    """
    if isinstance(arr, jax.Array) and (not arr.is_fully_addressable or arr.sharding == self.sharding):
      arr = _distinct_shards(arr)  # read each distinct shard once, not the assembled array
    if isinstance(arr, dict):
      missing = [k for k in self.keys if k not in arr]
      if not missing:
        return {k: np.asarray(arr[k]) for k in self.keys}
      # Sharded differently from the layout (e.g. params_like carried no sharding): rebuild the full
      # array from the pieces, which works whenever they cover it (always in a single process).
      arr = _join(arr, self.shape)
    full = np.asarray(arr)
    if full.shape != self.shape:
      raise ValueError(f"EMA leaf has shape {self.shape}, got {full.shape}")
    return {k: full[tuple(slice(a, b) for a, b in k)] for k in self.keys}


def _join(pieces: dict, shape: tuple) -> np.ndarray:
  """A new full array from {index key: piece}; raises if the pieces do not cover it.

  The pieces are distinct blocks of a sharding's grid, so they cover the array iff their sizes add up.
  """
  size = sum(int(np.prod([b - a for a, b in k])) for k in pieces)
  if not pieces or size != int(np.prod(shape)):
    raise ValueError(f"the local shards {sorted(pieces)} do not cover an array of shape {shape}: give "
                     f"params_like (or the loaded state) the same sharding as the params")
  first = np.asarray(next(iter(pieces.values())))
  full = np.empty(shape, first.dtype)
  for k, v in pieces.items():
    full[tuple(slice(a, b) for a, b in k)] = v
  return full


def _distinct_shards(arr: jax.Array) -> dict:
  """{index key: single-device array} with one shard per distinct index (replicas read once)."""
  out = {}
  for shard in arr.addressable_shards:
    out.setdefault(_index_key(shard.index, arr.shape), shard.data)
  return out


def _host_copy_fn(transfer: str):
  """Returns f(list of jax.Array) -> per leaf, {index key: shard} whose host copy is under way."""
  if transfer == "memory_kind":
    jitted = {}

    def to_pinned_host(xs):
      shardings = tuple(x.sharding.with_memory_kind("pinned_host") for x in xs)
      if shardings not in jitted:  # one program per sharding layout; normally compiled once
        jitted[shardings] = jax.jit(lambda ys: ys, out_shardings=list(shardings))
      return [_distinct_shards(y) for y in jitted[shardings](xs)]
    return to_pinned_host

  copy = jax.jit(lambda ys: [jnp.copy(y) for y in ys])

  def copy_then_fetch(xs):
    pieces = [_distinct_shards(y) for y in copy(xs)]
    # Start every shard's device->host transfer now; the worker's np.asarray then finds it done.
    for piece in pieces:
      for shard in piece.values():
        shard.copy_to_host_async()
    return pieces
  return copy_then_fetch


class HostEMA:
  """EMA of a parameter pytree held in host memory and updated on a background thread.

  Args:
    decay: the EMA decay d in ema = d * ema + (1 - d) * params.
    params_like: the params pytree. Concrete arrays initialise the EMA to them (step 0). Abstract
      leaves (`jax.ShapeDtypeStruct`, with the params' sharding when sharded) leave it empty until the
      first `update`, which then initialises it (or until `load_state_dict`).
    transfer: 'auto' | 'memory_kind' | 'copy' — how params reach the host (see the module docstring).
    dtype: the storage dtype of float leaves (float32: in bf16 the small (1 - d) increments would be
      lost to rounding).
    max_pending: the most updates in flight before `update` waits for the oldest.
  """

  def __init__(self, decay: float, params_like: Any, *, transfer: str = "auto",
               dtype=np.float32, max_pending: int = 1):
    if not 0.0 <= decay <= 1.0:
      raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if transfer not in ("auto", "memory_kind", "copy"):
      raise ValueError(f"transfer must be 'auto', 'memory_kind' or 'copy', got {transfer!r}")
    self.decay = float(decay)
    self.dtype = np.dtype(dtype)
    self.max_pending = max(1, int(max_pending))
    leaves, self._treedef = jax.tree.flatten(params_like)
    self._layouts = [_Layout(x) for x in leaves]
    devices = {d for x in leaves if getattr(x, "sharding", None) is not None
               for d in x.sharding.device_set} or set(jax.local_devices()[:1])
    if transfer == "auto":
      transfer = "memory_kind" if _supports_pinned_host(devices) else "copy"
    self.backend = transfer  # 'memory_kind' | 'copy': the transfer actually used
    self._to_host = _host_copy_fn(transfer)
    self._ema: Optional[list] = None  # per leaf: {index key: numpy array of this process's shard}
    self.step: Optional[int] = None  # the step of the last params folded into the EMA
    self._pending: collections.deque = collections.deque()
    # One worker: updates must apply in step order, and one numpy thread keeps up with the device.
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-ema")
    if leaves and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
      self.update(params_like, 0)

  # --------------------------------------------------------------------------------------------
  def update(self, params: Any, step: int) -> concurrent.futures.Future:
    """Folds `params` (the params after step `step`) into the EMA without waiting for them.

    At step 0, or while the EMA is empty, the EMA is (re)initialised to `params`. Returns the future
    of the host work; `wait()` joins it and re-raises its errors.
    """
    leaves, treedef = jax.tree.flatten(params)
    if treedef != self._treedef:
      raise ValueError(f"params structure {treedef} differs from the EMA's {self._treedef}")
    while len(self._pending) >= self.max_pending:
      self._pending.popleft().result()
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    # numpy leaves are copied so that a caller mutating them in place cannot race the worker.
    snap = [None if isinstance(x, jax.Array) else np.array(x) for x in leaves]
    if on_device:
      for i, y in zip(on_device, self._to_host([leaves[i] for i in on_device])):
        snap[i] = y
    init = step == 0 or self._ema is None
    self.step = int(step)
    fut = self._pool.submit(self._apply, snap, init)
    self._pending.append(fut)
    return fut

  def _apply(self, snap, init: bool) -> None:
    """Runs on the worker: waits for the host copy, then updates the local shards in place."""
    pieces = [layout.local_pieces(x) for layout, x in zip(self._layouts, snap)]
    if init:
      self._ema = [{k: np.array(v, dtype=self._store_dtype(v)) for k, v in p.items()}
                   for p in pieces]
      return
    one_minus = 1.0 - self.decay
    for ema, new in zip(self._ema, pieces):
      for k, e in ema.items():
        if jnp.issubdtype(e.dtype, jnp.floating):
          # ema -= (1 - d) * (ema - p)  ==  d * ema + (1 - d) * p, with a single temporary.
          tmp = np.subtract(e, new[k], dtype=e.dtype)
          tmp *= one_minus
          e -= tmp
        else:
          e[...] = new[k]  # integer leaves (counters) have no meaningful average: keep the latest

  def _store_dtype(self, v):
    # jnp.issubdtype, not np: numpy does not count ml_dtypes bfloat16 as floating.
    return self.dtype if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype

  def pending(self) -> int:
    """The number of updates whose host work has not finished yet."""
    return sum(not f.done() for f in self._pending)

  def wait(self) -> None:
    """Blocks until every pending update has been applied; re-raises a failed update's error."""
    while self._pending:
      self._pending.popleft().result()

  # --------------------------------------------------------------------------------------------
  def value(self) -> Any:
    """The EMA pytree in host memory (waits for pending updates first); see the module docstring."""
    self.wait()
    if self._ema is None:
      raise ValueError("the EMA is empty: call update(params, 0) (or pass concrete params) first")
    return jax.tree.unflatten(self._treedef, [
        self._assemble(layout, shards) for layout, shards in zip(self._layouts, self._ema)])

  def _assemble(self, layout: _Layout, shards: dict):
    if layout.fully_addressable:
      return _join(shards, layout.shape)  # a new array: later updates do not change what we return
    # Multi-process: a global array whose local shards are this process's EMA pieces, in host memory.
    sharding = layout.sharding
    if self.backend == "memory_kind":
      sharding = sharding.with_memory_kind("pinned_host")
    # Copies: device_put may alias numpy memory, which the worker goes on updating in place.
    arrays = [jax.device_put(np.array(shards[_index_key(idx, layout.shape)]),
                             jax.sharding.SingleDeviceSharding(d, memory_kind=sharding.memory_kind))
              for d, idx in sharding.addressable_devices_indices_map(layout.shape).items()]
    return jax.make_array_from_single_device_arrays(layout.shape, sharding, arrays)

  def state_dict(self) -> dict:
    """{'ema': value(), 'step': last step folded in, 'decay': decay}, for a checkpoint."""
    return {"ema": self.value(), "step": self.step, "decay": self.decay}

  def load_state_dict(self, state: dict) -> None:
    """Restores `state_dict()`'s output ('ema' leaves numpy or jax arrays, e.g. from orbax).

    The decay stays the one given to the constructor: a new decay on resume applies from then on.
    """
    self.wait()
    leaves, treedef = jax.tree.flatten(state["ema"])
    if treedef != self._treedef:
      raise ValueError(f"EMA state structure {treedef} differs from the params' {self._treedef}")
    self._ema = [{k: np.array(v, dtype=self._store_dtype(v)) for k, v in layout.local_pieces(x).items()}
                 for layout, x in zip(self._layouts, leaves)]
    self.step = None if state.get("step") is None else int(state["step"])

  def close(self) -> None:
    """Joins pending work and stops the worker thread."""
    self.wait()
    self._pool.shutdown(wait=True)
