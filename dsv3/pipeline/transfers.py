"""Moving activations and gradients between pipeline ranks' sub-meshes, within a process or across processes."""
from __future__ import annotations

from typing import List

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class Transfers:
  """Moves activations and gradients between ranks' sub-meshes; works across processes.

  Within one process this is jax.device_put. When either sub-mesh has devices of another process (or
  mode='collective'), it is a two-rank program: the source's shards and placeholder shards on the
  destination form one array over a ('pair', 'data', 'expert') mesh, and a shard_map ppermute over
  'pair' sends each source device's block to the destination device with the same ('data', 'expert')
  coordinates (on GPUs, NCCL send/recv). Every process holding a device of either rank calls it, and
  all processes walk the schedule in the same global order, so these collectives line up.
  """

  def __init__(self, meshes: List[Mesh], mode: str = "auto"):
    if mode not in ("auto", "collective"):
      raise ValueError(f"transfer must be 'auto' or 'collective', got {mode!r}")
    self.meshes, self.mode = meshes, mode
    me = jax.process_index()
    self.devices = [set(m.devices.flat) for m in meshes]
    owners = [{d.process_index for d in m.devices.flat} for m in meshes]
    self.mine = [me in o for o in owners]             # this process takes part in rank r's programs
    self.local = [o == {me} for o in owners]          # rank r lives entirely in this process
    self._programs, self._placeholders = {}, {}

  def __call__(self, x, src: int, dst: int, like: jax.ShapeDtypeStruct, spec: P):
    """x on rank `src` (None where this process holds none of src) -> the array on `dst` (None where
    this process holds none of dst)."""
    if not (self.mine[src] or self.mine[dst]):
      return None
    target = NamedSharding(self.meshes[dst], spec)
    if self.mine[src] and (x.shape, x.dtype) != (like.shape, like.dtype):
      raise AssertionError(f"pipeline transfer {src}->{dst}: got {x.shape} {x.dtype}, expected {like}")
    if src == dst or (self.mode == "auto" and self.local[src] and self.local[dst]):
      return jax.device_put(x, target) if self.mine[dst] else None
    lo, hi = sorted((src, dst))
    pair_sharding, send = self._program(lo, hi, src == lo, spec)
    shards = []
    if self.mine[src]:
      x = jax.device_put(x, NamedSharding(self.meshes[src], spec))
      shards += [s.data for s in x.addressable_shards]
    if self.mine[dst]:
      shards += [self._placeholder(d, target.shard_shape(like.shape), like.dtype)
                 for d in target.addressable_devices]
    both = jax.make_array_from_single_device_arrays((2 * like.shape[0], *like.shape[1:]),
                                                    pair_sharding, shards)
    out = send(both)
    if not self.mine[dst]:
      return None
    return jax.make_array_from_single_device_arrays(
        like.shape, target, [s.data for s in out.addressable_shards if s.device in self.devices[dst]])

  def _program(self, lo: int, hi: int, forward: bool, spec: P):
    """(sharding of the two-rank array, the jitted send) for ranks lo < hi, sending lo->hi if `forward`.

    The two-rank array stacks the ranks' blocks on the leading axis: rows [0, n) on lo, [n, 2n) on hi,
    each split like `spec` within its rank, so its shards are exactly the ranks' own shards."""
    key = (lo, hi, forward, spec)
    if key not in self._programs:
      lo_mesh, hi_mesh = self.meshes[lo], self.meshes[hi]
      pair_mesh = Mesh(np.stack([lo_mesh.devices, hi_mesh.devices]), ("pair", *lo_mesh.axis_names))
      first = (tuple(spec) + (None,))[0]
      first = () if first is None else (first if isinstance(first, tuple) else (first,))
      pair_spec = P(("pair", *first), *tuple(spec)[1:])
      perm = [(0, 1)] if forward else [(1, 0)]
      body = lambda block: jax.lax.ppermute(block, "pair", perm)
      send = jax.jit(jax.shard_map(body, mesh=pair_mesh, in_specs=pair_spec, out_specs=pair_spec))
      self._programs[key] = NamedSharding(pair_mesh, pair_spec), send
    return self._programs[key]

  def _placeholder(self, device, shape, dtype):
    # Never written to (the input is not donated), so one buffer per device/shape serves every transfer.
    key = (device, tuple(shape), jnp.dtype(dtype))
    if key not in self._placeholders:
      self._placeholders[key] = jax.device_put(np.zeros(shape, dtype), device)
    return self._placeholders[key]
