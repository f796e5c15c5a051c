"""One checkpoint step's saved state, read by blocks (SavedStep), the path key orbax names a leaf by, and the
errors a damaged or mismatched step raises. dsv3.training.checkpoint finds the steps; this reads one."""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from dsv3.training import orbax_errors


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but does not fit what it is read into (a tensor's shape, a missing tensor):
  the same on every step, so never a reason to fall back; the message names the tensor and both shapes."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint step directory exists but cannot be restored; the message names it."""


def leaf_key(path) -> tuple:
  """A pytree path as the strings orbax names a saved leaf by (dict keys, attribute names, sequence indices):
  the same key for a live optax state (namedtuples) and its saved metadata (dicts and lists)."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class SavedStep:
  """One checkpoint step's `state` item as saved: `abstract`, its tree of shapes and dtypes (each array on
  this process's first device: a target that restores whatever mesh wrote it), `shapes` ({leaf_key: shape})
  and `read(key, index)`, one block of one leaf read from disk (tensorstore reads only the chunks the block
  touches). `bytes_read` counts the bytes of the blocks read. Raises CheckpointCorruptError when the step
  has no readable state item (an interrupted copy or rsync leaves its extras without it)."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = step, directory
    try:
      with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(directory)
      tree = getattr(metadata, "item_metadata", metadata)
      ok = isinstance(getattr(tree, "tree", tree), Mapping)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
      raise CheckpointCorruptError(f"checkpoint {os.path.dirname(directory)} state cannot be read: "
                                   f"{orbax_errors.short(e)}") from e
    if not ok:
      raise CheckpointCorruptError(f"checkpoint {os.path.dirname(directory)} has no readable state item "
                                   f"({directory} is missing or damaged: an interrupted copy?)")
    self._zarr3 = bool(getattr(tree, "use_zarr3", False))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
    self.abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
                                 if is_array(m) else m, tree, is_leaf=is_array)
    flat = jax.tree_util.tree_flatten_with_path(self.abstract)[0]
    self.shapes = {leaf_key(p): tuple(a.shape) for p, a in flat if is_array(a)}
    self.dtypes = {leaf_key(p): np.dtype(a.dtype) for p, a in flat if is_array(a)}
    self._stores: dict = {}
    self.bytes_read = 0

  def read(self, key: tuple, index: tuple = ()) -> np.ndarray:
    """Leaf `key`[index] (index: slices, one per leading axis or fewer) as a numpy array."""
    if key not in self._stores:
      info = ocp.type_handlers.ParamInfo(name=".".join(key), parent_dir=epath.Path(self.directory),
                                         is_ocdbt_checkpoint=True, use_zarr3=self._zarr3)
      ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
      self._stores[key] = ts.open(ts.Spec(spec), read=True, open=True,
                                  context=ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)).result()
    out = np.asarray(self._stores[key][tuple(index)].read().result())
    self.bytes_read += out.nbytes
    return out
