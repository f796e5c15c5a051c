"""Causal softmax attention for MLA's training path: dense, blockwise (flash-style, pure JAX), cuDNN and tokamax.

Each takes q, k [B, T, N, Dqk] and v [B, T, N, Dv] (MLA: Dqk = qk_nope + qk_rope = 192, Dv = 128 in V3)
and returns the heads side by side, [B, T, N * Dv] in v's dtype (o_proj's input, named 'attn_out' for remat),
with float32 scores and accumulation.

- dense: today's [B, N, T, T] scores and probabilities; the probabilities are saved for backward
  (checkpoint name 'attn_probs'). Quickest to compile, as fast as blockwise on CPU for short sequences;
  quadratic memory.
- blockwise: FlashAttention-2's online softmax in plain JAX loops over `block`-sized query and key blocks
  (key blocks above the diagonal are skipped), under a `jax.custom_vjp` whose backward recomputes each
  block's probabilities from the saved (q, k, v, out, logsumexp). Nothing T x T is ever materialised or
  saved: memory is linear in T. Runs on every backend; T need not be a multiple of `block`.
- cudnn: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation='cudnn')`.
  That public API wants value's head dim equal to key's, so v is zero-padded to Dqk and the output sliced
  (jax's private `cudnn.fused_attention_stablehlo` takes Dv != Dqk itself, but only on cuDNN >= 9.10 on
  Hopper). cuDNN (jax 0.10) takes bf16/fp16 only, head dim a multiple of 8 and <= 256 on Hopper and later
  (<= 128 before): MLA's 192 needs an H100/H200. Its residuals are jax's own, unnamed, so under
  remat='paper' a layer's backward reruns the cuDNN forward (memory stays linear).

- tokamax: tokamax's Triton flash attention (`tokamax.dot_product_attention(implementation='triton')`), which
  takes Dv != Dqk as it is; GPU only. Unlike cuDNN it compiles without a device (python -m dsv3.compile_only).

`attention(..., implementation='auto')` uses cuDNN where the program is lowered for a GPU and cuDNN takes the
shapes (`jax.lax.platform_dependent`, so a deviceless GPU compile on a CPU host decides like the GPU run); for a
GPU where cuDNN refuses (a deviceless compile, too old a cuDNN), tokamax's kernel when tokamax is installed;
otherwise dense up to DENSE_MAX_LEN tokens and blockwise above.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3.kernels import backend

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "tokamax")
# 'auto' off GPU: dense up to here, blockwise above. Measured on CPU (fwd+bwd, B2 N4 d48/32): the two are within
# noise up to 256 tokens (dense compiles in half the time), blockwise is 2-7x faster from 1024 tokens on.
DENSE_MAX_LEN = 256
_NEG = float(jnp.finfo(jnp.float32).min)
# What jax.nn.dot_product_attention(implementation='cudnn') raises at trace time when cuDNN cannot run here
# (jax/_src/cudnn/fused_attention_stablehlo.py, jax 0.10-0.12): NotImplementedError from its flash-attention
# rules (head dim over 128 before Hopper, which is also what a deviceless compile sees, since the default
# backend is then the CPU; MLA or compute capability 10.3 on too old a cuDNN), RuntimeError when cuDNN is
# not there ('cuDNN is not detected.' without the CUDA plugin, 'cuDNN not found.' from its version probe
# without the cuDNN libraries). Its ValueErrors are about shapes and dtypes cudnn_unsupported rules out
# first: one there would be a bug here, so it is not swallowed.
CUDNN_REFUSALS = (NotImplementedError, RuntimeError)


def attention(q, k, v, scale: float, implementation: str = "auto", block: int = 512):
  """Causal attention; q, k [B, T, N, Dqk], v [B, T, N, Dv] -> [B, T, N * Dv]. See the module docstring."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: unknown implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
  if implementation == "dense":
    return dense_attention(q, k, v, scale)
  if implementation == "blockwise":
    return blockwise_attention(q, k, v, scale, block)
  why_not = cudnn_unsupported(q, k, v)
  if implementation == "cudnn":
    if why_not:
      raise ValueError(f"attention='cudnn': {why_not}; use 'auto' or 'blockwise'")
    return cudnn_attention(q, k, v, scale)
  if implementation == "tokamax":
    return tokamax_attention(q, k, v, scale)
  fallback = (functools.partial(dense_attention, scale=scale) if q.shape[1] <= DENSE_MAX_LEN
              else functools.partial(blockwise_attention, scale=scale, block=block))
  if not why_not:
    try:
      return jax.lax.platform_dependent(q, k, v, cuda=functools.partial(cudnn_attention, scale=scale),
                                        default=fallback)
    except CUDNN_REFUSALS:
      pass
  if backend.target_platform() == "gpu" and _tokamax() is not None:
    return tokamax_attention(q, k, v, scale)
  return fallback(q, k, v)


