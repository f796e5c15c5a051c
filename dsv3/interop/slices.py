"""Saved trees read straight into placed arrays, by slices: each process reads only its own devices' blocks.

A source is a saved tree in one of dsv3.layout's two forms (stacked, or per-layer) that reads any block of any
leaf, by key (dsv3.training.saved_step.leaf_key: a leaf's path as strings):
  shapes {key: shape}, dtypes {key: dtype}, read(key, index) -> np.ndarray, bytes_read
an orbax checkpoint step (dsv3.training.saved_step.SavedStep) or an HF dir (dsv3.interop.hf_sharded.Source).

`Route` says where each leaf of a target tree (either form) comes from in a source (either form), by
dsv3.layout's own unstack: a per-layer leaf is one row of a stacked leaf. `place` fills target trees of
ShapeDtypeStructs with shardings (e.g. every local pipeline rank's part of the state, each on its sub-mesh)
with global arrays on exactly those shardings: every block an addressable device holds is read from disk and
put on its device at once, a block several local devices hold (replicas, a unit two local ranks hold) is read
once, and no leaf is ever whole on the host or on a device that does not hold it. Shapes are checked against
the source before anything is read (CheckpointMismatchError names the tensor and both shapes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from dsv3 import layout
from dsv3.training.saved_step import CheckpointMismatchError, leaf_key


class Saved(NamedTuple):
  """A source, where the tree sits in it, and its name for errors: a checkpoint step's train state
  (prefix ('train',)), an export's or an HF dir's variables (prefix ())."""
  source: Any
  prefix: tuple
  what: str

  @property
  def per_layer(self) -> bool:
    """Whether the saved tree is in the per-layer form (a pipelined run wrote it), else stacked."""
    n = len(self.prefix)
    return any(k[:n] == self.prefix and k[n:n + 2] == ("params", layout.LAYERS) for k in self.source.shapes)


@dataclasses.dataclass(frozen=True)
class _Rows:
  """A stand-in leaf that dsv3.layout's unstack slices like an array: where a per-layer leaf lives."""
  key: tuple
  shape: tuple
  row: Optional[int] = None

  def __getitem__(self, i):
    return _Rows(self.key, self.shape[1:], int(i))


