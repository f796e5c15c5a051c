"""DeepSeek-V3's FP8 training recipe (report section 3.3) as plain JAX functions.

The report trains in E4M3 for all three GEMMs of every linear layer (forward, input gradient, weight
gradient) and makes that work with two ideas:

* Fine-grained online quantization (3.3.2): one scale per 1x128 tile for activations (per token, per 128
  channels) and one per 128x128 block for weights, each set from the current amax so that the tile's
  largest value maps onto E4M3's largest finite value 448. An outlier only squeezes its own tile, not the
  whole tensor. Optionally the scales are powers of two (the "ue8m0" format of the released kernels), so
  that scaling is exact and only the E4M3 rounding remains.
* Increased accumulation precision (3.3.2, "FP32 promotion"): Hopper tensor cores keep roughly 14 bits
  of the running FP8 sum; the report measured ~2% relative error at K=4096. DeepSeek-V3 instead copies the
  partial sum of every 128-element slice of K to FP32 registers, applies that slice's two scales there and
  accumulates in FP32. Because the scales change every 128 elements of K, the promotion interval and the
  tile width are the same number.

Numerics contract of every product here: out = sum_t (Aq_t @ Bq_t) * sa_t * sb_t over 128-wide K slices t,
with each slice's partial sum and the total in FP32. Three interchangeable implementations:

* 'emulate' (CPU default, the reference): dequantize both operands to FP32 and do one FP32 GEMM at HIGHEST
  precision. Scales are constant inside a K slice, so scaling the operands equals scaling each slice's
  partial sum; E4M3 x E4M3 products are exact in FP32, so this is the promoted accumulation up to FP32
  summation order.
* 'triton' (GPU default): dsv3.kernels.fp8_triton's kernels, E4M3 tensor-core products promoted in registers.
* 'fp8': real float8 dot_generals in XLA, one per K slice with preferred_element_type=float32, scaled and
  summed in FP32: the same arithmetic without a kernel (each slice rewrites an FP32 output-sized buffer).

`dot` and `ragged_dot` are custom_vjp layers whose backward passes also run in FP8: dx = dy @ w^T with dy
in 1x128 tiles along N, and dw = x^T @ dy with x and dy in 128x1 tiles along the token axis. As in the
report (3.5.2, "transposed GEMM"), the forward keeps only the FP8 x and its 1x128 scales; the backward
dequantizes and re-quantizes it as 128x1 tiles, so the saved activation costs one byte per element.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3.kernels import backend, fp8_triton
from dsv3.kernels.tiled_gemm import cdiv

FP8 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
# Unpromoted accumulation model: the H800 tensor-core accumulator keeps ~14 significant bits (13 stored
# mantissa bits + the implicit one) and adds one WGMMA K-step (32 FP8 elements) at a time. We truncate
# (round toward zero) because the hardware drops the low bits when aligning addends; truncation errors
# add up with K instead of cancelling, which is why the report sees percent-level errors at K=4096.
_ACC_MANTISSA_BITS = 13
_ACC_CHUNK = 32


IMPLS = ("emulate", "triton", "fp8")


def _default_impl():
  return "triton" if backend.target_platform() == "gpu" else "emulate"


def _pow2_ceil(s):
  # frexp gives s = m * 2^e with m in [0.5, 1); s is already a power of two exactly when m == 0.5. Rounding
  # the scale UP keeps |x| / scale <= 448, so nothing saturates.
  m, e = jnp.frexp(s)
  return jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))


def _scale(amax, pow2_scale):
  # An all-zero tile gets scale 1: its values quantize to 0 and dequantize to 0, and no division by 0.
  s = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
  return _pow2_ceil(s) if pow2_scale else s


def _cast_fp8(v):
  # XLA turns out-of-range values into NaN when casting to e4m3fn (no inf), and amax / (amax/448) can land
  # one ulp above 448 in FP32, so clip first.
  return jnp.clip(v, -E4M3_MAX, E4M3_MAX).astype(FP8)


def quantize_tiles(x, tile=TILE, axis=-1, pow2_scale=False):
  """1 x `tile` quantization along `axis`: returns (q float8_e4m3fn like x, scale float32).

  scale has x's shape with dim `axis` replaced by ceil(n / tile); x ~= q * scale broadcast over each tile.
  A partial last tile takes its scale from the elements it has.
  """
  x = jnp.moveaxis(jnp.asarray(x).astype(jnp.float32), axis, -1)
  n = x.shape[-1]
  nt = cdiv(n, tile)
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nt * tile - n)])
  xt = xp.reshape(x.shape[:-1] + (nt, tile))
  scale = _scale(jnp.max(jnp.abs(xt), axis=-1), pow2_scale)
  q = _cast_fp8(xt / scale[..., None]).reshape(xp.shape)[..., :n]
  return jnp.moveaxis(q, -1, axis), jnp.moveaxis(scale, -1, axis)


def dequantize_tiles(q, scale, tile=TILE, axis=-1, dtype=jnp.float32):
  """Inverse of `quantize_tiles`."""
  axis = axis % q.ndim
  s = jnp.repeat(scale, tile, axis=axis)
  s = jax.lax.slice_in_dim(s, 0, q.shape[axis], axis=axis)
  return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_blocks(w, block=TILE, pow2_scale=False):
  """`block` x `block` quantization of the last two dims of w [..., K, N] (e.g. [E, K, N] experts).

  Returns (q float8_e4m3fn like w, scale float32 [..., ceil(K/block), ceil(N/block)]).
  """
  w = jnp.asarray(w).astype(jnp.float32)
  k, n = w.shape[-2:]
  kb, nb = cdiv(k, block), cdiv(n, block)
  lead = w.shape[:-2]
  wp = jnp.pad(w, [(0, 0)] * len(lead) + [(0, kb * block - k), (0, nb * block - n)])
  wb = wp.reshape(lead + (kb, block, nb, block))
  scale = _scale(jnp.max(jnp.abs(wb), axis=(-3, -1)), pow2_scale)
  q = _cast_fp8(wb / scale[..., :, None, :, None]).reshape(wp.shape)[..., :k, :n]
  return q, scale


def dequantize_blocks(q, scale, block=TILE, dtype=jnp.float32):
  """Inverse of `quantize_blocks`."""
  k, n = q.shape[-2:]
  s = jnp.repeat(jnp.repeat(scale, block, axis=-2), block, axis=-1)[..., :k, :n]
  return (q.astype(jnp.float32) * s).astype(dtype)


def _block_to_col_scales(ws, n):
  # A 128x128 block scale [.., K/128, N/128] seen as per-column-per-K-slice scales [.., K/128, N]: the
  # GEMM core only needs "one scale per (K slice, output column)" for its right operand.
  return jnp.repeat(ws, TILE, axis=-1)[..., :n]


def _round_acc(v):
  """Truncate f32 values to `_ACC_MANTISSA_BITS` stored mantissa bits (see the module constants)."""
  drop = 23 - _ACC_MANTISSA_BITS
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  bits = bits & jnp.uint32((0xFFFFFFFF >> drop) << drop)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _pad_k(a, axis, k_pad):
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, k_pad - a.shape[axis])
  return jnp.pad(a, pad)


def _scaled_mm(aq, sa, bq, sb, *, promote=True, impl=None, out_dtype=jnp.float32):
  """FP32 result of the block-scaled product (Aq * sa) @ (Bq * sb) (the 'triton' kernel stores `out_dtype`,
  accumulating in FP32 all the same).

  aq [M, K] fp8 with sa [M, ceil(K/128)] (1x128 tiles along the contraction); bq [K, N] fp8 with
  sb [ceil(K/128), N] (one scale per K slice and column: covers both 128x128 weight blocks and 128x1
  activation tiles). promote=False models the un-promoted tensor-core accumulation instead.
  """
  impl = impl or _default_impl()
  m, k = aq.shape
  n = bq.shape[1]
  kt = cdiv(k, TILE)
  if not promote:
    # Scaled products summed in a ~14-bit accumulator, one 32-wide chunk at a time: fine-grained scales
    # applied to the operands, but no FP32 register ever sees the partial sums.
    a = dequantize_tiles(aq, sa, axis=1)
    b = bq.astype(jnp.float32) * jnp.repeat(sb, TILE, axis=0)[:k]
    nc = cdiv(k, _ACC_CHUNK)
    a = _pad_k(a, 1, nc * _ACC_CHUNK).reshape(m, nc, _ACC_CHUNK).transpose(1, 0, 2)
    b = _pad_k(b, 0, nc * _ACC_CHUNK).reshape(nc, _ACC_CHUNK, n)

    def step(acc, ab):
      part = jnp.dot(ab[0], ab[1], precision=jax.lax.Precision.HIGHEST)
      return _round_acc(acc + part), None
    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (a, b))
    return acc
  if impl == "emulate":
    a = dequantize_tiles(aq, sa, axis=1)
    b = bq.astype(jnp.float32) * jnp.repeat(sb, TILE, axis=0)[:k]
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  if impl == "triton":
    gs = jnp.full((1,), m, jnp.int32)
    return fp8_triton.scaled_matmul(aq, sa, bq[None], sb[None], gs, sb_col=1, out_dtype=out_dtype)
  if impl != "fp8":
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  # One FP8 GEMM per 128-wide K slice, FP32 out, scaled and summed in FP32: the promotion itself. Zero
  # padding of K contributes exact zeros.
  a = _pad_k(aq, 1, kt * TILE).reshape(m, kt, TILE).transpose(1, 0, 2)
  b = _pad_k(bq, 0, kt * TILE).reshape(kt, TILE, n)

  def step(acc, xs):
    a_t, b_t, sa_t, sb_t = xs
    part = jax.lax.dot_general(a_t, b_t, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc + part * sa_t[:, None] * sb_t[None, :], None
  acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32), (a, b, sa.T, sb))
  return acc


def fp8_matmul(x, w, *, promote=True, pow2_scale=False, impl=None):
  """x [M, K] @ w [K, N] with x in 1x128 tiles, w in 128x128 blocks; float32 result.

  promote=True accumulates each 128-wide K slice in FP32 with its scales (the report's recipe);
  promote=False emulates the limited-precision tensor-core accumulation the report measured.
  """
  xq, xs = quantize_tiles(x, axis=-1, pow2_scale=pow2_scale)
  wq, ws = quantize_blocks(w, pow2_scale=pow2_scale)
  return _scaled_mm(xq, xs, wq, _block_to_col_scales(ws, w.shape[1]), promote=promote, impl=impl)


# ----------------------------------------------------------------------------------------------------
# Linear layer: all three GEMMs in FP8.


def _dw_operands(xq, xs, dy2, pow2_scale):
  """Re-tile the saved 1x128 FP8 x and the gradient dy as 128x1 tiles along the token axis."""
  x_deq = dequantize_tiles(xq, xs, axis=-1)
  xq_t, xs_t = quantize_tiles(x_deq, axis=0, pow2_scale=pow2_scale)     # scales [M/128, K]
  dq_t, ds_t = quantize_tiles(dy2, axis=0, pow2_scale=pow2_scale)       # scales [M/128, N]
  return xq_t, xs_t, dq_t, ds_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot(x, w, pow2_scale, impl):
  return _dot_fwd(x, w, pow2_scale, impl)[0]


def _dot_fwd(x, w, pow2_scale, impl):
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  xq, xs = quantize_tiles(x2, axis=-1, pow2_scale=pow2_scale)
  wq, ws = quantize_blocks(w, pow2_scale=pow2_scale)
  y = vary_like(_scaled_mm(xq, xs, wq, _block_to_col_scales(ws, w.shape[1]), impl=impl, out_dtype=x.dtype), xq)
  # Residuals: FP8 x + scales (1 byte/element) and the FP8 weight; never the high-precision x.
  res = (xq, xs, wq, ws, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return y.astype(x.dtype).reshape(lead + (w.shape[1],)), res


def _dot_bwd(pow2_scale, impl, res, dy):
  xq, xs, wq, ws, x_tag, w_tag = res
  k, n = wq.shape
  lead = dy.shape[:-1]
  dy2 = dy.reshape(-1, n).astype(jnp.float32)
  # dx = dy @ w^T: dy in 1x128 tiles along N; w^T's 128x128 blocks are w's blocks transposed.
  dq, ds = quantize_tiles(dy2, axis=-1, pow2_scale=pow2_scale)
  dx = _scaled_mm(dq, ds, wq.T, _block_to_col_scales(ws.T, k), impl=impl, out_dtype=x_tag.dtype)
  # dw = x^T @ dy, contracting over tokens: both operands in 128x1 tiles along M.
  xq_t, xs_t, dq_t, ds_t = _dw_operands(xq, xs, dy2, pow2_scale)
  if impl == "triton":      # the weight-gradient kernel with one group of every row: no transposed copy of x
    dw = fp8_triton.scaled_ragged_dw(xq_t, xs_t, dq_t, ds_t, jnp.full((1,), xq_t.shape[0], jnp.int32))[0]
  else:
    dw = _scaled_mm(xq_t.T, xs_t.T, dq_t, ds_t, impl=impl)
  return (vary_like(dx.astype(x_tag.dtype), xq).reshape(lead + (k,)),
          vary_like(dw.astype(w_tag.dtype), wq))


_dot.defvjp(_dot_fwd, _dot_bwd)


def match_varying(*xs):
  """Inside shard_map, casts the operands to vary over the union of their manual mesh axes.

  A custom_vjp's cotangents must have their primal's type: an expert weight that is invariant over
  'data' would otherwise get a 'data'-varying gradient from data-sharded tokens. After the cast, JAX's
  transpose of the cast inserts the psum over 'data' itself. Outside shard_map this is a no-op.
  """
  kinds = [jax.typeof(x).manual_axis_type.varying for x in xs]
  union = frozenset().union(*kinds)
  return tuple(x if k == union else jax.lax.pcast(x, tuple(sorted(union - k)), to="varying")
               for x, k in zip(xs, kinds))


def vary_like(y, ref):
  """y cast to vary over the mesh axes `ref` varies over: a kernel's output inside shard_map varies over
  none, and a custom_vjp's outputs and cotangents must have their primal's type."""
  missing = jax.typeof(ref).manual_axis_type.varying - jax.typeof(y).manual_axis_type.varying
  return jax.lax.pcast(y, tuple(sorted(missing)), to="varying") if missing else y


def dot(x, w, pow2_scale=False, impl=None):
  """Linear layer y = x @ w (x [..., K], w [K, N]) with FP8 forward, input- and weight-gradient GEMMs.

  Output dtype is x.dtype; gradients have the dtypes of x and w.
  """
  x, w = match_varying(x, w)
  return _dot(x, w, pow2_scale, impl or _default_impl())


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM of the MoE experts.


def _row_groups(group_sizes, m):
  """Group id of each of m rows (rows past sum(group_sizes) get len(group_sizes))."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(m), side="right").astype(jnp.int32)


def _ragged_scaled_mm(aq, sa, bq, sb, group_sizes, impl, out_dtype=jnp.float32):
  """FP32 ragged_dot of aq [M, K] (1x128 scales sa [M, K/128]) with per-group bq [G, K, N] whose
  per-slice column scales are sb [G, K/128, N]."""
  m, k = aq.shape
  g, _, n = bq.shape
  if impl == "emulate":
    a = dequantize_tiles(aq, sa, axis=1)
    b = bq.astype(jnp.float32) * jnp.repeat(sb, TILE, axis=1)[:, :k]
    return jax.lax.ragged_dot(a, b, group_sizes, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)
  if impl == "triton":
    return fp8_triton.scaled_matmul(aq, sa, bq, sb, group_sizes, sb_col=1, out_dtype=out_dtype)
  if impl != "fp8":
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  kt = cdiv(k, TILE)
  a = _pad_k(aq, 1, kt * TILE).reshape(m, kt, TILE).transpose(1, 0, 2)
  b = _pad_k(bq, 1, kt * TILE).reshape(g, kt, TILE, n).transpose(1, 0, 2, 3)
  # Each row's right-operand scale is its own expert's; rows past the groups are 0 anyway, clamp them.
  rg = jnp.minimum(_row_groups(group_sizes, m), g - 1)

  def step(acc, xs):
    a_t, b_t, sa_t, sb_t = xs
    part = jax.lax.ragged_dot(a_t, b_t, group_sizes, preferred_element_type=jnp.float32)
    return acc + part * sa_t[:, None] * sb_t[rg], None
  acc, _ = jax.lax.scan(step, jnp.zeros((m, n), jnp.float32),
                        (a, b, sa.T, jnp.moveaxis(sb, 1, 0)))
  return acc


def _ragged_dw(xq_t, xs_t, dq_t, ds_t, group_sizes, g, impl):
  """Per-group x_g^T @ dy_g -> [G, K, N], both operands in 128x1 tiles along the ragged token axis.

  A 128-row tile may straddle two experts and then shares one scale between them: that only widens the
  tile's amax range, it never mis-scales a value.
  """
  m, k = xq_t.shape
  n = dq_t.shape[1]
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
  if impl == "emulate":
    a = dequantize_tiles(xq_t, xs_t, axis=0)
    b = dequantize_tiles(dq_t, ds_t, axis=0)
    return jax.lax.ragged_dot_general(a, b, group_sizes, dims, precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32)
  if impl == "triton":
    return fp8_triton.scaled_ragged_dw(xq_t, xs_t, dq_t, ds_t, group_sizes)
  # FP8: one ragged contraction per 128-row slice (the promotion interval along the token axis), with
  # that slice's share of every group; slice scales applied in FP32.
  mt = cdiv(m, TILE)
  a = _pad_k(xq_t, 0, mt * TILE).reshape(mt, TILE, k)
  b = _pad_k(dq_t, 0, mt * TILE).reshape(mt, TILE, n)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes

  def step(acc, xs):
    t, a_t, b_t, sa_t, sb_t = xs
    lo = t * TILE
    gs_t = jnp.clip(ends - lo, 0, TILE) - jnp.clip(starts - lo, 0, TILE)
    part = jax.lax.ragged_dot_general(a_t, b_t, gs_t.astype(jnp.int32), dims,
                                      preferred_element_type=jnp.float32)
    return acc + part * sa_t[None, :, None] * sb_t[None, None, :], None
  acc, _ = jax.lax.scan(step, jnp.zeros((g, k, n), jnp.float32),
                        (jnp.arange(mt), a, b, xs_t, ds_t))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ragged(x, w, group_sizes, pow2_scale, impl):
  return _ragged_fwd(x, w, group_sizes, pow2_scale, impl)[0]


def _ragged_fwd(x, w, group_sizes, pow2_scale, impl):
  xq, xs = quantize_tiles(x, axis=-1, pow2_scale=pow2_scale)
  wq, ws = quantize_blocks(w, pow2_scale=pow2_scale)
  y = vary_like(_ragged_scaled_mm(xq, xs, wq, _block_to_col_scales(ws, w.shape[2]), group_sizes, impl, x.dtype),
                xq)
  res = (xq, xs, wq, ws, group_sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return y.astype(x.dtype), res


def _ragged_bwd(pow2_scale, impl, res, dy):
  xq, xs, wq, ws, group_sizes, x_tag, w_tag = res
  g, k, n = wq.shape
  dy2 = dy.astype(jnp.float32)
  dq, ds = quantize_tiles(dy2, axis=-1, pow2_scale=pow2_scale)
  wq_t = jnp.swapaxes(wq, 1, 2)
  dx = _ragged_scaled_mm(dq, ds, wq_t, _block_to_col_scales(jnp.swapaxes(ws, 1, 2), k), group_sizes,
                         impl, x_tag.dtype)
  xq_t, xs_t, dq_t, ds_t = _dw_operands(xq, xs, dy2, pow2_scale)
  dw = _ragged_dw(xq_t, xs_t, dq_t, ds_t, group_sizes, g, impl)
  # Integer group sizes have no cotangent (float0 by JAX's convention).
  dgs = np.zeros(group_sizes.shape, jax.dtypes.float0)
  return vary_like(dx.astype(x_tag.dtype), xq), vary_like(dw.astype(w_tag.dtype), wq), dgs


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


def ragged_dot(x, w, group_sizes, pow2_scale=False, impl=None):
  """FP8 grouped GEMM with jax.lax.ragged_dot semantics: x [M, K] (rows sorted by group), w [G, K, N],
  group_sizes [G] int32 (sum <= M; later rows give 0). Per-expert 128x128 weight blocks; FP8 backward."""
  x, w = match_varying(x, w)
  return _ragged(x, w, jnp.asarray(group_sizes, jnp.int32), pow2_scale, impl or _default_impl())
