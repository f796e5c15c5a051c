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
   Only one replica of each distinct local shard is copied: each leaf is first viewed (no copy) on
   `checkpoint_sharding` of its sharding, and the copy is a jitted program per device set, which the
   runtime orders before a later donation of the params.
   - transfer='memory_kind' (chosen by 'auto' when every device holding the params exposes a
     `pinned_host` memory — GPU and TPU, and also XLA:CPU in current JAX): a jitted identity to the
     same (one-replica) shardings with `memory_kind='pinned_host'`. On GPU/TPU this is an asynchronous
     DMA from accelerator to page-locked host RAM, enqueued after the step that produced the params; on
     CPU it is a plain host memcpy. Either way the result is a *new* buffer, so the next training step
     may donate the params while the copy is still pending (the runtime orders donation after pending
     reads).
   - transfer='copy' (chosen by 'auto' on backends without memory kinds): a jitted on-device copy of
     the one-replica tree (again a new buffer, so donation is safe) followed by `copy_to_host_async()`
     on each shard. This costs one transient device copy of the distinct shards per step.
2. Host arithmetic (on one background worker thread): it materialises the snapshot's local shards as
   numpy (waiting there, not on the training thread, for the copy to land) and updates the float32 EMA
   in place. numpy releases the GIL during the arithmetic, so the Python training loop keeps running.

Sharded params: each process keeps only the shards of each parameter that its own devices hold, one
host copy per distinct shard (replicas over 'data'/'pipeline' on local devices are neither copied nor
stored twice). A 671B model's EMA is thus spread over the hosts like the params are, instead of a full
replicated copy per host.

Reading it back, never gathered to one host:
- `value()`: global `jax.Array`s with the params' shardings in device memory, built from the local
  pieces — what evaluation with the EMA params takes as is.
- `state_dict()['ema']` (for checkpoints): global `jax.Array`s in host memory (`pinned_host` where the
  devices have it) on `checkpoint_sharding(params sharding)`: the params' mesh with one device per
  process for each distinct shard, so each process provides each of its distinct shards once and orbax
  writes every process's shards from that process. `checkpoint_target()` is the matching restore
  target; `load_state_dict` keeps the distinct local pieces of what is restored, and `load_blocks` reads
  just those pieces from a checkpoint of either layout (dsv3.training.runner.restore).
Leaves given without a sharding (numpy params, or abstract ones without `sharding`) come back as numpy.

