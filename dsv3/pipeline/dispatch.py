"""How the pipeline executor's driver runs a step: each program called on device arrays (`Execute`), or recorded
on abstract arrays for the dry run (`Record`), so `--compile_only` compiles exactly what a step calls."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3.parallel import sharding
from dsv3.pipeline import reduction


@dataclasses.dataclass(frozen=True)
class Call:
  """A program the driver runs, as a dry run records it. name: e.g. 'rank0_F_stage0'; kind: F, B, Bstar,
  W, FB, FBstar, sums, update, eval or check; rank: None for a program on the whole mesh; key: what makes it
  a distinct program besides its arguments' shapes and layouts (mesh-independent: sub-meshes are alike)."""
  name: str
  kind: str
  rank: Optional[int]
  mesh: Mesh
  key: tuple = ()


class Execute:
  """How the driver runs a step: each program called on device arrays, for the ranks this process takes
  part in. `Record` walks the same driver on abstract arrays."""
  abstract = False

  def ranks(self, plan) -> list:
    """The ranks whose programs this process runs."""
    return plan.local_ranks

  def mine(self, plan, r: int) -> bool:
    return plan.transfers.mine[r]

  def tokens(self, tokens):
    """The global batch as a host array: every process reads the rows its first and last stages need."""
    if isinstance(tokens, jax.Array) and not (tokens.is_fully_addressable or tokens.is_fully_replicated):
      raise ValueError("pipeline executor: pass the global batch as a host (numpy) array in every process, "
                       "or as a replicated jax.Array; got an array split across processes")
    return np.asarray(tokens, np.int32)

  def rows(self, tokens, start: int, stop: int, placement):
    rows = tokens[start:stop]
    return jax.make_array_from_callback(rows.shape, placement, lambda i: rows[i])

  def constant(self, value, placement):
    return jax.device_put(value, placement)

  def call(self, call: Call, fn, *args):
    return fn(*args)

  def move(self, plan, x, src: int, dst: int, like, spec):
    return plan.transfers(x, src, dst, like, spec)

  def glue(self, fn, like):
    """fn(): what moves or sums data between the programs (no stage program of its own); `like`: a callable
    giving its abstract result, which a dry run takes instead."""
    return fn()

  def assemble(self, plan, sums: dict, rank_variables):
    return reduction.assemble(plan, sums)


def sds(shape, dtype, placement) -> jax.ShapeDtypeStruct:
  """An abstract array placed like `placement`."""
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=placement)


class Record(Execute):
  """The driver as a dry run: abstract arrays (ShapeDtypeStructs with shardings) stand in for every array,
  every rank is walked as if this process held them all, and each program call goes to
  `on_call(call, fn, args)`, which returns its abstract outputs (dsv3.training.runner compiles the program and reads
  them off the compiled executable)."""
  abstract = True

  def __init__(self, on_call):
    self.on_call = on_call

  def ranks(self, plan) -> list:
    return list(range(len(plan.meshes)))

  def mine(self, plan, r: int) -> bool:
    return True

  def tokens(self, tokens):
    return tokens

  def rows(self, tokens, start: int, stop: int, placement):
    return sds((stop - start, *tokens.shape[1:]), tokens.dtype, placement)

  def constant(self, value, placement):
    value = np.asarray(value)
    return sds(value.shape, value.dtype, placement)

  def call(self, call: Call, fn, *args):
    return self.on_call(call, fn, args)

  def move(self, plan, x, src: int, dst: int, like, spec):
    return sds(like.shape, like.dtype, NamedSharding(plan.meshes[dst], spec))

  def glue(self, fn, like):
    return like()

  def assemble(self, plan, sums: dict, rank_variables):
    """reduction.assemble's result, abstract: each rank's gradients in its params' ZeRO-1 shards (as the sums
    leave them), its loads replicated, the step's scalars on the whole mesh."""
    whole = NamedSharding(plan.mesh, P())
    totals = sds((len(reduction.SCALARS),), jnp.float32, whole)
    scalars = jax.eval_shape(functools.partial(reduction.step_metrics, plan.cfg, plan.microbatches), totals)
    loss, metrics, norm = jax.tree.map(lambda a: sds(a.shape, a.dtype, whole), scalars)
    grads, loads = [None] * len(plan.meshes), [None] * len(plan.meshes)
    for r in sums:
      params, routing = rank_variables[r]["params"], rank_variables[r].get("routing", {})
      grads[r] = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), params,
                              sharding.zero1_shardings(plan.meshes[r], params))
      loads[r] = jax.tree.map(lambda a: sds(a.shape, jnp.float32, NamedSharding(plan.meshes[r], P())), routing)
    return loss, metrics, grads, loads, norm


EXECUTE = Execute()
