"""DeepSeek-V3's FP8 GEMMs on GPU tensor cores: two Triton kernels with FP32 promotion every 128 of K.

Every GEMM of an FP8 linear layer and of the experts (forward, input gradient, weight gradient) is one of:

* `scaled_matmul`: out[rows of g] = sum_t (A_t @ B[g]_t) * sa[row, t] * sb[g, t, col // sb_col], A [M, K] E4M3
  in 1x128 tiles along K (rows sorted by group g), B [G, K, N] E4M3 with one scale per K slice and per
  `sb_col` columns (128: the 128x128 weight blocks). G = 1 is a dense GEMM. Forward and input gradient.
* `scaled_ragged_dw`: out[g] = sum over group g's rows r of A[r]^T B[r], both E4M3 in 128x1 tiles along the
  rows (sa [M/128, K], sb [M/128, N]): the weight gradient, per expert or (G = 1) of a dense layer.

In both, each 128-wide K step's tensor-core product is taken out in FP32, multiplied by its two scales and
added to an FP32 accumulator: the report's promotion (section 3.3.2). Row tiles follow
`dsv3.kernels.tiled_gemm.tile_schedule` (a tile never straddles two experts). The kernels are launched through
jax_triton (GPU only, imported lazily); on CPU the tests run their bodies in Triton's interpreter
(`interpret`) and `emulate_scaled_matmul` re-traces the first kernel's schedule and scale indexing in jnp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from dsv3.kernels.tiled_gemm import cdiv, num_tiles, tile_schedule

TILE = 128          # the scaling tile = the promotion interval = the K step
BLOCK_M = 128
BLOCK_N = 128


@triton.jit
def _scaled_matmul_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, grp_ptr, start_ptr, end_ptr, out_ptr,
                          N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, SB_COL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
  KT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
  NS: tl.constexpr = (N + SB_COL - 1) // SB_COL
  grp = tl.load(grp_ptr + tl.program_id(0))
  start = tl.load(start_ptr + tl.program_id(0))
  end = tl.load(end_ptr + tl.program_id(0))
  rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
  cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
  row_ok = rows < end
  col_ok = cols < N
  g = tl.minimum(grp, G - 1).to(tl.int64)
  # Tail tiles (grp == G: rows past the groups) and unused tiles skip the K loop and store zeros / nothing.
  k_stop = tl.where((grp < G) & (start < end), K, 0)
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  for k0 in range(0, k_stop, BLOCK_K):
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_ptr + g * K * N + ks[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                other=0.0)
    sa = tl.load(sa_ptr + rows * KT + k0 // BLOCK_K, mask=row_ok, other=0.0)
    sb = tl.load(sb_ptr + g * KT * NS + (k0 // BLOCK_K) * NS + cols // SB_COL, mask=col_ok, other=0.0)
    acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
  tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
           mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scaled_ragged_dw_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, gstart_ptr, gend_ptr, out_ptr,
                             K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
  g = tl.program_id(0)
  start = tl.load(gstart_ptr + g)
  end = tl.load(gend_ptr + g)
  ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
  ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
  k_ok = ks < K
  n_ok = ns < N
  # The group's rows in 128-row scale tiles; a tile shared with a neighbouring group is masked to ours.
  t_stop = tl.where(end > start, (end + BLOCK_T - 1) // BLOCK_T, start // BLOCK_T)
  acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
  for t in range(start // BLOCK_T, t_stop):
    rows = (t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mine = (rows >= start) & (rows < end)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=mine[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(b_ptr + rows[:, None] * N + ns[None, :], mask=mine[:, None] & n_ok[None, :], other=0.0)
    sa = tl.load(sa_ptr + t * K + ks, mask=k_ok, other=0.0)
    sb = tl.load(sb_ptr + t * N + ns, mask=n_ok, other=0.0)
    acc += tl.dot(tl.trans(a), b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
  tl.store(out_ptr + g.to(tl.int64) * K * N + ks[:, None] * N + ns[None, :], acc.to(out_ptr.dtype.element_ty),
           mask=k_ok[:, None] & n_ok[None, :])


def _check(a, sa, b, sb, sb_col):
  m, k = a.shape
  g, _, n = b.shape
  want = {"sa": (m, cdiv(k, TILE)), "sb": (g, cdiv(k, TILE), cdiv(n, sb_col))}
  for name, arr in (("sa", sa), ("sb", sb)):
    if tuple(arr.shape) != want[name]:
      raise ValueError(f"{name} must have shape {want[name]}, got {tuple(arr.shape)}")


def _matmul_args(a, sa, b, sb, group_sizes, sb_col, block_m, block_n):
  m, k = a.shape
  g, _, n = b.shape
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  grid = (num_tiles(m, g, block_m), cdiv(n, block_n))
  consts = dict(N=n, K=k, G=g, SB_COL=sb_col, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=TILE)
  return (a, b, sa.astype(jnp.float32), sb.astype(jnp.float32), grp, start, end), grid, consts


def _dw_args(a, sa, b, sb, group_sizes, block_k, block_n):
  k, n = a.shape[1], b.shape[1]
  ends = jnp.cumsum(jnp.asarray(group_sizes, jnp.int32)).astype(jnp.int32)
  starts = (ends - group_sizes).astype(jnp.int32)
  grid = (group_sizes.shape[0], cdiv(k, block_k), cdiv(n, block_n))
  consts = dict(K=k, N=n, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_T=TILE)
  return (a, b, sa.astype(jnp.float32), sb.astype(jnp.float32), starts, ends), grid, consts


def _jax_triton():
  """jax_triton (needs a CUDA jaxlib: imported on first launch, so CPU users never touch it).

  jax-triton 0.4.1, the newest, registers a two-argument dead-code rule for its primitive; JAX 0.12 calls
  rules with (used_outputs, live_inputs, eqn), so a kernel whose output a gradient drops fails to trace.
  Where JAX wants the longer form, it is registered here with the same meaning (a kernel keeps its inputs).
  """
  import jax_triton as jt
  from jax._src.interpreters import partial_eval as pe   # no public registry for DCE rules
  rule = pe.dce_rules.get(jt.triton_lib.triton_kernel_call_p)
  if rule is not None and rule.__code__.co_argcount < pe._default_dce_rule.__code__.co_argcount:
    pe.dce_rules[jt.triton_lib.triton_kernel_call_p] = (
        lambda used_outs, live_ins, eqn: ([True] * len(eqn.invars), eqn))
  return jt


def scaled_matmul(a, sa, b, sb, group_sizes, *, sb_col=TILE, out_dtype=jnp.float32, block_m=BLOCK_M,
                  block_n=BLOCK_N, num_warps=8, num_stages=3):
  """[M, N] promoted FP8 grouped GEMM (module doc); rows past sum(group_sizes) are 0. GPU only."""
  jt = _jax_triton()
  _check(a, sa, b, sb, sb_col)
  args, grid, consts = _matmul_args(a, sa, b, sb, group_sizes, sb_col, block_m, block_n)
  return jt.triton_call(*args, kernel=_scaled_matmul_kernel,
                        out_shape=jax.ShapeDtypeStruct((a.shape[0], b.shape[2]), out_dtype), grid=grid,
                        num_warps=num_warps, num_stages=num_stages, **consts)


def scaled_ragged_dw(a, sa, b, sb, group_sizes, *, out_dtype=jnp.float32, block_k=128, block_n=128,
                     num_warps=8, num_stages=3):
  """[G, K, N] promoted FP8 weight gradient: per group, its rows of a [M, K] transposed times b [M, N],
  both in 128x1 row tiles (sa [M/128, K], sb [M/128, N]). GPU only."""
  jt = _jax_triton()
  args, grid, consts = _dw_args(a, sa, b, sb, group_sizes, block_k, block_n)
  out = jax.ShapeDtypeStruct((group_sizes.shape[0], a.shape[1], b.shape[1]), out_dtype)
  return jt.triton_call(*args, kernel=_scaled_ragged_dw_kernel, out_shape=out, grid=grid, num_warps=num_warps,
                        num_stages=num_stages, **consts)


# ----------------------------------------------------------------------------------------------------
# CPU checks: a jnp re-trace of the first kernel, and both kernel bodies in Triton's interpreter.


def emulate_scaled_matmul(a, sa, b, sb, group_sizes, *, sb_col=TILE, block_m=BLOCK_M):
  """What `scaled_matmul` computes, tile by tile, in jnp (f32): the same schedule, masks, K steps and scale
  indexing, so a schedule or offset bug shows up as a mismatch with the FP8 reference on CPU."""
  m, k = a.shape
  g, _, n = b.shape
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  kp = cdiv(k, TILE) * TILE
  a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, kp - k)))
  b = jnp.pad(b.astype(jnp.float32), ((0, 0), (0, kp - k), (0, 0)))

  def one_tile(gi, s, e):
    rows = s + jnp.arange(block_m)
    row_ok = rows < e
    gc = jnp.minimum(gi, g - 1)
    at = jnp.where(row_ok[:, None], a[jnp.minimum(rows, m - 1)], 0.0)
    acc = jnp.zeros((block_m, n), jnp.float32)
    for kt in range(kp // TILE):
      part = jnp.dot(at[:, kt * TILE:(kt + 1) * TILE], b[gc, kt * TILE:(kt + 1) * TILE],
                     precision=jax.lax.Precision.HIGHEST)
      s_a = jnp.where(row_ok, sa[jnp.minimum(rows, m - 1), kt], 0.0)
      acc = acc + part * s_a[:, None] * sb[gc, kt, jnp.arange(n) // sb_col][None, :]
    return rows, row_ok, jnp.where((gi < g) & (s < e), acc, 0.0)

  rows, row_ok, vals = jax.vmap(one_tile)(grp, start, end)
  rows = jnp.where(row_ok, rows, 0).reshape(-1)        # tiles are disjoint; masked rows add zeros
  vals = jnp.where(row_ok[..., None], vals, 0.0).reshape(-1, n)
  return jnp.zeros((m, n), jnp.float32).at[rows].add(vals)


_TL_DTYPES = {np.dtype(np.float32): tl.float32, np.dtype(np.int32): tl.int32,
              np.dtype(jnp.float8_e4m3fn): tl.float8e4nv}


def interpret(kernel: str, a, sa, b, sb, group_sizes, *, sb_col=TILE, block=32):
  """Runs a kernel body ('scaled_matmul' | 'scaled_ragged_dw') on CPU in Triton's interpreter (tests; slow);
  f32 result. Needs TRITON_INTERPRET=1 set before triton is first imported (it decides, at decoration,
  whether every @triton.jit function is interpretable), so the tests use a subprocess. The interpreter's
  launcher expects torch tensors, so this drives the function over numpy buffers: pointers are addresses."""
  from triton.runtime import interpreter as ti
  fn = {"scaled_matmul": _scaled_matmul_kernel, "scaled_ragged_dw": _scaled_ragged_dw_kernel}[kernel]
  if not isinstance(fn, ti.InterpretedFunction):
    raise RuntimeError("interpret needs TRITON_INTERPRET=1 set before importing triton")
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  if kernel == "scaled_matmul":
    _check(a, sa, b, sb, sb_col)
    args, grid, consts = _matmul_args(a, sa, b, sb, group_sizes, sb_col, block, block)
    names = ["a_ptr", "b_ptr", "sa_ptr", "sb_ptr", "grp_ptr", "start_ptr", "end_ptr"]
    out = np.zeros((a.shape[0], b.shape[2]), np.float32)
  else:
    args, grid, consts = _dw_args(a, sa, b, sb, group_sizes, block, block)
    names = ["a_ptr", "b_ptr", "sa_ptr", "sb_ptr", "gstart_ptr", "gend_ptr"]
    out = np.zeros((group_sizes.shape[0], a.shape[1], b.shape[1]), np.float32)
  bufs = [np.ascontiguousarray(np.asarray(x)) for x in args] + [out]

  def ptr(buf):
    ty = tl.pointer_type(_TL_DTYPES[buf.dtype])
    return tl.tensor(ti.TensorHandle(np.array([buf.ctypes.data], np.uint64), ty), ty)

  body = fn.rewrite()
  call = {name: ptr(buf) for name, buf in zip(names + ["out_ptr"], bufs)}
  scope = ti._patch_lang(body)
  try:
    ti.interpreter_builder.set_grid_dim(*grid, *(1,) * (3 - len(grid)))
    for idx in np.ndindex(*grid):
      ti.interpreter_builder.set_grid_idx(*idx, *(0,) * (3 - len(idx)))
      body(**call, **consts)
  finally:
    scope.restore()
  return out
