"""Expert parallelism: routed experts split over the mesh's 'expert' axis, tokens moved by all-to-all.

The model is written in the global (jit) view; only this dispatch/combine is per-device, inside
`jax.shard_map`. Routing has already happened (globally, so the per-expert load and the balance loss
are the same whatever the mesh). Each device holds N / (data·expert) tokens and E / expert experts,
and runs:

  1. route locally: for every (token, destination shard) pair with at least one of the token's top-k
     experts on that shard, one "unit" = the token's hidden row plus its expert ids/weights there.
     A token is sent ONCE per shard, not once per expert: with node-limited routing (n_group equal to
     the number of expert shards, topk_group = M) a token reaches at most M shards, so it costs at
     most M rows of traffic each way, whatever k is — DeepSeek-V3's "each token reaches at most 4
     nodes" bound on all-to-all traffic (report §3.2.2).
  2. exchange the per-destination unit counts (all_gather of a [shards] vector; the ragged transport
     needs them for its offsets, the dense one finds empty slots by their -1 expert ids),
  3. dispatch the units to the shards that own their experts (all-to-all),
  4. on each shard, expand units to (unit, local expert) rows, sort by expert, and run one grouped
     GEMM over the local experts (dsv3.moe.expert_ffn, so the precision / fp8 / triton choices apply);
     the gate weights are applied there, so each unit returns ONE row,
  5. combine: the reverse all-to-all, then each token sums the rows of its shards.

Two transports with the same results: `ragged` uses `jax.lax.ragged_all_to_all` (GPU/TPU) and sends
only the real units; `dense` (CPU, which has no ragged all-to-all) pads each destination's block to
the worst case (every local token goes to that shard) and uses `jax.lax.all_to_all`. `impl='auto'`
picks by the mesh's platform. Both are linear maps with JAX transpose rules, so gradients flow.

Dropless by default, like DeepSeek-V3: the receive buffers are sized for the worst case. With
cfg.capacity_factor > 0 each expert keeps at most ceil(cf · tokens · k / E) of the rows it receives
from its data group (in token order, so with data=1 this is exactly `routed_experts_local`), and the
number of dropped (token, expert) assignments is returned, summed over all devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from dsv3.config import ModelConfig
from dsv3.moe import expert_ffn


def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Plugs into dsv3.moe.MoE (`Transformer(cfg, ExpertParallel(mesh))`). Hashable: a Flax attribute.

  mesh: a mesh with `expert_axis` (and optionally `data_axis`; other axes see replicated tokens).
  impl: 'auto' | 'ragged' | 'dense' — the all-to-all transport (see the module docstring).
  """
  mesh: Mesh
  impl: str = "auto"
  data_axis: str = "data"
  expert_axis: str = "expert"

  def __post_init__(self):
    if self.impl not in ("auto", "ragged", "dense"):
      raise ValueError(f"ExpertParallel.impl must be 'auto', 'ragged' or 'dense', got {self.impl!r}")
    if self.expert_axis not in self.mesh.axis_names:
      raise ValueError(f"ExpertParallel: the mesh has axes {self.mesh.axis_names}, no {self.expert_axis!r}")

  @property
  def token_axes(self) -> tuple:
    return tuple(a for a in (self.data_axis, self.expert_axis) if a in self.mesh.axis_names)

  @property
  def num_shards(self) -> int:
    return int(self.mesh.shape[self.expert_axis])

  @property
  def num_token_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.token_axes]))

  def transport(self) -> str:
    if self.impl != "auto":
      return self.impl
    platform = self.mesh.devices.flat[0].platform
    return "ragged" if platform in ("gpu", "cuda", "rocm", "tpu") else "dense"

  def routed_experts(self, cfg: ModelConfig, x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """Same contract as dsv3.moe.routed_experts_local: (y [N, H], dropped assignment count)."""
    N = x.shape[0]
    E = w_gate.shape[0]
    if N % self.num_token_shards:
      raise ValueError(
          f"expert parallelism: {N} tokens (batch × seq_len) cannot be split over the "
          f"{self.num_token_shards} devices of mesh axes {self.token_axes}; make batch_size × seq_len "
          f"(per micro-batch) a multiple of mesh.data × mesh.expert = {self.num_token_shards}")
    if E % self.num_shards:
      raise ValueError(f"expert parallelism: {E} routed experts cannot be split over mesh.expert="
                       f"{self.num_shards}; choose mesh.expert dividing model.n_routed_experts")
    tok, exp = P(self.token_axes), P(self.expert_axis)
    body = functools.partial(_shard_body, cfg, self.transport(), self.expert_axis, self.token_axes,
                             self.num_shards)
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(tok, tok, tok, exp, exp, exp),
                       out_specs=(tok, P()))
    return fn(x, topk_idx, topk_weight, w_gate, w_up, w_down)


