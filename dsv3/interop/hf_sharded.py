"""HF checkpoint import straight into sharded arrays: each process reads only its own devices' slices.

`hf.load_checkpoint(path, shardings=...)` plans the variable leaves (shape, dtype, and which HF tensor
fills which position of the stacked [L, ...] / [L, E, ...] axes) and calls `load`. Every leaf becomes
one array made of this process's device blocks: a callback maps each device's index range on the
stack/expert axes to HF tensor names and reads just the requested rows/columns of each (transposing
[out, in] -> [in, out] per slice; FP8 blocks dequantised per slice), and the block is placed on its
device before the next is read. Host memory stays at one block beyond the process's own shards.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import numpy as np


@dataclasses.dataclass
class Leaf:
  """One variable leaf: its full shape and dtype, and stack position (layer[, expert]) -> (HF name, transpose)."""
  shape: tuple
  dtype: np.dtype
  parts: dict


def _path(coll, ours) -> str:
  return "/".join((coll,) + tuple(ours))


def _sharding_of(shardings, coll, ours):
  tree = shardings
  for k in (coll,) + tuple(ours):
    if not isinstance(tree, dict) or k not in tree:
      raise ValueError(f"load_checkpoint(shardings=...): no sharding for {_path(coll, ours)}; pass a tree shaped "
                       f"like the variables {{'params', 'routing'}} or a function of their abstract tree, e.g. "
                       f"lambda a: dsv3.parallel.sharding.param_shardings(mesh, a)")
    tree = tree[k]
  if not isinstance(tree, jax.sharding.Sharding):
    raise ValueError(f"load_checkpoint(shardings=...): {_path(coll, ours)} maps to {type(tree).__name__}, "
                     f"not a jax.sharding.Sharding")
  return tree


def abstract(leaves: dict) -> dict:
  """The variables tree as ShapeDtypeStructs, for a `shardings` function."""
  out: dict = {}
  for (coll, ours), leaf in leaves.items():
    tree = out.setdefault(coll, {})
    for k in ours[:-1]:
      tree = tree.setdefault(k, {})
    tree[ours[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  return out


def load(leaves: dict, read: Callable, shardings) -> dict:
  """(collection, path) -> Leaf, read(name, index) -> np.ndarray, shardings tree/fn -> variables of jax.Arrays."""
  if callable(shardings) and not isinstance(shardings, dict):
    shardings = shardings(abstract(leaves))
  variables: dict = {}
  for (coll, ours), leaf in leaves.items():
    target = _sharding_of(shardings, coll, ours)
    cb = _callback(leaf, read)
    # make_array_from_callback would hold every local block on the host before placing any; placing
    # each block as it is read keeps the host overhead at one block.
    # Devices holding the same block are visited one after another, so it is read once.
    indices = target.addressable_devices_indices_map(leaf.shape)
    order = sorted(indices, key=lambda d: [s.indices(n)[:2] for s, n in zip(indices[d], leaf.shape)])
    blocks = {device: jax.device_put(cb(indices[device]), device) for device in order}
    array = jax.make_array_from_single_device_arrays(leaf.shape, target, [blocks[d] for d in indices])
    tree = variables.setdefault(coll, {})
    for k in ours[:-1]:
      tree = tree.setdefault(k, {})
    tree[ours[-1]] = array
  return variables


def _callback(leaf: Leaf, read: Callable) -> Callable:
  """index (slices over leaf.shape) -> that block, read tensor by tensor; the same index asked again at once
  (the next device replicates the block) is not read again."""
  k = len(next(iter(leaf.parts)))           # stack axes in front: 0 (whole tensor), 1 (layers), 2 (+experts)
  cache: dict = {}

  def cb(index):
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(tuple(index) + (slice(None),) * len(leaf.shape),
                                                            leaf.shape))
    key = tuple((s.start, s.stop) for s in index)
    if key in cache:
      return cache[key]
    stack, rest = index[:k], index[k:]
    cache.clear()
    out = np.empty(tuple(s.stop - s.start for s in index), leaf.dtype)
    for pos in itertools.product(*(range(s.start, s.stop) for s in stack)):
      name, transpose = leaf.parts[pos]
      value = read(name, rest[::-1] if transpose else rest)
      out[tuple(p - s.start for p, s in zip(pos, stack))] = value.T if transpose else value
    cache[key] = out
    return out
  return cb
