"""DeepSeekMoE (report §2.1.2): shared experts + fine-grained routed experts, sigmoid group-limited routing.

Routing, per token:
  s_i   = sigmoid(u · e_i)                                  affinity to routed expert i
  c_i   = s_i + b_i                                         b: the aux-loss-free correction bias
  group score = sum of the top-2 c_i inside the group;  keep the best topk_group groups
  top-k experts chosen on c_i among the kept groups; gate weights from the UNBIASED s_i,
  normalised to sum to 1 (norm_topk_prob), times routed_scaling_factor.

Dropless dispatch: the (token, expert) assignments are sorted by expert so that each expert's tokens
are contiguous, then one grouped GEMM (`jax.lax.ragged_dot`) runs every expert at once — no one-hot
over experts, no Python loop over experts, no token dropped (unless cfg.capacity_factor > 0, or with
expert parallelism a load past cfg.ep_buffer_factor × balanced: both counted in aux['dropped']).

The correction bias lives in the 'routing' variable collection: it is state, not a parameter (no
gradient, no optimizer, no weight decay); the trainer updates it from the per-expert load this layer
reports. The layer also reports the complementary sequence-wise balance loss (report eq. 17-20).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3.config import ModelConfig
from dsv3.kernels import backend, fp8, grouped_gemm, tiled_gemm
from dsv3.nn.layers import MLP, compute_dtype


def route(cfg: ModelConfig, x: jax.Array, router_kernel: jax.Array, bias: jax.Array):
  """x [N, H] -> (topk_idx [N, k] int32, topk_weight [N, k] f32, scores [N, E] f32)."""
  logits = checkpoint_name(jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32)), "router_logits")
  scores = jax.nn.sigmoid(logits)
  choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))[None, :]
  N, E = choice.shape
  G = cfg.n_group
  if G > 1:
    grouped = choice.reshape(N, G, E // G)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                 # [N, G]
    _, keep_groups = jax.lax.top_k(group_score, cfg.topk_group)        # [N, topk_group]
    group_mask = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], keep_groups].set(True)
    choice = jnp.where(jnp.repeat(group_mask, E // G, axis=1), choice, -jnp.inf)
  _, topk_idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  topk_weight = jnp.take_along_axis(scores, topk_idx, axis=1)
  if cfg.norm_topk_prob:
    topk_weight = topk_weight / (topk_weight.sum(-1, keepdims=True) + 1e-20)
  return topk_idx.astype(jnp.int32), topk_weight * cfg.routed_scaling_factor, scores


def grouped_gemm_impl(cfg: ModelConfig) -> str:
  """cfg.grouped_gemm with 'auto' resolved: XLA lowers ragged_dot as a dense dot over all experts, so CPU tiles
  and GPU runs tokamax's grouped kernels."""
  if cfg.grouped_gemm == "auto":
    return "tokamax" if backend.target_platform() == "gpu" else "tiled"
  return cfg.grouped_gemm


def grouped_matmul(x, w, group_sizes, cfg: ModelConfig):
  """Grouped GEMM: rows of x [M, K] sorted by group, w [G, K, N]; rows past sum(group_sizes) give 0."""
  dtype = compute_dtype(cfg)
  if cfg.precision == "fp8":       # the FP8 kernels: Triton on GPU, the exact emulation on CPU
    return fp8.ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes).astype(dtype)
  impl = grouped_gemm_impl(cfg)
  if impl == "tiled":
    return tiled_gemm.tiled_ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes)
  if impl == "scan":
    return tiled_gemm.scan_ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes)
  if impl == "tokamax":
    return grouped_gemm.ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes)
  y = jax.lax.ragged_dot(x.astype(dtype), w.astype(dtype), group_sizes, preferred_element_type=jnp.float32)
  return y.astype(dtype)


_EXPERT_NAMES = ("expert_gate", "expert_up", "expert_out")   # what the 'paper' remat policy saves


def expert_ffn(xs, group_sizes, w_gate, w_up, w_down, cfg: ModelConfig):
  """SwiGLU of every expert over its contiguous block of sorted rows, as three grouped GEMMs."""
  gate = checkpoint_name(grouped_matmul(xs, w_gate, group_sizes, cfg), _EXPERT_NAMES[0])
  up = checkpoint_name(grouped_matmul(xs, w_up, group_sizes, cfg), _EXPERT_NAMES[1])
  return checkpoint_name(grouped_matmul(nn.silu(gate) * up, w_down, group_sizes, cfg), _EXPERT_NAMES[2])


def capacity(cfg: ModelConfig, assignments: int, experts: int) -> int:
  """Rows an expert computes at most: capacity_factor x its balanced share of `assignments`, at least 1.
  The one owner of the expert capacity (all experts local, or split by dsv3.parallel.expert_parallel)."""
  return max(1, int(cfg.capacity_factor * assignments / experts + 0.999999))


