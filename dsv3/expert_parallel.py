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
only the real units; `dense` (CPU, which has no ragged all-to-all) sends every destination's fixed-size
block, padded, with `jax.lax.all_to_all`. `impl='auto'` picks by the mesh's platform. Both are linear
maps with JAX transpose rules, so gradients flow.

Bounded buffers (`buffer_rows`). With n tokens per device, a balanced router sends n·p units from each
device to each shard (p = `shard_hit_probability`, the chance a token needs a given shard; node-limited
routing lowers it) and each shard expands n·k (unit, local expert) rows (every device's n·k assignments
spread over the shards). With cfg.ep_buffer_factor = f > 0 (MaxText's ragged buffer factor) a
(source, destination) block holds c = ceil(f·n·p) units (at most n) and the expansion ceil(f·n·k) rows,
so the buffers stay flat as mesh.expert grows; f = 0 keeps the worst case (c = n: every token of every
device to one shard), dropless whatever the routing. Overflow is dropped deterministically: a block keeps
its first c units in token order, the expansion its first rows in (source, token) order; the dropped
(token, expert) assignments are counted, summed over all devices, and so is the worst load seen
(max over blocks and shards of load / balanced load: nothing drops while it stays <= f). Both
transports use the same blocks (the ragged one places source s's block at s·c), so they agree exactly.
A block stays worst-case (c = n) until f·p < 1, i.e. mesh.expert beyond about f·k; the expansion is
bounded from f < ep·min(k, E/ep)/k on. The default f = 3.5: configs/tiny.py on mesh data=2 × expert=4
(256 tokens per device) peaks at 3.0× balanced in its first 200 steps (while the aux-free balancer
corrects the initial router collapse: a shard gets 3 of every token's 4 experts), ≈ 2× after that.

cfg.capacity_factor > 0 additionally keeps at most ceil(cf · tokens · k / E) rows per expert of those
it receives from its data group (in token order, so with data=1 and f = 0 this is exactly
`routed_experts_local`); its drops are counted with the others.
"""
from __future__ import annotations

import dataclasses
import functools
import math
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
  manual: bool = False    # called inside a shard_map over the token axes already (dsv3.steps' local gradients)

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
    """(y [N, H], dropped assignment count, load ratio): routed_experts_local's pair plus the worst
    per-block / per-shard load over its balanced value (scalars summed / maxed over all devices)."""
    if self.manual:   # x is this device's rows, the weights its local experts
      rows = buffer_rows(cfg, x.shape[0], self.num_shards, self.transport())
      return _shard_body(cfg, self.transport(), self.expert_axis, self.token_axes, self.num_shards, rows,
                         x, topk_idx, topk_weight, w_gate, w_up, w_down)
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
    rows = buffer_rows(cfg, N // self.num_token_shards, self.num_shards, self.transport())
    body = functools.partial(_shard_body, cfg, self.transport(), self.expert_axis, self.token_axes,
                             self.num_shards, rows)
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(tok, tok, tok, exp, exp, exp),
                       out_specs=(tok, P(), P()))
    return fn(x, topk_idx, topk_weight, w_gate, w_up, w_down)


def shard_hit_probability(cfg: ModelConfig, ep: int) -> float:
  """P(a token needs a given one of `ep` shards) under balanced routing: the token's groups uniform among
  the n_group, then its k experts uniform among the kept groups' experts. Where shards straddle groups
  the grouping is ignored (uniform over all experts: an upper bound)."""
  E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  e_local = E // ep
  G, g = (cfg.n_group, cfg.topk_group) if cfg.n_group > 1 else (1, 1)
  per_group = E // G
  if per_group % e_local and e_local % per_group:
    G, g, per_group = 1, 1, E
  m = max(1, e_local // per_group)                 # groups overlapping one shard
  overlap = min(e_local, per_group)                # the shard's experts in each of them
  pool = g * per_group                             # the experts a token chooses among
  miss = sum(math.comb(m, j) * math.comb(G - m, g - j) / math.comb(G, g)
             * math.comb(pool - j * overlap, k) / math.comb(pool, k) for j in range(min(m, g) + 1))
  return 1.0 - miss


def buffer_rows(cfg: ModelConfig, n: int, ep: int, transport: str) -> dict:
  """Static buffer sizes (rows) per device for n tokens per device over `ep` expert shards.

  block: units one device may send one shard, ceil(f·n·p) (f = cfg.ep_buffer_factor; f = 0: n);
  send / recv: the dispatch buffers (recv = ep·block; ragged sends at most min(k, ep) units a token);
  expand: (unit, local expert) rows into the grouped GEMM, ceil(f·n·k), at most all received slots;
  balanced_block / balanced_expand: the balanced loads these are sized from.
  """
  k, e_local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
  p = shard_hit_probability(cfg, ep)
  f = float(cfg.ep_buffer_factor)
  block = n if f <= 0 else max(1, min(n, math.ceil(f * n * p - 1e-9)))
  most = ep * block * min(k, e_local)
  expand = most if f <= 0 else max(1, min(most, math.ceil(f * n * k - 1e-9)))
  send = ep * block if transport == "dense" else min(ep * block, n * min(k, ep))
  return dict(block=block, send=send, recv=ep * block, expand=expand, balanced_block=n * p,
              balanced_expand=float(n * k))


def _shard_body(cfg, transport, axis, token_axes, ep, rows, x, idx, w, w_gate, w_up, w_down):
  """Per device: x [n, H], idx/w [n, k], local experts [E/ep, ...]; buffers sized by `rows`."""
  n, H = x.shape
  k = idx.shape[1]
  e_local = w_gate.shape[0]
  c, S, R, X = rows["block"], rows["send"], rows["recv"], rows["expand"]
  shards = jnp.arange(ep, dtype=jnp.int32)
  me = jax.lax.axis_index(axis)

  # 1. Units: (token, destination shard) pairs, laid out by destination, tokens in order inside; each
  #    destination takes the first c (the rest are dropped, with all their assignments there).
  per_shard = jnp.sum((idx // e_local)[:, :, None] == shards[None, None, :], axis=1, dtype=jnp.int32)
  hit = per_shard > 0                                                            # [n, ep]
  rank = jnp.cumsum(hit, axis=0, dtype=jnp.int32) - 1
  sizes = hit.sum(0, dtype=jnp.int32)                                            # units per destination
  fits = hit & (rank < c)
  sent = jnp.minimum(sizes, c)
  dropped = jnp.sum(jnp.where(hit & ~fits, per_shard, 0))
  # 2. Everyone learns everyone's counts: M[s, d] = units s sends to d (ragged needs the offsets).
  counts = jax.lax.all_gather(sent, axis)                                        # [ep, ep]
  send_off = _exclusive_cumsum(sent) if transport == "ragged" else shards * c    # dense: fixed blocks of c
  slot = jnp.where(fits, send_off[None, :] + rank, S).reshape(-1)   # S: out of range, ignored by mode="drop"
  src_tok = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.repeat(jnp.arange(n, dtype=jnp.int32), ep),
                                                    mode="drop")
  slot_dest = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.tile(shards, n), mode="drop")
  slot_valid = jnp.zeros((S,), bool).at[slot].set(True, mode="drop")
  unit_idx = idx[src_tok]
  mine = slot_valid[:, None] & (unit_idx // e_local == slot_dest[:, None])
  send_ids = jnp.where(mine, unit_idx % e_local, -1)                             # local expert ids there
  send_w = jnp.where(mine, w[src_tok], 0.0)
  send_x = jnp.where(slot_valid[:, None], x[src_tok], 0)

  # 3. Dispatch: source s's block lands at s·c here.
  if transport == "ragged":
    recv_sizes = counts[:, me]
    out_off = jnp.full((ep,), me * c, jnp.int32)            # where my block lands on each destination
    def a2a(v, fill):
      out = jnp.full((R,) + v.shape[1:], fill, v.dtype)
      return jax.lax.ragged_all_to_all(v, out, send_off, sent, out_off, recv_sizes, axis_name=axis)
    def a2a_back(v):
      back_off = _exclusive_cumsum(counts, 1)[:, me]        # my block's place in each source's layout
      return jax.lax.ragged_all_to_all(v, jnp.zeros((S,) + v.shape[1:], v.dtype), shards * c, recv_sizes,
                                       back_off, sent, axis_name=axis)
  else:
    a2a = lambda v, fill: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
    a2a_back = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  recv_x, recv_ids, recv_w = a2a(send_x, 0), a2a(send_ids, -1), a2a(send_w, 0)

  # 4. Local experts: keep the first X (unit, expert) rows in arrival order, sort them by expert (stable:
  #    source-major, then token order) and run the grouped GEMM on X rows.
  flat = recv_ids.reshape(-1)
  valid = flat >= 0
  keep = valid & (jnp.cumsum(valid, dtype=jnp.int32) <= X)
  dropped += jnp.sum(valid & ~keep)
  key = jnp.where(keep, flat, e_local)
  order = jnp.argsort(key, stable=True)[:X]
  sorted_key = key[order]
  row_ok = sorted_key < e_local
  group_sizes = jnp.bincount(jnp.where(keep, flat, 0), weights=keep.astype(jnp.int32),
                             length=e_local).astype(jnp.int32)
  unit_of = order // k
  weight = recv_w.reshape(-1)[order]
  if cfg.capacity_factor > 0:
    E = e_local * ep
    capacity = max(1, int(cfg.capacity_factor * ep * n * k / E + 0.999999))   # as moe.py, the group's tokens
    starts = _exclusive_cumsum(group_sizes)
    pos = jnp.arange(X) - starts[jnp.minimum(sorted_key, e_local - 1)]
    within = row_ok & (pos < capacity)
    dropped += jnp.sum(row_ok & ~within)
    row_ok = within
  out = expert_ffn(recv_x[unit_of], group_sizes, w_gate, w_up, w_down, cfg).astype(jnp.float32)
  # where, not multiply: rows past sum(group_sizes) are padding and must not leak into the sum.
  contrib = jnp.where(row_ok[:, None], out * weight[:, None], 0.0)
  unit_out = jnp.zeros((R, H), jnp.float32).at[unit_of].add(contrib).astype(x.dtype)

  # 5. Combine: units come home in the send layout; each token sums its shards' rows.
  back = a2a_back(unit_out)
  back = jnp.where(slot_valid[:, None], back, 0).astype(jnp.float32)
  y = jnp.zeros((n, H), jnp.float32).at[src_tok].add(back)

  # The worst load against its balanced value: per (source, destination) block, and per shard's rows.
  shard_rows = jax.lax.psum(per_shard.sum(0), axis)[me]
  ratio = jnp.maximum(sizes.max() / rows["balanced_block"], shard_rows / rows["balanced_expand"])
  return (y.astype(x.dtype), jax.lax.psum(dropped.astype(jnp.int32), token_axes),
          jax.lax.pmax(ratio.astype(jnp.float32), token_axes))


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