def _shard_body(cfg, transport, axis, token_axes, ep, x, idx, w, w_gate, w_up, w_down):
  """Per device: x [n, H], idx/w [n, k], local experts [E/ep, ...]."""
  n, H = x.shape
  k = idx.shape[1]
  e_local = w_gate.shape[0]
  S = ep * n                                       # worst-case units, sent or received
  shards = jnp.arange(ep, dtype=jnp.int32)

  # 1. Units: (token, destination shard) pairs, laid out by destination, tokens in order inside.
  hit = jnp.any((idx // e_local)[:, :, None] == shards[None, None, :], axis=1)    # [n, ep]
  rank = jnp.cumsum(hit, axis=0, dtype=jnp.int32) - 1
  sizes = hit.sum(0, dtype=jnp.int32)                                            # units per destination
  # 2. Everyone learns everyone's counts: M[s, d] = units s sends to d (ragged needs the offsets).
  counts = jax.lax.all_gather(sizes, axis)                                       # [ep, ep]
  me = jax.lax.axis_index(axis)
  send_off = _exclusive_cumsum(sizes)
  base = send_off if transport == "ragged" else shards * n                       # dense: fixed blocks of n
  slot = jnp.where(hit, base[None, :] + rank, S).reshape(-1)   # S: out of range, ignored by mode="drop"
  src_tok = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.repeat(jnp.arange(n, dtype=jnp.int32), ep),
                                                    mode="drop")
  slot_dest = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.tile(shards, n), mode="drop")
  slot_valid = jnp.zeros((S,), bool).at[slot].set(True, mode="drop")
  unit_idx = idx[src_tok]
  mine = slot_valid[:, None] & (unit_idx // e_local == slot_dest[:, None])
  send_ids = jnp.where(mine, unit_idx % e_local, -1)                             # local expert ids there
  send_w = jnp.where(mine, w[src_tok], 0.0)
  send_x = jnp.where(slot_valid[:, None], x[src_tok], 0)

  # 3. Dispatch.
  if transport == "ragged":
    recv_sizes = counts[:, me]
    recv_off = _exclusive_cumsum(counts, 0)[:, me]          # where each source's block lands here
    out_off = _exclusive_cumsum(counts, 0)[me, :]           # where my block lands on each destination
    def a2a(v, fill):
      return jax.lax.ragged_all_to_all(v, jnp.full_like(v, fill), send_off, sizes, out_off, recv_sizes,
                                       axis_name=axis)
    def a2a_back(v):
      back_off = _exclusive_cumsum(counts, 1)[:, me]        # my block's place in each source's layout
      return jax.lax.ragged_all_to_all(v, jnp.zeros_like(v), recv_off, recv_sizes, back_off, sizes,
                                       axis_name=axis)
  else:
    a2a = lambda v, fill: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
    a2a_back = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  recv_x, recv_ids, recv_w = a2a(send_x, 0), a2a(send_ids, -1), a2a(send_w, 0)

  # 4. Local experts: expand units to rows, sort by expert (stable: source-major, then token order).
  flat = recv_ids.reshape(-1)
  valid = flat >= 0
  key = jnp.where(valid, flat, e_local)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  row_ok = sorted_key < e_local
  group_sizes = jnp.bincount(jnp.where(valid, flat, 0), weights=valid.astype(jnp.int32),
                             length=e_local).astype(jnp.int32)
  unit_of = order // k
  weight = recv_w.reshape(-1)[order]
  dropped = jnp.zeros((), jnp.int32)
  if cfg.capacity_factor > 0:
    E = e_local * ep
    capacity = max(1, int(cfg.capacity_factor * S * k / E + 0.999999))   # as moe.py; S = the group's tokens
    starts = _exclusive_cumsum(group_sizes)
    pos = jnp.arange(S * k) - starts[jnp.minimum(sorted_key, e_local - 1)]
    keep = row_ok & (pos < capacity)
    dropped = jnp.sum(row_ok & ~keep).astype(jnp.int32)
    row_ok = keep
  out = expert_ffn(recv_x[unit_of], group_sizes, w_gate, w_up, w_down, cfg).astype(jnp.float32)
  # where, not multiply: rows past sum(group_sizes) are padding and must not leak into the sum.
  contrib = jnp.where(row_ok[:, None], out * weight[:, None], 0.0)
  unit_out = jnp.zeros((S, H), jnp.float32).at[unit_of].add(contrib).astype(x.dtype)

  # 5. Combine: units come home in the send layout; each token sums its shards' rows.
  back = a2a_back(unit_out)
  back = jnp.where(slot_valid[:, None], back, 0).astype(jnp.float32)
  y = jnp.zeros((n, H), jnp.float32).at[src_tok].add(back)
  return y.astype(x.dtype), jax.lax.psum(dropped, token_axes)


# -------------------------------------------------------------------------------------------------
# Traffic accounting (used by dsv3.bench_ep and the tests).
# -------------------------------------------------------------------------------------------------
def dispatch_units(topk_idx, n_experts: int, num_shards: int) -> int:
  """How many (token, shard) rows the dispatch sends: a token goes once to each shard it needs."""
  idx = np.asarray(topk_idx).reshape(-1, np.asarray(topk_idx).shape[-1])
  shard = idx // (n_experts // num_shards)
  return int(sum(len(set(row)) for row in shard.tolist()))


def alltoall_bytes(topk_idx, n_experts: int, num_shards: int, hidden: int, itemsize: int = 4,
                   dense: bool = False, token_shards: Optional[int] = None) -> dict:
  """Bytes of hidden rows crossing devices per step, dispatch + combine (ids/weights are extra, small).

  'payload' counts only rows sent to ANOTHER shard (what the ragged transport moves); 'dense' is what
  the padded CPU transport moves: every device's full [shards, n, H] buffer, minus its own block.
  """
  idx = np.asarray(topk_idx).reshape(-1, np.asarray(topk_idx).shape[-1])
  N = idx.shape[0]
  token_shards = token_shards or num_shards
  n = N // token_shards
  shard = idx // (n_experts // num_shards)
  own = (np.arange(N) // n) % num_shards               # the expert-axis coordinate of each token's device
  remote = sum(len(set(row) - {o}) for row, o in zip(shard.tolist(), own.tolist()))
  row = hidden * itemsize
  out = {"units": dispatch_units(idx, n_experts, num_shards), "remote_units": remote,
         "payload": 2 * remote * row}
  if dense:
    out["dense"] = 2 * token_shards * (num_shards - 1) * n * row
  return out