def capacity_mask(sorted_expert, group_sizes, num_rows, capacity):
  """True for the first `num_rows` rows, sorted by expert (ids in [0, len(group_sizes))), that lie within their
  expert's capacity (the row's rank inside its expert < capacity)."""
  starts = jnp.cumsum(group_sizes) - group_sizes
  rank = jnp.arange(num_rows) - starts[sorted_expert]
  return rank < capacity


def routed_experts_local(cfg: ModelConfig, x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """All experts on this device: sort assignments by expert, grouped GEMMs, weighted scatter-add back.

  Returns (y [N, H], dropped assignment count). Dropless unless cfg.capacity_factor > 0.
  """
  N, k = topk_idx.shape
  E = w_gate.shape[0]
  flat_expert = topk_idx.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)
  sorted_expert = flat_expert[order]
  token_of = order // k
  group_sizes = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
  weight = topk_weight.reshape(-1)[order]
  dropped = jnp.zeros((), jnp.int32)
  if cfg.capacity_factor > 0:
    keep = capacity_mask(sorted_expert, group_sizes, N * k, capacity(cfg, N * k, E))
    weight = jnp.where(keep, weight, 0.0)
    dropped = jnp.sum(~keep).astype(jnp.int32)
  if cfg.precision != "fp8" and grouped_gemm_impl(cfg) == "tiled":
    # Tokens gathered straight into expert tiles and combined from them: one gather, one scatter-add.
    dtype = compute_dtype(cfg)
    y = tiled_gemm.tiled_expert_ffn(x.astype(dtype), token_of, weight, group_sizes, w_gate.astype(dtype),
                                      w_up.astype(dtype), w_down.astype(dtype), names=_EXPERT_NAMES)
    return y.astype(x.dtype), dropped
  out = expert_ffn(x[token_of], group_sizes, w_gate, w_up, w_down, cfg)
  out = out.astype(jnp.float32) * weight[:, None]
  y = jnp.zeros((N, x.shape[-1]), jnp.float32).at[token_of].add(out)
  return y.astype(x.dtype), dropped


def sequence_balance_loss(cfg: ModelConfig, scores, topk_idx, batch: int):
  """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences (alpha applied later).

  f_i = E / (k T) * #tokens of the sequence routed to i;  P_i = mean over the sequence of s_i / sum_j s_j.
  """
  E, k = scores.shape[-1], topk_idx.shape[-1]
  s = scores.reshape(batch, -1, E)
  T = s.shape[1]
  p = (s / s.sum(-1, keepdims=True)).mean(1)                            # [B, E]
  counts = jax.nn.one_hot(topk_idx.reshape(batch, T * k), E, dtype=jnp.float32).sum(1)
  f = counts * E / (k * T)
  return jnp.mean(jnp.sum(f * p, -1))


class MoE(nn.Module):
  """Shared experts + routed experts. Returns (y, aux) with aux = {load [E], balance_loss, dropped: the
  (token, expert) assignments not computed, and with expert parallelism ep_load_ratio: the worst
  buffer load over its balanced value (dsv3.parallel.expert_parallel)}."""
  cfg: ModelConfig
  # Set by dsv3.parallel.expert_parallel to run dispatch/combine inside shard_map; None = all experts local.
  expert_parallel: Optional[object] = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    B, T, H = x.shape
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    pdt = jnp.dtype(cfg.param_dtype)
    router_kernel = self.param("gate", init, (H, E), jnp.float32)   # gating stays FP32
    bias = self.variable("routing", "e_score_correction_bias", lambda: jnp.zeros((E,), jnp.float32)).value
    # Inside a shard_map over the mesh (dsv3.training.steps' local gradients) the module holds this device's experts.
    ep = self.expert_parallel
    E_here = E // ep.num_shards if ep is not None and ep.manual else E
    w_gate = self.param("experts_gate_proj", init, (E_here, H, I), pdt)
    w_up = self.param("experts_up_proj", init, (E_here, H, I), pdt)
    w_down = self.param("experts_down_proj", init, (E_here, I, H), pdt)

    flat = x.reshape(B * T, H)
    topk_idx, topk_weight, scores = route(cfg, flat, router_kernel, bias)
    extra = {}
    if self.expert_parallel is None:
      routed, dropped = routed_experts_local(cfg, flat, topk_idx, topk_weight, w_gate, w_up, w_down)
    else:
      routed, dropped, extra["ep_load_ratio"] = self.expert_parallel.routed_experts(
          cfg, flat, topk_idx, topk_weight, w_gate, w_up, w_down)
    y = routed.reshape(B, T, H)
    if cfg.n_shared_experts > 0:
      y = y + MLP(I * cfg.n_shared_experts, cfg, name="shared_experts")(x)
    aux = {"load": jnp.bincount(topk_idx.reshape(-1), length=E).astype(jnp.float32),
           "balance_loss": sequence_balance_loss(cfg, scores, topk_idx, B),
           "dropped": dropped, **extra}
    return checkpoint_name(y, "moe_out"), aux
