"""Small building blocks shared by attention, MoE and MTP: RMSNorm, RoPE with YaRN, Linear, SwiGLU.

Parameter names follow HF's DeepseekV3 so that checkpoint conversion is a rename plus a transpose
(flax kernels are [in, out], torch weights are [out, in]).

Activations are tagged with `jax.ad_checkpoint.checkpoint_name` so a remat policy can decide what the
backward pass keeps. The names that the paper recomputes are RMSNORM and MLA_UP; everything worth keeping
carries one of the KEEP names (see `remat_policy`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3.config import ModelConfig, yarn_get_mscale
from dsv3.kernels import fp8

# Names for activation checkpointing.
RMSNORM = "rmsnorm"          # RMSNorm outputs: recomputed under the paper policy
MLA_UP = "mla_up"            # q_b_proj / kv_b_proj outputs: recomputed under the paper policy
KEEP = ("q_a", "kv_a", "attn_probs", "attn_out", "attn_o", "mlp_gate", "mlp_up", "mlp_out",
        "router_logits", "expert_gate", "expert_up", "expert_out", "moe_out")


def remat_policy(kind: str):
  """The jax.checkpoint policy for `kind` in {'paper', 'full'}.

  'paper' saves exactly the KEEP-named activations. It is written as "save only these names" rather than
  "save everything except RMSNORM/MLA_UP" because the latter still saves the un-named value that a
  checkpoint_name was applied to (the norm's multiply output), defeating the point.
  """
  if kind == "paper":
    return jax.checkpoint_policies.save_only_these_names(*KEEP)
  if kind == "full":
    return jax.checkpoint_policies.nothing_saveable
  raise ValueError(f"remat: unknown policy {kind!r}; use 'none', 'paper' or 'full'")


def compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# Parameters whose working copy stays float32 whatever cfg.dtype: those the model reads in FP32 (RMSNorm
# scales, the router's gate, the embedding table, whose scatter-added gradient of repeated tokens is FP32),
# and the output head, which the main model and every MTP module read (their gradients add up in FP32).
FLOAT32_PARAMS = frozenset({"weight", "gate", "embedding", "lm_head"})


def working_dtype(name: str, dtype, cfg: ModelConfig) -> jnp.dtype:
  """The dtype of a working copy of parameter leaf `name` stored in `dtype` (a pipeline rank's per-device
  copies, gathered from the FP32 master): one that gives bitwise the loss and gradients of the master itself;
  the leaf's own dtype where that is narrower."""
  want = jnp.dtype(jnp.float32 if name in FLOAT32_PARAMS else compute_dtype(cfg))
  return want if want.itemsize < jnp.dtype(dtype).itemsize else jnp.dtype(dtype)


def matmul(x: jax.Array, kernel: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x [..., K] @ kernel [K, N] in the configured precision; the result has the compute dtype."""
  dtype = compute_dtype(cfg)
  if cfg.precision == "fp8":
    # FP8 GEMMs with DeepSeek's 1x128 / 128x128 scaling, all three GEMMs
    return fp8.dot(x.astype(dtype), kernel.astype(dtype)).astype(dtype)
  return rows_matmul(x.astype(dtype), kernel.astype(dtype)).astype(dtype)


def rows_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, N] -> f32 [..., N] as one 2-D GEMM over the flattened rows.

  The same product as einsum('...k,kn->...n'); with the leading axes flattened, XLA:CPU's weight gradient is
  one plain x^T @ dy GEMM instead of a transpose-copy of dy plus a slower dot (2.3x faster fwd + bwd at
  [2048, 256] @ [256, 8192]). On GPU the reshape is free."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel, preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nn.Module):
  """A bias-free projection whose GEMM honours cfg.precision (fp32 / bf16 / fp8).

  The kernel is made in setup() so that a parent can read `.kernel` without calling the layer
  (MLA's absorbed decode multiplies by slices of kv_b_proj's kernel).
  """
  in_features: int
  features: int
  cfg: ModelConfig

  def setup(self):
    self.kernel = self.param("kernel", nn.initializers.normal(self.cfg.initializer_range),
                             (self.in_features, self.features), jnp.dtype(self.cfg.param_dtype))

  def __call__(self, x):
    return matmul(x, self.kernel, self.cfg)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32 (as DeepSeek does), output tagged for recomputation."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return checkpoint_name((y * weight).astype(self.dtype), RMSNORM)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""
  intermediate: int
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    hidden, inter = x.shape[-1], self.intermediate
    gate = checkpoint_name(Linear(hidden, inter, self.cfg, name="gate_proj")(x), "mlp_gate")
    up = checkpoint_name(Linear(hidden, inter, self.cfg, name="up_proj")(x), "mlp_up")
    return checkpoint_name(Linear(inter, hidden, self.cfg, name="down_proj")(nn.silu(gate) * up), "mlp_out")


# ---------------------------------------------------------------------------------------------------
# Rotary embeddings with YaRN (DeepSeek-V3 §4.3 context extension; the formulas of DeepSeek's
# model.py / HF's _compute_yarn_parameters).
# ---------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> tuple[jax.Array, float]:
  """Per-pair inverse frequencies [d/2] (YaRN-blended when configured) and the cos/sin scale."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  inv_freq = 1.0 / pos_freqs
  rope = cfg.rope
  if not rope:
    return inv_freq, 1.0
  factor = float(rope["factor"])
  original = int(rope["original_max_position_embeddings"])
  beta_fast, beta_slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

  def correction_dim(num_rotations):
    return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(beta_fast)), 0)
  high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp                      # 1: keep the original frequency (high-frequency dims)
  inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
  mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
  if rope.get("attention_factor") is not None:
    attn_factor = float(rope["attention_factor"])
  elif mscale and mscale_all:
    attn_factor = yarn_get_mscale(factor, float(mscale)) / yarn_get_mscale(factor, float(mscale_all))
  else:
    attn_factor = yarn_get_mscale(factor)
  return inv_freq, attn_factor


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [..., d/2] for integer positions [...]."""
  inv_freq, scale = rope_inv_freq(cfg)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's complex-number RoPE does.

  x: [B, T, (heads,) d]; cos/sin: [B, T, d/2] (broadcast over heads when x has a heads axis).
  """
  if x.ndim == cos.ndim + 1:
    cos, sin = cos[..., None, :], sin[..., None, :]
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  x0, x1 = x32[..., 0], x32[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
