"""Where a stage runs: per device on parameter copies, or in the global view.

When a micro-batch's rows split over every device of the sub-mesh (the trainer's layouts always do), each
piece runs per device (shard_map, check_vma=False) on the device's own rows and its own copy of the stage's
parameters, so every backward leaves each device's gradient in its copy, unreduced, and the executor sums
the copies once per step. Otherwise the pieces run in the global view and XLA reduces every backward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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

  def copies(self, tree):
    """The stage's parameters as per-device copies: each leaf broadcast over a leading axis that spans the
    devices it is replicated on (its own split, e.g. experts over 'expert', is kept). Unchanged if axes=()."""
    if not self.axes:
      return tree
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(_broadcast_copies(tuple(leaves), self._copy_shardings(tree)))

  def abstract_copies(self, tree):
    """`copies` of a tree of ShapeDtypeStructs, with their shardings (what a dry run lowers with)."""
    if not self.axes:
      return tree
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([jax.ShapeDtypeStruct((_num_copies(sh), *a.shape), a.dtype, sharding=sh)
                              for a, sh in zip(leaves, self._copy_shardings(tree))])

  def copies_taking(self, params):
    """`copies` of a rank's per-layer `params`, which are donated: during the step the copies stand in for
    them, so a rank does not hold its parameters twice. `params_from_copies` gives them back."""
    if not self.axes:
      return params
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(_copies_taking(tuple(leaves), self._copy_shardings(params)))

  def params_from_copies(self, copies, shardings):
    """The rank's per-layer params (on `shardings`) from the copies `copies_taking` made: each leaf is the
    device's own copy (every device's copy is the same; nothing moves)."""
    if not self.axes:
      return copies
    out_specs = jax.tree.map(lambda sh: sh.spec, shardings)
    leaves, treedef = jax.tree.flatten(out_specs, is_leaf=lambda x: isinstance(x, P))
    return _uncopy(self, treedef, tuple(leaves))(copies)

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


@functools.partial(jax.jit, static_argnums=1)
def _broadcast_copies(leaves, shardings):
  return [jax.lax.with_sharding_constraint(jnp.broadcast_to(a[None], (_num_copies(sh), *a.shape)), sh)
          for a, sh in zip(leaves, shardings)]


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _copies_taking(leaves, shardings):
  return [jax.lax.with_sharding_constraint(jnp.broadcast_to(a[None], (_num_copies(s), *a.shape)), s)
          for a, s in zip(leaves, shardings)]


@functools.lru_cache(maxsize=None)
def _uncopy(devices: "Devices", treedef, out_specs: tuple):
  """A jitted map from copied params to the params themselves: each device keeps its own copy's block."""
  out_specs = jax.tree.unflatten(treedef, out_specs)

  def take(copies):
    body = lambda tree: jax.tree.map(lambda a: a[0], tree)
    return jax.shard_map(body, mesh=devices.mesh, check_vma=False, in_specs=(devices._specs(copies, copied=True),),
                         out_specs=out_specs)(copies)
  return jax.jit(take)


def _num_copies(copy_sharding: NamedSharding) -> int:
  """The length of a copied leaf's leading axis: the devices along the axes its spec[0] names."""
  return int(np.prod([copy_sharding.mesh.shape[ax] for ax in jax.tree.leaves(copy_sharding.spec[0])] or [1]))