Back-pressure: at most `max_pending` updates are in flight. If the host falls behind the device, the
next `update()` waits for the oldest pending one; this bounds host memory to `max_pending` snapshots
(each the process's distinct shards). It waits rather than skips: a skipped step would change the EMA
(ema_n is defined over every step), so a resumed run could not match an uninterrupted one.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def _supports_pinned_host(devices) -> bool:
  try:
    return all("pinned_host" in [m.kind for m in d.addressable_memories()] for d in devices)
  except Exception:  # noqa: BLE001 - older plugins raise instead of listing memories
    return False


def _index_key(index, shape) -> tuple:
  """A hashable (start, stop) per dimension for a shard's index (a tuple of slices)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


@functools.cache   # called per leaf at every update
def checkpoint_sharding(sharding, process_of=lambda d: d.process_index):
  """`sharding` with one device per process for each distinct shard (a NamedSharding on a sub-mesh).

  Along each mesh axis that the spec does not use (a replica axis), the positions kept are the first
  of each distinct pattern of processes across the other axes: an axis inside one process is cut to
  its first position; an axis over 2 processes x 4 devices keeps positions 0 and 4. Every process keeps
  a device for each distinct shard it held, and shard indices are unchanged. Other shardings are
  returned as they are. `process_of(device)`: its process (a parameter for tests).
  """
  if not isinstance(sharding, NamedSharding):
    return sharding
  used = set()
  for part in sharding.spec:
    if part is not None and part is not jax.sharding.PartitionSpec.UNCONSTRAINED:
      used.update(part if isinstance(part, tuple) else (part,))
  mesh = sharding.mesh
  devices = mesh.devices
  for axis, name in enumerate(mesh.axis_names):
    if name in used or devices.shape[axis] == 1:
      continue
    procs = np.vectorize(process_of, otypes=[int])(devices)
    first = {}
    for j in range(devices.shape[axis]):
      first.setdefault(procs.take([j], axis=axis).tobytes(), j)
    devices = devices.take(sorted(first.values()), axis=axis)
  if devices.shape == mesh.devices.shape:
    return sharding
  sub = Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)
  return NamedSharding(sub, sharding.spec, memory_kind=sharding.memory_kind)


class _Layout:
  """Which distinct shards of one leaf this process holds: keys of (start, stop) per dimension."""

  def __init__(self, leaf):
    self.shape = tuple(leaf.shape)
    self.sharding = getattr(leaf, "sharding", None)
    if self.sharding is None:
      self.keys = [tuple((0, n) for n in self.shape)]
    else:
      idx = self.sharding.addressable_devices_indices_map(self.shape)
      self.keys = sorted({_index_key(i, self.shape) for i in idx.values()})

  def local_pieces(self, arr) -> dict:
    """Maps each key to a host (numpy) view of that piece of `arr`.

    `arr`: a numpy array, a jax.Array (each distinct shard read once), or a {index key: piece} dict.
    """
    if isinstance(arr, jax.Array):
      arr = _distinct_shards(arr)
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


def _one_replica(arr: jax.Array) -> jax.Array:
  """`arr` on `checkpoint_sharding(arr.sharding)`: the same buffers (nothing copied), one device per
  distinct local shard."""
  sharding = checkpoint_sharding(arr.sharding)
  if sharding == arr.sharding:
    return arr
  by_device = {s.device: s.data for s in arr.addressable_shards}
  return jax.make_array_from_single_device_arrays(arr.shape, sharding,
                                                  [by_device[d] for d in sharding.addressable_devices])


def _host_copy_fn(transfer: str):
  """Returns f(list of jax.Array) -> list of jax.Array (one replica of each distinct shard) whose host
  copy is under way.

  The copies are jitted programs (one per device set), so the runtime orders a later donation of the
  params after them; each program reads one replica per distinct shard (`_one_replica`).
  """
  jitted = {}

  def copy(xs):
    xs = [_one_replica(x) for x in xs]
    groups = collections.defaultdict(list)   # jit takes one device assignment per call
    for i, x in enumerate(xs):
      groups[tuple(x.sharding._device_assignment)].append(i)
    out = [None] * len(xs)
    for idx in groups.values():
      ys = [xs[i] for i in idx]
      key = tuple(y.sharding for y in ys)
      if key not in jitted:   # one program per layout; normally compiled once
        if transfer == "memory_kind":
          jitted[key] = jax.jit(lambda zs: zs, out_shardings=[s.with_memory_kind("pinned_host") for s in key])
        else:
          jitted[key] = jax.jit(lambda zs: [jnp.copy(z) for z in zs], out_shardings=list(key))
      for i, y in zip(idx, jitted[key](ys)):
        out[i] = y
    if transfer != "memory_kind":
      # Start every shard's device->host transfer now; the worker's np.asarray then finds it done.
      for y in out:
        for shard in y.addressable_shards:
          shard.data.copy_to_host_async()
    return out
  return copy


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
    self._dtypes = [np.dtype(x.dtype) for x in leaves]
    devices = {d for x in leaves if getattr(x, "sharding", None) is not None
               for d in x.sharding.device_set} or set(jax.local_devices()[:1])
    pinned = _supports_pinned_host(devices)
    if transfer == "auto":
      transfer = "memory_kind" if pinned else "copy"
    self.backend = transfer  # 'memory_kind' | 'copy': the transfer actually used
    self.host_memory_kind = "pinned_host" if pinned else None  # where state_dict()'s arrays live
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
      self._ema = [{k: np.array(v, dtype=self._store_dtype(v.dtype)) for k, v in p.items()}
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

  def _store_dtype(self, dtype):
    # jnp.issubdtype, not np: numpy does not count ml_dtypes bfloat16 as floating.
    return self.dtype if jnp.issubdtype(dtype, jnp.floating) else dtype

  def pending(self) -> int:
    """The number of updates whose host work has not finished yet."""
    return sum(not f.done() for f in self._pending)

  def wait(self) -> None:
    """Blocks until every pending update has been applied; re-raises a failed update's error."""
    while self._pending:
      self._pending.popleft().result()

  def host_nbytes(self) -> int:
    """Bytes of EMA state this process holds (its distinct shards); waits for pending updates."""
    self.wait()
    return sum(v.nbytes for leaf in self._ema or () for v in leaf.values())

  # --------------------------------------------------------------------------------------------
  def value(self) -> Any:
    """The EMA pytree (waits for pending updates): per leaf a global jax.Array with the params'
    sharding in device memory (numpy for leaves given without a sharding), ready for evaluation."""
    return self._build(lambda layout: layout.sharding)

  def checkpoint_target(self) -> Any:
    """The restore target for `state_dict()['ema']`: ShapeDtypeStructs on the checkpoint shardings."""
    return jax.tree.unflatten(self._treedef, [
        jax.ShapeDtypeStruct(layout.shape, self._store_dtype(dtype),
                             sharding=None if layout.sharding is None else self._checkpoint_sharding(layout))
        for layout, dtype in zip(self._layouts, self._dtypes)])

  def _checkpoint_sharding(self, layout: _Layout):
    sharding = checkpoint_sharding(layout.sharding)
    return sharding.with_memory_kind(self.host_memory_kind) if self.host_memory_kind else sharding

  def _build(self, sharding_of) -> Any:
    self.wait()
    if self._ema is None:
      raise ValueError("the EMA is empty: call update(params, 0) (or pass concrete params) first")
    out, puts = [], []   # puts: (leaf, device sharding, piece) for one batched device_put
    for i, (layout, shards) in enumerate(zip(self._layouts, self._ema)):
      if layout.sharding is None:
        out.append(_join(shards, layout.shape))  # a new array: later updates do not change it
        continue
      sharding = sharding_of(layout)
      out.append(sharding)
      for d, idx in sharding.addressable_devices_indices_map(layout.shape).items():
        # A copy (device_put may alias numpy memory, which the worker goes on updating in place).
        puts.append((i, SingleDeviceSharding(d, memory_kind=sharding.memory_kind),
                     np.array(shards[_index_key(idx, layout.shape)])))
    arrays = jax.device_put([p for _, _, p in puts], [s for _, s, _ in puts])
    per_leaf = collections.defaultdict(list)
    for (i, _, _), a in zip(puts, arrays):
      per_leaf[i].append(a)
    for i, layout in enumerate(self._layouts):
      if layout.sharding is not None:
        out[i] = jax.make_array_from_single_device_arrays(layout.shape, out[i], per_leaf[i])
    return jax.tree.unflatten(self._treedef, out)

  def state_dict(self) -> dict:
    """{'ema', 'step': last step folded in, 'decay'} for a checkpoint; 'ema' is host-resident global
    arrays on the checkpoint shardings (see the module docstring; `checkpoint_target()` restores it)."""
    return {"ema": self._build(self._checkpoint_sharding), "step": self.step, "decay": self.decay}

  def load_state_dict(self, state: dict) -> None:
    """Restores `state_dict()`'s output ('ema' leaves numpy or jax arrays, e.g. from orbax, on any
    sharding whose local shards cover this process's pieces), keeping the distinct local pieces.

    The decay stays the one given to the constructor: a new decay on resume applies from then on.
    """
    self.wait()
    leaves, treedef = jax.tree.flatten(state["ema"])
    if treedef != self._treedef:
      raise ValueError(f"EMA state structure {treedef} differs from the params' {self._treedef}")
    self._ema = [{k: np.array(v, dtype=self._store_dtype(v.dtype)) for k, v in layout.local_pieces(x).items()}
                 for layout, x in zip(self._layouts, leaves)]
    self.step = None if state.get("step") is None else int(state["step"])

  def load_blocks(self, read, step: Optional[int]) -> None:
    """Restores the EMA block by block, as of step `step`: read(path, bounds) -> the block of the leaf at
    pytree path `path` at bounds ((start, stop) per axis), as numpy. Only this process's distinct pieces
    are asked for, so a checkpoint of either layout restores with the EMA's shardings, never whole
    (dsv3.training.runner.restore reads them by slices)."""
    self.wait()
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(self._treedef, [0] * len(self._layouts)))[0]]
    ema = []
    for path, layout in zip(paths, self._layouts):
      pieces = {}
      for k in layout.keys:
        block = np.asarray(read(path, k))
        block = np.asarray(block, dtype=self._store_dtype(block.dtype))
        pieces[k] = block if block.flags.writeable else block.copy()    # updated in place later
      ema.append(pieces)
    self._ema, self.step = ema, None if step is None else int(step)

  def close(self) -> None:
    """Joins pending work and stops the worker thread."""
    self.wait()
    self._pool.shutdown(wait=True)
