"""Grouped GEMM for the MoE experts: XLA's ragged_dot, and a Triton kernel for BF16 and block-scaled FP8.

Each routed expert multiplies its own contiguous run of token rows (tokens sorted by expert) with its own
weight matrix: out[rows of g] = x[rows of g] @ w[g]. `jax.lax.ragged_dot` is the reference semantics
(rows past sum(group_sizes) give 0); the Triton kernel follows the layout of DeepSeek-V3's FP8 GEMMs
(report section 3.3, and DeepGEMM's grouped "contiguous" layout):

* Tile schedule. The M axis is cut into BLOCK_M-row tiles that never straddle two experts: group g owns
  ceil(size_g / BLOCK_M) tiles starting at its row offset, the last one partial. Rows past the groups form
  one more pseudo-group (id G) whose tiles store zeros, so the output needs no separate zero-fill. The
  number of tiles depends on the data, so the grid is the static upper bound cdiv(M, BLOCK_M) + G + 1 and
  surplus tiles are empty (start == end). The schedule is `dsv3.tiled_gemm.tile_schedule`, plain jnp, so that
  the CPU tests check exactly the offsets the kernel reads.
* K loop in 128-element steps. For FP8 each step's tensor-core product is taken out in FP32, multiplied by
  the 1x128 activation scales of its rows and the 128x128 block scales of its expert's weight columns, and
  added to an FP32 accumulator: the report's "promotion to CUDA cores every 128 elements of K".

Implementation choice: the kernel is written in Triton and launched with `jax_triton.triton_call`, the
declared dependency, rather than in Pallas: Pallas' interpret mode would run on CPU, but its Triton
lowering has no FP8 tl.dot path we could rely on. The kernel body is still exercised on CPU by the tests,
through Triton's own interpreter (`run_triton_interpreted`), and `emulate_kernel` re-traces the same
schedule and scale indexing in jnp. jax_triton imports only on a GPU build of jaxlib, so it is loaded
lazily and 'auto' falls back to XLA elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from dsv3 import fp8 as fp8_lib
from dsv3.tiled_gemm import cdiv as _cdiv, num_tiles, tile_schedule

BLOCK_K = 128   # = the FP8 scaling tile: one scale pair per K step


# ----------------------------------------------------------------------------------------------------
# The Triton kernel.


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, grp_ptr, start_ptr, end_ptr, out_ptr,
                         N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
  pid_t = tl.program_id(0)
  pid_n = tl.program_id(1)
  grp = tl.load(grp_ptr + pid_t)
  start = tl.load(start_ptr + pid_t)
  end = tl.load(end_ptr + pid_t)
  rows = start + tl.arange(0, BLOCK_M)
  cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  row_ok = rows < end
  col_ok = cols < N
  rows64 = rows.to(tl.int64)
  # Tail tiles (grp == G) and unused tiles skip the K loop: they store zeros / nothing.
  k_stop = tl.where((grp < G) & (start < end), K, 0)
  w_base = w_ptr + tl.minimum(grp, G - 1).to(tl.int64) * K * N
  ws_base = ws_ptr + tl.minimum(grp, G - 1).to(tl.int64) * ((K + 127) // 128) * ((N + 127) // 128)
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  for k0 in range(0, k_stop, BLOCK_K):
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    a = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                other=0.0)
    b = tl.load(w_base + ks[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                other=0.0)
    if FP8:
      # Promotion: this K step's FP32 partial product gets its scales before joining the accumulator.
      kt = k0 // 128
      sa = tl.load(xs_ptr + rows64 * ((K + 127) // 128) + kt, mask=row_ok, other=0.0)
      sb = tl.load(ws_base + kt * ((N + 127) // 128) + cols // 128, mask=col_ok, other=0.0)
      acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    else:
      acc = tl.dot(a, b, acc)
  tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
           mask=row_ok[:, None] & col_ok[None, :])


def _kernel_operands(x, w, fp8, pow2_scale):
  """(x, w, x_scales, w_scales) as the kernel reads them; BF16 passes 1-element dummy scales."""
  if fp8:
    xq, xs = fp8_lib.quantize_tiles(x, axis=-1, pow2_scale=pow2_scale)
    wq, ws = fp8_lib.quantize_blocks(w, pow2_scale=pow2_scale)
    return xq, wq, xs, ws
  one = jnp.ones((1,), jnp.float32)
  return x, w, one, one


def _kernel_config(m, n, k, fp8, block_m, block_n):
  if fp8 and (block_n > 128 or 128 % block_n):
    raise ValueError("FP8 needs BLOCK_N to divide the 128-column weight block")
  return dict(N=n, K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, FP8=bool(fp8))


def _launch(xk, wk, xs, ws, group_sizes, fp8, out_dtype, block_m=128, block_n=128, num_warps=8,
            num_stages=3):
  import jax_triton as jt   # needs a CUDA jaxlib; imported here so CPU users never touch it
  m, k = xk.shape
  g, _, n = wk.shape
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  return jt.triton_call(
      xk, wk, xs, ws, grp, start, end, kernel=_grouped_gemm_kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_tiles(m, g, block_m), _cdiv(n, block_n)), num_warps=num_warps,
      num_stages=num_stages, G=g, **_kernel_config(m, n, k, fp8, block_m, block_n))


def triton_ragged_dot(x, w, group_sizes, fp8=False, pow2_scale=False, out_dtype=None, **launch):
  """The Triton grouped GEMM, forward only (GPU). fp8=True quantizes x (1x128) and w (128x128) first."""
  xk, wk, xs, ws = _kernel_operands(x, w, fp8, pow2_scale)
  return _launch(xk, wk, xs, ws, jnp.asarray(group_sizes, jnp.int32), fp8, out_dtype or x.dtype,
                 **launch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _triton_trainable(x, w, group_sizes, fp8, pow2_scale):
  return _triton_fwd(x, w, group_sizes, fp8, pow2_scale)[0]


def _triton_fwd(x, w, group_sizes, fp8, pow2_scale):
  xk, wk, xs, ws = _kernel_operands(x, w, fp8, pow2_scale)
  y = _launch(xk, wk, xs, ws, group_sizes, fp8, x.dtype)
  if fp8:
    # The same residuals as dsv3.fp8.ragged_dot (FP8 x and w with scales), so its FP8 backward applies.
    return y, (xk, xs, wk, ws, group_sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return y, (x, w, group_sizes)


def _triton_bwd(fp8, pow2_scale, res, dy):
  if fp8:
    return fp8_lib._ragged_bwd(pow2_scale, fp8_lib._default_impl(), res, dy)
  x, w, group_sizes = res
  _, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, group_sizes, preferred_element_type=a.dtype),
                   x, w)
  return vjp(dy) + (np.zeros(group_sizes.shape, jax.dtypes.float0),)


_triton_trainable.defvjp(_triton_fwd, _triton_bwd)


# ----------------------------------------------------------------------------------------------------
# CPU checks of the kernel: a jnp re-trace of its schedule, and a Triton-interpreter launcher.


def emulate_kernel(x, w, group_sizes, fp8=False, pow2_scale=False, block_m=128):
  """What the kernel computes, tile by tile, in jnp (f32 result): the same schedule, masks, K steps and
  scale indexing, so a schedule or offset bug shows up as a mismatch with ragged_dot on CPU. Column tiles
  do not change any column's arithmetic, so each row tile is emulated over all N columns at once."""
  m, k = x.shape
  g, _, n = w.shape
  xk, wk, xs, ws = _kernel_operands(x, w, fp8, pow2_scale)
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  kp = _cdiv(k, BLOCK_K) * BLOCK_K
  xk = jnp.pad(xk.astype(jnp.float32), ((0, 0), (0, kp - k)))
  wk = jnp.pad(wk.astype(jnp.float32), ((0, 0), (0, kp - k), (0, 0)))

  def one_tile(gi, s, e):
    rows = s + jnp.arange(block_m)
    row_ok = rows < e
    live = (gi < g) & (s < e)
    gc = jnp.minimum(gi, g - 1)
    a = jnp.where(row_ok[:, None], xk[jnp.minimum(rows, m - 1)], 0.0)
    acc = jnp.zeros((block_m, n), jnp.float32)
    for kt in range(kp // BLOCK_K):
      sl = slice(kt * BLOCK_K, (kt + 1) * BLOCK_K)
      part = jnp.dot(a[:, sl], wk[gc, sl], precision=jax.lax.Precision.HIGHEST)
      if fp8:
        sa = jnp.where(row_ok, xs[jnp.minimum(rows, m - 1), kt], 0.0)
        sb = ws[gc, kt, jnp.arange(n) // 128]
        part = part * sa[:, None] * sb[None, :]
      acc = acc + part
    return rows, row_ok, jnp.where(live, acc, 0.0)

  rows, row_ok, vals = jax.vmap(one_tile)(grp, start, end)
  # Tiles are disjoint; masked rows scatter-add zeros onto a clamped index.
  rows = jnp.where(row_ok, rows, 0).reshape(-1)
  vals = jnp.where(row_ok[..., None], vals, 0.0).reshape(-1, n)
  return jnp.zeros((m, n), jnp.float32).at[rows].add(vals)


_TL_DTYPES = {np.dtype(np.float32): tl.float32, np.dtype(np.int32): tl.int32,
              np.dtype(jnp.bfloat16): tl.bfloat16, np.dtype(jnp.float8_e4m3fn): tl.float8e4nv}


def run_triton_interpreted(x, w, group_sizes, fp8=False, pow2_scale=False, out_dtype=jnp.float32,
                           block_m=32, block_n=32):
  """Runs the real Triton kernel body on CPU with Triton's interpreter (for tests; slow).

  Needs TRITON_INTERPRET=1 in the environment before triton is first imported (the flag decides, at
  decoration time, whether every @triton.jit function, tl's own included, is interpretable; the tests use
  a subprocess). Triton's interpreter launcher expects torch tensors, so this drives the interpreted
  function directly over numpy buffers: pointers are the buffers' host addresses.
  """
  from triton.runtime import interpreter as ti
  if not isinstance(_grouped_gemm_kernel, ti.InterpretedFunction):
    raise RuntimeError("run_triton_interpreted needs TRITON_INTERPRET=1 set before importing triton")
  if not fp8 and x.dtype == jnp.bfloat16:
    # The interpreter keeps bf16 as uint16 and its tl.dot multiplies those integers; the non-FP8 branch
    # is dtype-generic, so it is checked in float32 instead.
    raise ValueError("Triton's interpreter cannot run a bf16 tl.dot; pass float32 operands")
  m, k = x.shape
  g, _, n = w.shape
  xk, wk, xs, ws = _kernel_operands(x, w, fp8, pow2_scale)
  grp, start, end = tile_schedule(group_sizes, m, block_m)
  bufs = [np.ascontiguousarray(np.asarray(a)) for a in (xk, wk, xs, ws, grp, start, end)]
  out = np.zeros((m, n), np.dtype(out_dtype))
  bufs.append(out)

  def ptr(buf):
    ty = tl.pointer_type(_TL_DTYPES[buf.dtype])
    return tl.tensor(ti.TensorHandle(np.array([buf.ctypes.data], np.uint64), ty), ty)

  fn = _grouped_gemm_kernel.rewrite()
  names = ["x_ptr", "w_ptr", "xs_ptr", "ws_ptr", "grp_ptr", "start_ptr", "end_ptr", "out_ptr"]
  args = {name: ptr(b) for name, b in zip(names, bufs)}
  args.update(G=g, **_kernel_config(m, n, k, fp8, block_m, block_n))
  grid = (num_tiles(m, g, block_m), _cdiv(n, block_n), 1)
  scope = ti._patch_lang(fn)
  try:
    ti.interpreter_builder.set_grid_dim(*grid)
    for i in range(grid[0]):
      for j in range(grid[1]):
        ti.interpreter_builder.set_grid_idx(i, j, 0)
        fn(**args)
  finally:
    scope.restore()
  return out


# ----------------------------------------------------------------------------------------------------
# Dispatch.


def ragged_dot(x, w, group_sizes, impl="auto", fp8=False, pow2_scale=False):
  """Grouped GEMM x [M, K] (rows sorted by group) @ w [G, K, N] per group, jax.lax.ragged_dot semantics.

  impl: 'xla' = jax.lax.ragged_dot (fp8=True: dsv3.fp8.ragged_dot, differentiable, FP8 backward too);
  'triton' = the Triton kernel (GPU) for the forward, with the XLA / FP8 backward of the 'xla' path;
  'auto' = triton on GPU, xla elsewhere. Output dtype = x.dtype.
  """
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  if impl == "auto":
    impl = "triton" if jax.default_backend() == "gpu" else "xla"
  if impl == "xla":
    if fp8:
      return fp8_lib.ragged_dot(x, w, group_sizes, pow2_scale=pow2_scale)
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)
  if impl == "triton":
    return _triton_trainable(x, w, group_sizes, bool(fp8), bool(pow2_scale))
  raise ValueError(f"impl must be 'auto', 'xla' or 'triton', got {impl!r}")

