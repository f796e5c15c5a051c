"""Multi-head Latent Attention (DeepSeek-V2/V3, report §2.1.1).

Keys and values are compressed into one latent c_kv (kv_lora_rank wide, RMS-normalised) plus one
rotary key k_rope shared by all heads ("decoupled RoPE"). Queries optionally go through their own
low-rank path (q_a_proj -> norm -> q_b_proj) when q_lora_rank is set.

Two mathematically equal ways to attend:
- expanded (training): up-project c_kv with kv_b_proj into per-head k_nope and v, then ordinary causal
  attention (dsv3/nn/attention.py: dense, blockwise flash-style or cuDNN, by cfg.attention);
- absorbed (decoding): fold kv_b_proj's key half W_UK into the query and its value half W_UV into the
  output, so attention runs directly against the cached latents. The cache then holds only
  kv_lora_rank + qk_rope_head_dim numbers per token per layer (70,272 bytes/token for the 671B model in BF16).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3.config import ModelConfig
from dsv3.nn.attention import attention
from dsv3.nn.layers import MLA_UP, Linear, RMSNorm, apply_rope, compute_dtype


def init_layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
  """An empty latent cache for one layer: normalised c_kv and the roped shared key."""
  return {"kv": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
          "k_rope": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype)}


class MLA(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, cache: Optional[dict] = None, cache_index=None):
    """x [B, T, H]; cos/sin [B, T, rope/2]. With `cache`, writes this step's latents at cache_index
    (a scalar: all rows share one length) and attends to everything cached so far (absorbed form).
    Returns (output [B, T, H], updated cache or None)."""
    cfg = self.cfg
    B, T, H = x.shape
    nh, dn, dr, dv, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim, cfg.kv_lora_rank)
    dtype = compute_dtype(cfg)

    # Queries: optional low-rank path.
    if cfg.q_lora_rank is None:
      q = Linear(H, nh * (dn + dr), cfg, name="q_proj")(x)
    else:
      q_a = checkpoint_name(Linear(H, cfg.q_lora_rank, cfg, name="q_a_proj")(x), "q_a")
      q_a = RMSNorm(cfg.rms_norm_eps, dtype, name="q_a_layernorm")(q_a)
      q = checkpoint_name(Linear(cfg.q_lora_rank, nh * (dn + dr), cfg, name="q_b_proj")(q_a), MLA_UP)
    q = q.reshape(B, T, nh, dn + dr)
    q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], cos, sin)

    # Keys/values: one compressed latent plus the shared rotary key.
    kv_a = checkpoint_name(Linear(H, C + dr, cfg, name="kv_a_proj_with_mqa")(x), "kv_a")
    kv_latent = RMSNorm(cfg.rms_norm_eps, dtype, name="kv_a_layernorm")(kv_a[..., :C])
    k_rope = apply_rope(kv_a[..., C:], cos, sin)                       # [B, T, dr], shared by heads
    kv_b = Linear(C, nh * (dn + dv), cfg, name="kv_b_proj")
    o_proj = Linear(nh * dv, H, cfg, name="o_proj")
    scale = cfg.softmax_scale()

    if cache is None:
      kv = checkpoint_name(kv_b(kv_latent), MLA_UP).reshape(B, T, nh, dn + dv)
      # Ordinary attention with the shared rotary key broadcast to every head: d_qk = dn + dr, d_v = dv.
      q = jnp.concatenate([q_nope, q_rope], -1).astype(dtype)
      k = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_rope[:, :, None], (B, T, nh, dr))], -1).astype(dtype)
      out = attention(q, k, kv[..., dn:].astype(dtype), scale, cfg.attention, cfg.attention_block)
      return checkpoint_name(o_proj(out), "attn_o"), None

    # Absorbed decoding against the latent cache.
    cache = {"kv": jax.lax.dynamic_update_slice_in_dim(cache["kv"], kv_latent.astype(cache["kv"].dtype),
                                                       cache_index, axis=1),
             "k_rope": jax.lax.dynamic_update_slice_in_dim(cache["k_rope"], k_rope.astype(cache["k_rope"].dtype),
                                                           cache_index, axis=1)}
    w = kv_b.kernel.astype(jnp.float32).reshape(C, nh, dn + dv)
    w_uk, w_uv = w[..., :dn], w[..., dn:]
    q_latent = jnp.einsum("bthd,chd->bthc", q_nope.astype(jnp.float32), w_uk)
    kv_c, kr_c = cache["kv"].astype(jnp.float32), cache["k_rope"].astype(jnp.float32)
    scores = (jnp.einsum("bthc,bsc->bhts", q_latent, kv_c)
              + jnp.einsum("bthr,bsr->bhts", q_rope.astype(jnp.float32), kr_c))
    S = kv_c.shape[1]
    q_pos = cache_index + jnp.arange(T)
    visible = jnp.arange(S)[None, :] <= q_pos[:, None]                  # [T, S]: causal over the cache
    probs = _softmax(scores * scale, visible[None, None])
    out_latent = jnp.einsum("bhts,bsc->bthc", probs, kv_c)
    out = jnp.einsum("bthc,chd->bthd", out_latent, w_uv).astype(dtype).reshape(B, T, nh * dv)
    return o_proj(out), cache


def _softmax(scores, mask):
  """Masked softmax in float32 (scores already scaled)."""
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)