def dense_attention(q, k, v, scale: float):
  """Materialised [B, N, T, T] scores and softmax (float32); probabilities named 'attn_probs' for remat."""
  T = q.shape[1]
  scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, _NEG)
  probs = checkpoint_name(jax.nn.softmax(scores, axis=-1).astype(v.dtype), "attn_probs")
  out = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
  return checkpoint_name(out.reshape(*out.shape[:2], -1), "attn_out")


# ---------------------------------------------------------------------------------------------------
# Blockwise (online softmax) with a recomputing backward.
# ---------------------------------------------------------------------------------------------------
def blockwise_attention(q, k, v, scale: float, block: int = 512):
  """Flash-style causal attention in `block`-sized tiles (one tile when T <= block); linear memory."""
  return _blockwise(q, k, v, float(scale), min(int(block), q.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, scale, bs):
  return _blockwise_fwd(q, k, v, scale, bs)[0]


def _pad(x, bs):
  """Zero-pads the sequence axis (1) up to a multiple of bs."""
  extra = -x.shape[1] % bs
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) if extra else x


def _block(x, i, bs):
  return jax.lax.dynamic_slice_in_dim(x, i * bs, bs, axis=1)


def _scores(qi, kj, i, j, scale, bs):
  """Scaled float32 scores of query block i against key block j [B, N, bs, bs], causally masked."""
  s = jnp.einsum("bqnd,bknd->bnqk", qi, kj, preferred_element_type=jnp.float32) * scale
  visible = (j * bs + jnp.arange(bs))[None, :] <= (i * bs + jnp.arange(bs))[:, None]
  return jnp.where(visible, s, _NEG)


def _blockwise_fwd(q, k, v, scale, bs):
  """Returns (out [B, T, N * Dv], residuals (q, k, v, out, logsumexp [B, N, T]))."""
  B, T, N, _ = q.shape
  qp, kp, vp = _pad(q, bs), _pad(k, bs), _pad(v, bs)
  nb, Dv = qp.shape[1] // bs, v.shape[-1]

  def query_block(i, carry):
    out, lse = carry
    qi = _block(qp, i, bs)

    def key_block(j, state):                   # online softmax over key blocks 0..i (the rest is masked)
      m, l, acc = state
      s = _scores(qi, _block(kp, j, bs), i, j, scale, bs)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bnqk,bknd->bnqd", p.astype(v.dtype), _block(vp, j, bs), preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((B, N, bs), _NEG, jnp.float32), jnp.zeros((B, N, bs), jnp.float32),
            jnp.zeros((B, N, bs, Dv), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    o = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(v.dtype)
    return (jax.lax.dynamic_update_slice_in_dim(out, o, i * bs, axis=1),
            jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * bs, axis=2))

  out, lse = jax.lax.fori_loop(0, nb, query_block, (jnp.zeros((B, nb * bs, N, Dv), v.dtype),
                                                    jnp.zeros((B, N, nb * bs), jnp.float32)))
  # Saved for backward under remat='paper' (layers.KEEP): the output (the very array returned, so it is kept
  # once) and the softmax's statistics, under the name the dense path gives its probabilities.
  out = checkpoint_name(out[:, :T].reshape(B, T, N * Dv), "attn_out")
  lse = checkpoint_name(lse[..., :T], "attn_probs")
  return out, (q, k, v, out, lse)


