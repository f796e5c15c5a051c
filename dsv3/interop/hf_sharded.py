"""HF checkpoint import straight into sharded arrays: each process reads only its own devices' slices.

`hf.open_checkpoint(path)` plans the variable leaves (shape, dtype, and which HF tensor fills which position
of the stacked [L, ...] / [L, E, ...] axes) as a `Source` that dsv3.interop.slices places into any target,
stacked or per-layer (a pipelined run's ranks): a callback maps each device's index range on the stack/expert
axes to HF tensor names and reads just the requested rows/columns of each (transposing [out, in] -> [in, out]
per slice; FP8 blocks dequantised per slice), and the block is placed on its device before the next is read.
Host memory stays at one block beyond the process's own shards. `load` is hf.load_checkpoint's stacked case.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import numpy as np

from dsv3.interop import slices


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


class Source:
  """An HF dir's variables in the stacked form as a dsv3.interop.slices source: leaf keys (collection, *path),
  `read(key, index)` reads that block tensor by tensor (FP8 blocks dequantised per slice)."""

  def __init__(self, leaves: dict, read: Callable, reader=None):
    self.leaves = {(coll, *ours): leaf for (coll, ours), leaf in leaves.items()}
    self.shapes = {k: tuple(leaf.shape) for k, leaf in self.leaves.items()}
    self.dtypes = {k: np.dtype(leaf.dtype) for k, leaf in self.leaves.items()}
    self._blocks = {k: _callback(leaf, read) for k, leaf in self.leaves.items()}
    self._reader = reader

  @property
  def bytes_read(self) -> int:
    return self._reader.bytes_read if self._reader is not None else 0

  def read(self, key: tuple, index=()) -> np.ndarray:
    return self._blocks[key](index)

  def abstract(self) -> dict:
    """The variables tree as ShapeDtypeStructs."""
    out: dict = {}
    for key, leaf in self.leaves.items():
      tree = out
      for k in key[:-1]:
        tree = tree.setdefault(k, {})
      tree[key[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return out


def load(source: Source, shardings) -> dict:
  """A Source's variables as jax.Arrays on `shardings` (a tree shaped like the variables, or a function of
  their abstract tree), each block read once and put on its devices as it is read (dsv3.interop.slices)."""
  if callable(shardings) and not isinstance(shardings, dict):
    shardings = shardings(source.abstract())
  target = source.abstract()
  for (coll, *ours), leaf in source.leaves.items():
    tree = target[coll]
    for k in ours[:-1]:
      tree = tree[k]
    tree[ours[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_of(shardings, coll, ours))
  return slices.place([target], slices.identity(target), source, "HF checkpoint")[0]


def _callback(leaf: Leaf, read: Callable) -> Callable:
  """index (slices over leaf.shape) -> that block, read tensor by tensor."""
  k = len(next(iter(leaf.parts)))           # stack axes in front: 0 (whole tensor), 1 (layers), 2 (+experts)

  def cb(index):
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(tuple(index) + (slice(None),) * len(leaf.shape),
                                                            leaf.shape))
    stack, rest = index[:k], index[k:]
    out = np.empty(tuple(s.stop - s.start for s in index), leaf.dtype)
    for pos in itertools.product(*(range(s.start, s.stop) for s in stack)):
      name, transpose = leaf.parts[pos]
      value = read(name, rest[::-1] if transpose else rest)
      out[tuple(p - s.start for p, s in zip(pos, stack))] = value.T if transpose else value
    return out
  return cb
