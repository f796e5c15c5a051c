"""Expert parallelism: routed experts split over the mesh's 'expert' axis, tokens moved by all-to-all.

The model is written in the global (jit) view; only this dispatch/combine is per-device, inside
`jax.shard_map`. Routing has already happened (globally, so the per-expert load and the balance loss
are the same whatever the mesh). Each device holds N / (data·expert) tokens and E / expert experts, and:

  1. packs one "unit" per (token, destination shard holding one of its top-k experts): the token's row plus
     its expert ids/weights there. A token is sent ONCE per shard, not once per expert, so with node-limited
     routing (n_group = expert shards, topk_group = M) it costs at most M rows each way (report §3.2.2);
  2. exchanges the per-destination unit counts (the ragged transport needs them for its offsets);
  3. dispatches the units to the shards that own their experts (all-to-all);
  4. on each shard, runs the (unit, local expert) rows sorted by expert through one grouped GEMM
     (dsv3.nn.moe.expert_ffn), gate-weighted, so each unit returns ONE row;
  5. combines: the reverse all-to-all, then each token sums the rows of its shards.

Transports, same results: `ragged` (jax.lax.ragged_all_to_all; GPU/TPU) sends only the real units; `dense`
(CPU has no ragged all-to-all) sends every destination's fixed-size block, padded. `impl='auto'` picks by
the mesh's platform. Both are linear maps with JAX transpose rules, so gradients flow.

Two-hop dispatch (cfg.ep_node_size = L; README "Two-hop, node-aware dispatch"): device d is on node d // L;
hop 1 sends a token once per NODE it needs, to the device with its own in-node index there; hop 2 forwards
it inside the node to the shards it needs; the combine sums a node's rows before the single return. L = 0,
1 or >= mesh.expert is the flat dispatch. cfg.ep_fp8_dispatch sends the dispatch rows as E4M3 with 1x128
scales (straight-through backward); the combine stays in the activation dtype.

Bounded buffers (`dispatch_plan`): with cfg.ep_buffer_factor = f > 0 (MaxText's ragged buffer factor) a
(source, destination) block holds ceil(f · its balanced load) units and the expansion ceil(f·n·k) rows, so
buffers stay flat as mesh.expert grows; f = 0 keeps the worst case, dropless whatever the routing. Overflow
is dropped deterministically (a block keeps its first units in token order), counted over all devices, and
the worst load / balanced load is reported (nothing drops while it stays <= f). The default 3.5: configs/tiny.py
on data=2 × expert=4 peaks at 3.0× balanced in its first 200 steps, ≈ 2× after. cfg.capacity_factor > 0
also keeps at most ceil(cf · tokens · k / E) rows per expert (moe.capacity) in arrival order, its drops
counted too (with data=1 and f = 0 exactly `moe.routed_experts_local`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from dsv3.config import ModelConfig
from dsv3.kernels import backend, fp8
from dsv3.nn import moe
from dsv3.nn.moe import expert_ffn
from dsv3.parallel import sharding


def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Plugs into dsv3.nn.moe.MoE (`Transformer(cfg, ExpertParallel(mesh))`). Hashable: a Flax attribute.

  mesh: a mesh with `expert_axis` (and optionally `data_axis`; other axes see replicated tokens).
  impl: 'auto' | 'ragged' | 'dense' — the all-to-all transport (see the module docstring).
  """
  mesh: Mesh
  impl: str = "auto"
  data_axis: str = "data"
  expert_axis: str = "expert"
  manual: bool = False    # called inside a shard_map over the token axes already (dsv3.training.steps' local gradients)

  def __post_init__(self):
    if self.impl not in ("auto", "ragged", "dense"):
      raise ValueError(f"ExpertParallel.impl must be 'auto', 'ragged' or 'dense', got {self.impl!r}")
    if self.expert_axis not in self.mesh.axis_names:
      raise ValueError(f"ExpertParallel: the mesh has axes {self.mesh.axis_names}, no {self.expert_axis!r}")

  @property
  def token_axes(self) -> tuple:
    """The axes the tokens are split over (dsv3.parallel.sharding.token_axes owns the rule)."""
    return sharding.token_axes(self.mesh, axes=(self.data_axis, self.expert_axis))

  @property
  def num_shards(self) -> int:
    return int(self.mesh.shape[self.expert_axis])

  @property
  def num_token_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.token_axes]))

  def transport(self) -> str:
    return self.impl if self.impl != "auto" else default_transport(backend.mesh_platform(self.mesh))

  def routed_experts(self, cfg: ModelConfig, x, topk_idx, topk_weight, w_gate, w_up, w_down, stats: bool = False):
    """(y [N, H], dropped assignment count, load ratio): routed_experts_local's pair plus the worst
    per-block / per-shard load over its balanced value (scalars summed / maxed over all devices).

    stats=True adds a dict: hop_units [hops] (units each hop sent to another device, all devices; with
    cfg.ep_node_size hop 0 crosses nodes, hop 1 stays inside them) and token_remote [N] (each token's
    first-hop units to another device), what `dsv3.bench.ep_traffic.dispatch_traffic` counts from topk_idx
    when nothing drops."""
    if self.manual:   # x is this device's rows, the weights its local experts
      plan = dispatch_plan(cfg, x.shape[0], self.num_shards, self.transport())
      return _shard_body(cfg, self.transport(), self.expert_axis, self.token_axes, self.num_shards, plan, stats,
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
    plan = dispatch_plan(cfg, N // self.num_token_shards, self.num_shards, self.transport())
    body = functools.partial(_shard_body, cfg, self.transport(), self.expert_axis, self.token_axes,
                             self.num_shards, plan, stats)
    out_specs = (tok, P(), P()) + ((dict(hop_units=P(), token_remote=tok),) if stats else ())
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=out_specs)
    return fn(x, topk_idx, topk_weight, w_gate, w_up, w_down)


def default_transport(platform: str) -> str:
  """The all-to-all transport `impl='auto'` picks on a platform ('gpu', 'cpu', 'tpu': dsv3.kernels.backend's names):
  ragged where jax.lax.ragged_all_to_all exists (GPU, TPU), dense on CPU."""
  return "dense" if platform == "cpu" else "ragged"


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


def node_size(cfg: ModelConfig, ep: int) -> int:
  """Devices per node for the dispatch: cfg.ep_node_size, or ep (one node: the flat one-hop dispatch) when it
  is 0 or >= ep. 1 is the flat dispatch too (every device its own node: no in-node hop)."""
  size = cfg.ep_node_size
  if size == 0 or size >= ep:
    return ep
  if ep % size:
    raise ValueError(f"expert parallelism: model.ep_node_size={size} does not divide mesh.expert={ep}; set "
                     f"model.ep_node_size to a divisor of mesh.expert (devices per node), or 0 for the flat dispatch")
  return size


def dispatch_plan(cfg: ModelConfig, n: int, ep: int, transport: str) -> dict:
  """The dispatch's hops and static buffer sizes (rows) per device, n tokens per device over `ep` shards.

  hops: one dict per all-to-all, in dispatch order. A hop exchanges among groups of D devices (members
  base + j·stride, j < D) and sends each of its input rows once per member holding one of the row's
  experts (`width` consecutive experts per member). Flat: one hop over all ep devices. Two-hop (L =
  node_size < ep): the peer hop (D = ep/L nodes, stride L: the devices with my in-node index), then
  the node hop (D = L, stride 1) from the forwarded units. Per hop: block c = ceil(f·balanced_block)
  units one device sends one member (f = cfg.ep_buffer_factor; f = 0 or more than the input rows: all
  of them), send/recv the buffers (recv = D·c; the dense transport sends D fixed blocks, ragged at most
  min(k, D) units a row). expand: (unit, local expert) rows into the grouped GEMM, ceil(f·n·k), at most
  every received slot's; balanced_*: the balanced loads these are sized from.
  """
  k, e_local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
  f = float(cfg.ep_buffer_factor)
  L = node_size(cfg, ep)
  nodes = ep // L

  def hop(D, stride, width, rows_in, balanced):
    block = rows_in if f <= 0 else max(1, min(rows_in, math.ceil(f * balanced - 1e-9)))
    send = D * block if transport == "dense" else min(D * block, rows_in * min(k, D))
    return dict(D=D, stride=stride, width=width, block=block, send=send, recv=D * block, balanced_block=balanced)

  hops = []
  if nodes > 1:   # a token's unit per node it needs, to my peer there (the node's chance: a shard of E/nodes)
    hops.append(hop(nodes, L, e_local * L, n, n * shard_hit_probability(cfg, nodes)))
  if L > 1 or not hops:   # a unit per shard it needs, from the `nodes` peers' units forwarded here (or my tokens)
    rows_in = hops[0]["recv"] if hops else n
    hops.append(hop(L, 1, e_local, rows_in, nodes * n * shard_hit_probability(cfg, ep)))
  most = hops[-1]["recv"] * min(k, e_local)
  expand = most if f <= 0 else max(1, min(most, math.ceil(f * n * k - 1e-9)))
  return dict(hops=hops, expand=expand, balanced_expand=float(n * k))


def buffer_rows(cfg: ModelConfig, n: int, ep: int, transport: str) -> dict:
  """Static buffer sizes (rows) per device for n tokens per device over `ep` expert shards (dispatch_plan).

  block: units one device may send one shard, ceil(f·n·p) (f = cfg.ep_buffer_factor; f = 0: n);
  send / recv: the dispatch buffers (recv = ep·block; ragged sends at most min(k, ep) units a token);
  expand: (unit, local expert) rows into the grouped GEMM, ceil(f·n·k), at most all received slots;
  balanced_block / balanced_expand: the balanced loads these are sized from.
  Two-hop dispatch (cfg.ep_node_size): send / recv summed over the hops, and the hops themselves.
  """
  plan = dispatch_plan(cfg, n, ep, transport)
  hops, rest = plan["hops"], dict(expand=plan["expand"], balanced_expand=plan["balanced_expand"])
  if len(hops) == 1:
    hop = hops[0]
    return dict(block=hop["block"], send=hop["send"], recv=hop["recv"], balanced_block=hop["balanced_block"], **rest)
  return dict(hops=hops, send=sum(h["send"] for h in hops), recv=sum(h["recv"] for h in hops), **rest)


def _members(axis, ep, hop):
  """(my group's devices [D], whether each is another device): base + j·stride, j < D."""
  me = jax.lax.axis_index(axis)
  pos = (me // hop["stride"]) % hop["D"]
  members = me - pos * hop["stride"] + jnp.arange(hop["D"], dtype=jnp.int32) * hop["stride"]
  return members, members != me


def _pack(ids, w, hop, transport):
  """One hop's units: (input row, member j) for every j holding one of the row's experts (ids // width == j;
  id -1 = none), laid out by member, rows in order; member j keeps its first `block` units (the rest are
  dropped with all their assignments there). Slots: dense j's block at j·block; ragged packed.

  Returns src / valid [S] (the input row of each send slot), ids / w [S, k] (ids relative to the member, -1
  for the row's other experts), sent / sizes [D] (units kept / wanted per member), fits [rows, D], dropped.
  """
  rows = ids.shape[0]
  D, c, S, width = hop["D"], hop["block"], hop["send"], hop["width"]
  dests = jnp.arange(D, dtype=jnp.int32)
  per_dest = jnp.sum((ids // width)[:, :, None] == dests[None, None, :], axis=1, dtype=jnp.int32)   # [rows, D]
  hit = per_dest > 0
  rank = jnp.cumsum(hit, axis=0, dtype=jnp.int32) - 1
  sizes = hit.sum(0, dtype=jnp.int32)
  fits = hit & (rank < c)
  sent = jnp.minimum(sizes, c)
  offset = _exclusive_cumsum(sent) if transport == "ragged" else dests * c
  slot = jnp.where(fits, offset[None, :] + rank, S).reshape(-1)      # S: out of range, ignored by mode="drop"
  src = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.repeat(jnp.arange(rows, dtype=jnp.int32), D), mode="drop")
  dest = jnp.zeros((S,), jnp.int32).at[slot].set(jnp.tile(dests, rows), mode="drop")
  valid = jnp.zeros((S,), bool).at[slot].set(True, mode="drop")
  unit_ids = ids[src]
  mine = valid[:, None] & (unit_ids // width == dest[:, None])
  return dict(src=src, valid=valid, ids=jnp.where(mine, unit_ids % width, -1), w=jnp.where(mine, w[src], 0.0),
              sent=sent, sizes=sizes, fits=fits, dropped=jnp.sum(jnp.where(hit & ~fits, per_dest, 0)))


def _route(transport, axis, ep, hop, sent):
  """Where one hop's all-to-all puts things, as arrays (for `_forward` / `_back`): dense, my group's members;
  ragged, every device's sizes and offsets ([ep] vectors, zero sizes for devices outside my group)."""
  members, _ = _members(axis, ep, hop)
  if transport != "ragged":
    return dict(members=members)
  me = jax.lax.axis_index(axis)
  c = hop["block"]
  per_device = jnp.zeros((ep,), jnp.int32).at[members].set(sent)     # members ascend: packed offsets agree
  counts = jax.lax.all_gather(per_device, axis)                      # [source, destination] units
  place = (jnp.arange(ep, dtype=jnp.int32) // hop["stride"]) % hop["D"] * c   # a source's block in my recv
  return dict(sizes=per_device, offsets=_exclusive_cumsum(per_device), recv_sizes=counts[:, me],
              mine=jnp.full((ep,), place[me], jnp.int32), places=place,
              back_offsets=_exclusive_cumsum(counts, 1)[:, me])      # my block in each source's send layout


def _forward(transport, axis, ep, hop, route, v, fill):
  """One hop's all-to-all among my group: `_pack`'s [send] slots -> [recv], member j's block at j·block.
  Devices outside the group get nothing: zero sizes (ragged) or empty blocks (dense, which pads every device
  of the axis: CPU is for correctness, the bytes are counted by `dsv3.bench.ep_traffic.dispatch_traffic`)."""
  if transport == "ragged":
    out = jnp.full((hop["recv"],) + v.shape[1:], fill, v.dtype)
    return jax.lax.ragged_all_to_all(v, out, route["offsets"], route["sizes"], route["mine"], route["recv_sizes"],
                                     axis_name=axis)
  return _dense_all_to_all(axis, ep, hop, route["members"], v)


def _back(transport, axis, ep, hop, route, v):
  """The reverse of `_forward` (the combine): [recv] rows -> my [send] slots."""
  if transport == "ragged":
    out = jnp.zeros((hop["send"],) + v.shape[1:], v.dtype)
    return jax.lax.ragged_all_to_all(v, out, route["places"], route["recv_sizes"], route["back_offsets"],
                                     route["sizes"], axis_name=axis)
  return _dense_all_to_all(axis, ep, hop, route["members"], v)


def _dense_all_to_all(axis, ep, hop, members, v):
  """[D·c] blocks, block j for member j -> the members' blocks to me, by all_to_all over the whole axis
  (non-members' blocks empty). Its own reverse."""
  D, c, tail = hop["D"], hop["block"], v.shape[1:]
  if D == ep:                          # the group is the whole axis, in order
    return jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  blocks = jnp.zeros((ep, c) + tail, v.dtype).at[members].set(v.reshape((D, c) + tail), unique_indices=True)
  got = jax.lax.all_to_all(blocks.reshape((ep * c,) + tail), axis, 0, 0, tiled=True)
  return got.reshape((ep, c) + tail)[members].reshape((D * c,) + tail)


def fp8_row_bytes(hidden: int) -> int:
  """Bytes of one row `_fp8_pack` sends: E4M3 values, then an f32 scale per 1x128 tile."""
  return hidden + 4 * -(-hidden // fp8.TILE)


def _fp8_pack(x):
  """[n, H] -> [n, H + 4·ceil(H/128)] uint8: E4M3 values, then the f32 scale of each 1x128 tile."""
  q, scale = fp8.quantize_tiles(x)
  return jnp.concatenate([jax.lax.bitcast_convert_type(q, jnp.uint8),
                          jax.lax.bitcast_convert_type(scale, jnp.uint8).reshape(x.shape[0], -1)], axis=1)


def _fp8_unpack(rows, hidden):
  q = jax.lax.bitcast_convert_type(rows[:, :hidden], fp8.FP8)
  scale = jax.lax.bitcast_convert_type(rows[:, hidden:].reshape(rows.shape[0], -1, 4), jnp.float32)
  return fp8.dequantize_tiles(q, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_dispatch(move, x, tables):
  """move(x, tables) with the rows on the wire as FP8 (1x128 scales); the backward moves the gradient
  unquantized (straight-through: the quantization's derivative taken as 1)."""
  return _fp8_unpack(move(_fp8_pack(x), tables), x.shape[1]).astype(x.dtype)


def _fp8_dispatch_bwd(move, residuals, ct):
  x, tables = residuals
  # jax.typeof: x's shape, dtype and the mesh axes it varies over, which the transpose must give back.
  return jax.linear_transpose(lambda v: move(v, tables), jax.typeof(x))(ct)[0], None


_fp8_dispatch.defvjp(lambda move, x, tables: (_fp8_dispatch(move, x, tables), (x, tables)), _fp8_dispatch_bwd)


def _local_experts(cfg, x, ids, w, ep, n, expand, w_gate, w_up, w_down):
  """The received units through this device's experts: x [R, H], ids / w [R, k] (local expert ids, -1 none).
  Keeps the first `expand` (unit, expert) rows in arrival order, sorts them by expert (stable: arrival order
  inside an expert) and runs one grouped GEMM (dsv3.nn.moe.expert_ffn), gate-weighted: (one row per unit [R, H],
  dropped assignments)."""
  R, H = x.shape
  k, e_local = ids.shape[1], w_gate.shape[0]
  flat = ids.reshape(-1)
  valid = flat >= 0
  keep = valid & (jnp.cumsum(valid, dtype=jnp.int32) <= expand)
  dropped = jnp.sum(valid & ~keep)
  key = jnp.where(keep, flat, e_local)
  order = jnp.argsort(key, stable=True)[:expand]
  sorted_key = key[order]
  row_ok = sorted_key < e_local
  group_sizes = jnp.bincount(jnp.where(keep, flat, 0), weights=keep.astype(jnp.int32),
                             length=e_local).astype(jnp.int32)
  unit_of = order // k
  weight = w.reshape(-1)[order]
  if cfg.capacity_factor > 0:   # capacity from the whole group's assignments, as with every expert local
    within = row_ok & moe.capacity_mask(jnp.minimum(sorted_key, e_local - 1), group_sizes, expand,
                                        moe.capacity(cfg, ep * n * k, e_local * ep))
    dropped += jnp.sum(row_ok & ~within)
    row_ok = within
  out = expert_ffn(x[unit_of], group_sizes, w_gate, w_up, w_down, cfg).astype(jnp.float32)
  # where, not multiply: rows past sum(group_sizes) are padding and must not leak into the sum.
  contrib = jnp.where(row_ok[:, None], out * weight[:, None], 0.0)
  return jnp.zeros((R, H), jnp.float32).at[unit_of].add(contrib), dropped


def _shard_body(cfg, transport, axis, token_axes, ep, plan, with_stats, x, idx, w, w_gate, w_up, w_down):
  """Per device: x [n, H], idx/w [n, k], local experts [E/ep, ...]; hops and buffers from `plan`."""
  n, H = x.shape
  e_local = w_gate.shape[0]
  me = jax.lax.axis_index(axis)

  # 1-3. Dispatch hop by hop: pack the input rows' units by member, learn the counts, exchange ids and weights;
  #      the next hop's input rows are this hop's received slots (ids relative to this node).
  hops, ids, wts, dropped = [], idx, w, jnp.zeros((), jnp.int32)
  for hop in plan["hops"]:
    units = _pack(ids, wts, hop, transport)
    route = _route(transport, axis, ep, hop, units["sent"])
    exchange = functools.partial(_forward, transport, axis, ep, hop, route)
    ids, wts = exchange(units["ids"], -1), exchange(units["w"], 0)
    dropped += units["dropped"]
    hops.append((hop, units, route))
  # The token rows take the same way: each hop gathers its send slots' input rows and exchanges them.
  tables = [(units["src"], units["valid"], route) for _, units, route in hops]
  def move(v, tables):
    for hop, (src, valid, route) in zip(plan["hops"], tables):
      v = _forward(transport, axis, ep, hop, route, jnp.where(valid[:, None], v[src], 0), 0)
    return v
  rows = _fp8_dispatch(move, x, tables) if cfg.ep_fp8_dispatch else move(x, tables)

  # 4. Local experts on the last hop's units: one gate-weighted row back per unit.
  out, d = _local_experts(cfg, rows, ids, wts, ep, n, plan["expand"], w_gate, w_up, w_down)
  dropped += d

  # 5. Combine, hops reversed: a unit's rows come home to its send slot, and each input row sums its units'
  #    (on a forwarder: the node's shards' rows for one (token, node), before the single return over hop 1).
  for hop, units, route in reversed(hops):
    rows_in = units["fits"].shape[0]
    returned = _back(transport, axis, ep, hop, route, out.astype(x.dtype))
    returned = jnp.where(units["valid"][:, None], returned, 0).astype(jnp.float32)
    out = jnp.zeros((rows_in, H), jnp.float32).at[units["src"]].add(returned)

  # The worst load against its balanced value: per (source, destination) block of every hop, and per shard.
  shard_rows = jax.lax.psum(jnp.bincount(idx.reshape(-1) // e_local, length=ep), axis)[me]
  ratio = shard_rows / plan["balanced_expand"]
  for hop, units, _ in hops:
    ratio = jnp.maximum(ratio, units["sizes"].max() / hop["balanced_block"])
  result = (out.astype(x.dtype), jax.lax.psum(dropped.astype(jnp.int32), token_axes),
            jax.lax.pmax(ratio.astype(jnp.float32), token_axes))
  if not with_stats:
    return result
  # Units each hop sent to another device (summed over devices), and per token those of the first hop.
  remote = [_members(axis, ep, hop)[1] for hop, _, _ in hops]
  hop_units = jnp.stack([jnp.sum(jnp.where(r, units["sent"], 0)) for r, (_, units, _) in zip(remote, hops)])
  token_remote = jnp.sum(hops[0][1]["fits"] & remote[0][None, :], axis=1, dtype=jnp.int32)
  return result + (dict(hop_units=jax.lax.psum(hop_units, token_axes), token_remote=token_remote),)
