"""Where a stage runs: per device on parameter copies, or in the global view.

When a micro-batch's rows split over every device of the sub-mesh (the trainer's layouts always do), each
piece runs per device (shard_map, check_vma=False) on the device's own rows and its own working copy of the
stage's parameters (in the dtype the model reads each in), so every backward leaves each device's gradient in
its copy, unreduced, and the executor adds it to an FP32 accumulator and sums the copies once per step.
Otherwise the pieces run in the global view and XLA reduces every backward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3.nn import layers
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel


@dataclasses.dataclass(frozen=True)
class Devices:
  """A stage's sub-mesh and how its pieces run there (static: hashable).

  axes: the sub-mesh's axes when a micro-batch's rows split over all of its devices; then every piece runs
  per device on parameter copies. () runs the pieces in the global view.
  expert_parallel: the routed experts over the sub-mesh's 'expert' axis (None: all local).
  """
  mesh: Mesh
  axes: Tuple[str, ...]
  expert_parallel: Optional[ExpertParallel]

  @classmethod
  def of(cls, mesh: Mesh, rows: int) -> "Devices":
    ep = ExpertParallel(mesh) if mesh.shape.get("expert", 1) > 1 else None
    if mesh.size == 1 or rows % mesh.size:
      return cls(mesh, (), ep)
    # Every axis, size-1 ones included: an axis no spec mentions would get a (no-op) psum in the backward.
    return cls(mesh, tuple(mesh.axis_names), dataclasses.replace(ep, manual=True) if ep else None)

  def _specs(self, tree, copied: bool):
    """Each leaf's spec on the sub-mesh; `copied` leaves carry the leading copy axis (shapes[1:] are the leaf's)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:] if copied else a.shape, a.dtype), tree)
    def one(spec):
      used = set(jax.tree.leaves(tuple(spec)))
      copy = tuple(a for a in self.axes if a not in used)
      return P(copy or None, *spec)
    return jax.tree.map(one, sharding.param_specs(self.mesh, shapes), is_leaf=lambda x: isinstance(x, P))

  def copies(self, params, cfg):
    """The stage's parameters as per-device working copies: each leaf in the dtype the model reads it in
    (nn.layers.working_dtype; BF16 for a BF16 model's GEMM weights), gathered from wherever the FP32 master
    lives (a pipeline rank keeps it ZeRO-sharded) and broadcast over a leading axis that spans the devices it
    is replicated on (its own split, e.g. experts over 'expert', is kept). With axes=(): `working`."""
    if not self.axes:
      return self.working(params, cfg)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(_broadcast_copies(tuple(leaves), self._copy_shardings(params),
                                               _working_dtypes(params, cfg)))

  def abstract_copies(self, params, cfg):
    """`copies` of a tree of ShapeDtypeStructs, with their shardings (what a dry run lowers with)."""
    if not self.axes:
      return self.abstract_working(params, cfg)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([jax.ShapeDtypeStruct((_num_copies(sh), *a.shape), dt, sharding=sh) for a, sh, dt
                              in zip(leaves, self._copy_shardings(params), _working_dtypes(params, cfg))])

  def working(self, params, cfg):
    """The params in the global view as a stage reads them: each leaf in its working dtype, gathered from
    the ZeRO-sharded master onto the stage's layout (routed experts over 'expert', the rest replicated), so
    no program partitions a GEMM over a sharded weight."""
    leaves, treedef = jax.tree.flatten(params)
    shardings = tuple(jax.tree.leaves(sharding.param_shardings(self.mesh, params)))
    return treedef.unflatten(_gather(tuple(leaves), shardings, _working_dtypes(params, cfg)))

  def abstract_working(self, params, cfg):
    """`working` of a tree of ShapeDtypeStructs."""
    leaves, treedef = jax.tree.flatten(params)
    shardings = jax.tree.leaves(sharding.param_shardings(self.mesh, params))
    return treedef.unflatten([jax.ShapeDtypeStruct(a.shape, dt, sharding=sh) for a, sh, dt
                              in zip(leaves, shardings, _working_dtypes(params, cfg))])

  def _copy_shardings(self, tree) -> tuple:
    specs = jax.tree.leaves(self._specs(tree, copied=False), is_leaf=lambda x: isinstance(x, P))
    return tuple(NamedSharding(self.mesh, sp) for sp in specs)

  def sum_copies(self, tree):
    """Gradients in the copies' layout summed over the copies: the step's one reduction."""
    return jax.tree.map(lambda g: g.sum(0), tree) if self.axes else tree

  def local(self, params):
    """Inside `run`'s fn: the parameters as the layer sees them (a device's copy without its leading axis).
    Pieces apply it inside their checkpointed function, so that the VJP keeps the copies themselves, which
    `forward` then leaves out of its residuals (`ParamRef`)."""
    return jax.tree.map(lambda a: a[0], params) if self.axes else params

  def run(self, fn, params, rows, shared=()):
    """fn(params, *rows, *shared) -> (out, stats) on every device (or once, in the global view); fn sees
    `params` as given (per device: with the copy axis, see `local`).

    rows: arrays split over the micro-batch rows (leading axis); shared: replicated. `out` is split like the
    rows (None allowed); `stats` is a dict of per-device scalars/arrays, combined here in the global view:
    'load' (token counts) summed over the devices, the rest (means over the device's rows) averaged.
    """
    if not self.axes:
      return fn(params, *rows, *shared)
    row_spec = P(self.axes)

    def body(p, rows, shared):
      out, stats = fn(p, *rows, *shared)
      return out, jax.tree.map(lambda v: jnp.asarray(v)[None], stats)
    per_device = jax.shard_map(body, mesh=self.mesh, check_vma=False,
                               in_specs=(self._specs(params, copied=True), row_spec, P()),
                               out_specs=(row_spec, row_spec))
    out, stats = per_device(params, tuple(rows), tuple(shared))
    return out, {k: jax.tree.map(lambda v: v.sum(0) if k == "load" else v.mean(0), v) for k, v in stats.items()}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _broadcast_copies(leaves, shardings, dtypes):
  # Cast before the gather: a BF16 copy moves half the bytes.
  return [jax.lax.with_sharding_constraint(jnp.broadcast_to(a.astype(dt)[None], (_num_copies(sh), *a.shape)), sh)
          for a, sh, dt in zip(leaves, shardings, dtypes)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gather(leaves, shardings, dtypes):
  return [jax.lax.with_sharding_constraint(a.astype(dt), sh) for a, sh, dt in zip(leaves, shardings, dtypes)]


def _working_dtypes(params, cfg) -> tuple:
  """Per leaf of `params`: its working dtype (layers.working_dtype)."""
  one = lambda path, a: layers.working_dtype(str(getattr(path[-1], "key", path[-1])), a.dtype, cfg)
  return tuple(jax.tree.leaves(jax.tree_util.tree_map_with_path(one, params)))


def _num_copies(copy_sharding: NamedSharding) -> int:
  """The length of a copied leaf's leading axis: the devices along the axes its spec[0] names."""
  return int(np.prod([copy_sharding.mesh.shape[ax] for ax in jax.tree.leaves(copy_sharding.spec[0])] or [1]))
