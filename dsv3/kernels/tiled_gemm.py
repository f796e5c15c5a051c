"""Grouped GEMM in plain XLA over expert-homogeneous row tiles: the CPU default, differentiable.

XLA:CPU lowers jax.lax.ragged_dot to a dense computation masked over all experts, so its cost grows with the
expert count. Here rows sorted by expert are cut into `block_m`-row tiles that never straddle two experts
(`tile_schedule`, the same schedule the FP8 Triton kernel in dsv3.kernels.fp8_triton runs), and each GEMM is one batched
matmul over the tiles: the work is ~(M + G * block_m) * K * N whatever G is.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def cdiv(a, b):
  return -(-a // b)


# ----------------------------------------------------------------------------------------------------
# The tile schedule (shared with the FP8 Triton kernel in dsv3.kernels.fp8_triton, its jnp emulation and the tests).


def num_tiles(m, g, block_m):
  """Static upper bound on the schedule length: sum_g ceil(s_g / B) <= cdiv(M, B) + G (one partial tile
  per group at most) over the G groups plus the tail pseudo-group."""
  return cdiv(m, block_m) + g + 1


def tile_schedule(group_sizes, m, block_m):
  """Per-tile (group, row_start, row_end) int32 arrays of length `num_tiles(m, G, block_m)`.

  Tile i covers rows [row_start, row_end) of expert `group` (== G for rows past sum(group_sizes), which
  the kernel zero-fills). Unused tiles have row_start == row_end.
  """
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  g = group_sizes.shape[0]
  # The tail rows are one extra group so every output row is written exactly once.
  sizes = jnp.concatenate([group_sizes, jnp.maximum(m - jnp.sum(group_sizes), 0)[None]])
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  tiles = (sizes + block_m - 1) // block_m
  tile_ends = jnp.cumsum(tiles)
  t = jnp.arange(num_tiles(m, g, block_m), dtype=jnp.int32)
  # The group of tile t is the first whose cumulative tile count exceeds t; empty groups own no tile.
  grp = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right"), g).astype(jnp.int32)
  local = t - (tile_ends[grp] - tiles[grp])
  row_start = starts[grp] + local * block_m
  row_end = jnp.minimum(row_start + block_m, ends[grp])
  used = t < tile_ends[-1]
  row_start = jnp.where(used, row_start, 0).astype(jnp.int32)
  row_end = jnp.where(used, row_end, 0).astype(jnp.int32)
  return grp, row_start, row_end


def default_block_m(m: int, g: int) -> int:
  """About one tile per expert on average, bounded for padding waste and batching."""
  return int(min(128, max(8, 2 ** round(math.log2(max(m // max(g, 1), 1))))))


def _tiles(group_sizes, m: int, g: int, block_m):
  """(block_m, expert of each tile [T], row index [T, bm] clamped into [0, m), live [T, bm]): the rows each
  tile covers, `live` where a row is a real row of a real expert (not past a tile's end or in the tail)."""
  block_m = block_m or default_block_m(m, g)
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  rows = start[:, None] + jnp.arange(block_m, dtype=jnp.int32)[None, :]
  live = (rows < end[:, None]) & (grp < g)[:, None]
  return block_m, jnp.minimum(grp, g - 1), jnp.minimum(rows, m - 1), live


def _tile_matmul(tiles, w, expert):
  return jnp.einsum("tbk,tkn->tbn", tiles, w[expert], preferred_element_type=jnp.float32)


def tiled_ragged_dot(x, w, group_sizes, block_m=None):
  """jax.lax.ragged_dot(x [M, K], w [G, K, N], group_sizes) as one batched matmul over row tiles: rows past
  sum(group_sizes) are 0. Accumulates in f32; returns x.dtype."""
  m, _ = x.shape
  g, _, n = w.shape
  _, expert, rows, live = _tiles(group_sizes, m, g, block_m)
  tiles = jnp.where(live[..., None], x[rows], 0).astype(x.dtype)
  out = jnp.where(live[..., None], _tile_matmul(tiles, w, expert), 0.0)
  y = jnp.zeros((m, n), jnp.float32).at[jnp.where(live, rows, m).reshape(-1)].add(
      out.reshape(-1, n), mode="drop")
  return y.astype(x.dtype)


def tiled_expert_ffn(x, token_of, weight, group_sizes, w_gate, w_up, w_down, block_m=None, names=None):
  """The routed experts' SwiGLU in tile space, combined: y [N, H] = sum over sorted assignment rows r of
  weight[r] * down(silu(gate(x[token_of[r]])) * up(...)) on row r's expert (rows sorted by expert).

  Token rows are gathered once straight into the tiles and combined by one weighted scatter-add: none of
  the per-GEMM gathers/scatters of three tiled_ragged_dot calls, the same arithmetic. names: optional
  (gate, up, out) checkpoint_name tags for the remat policy. Accumulates in f32; returns f32 [N, H].
  """
  m, = token_of.shape
  n, h = x.shape
  _, expert, rows, live = _tiles(group_sizes, m, w_gate.shape[0], block_m)
  tag = (lambda y, i: y) if names is None else (lambda y, i: checkpoint_name(y, names[i]))
  tok = token_of[rows]
  tiles = jnp.where(live[..., None], x[tok], 0).astype(x.dtype)                  # [T, bm, H]
  gate = tag(_tile_matmul(tiles, w_gate, expert).astype(x.dtype), 0)
  up = tag(_tile_matmul(tiles, w_up, expert).astype(x.dtype), 1)
  out = tag(_tile_matmul((jax.nn.silu(gate) * up).astype(x.dtype), w_down, expert).astype(x.dtype), 2)
  scale = jnp.where(live, weight[rows], 0.0).astype(jnp.float32)
  return jnp.zeros((n, h), jnp.float32).at[jnp.where(live, tok, n).reshape(-1)].add(
      (out.astype(jnp.float32) * scale[..., None]).reshape(-1, h), mode="drop")


# ----------------------------------------------------------------------------------------------------
# The same tiles one at a time: memory of the output only, for large meshes on GPU.


def scan_block_m(m: int, g: int) -> int:
  """Larger tiles than default_block_m (fewer steps): about one per expert, between 64 and 512 rows."""
  return int(min(512, max(64, 2 ** round(math.log2(max(m // max(g, 1), 1))))))


@jax.custom_vjp
def scan_ragged_dot(x, w, group_sizes):
  """jax.lax.ragged_dot(x [M, K], w [G, K, N], group_sizes) one row tile at a time (a loop over the tile
  schedule: each step one [B, K] @ [K, N] GEMM on the tile's expert). Nothing of size G x M or T x K x N
  exists, forward or backward (the backward is two more loops: dx per tile, dw accumulated per expert), so
  memory stays that of x, w and the output where XLA:GPU's ragged_dot materialises an f32 [G, M, N].
  Accumulates in f32; returns x.dtype; rows past sum(group_sizes) are 0."""
  return _scan_forward(x, w, group_sizes)


def _scan_tiles(group_sizes, m: int, g: int):
  block_m = scan_block_m(m, g)
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  return block_m, grp, start, end


def _zeros(shape, dtype, *like):
  """Zeros that vary over the same shard_map axes as `like` (a loop's carry must type like its output)."""
  return jnp.zeros(shape, dtype) + sum(a[:0].sum().astype(dtype) for a in like)


def _tile_loop(x, w, w_of, group_sizes, n_out, dtype):
  """y [M, n_out]: for each tile, x's tile rows @ w_of(expert) written to the tile's live rows."""
  m = x.shape[0]
  g = group_sizes.shape[0]
  block_m, grp, start, end = _scan_tiles(group_sizes, m, g)
  xp = jnp.pad(x, ((0, block_m), (0, 0)))                          # a tile never reads past the end
  rows = jnp.arange(block_m, dtype=jnp.int32)

  def step(y, tile):
    e, s, t = tile
    xs = jax.lax.dynamic_slice_in_dim(xp, s, block_m, 0)
    out = jnp.dot(xs, w_of(jnp.minimum(e, g - 1)), preferred_element_type=jnp.float32).astype(dtype)
    live = ((s + rows < t) & (e < g))[:, None]
    old = jax.lax.dynamic_slice_in_dim(y, s, block_m, 0)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(live, out, old), s, 0), None

  y = _zeros((m + block_m, n_out), dtype, x, w)
  y, _ = jax.lax.scan(step, y, (grp, start, end))
  return y[:m]


def _scan_forward(x, w, group_sizes):
  return _tile_loop(x, w, lambda e: w[e], group_sizes, w.shape[2], x.dtype)


def _scan_fwd(x, w, group_sizes):
  return _scan_forward(x, w, group_sizes), (x, w, group_sizes)


def _scan_bwd(res, dy):
  x, w, group_sizes = res
  m, g = x.shape[0], w.shape[0]
  dx = _tile_loop(dy.astype(x.dtype), w, lambda e: w[e].T, group_sizes, w.shape[1], x.dtype)
  block_m, grp, start, end = _scan_tiles(group_sizes, m, g)
  xp = jnp.pad(x, ((0, block_m), (0, 0)))
  dyp = jnp.pad(dy.astype(x.dtype), ((0, block_m), (0, 0)))
  rows = jnp.arange(block_m, dtype=jnp.int32)

  def step(dw, tile):
    e, s, t = tile
    live = ((s + rows < t) & (e < g))[:, None]
    xs = jnp.where(live, jax.lax.dynamic_slice_in_dim(xp, s, block_m, 0), 0)
    gs = jax.lax.dynamic_slice_in_dim(dyp, s, block_m, 0)
    part = jnp.dot(xs.T, gs, preferred_element_type=jnp.float32)
    e = jnp.minimum(e, g - 1)
    return dw.at[e].add(jnp.where(t > s, part, 0.0)), None

  dw, _ = jax.lax.scan(step, _zeros(w.shape, jnp.float32, x, dy, w), (grp, start, end))
  return dx, dw.astype(w.dtype), None


scan_ragged_dot.defvjp(_scan_fwd, _scan_bwd)