def _flat(tree) -> list:
  return [(leaf_key(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _bounds(index, shape) -> tuple:
  """A device's index (slices) over `shape` as ((start, stop), ...) per axis."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


class Route:
  """Where each leaf of a target tree comes from in a saved tree of the same variables, either form.

  stacked: the tree's abstract in the stacked form (the model's own: what the config makes); unstack: stacked
  tree -> per-layer tree (dsv3.layout's, e.g. `lambda t: layout.map_state(lambda v: layout.unstack(cfg, v), t)`);
  target_per_layer, source_per_layer: the two forms; prefix: the tree's key in the source (('train',) for a
  checkpoint's train state).
  """

  def __init__(self, stacked, unstack: Callable, target_per_layer: bool, source_per_layer: bool,
               prefix: tuple = ()):
    self.prefix, self.target_per_layer, self.source_per_layer = tuple(prefix), target_per_layer, source_per_layer
    refs = jax.tree_util.tree_map_with_path(lambda p, a: _Rows(leaf_key(p), tuple(a.shape)), stacked)
    per_layer = _flat(unstack(refs))
    self.down = {k: (r.key, r.row) for k, r in per_layer}            # per-layer key -> (stacked key, row)
    self.up: dict = {}                                                 # stacked key -> per-layer keys by row
    for k, (stack_key, row) in self.down.items():
      if row is not None:
        self.up.setdefault(stack_key, {})[row] = k
    # The config's shape of every leaf in the source's form: what the checkpoint must hold.
    self.expected = {k: r.shape for k, r in (per_layer if source_per_layer else _flat(refs))}

  def sources(self, key: tuple) -> list:
    """The source keys (without prefix) that target leaf `key` is read from."""
    if self.target_per_layer == self.source_per_layer:
      return [key]
    if self.target_per_layer:
      return [self.down[key][0]]
    rows = self.up.get(key)
    return [rows[i] for i in sorted(rows)] if rows else [key]

  def block(self, source, key: tuple, bounds: tuple) -> np.ndarray:
    """Target leaf `key`'s block at `bounds` ((start, stop) per axis), read from `source`."""
    index = tuple(slice(a, b) for a, b in bounds)
    at = lambda k: self.prefix + k
    if self.target_per_layer == self.source_per_layer:
      return source.read(at(key), index)
    if self.target_per_layer:
      stack_key, row = self.down[key]
      return source.read(at(stack_key), index) if row is None else \
          source.read(at(stack_key), (slice(row, row + 1),) + index)[0]
    rows = self.up.get(key)
    if not rows:
      return source.read(at(key), index)
    return np.stack([source.read(at(rows[i]), index[1:]) for i in range(*bounds[0])])

  def check(self, source, keys, what: str) -> None:
    """Raises CheckpointMismatchError naming the first tensor of `keys`' sources that `source` lacks or holds
    in another shape than the config's (the params first: the names a user knows)."""
    for key in sorted(keys, key=lambda k: (k[:1] != ("params",), k)):
      for k in self.sources(key):
        want, got = tuple(self.expected[k]), source.shapes.get(self.prefix + k)
        if got is None:
          raise CheckpointMismatchError(
              f"{what}: tensor {'/'.join(self.prefix + k)} is not in the checkpoint (the config needs it with "
              f"shape {want}); the checkpoint was written for another model config")
        if tuple(got) != want:
          raise CheckpointMismatchError(
              f"{what}: tensor {'/'.join(self.prefix + k)} has shape {tuple(got)} in the checkpoint, the config "
              f"gives {want}; set config.model to the checkpoint's model")


def identity(tree, prefix: tuple = ()) -> Route:
  """The route of a target read from a source of the same form and tree."""
  return Route(tree, lambda t: t, False, False, prefix)


def place(targets: Sequence, route: Route, source, what: str) -> list:
  """`targets` (trees of ShapeDtypeStructs with shardings; None entries stay None) as trees of jax.Arrays on
  exactly those shardings, read from `source` along `route`; `what` names the source in errors.

  Each leaf's blocks are read in index order over every target holding that leaf, so a block is read once
  however many local devices (of however many targets) hold it, and the host keeps at most one block."""
  flats = [None if t is None else jax.tree_util.tree_flatten_with_path(t) for t in targets]
  by_key: dict = {}
  for t, flat in enumerate(flats):
    for i, (path, sds) in enumerate([] if flat is None else flat[0]):
      by_key.setdefault(leaf_key(path), []).append((t, i, sds))
  route.check(source, by_key, what)
  out = [None if f is None else [None] * len(f[0]) for f in flats]
  for key, holders in by_key.items():
    wanted = []    # (block bounds, target, leaf, device, its ShapeDtypeStruct)
    for t, i, sds in holders:
      for device, index in sds.sharding.addressable_devices_indices_map(tuple(sds.shape)).items():
        wanted.append((_bounds(index, sds.shape), t, i, device, sds))
    wanted.sort(key=lambda w: (w[0], w[1], w[2], w[3].id))
    blocks, last = {}, (None, None)
    for bounds, t, i, device, sds in wanted:
      if last[0] != bounds:
        last = (bounds, np.asarray(route.block(source, key, bounds)).astype(sds.dtype, copy=False))
      on = jax.sharding.SingleDeviceSharding(device, memory_kind=sds.sharding.memory_kind)
      blocks.setdefault((t, i), {})[device] = jax.device_put(last[1], on)
    for t, i, sds in holders:
      here = blocks.get((t, i), {})
      out[t][i] = jax.make_array_from_single_device_arrays(
          tuple(sds.shape), sds.sharding, [here[d] for d in sds.sharding.addressable_devices_indices_map(
              tuple(sds.shape))])
  return [None if f is None else jax.tree.unflatten(f[1], o) for f, o in zip(flats, out)]


def planned_bytes(targets: Sequence, route: Route, source_dtypes: dict, process_of: Callable = None) -> dict:
  """{process: bytes it reads} to `place` targets (abstract; nothing read): each distinct block of each
  leaf once per process, in the source's dtype. `process_of(device)`: its process (default
  device.process_index; a dry run on a deviceless topology passes its own)."""
  process_of = process_of or (lambda d: d.process_index)
  seen, total = set(), {}
  for tree in targets:
    for key, sds in ([] if tree is None else _flat(tree)):
      itemsize = max(np.dtype(source_dtypes[route.prefix + k]).itemsize for k in route.sources(key))
      for device, index in sds.sharding.devices_indices_map(tuple(sds.shape)).items():
        bounds, p = _bounds(index, sds.shape), process_of(device)
        if (p, key, bounds) not in seen:
          seen.add((p, key, bounds))
          total[p] = total.get(p, 0) + int(np.prod([b - a for a, b in bounds])) * itemsize
  return total