def _blockwise_bwd(scale, bs, res, g):
  """FlashAttention-2 backward: per key block j, loop over query blocks i >= j, recomputing P_ij."""
  q, k, v, out, lse = res
  T = q.shape[1]
  out, g = out.reshape(v.shape), g.reshape(v.shape)
  qp, kp, vp, dop = _pad(q, bs), _pad(k, bs), _pad(v, bs), _pad(g.astype(v.dtype), bs)
  nb = qp.shape[1] // bs
  pad_t = [(0, 0), (0, 0), (0, nb * bs - T)]
  lse = jnp.pad(lse, pad_t)                                              # padded rows: dO = 0, so no effect
  delta = jnp.pad(jnp.einsum("btnd,btnd->bnt", g.astype(jnp.float32), out.astype(jnp.float32)), pad_t)

  def key_block(j, carry):
    dq, dk, dv = carry
    kj, vj = _block(kp, j, bs), _block(vp, j, bs)

    def query_block(i, state):
      dq, dkj, dvj = state
      qi, doi = _block(qp, i, bs), _block(dop, i, bs)
      lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bs, bs, axis=2)
      delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bs, bs, axis=2)
      p = jnp.exp(_scores(qi, kj, i, j, scale, bs) - lse_i[..., None])          # [B, N, q, k]
      dvj = dvj + jnp.einsum("bnqk,bqnd->bknd", p.astype(v.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqnd,bknd->bnqk", doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
      dkj = dkj + jnp.einsum("bnqk,bqnd->bknd", ds, qi, preferred_element_type=jnp.float32)
      dqi = _block(dq, i, bs) + jnp.einsum("bnqk,bknd->bqnd", ds, kj, preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * bs, axis=1), dkj, dvj

    zeros = lambda x: jnp.zeros(x.shape[:1] + (bs,) + x.shape[2:], jnp.float32)
    dq, dkj, dvj = jax.lax.fori_loop(j, nb, query_block, (dq, zeros(kp), zeros(vp)))
    return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dkj, j * bs, axis=1),
            jax.lax.dynamic_update_slice_in_dim(dv, dvj, j * bs, axis=1))

  f32 = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, nb, key_block, (f32(qp), f32(kp), f32(vp)))
  return dq[:, :T].astype(q.dtype), dk[:, :T].astype(k.dtype), dv[:, :T].astype(v.dtype)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---------------------------------------------------------------------------------------------------
# cuDNN (GPU).
# ---------------------------------------------------------------------------------------------------
def cudnn_unsupported(q, k, v) -> str:
  """Why cuDNN fused attention cannot run these inputs here ('' when it can, as far as trace time knows)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or not q.dtype == k.dtype == v.dtype:
    return f"cuDNN attention takes bf16/fp16 q, k, v, got {q.dtype}/{k.dtype}/{v.dtype} (model.dtype)"
  d = q.shape[-1]
  if d % 8 or d > 256 or v.shape[-1] > d:
    return f"cuDNN attention takes head dims that are multiples of 8, <= 256 (Hopper), v's <= q's; got {d}"
  try:
    from jax._src.lib import cuda_versions  # None without jax's CUDA plugin
    if cuda_versions is None or not cuda_versions.cudnn_get_version():
      return "cuDNN is not installed (jax's CUDA plugin and the nvidia-cudnn wheel are needed)"
  except (ImportError, OSError, RuntimeError) as e:   # the plugin without cuDNN: RuntimeError 'cuDNN not found.'
    return f"cuDNN is not usable: {e}"
  return ""


def cudnn_attention(q, k, v, scale: float):
  """cuDNN fused causal attention; v is zero-padded to q's head dim (the public API wants them equal)."""
  dv = v.shape[-1]
  v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)]) if dv != q.shape[-1] else v
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
  return checkpoint_name(out[..., :dv].reshape(*out.shape[:2], -1), "attn_out")


# ---------------------------------------------------------------------------------------------------
# tokamax (GPU).
# ---------------------------------------------------------------------------------------------------
def _tokamax():
  try:
    import tokamax      # optional: the GPU extras
  except ImportError:
    return None
  return tokamax


def tokamax_attention(q, k, v, scale: float):
  """tokamax's Triton flash attention, causal; Dv may differ from Dqk (MLA's 192 / 128)."""
  lib = _tokamax()
  if lib is None:
    raise ValueError("model.attention='tokamax' needs tokamax (pip install -e '.[gpu]' on a GPU host, or the "
                     "'aot' extra for a compile-only run); or use 'auto'")
  out = lib.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="triton")
  return checkpoint_name(out.reshape(*out.shape[:2], -1), "attn_out")
