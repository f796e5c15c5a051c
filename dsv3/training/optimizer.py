"""AdamW as DeepSeek-V3 trains with it (report §4.2): beta1 0.9, beta2 0.95, weight decay 0.1, grad clip 1.0.

- Weight decay skips norms' scales and any 1-D parameter (biases); the routing correction bias is not a
  parameter at all (it lives in the 'routing' collection), so the optimizer never sees it.
- Learning-rate schedules: 'deepseek' = linear warmup -> constant -> cosine decay -> constant tail (the
  shape of the report's schedule), or plain 'cosine' (warmup + cosine).
- Moments can be stored in bfloat16 (the FP8 recipe keeps AdamW's first and second moments in BF16) while
  the update arithmetic runs in float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  lr, steps = float(config.learning_rate), int(config.num_train_steps)
  warmup = min(int(config.warmup_steps), steps)
  floor = lr * float(config.min_lr_ratio)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), floor)
  start = max(int(steps * config.decay_start_frac), warmup)
  end = max(int(steps * config.decay_end_frac), start + 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)),
       optax.constant_schedule(lr),
       optax.cosine_decay_schedule(lr, end - start, alpha=floor / lr if lr else 0.0),
       optax.constant_schedule(floor)],
      boundaries=[warmup, start, end])


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float = 1e-8, moments_dtype=jnp.float32):
  """Adam's bias-corrected scaling with both moments stored in `moments_dtype`, math in float32.

  (optax.scale_by_adam only lets the first moment change dtype.)"""
  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moments_dtype)
    return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    out = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates)
    cast = lambda t: jax.tree.map(lambda x: x.astype(moments_dtype), t)
    return out, ScaleByAdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm, with the norm optionally given: `tx.update(..., global_norm=n)`. A pipeline
  rank updates only its stages' parameters, but clips by the norm over the whole model."""
  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if global_norm is None else global_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def decay_mask(params):
  """True where weight decay applies: matrices and expert tensors, not norm scales (even when stacked
  over layers into a 2-D array) nor any other 1-D parameter."""
  def leaf(path, p):
    is_norm = any("norm" in str(getattr(k, "key", k)) for k in path)
    return p.ndim >= 2 and not is_norm
  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(config)
  # The FP8 recipe stores both AdamW moments in BF16 (report §3.3.3); master weights stay FP32.
  low = config.adam_moments_dtype == "bfloat16" or config.precision == "fp8"
  moments = jnp.bfloat16 if low else jnp.float32
  tx = optax.chain(
      clip_by_global_norm(float(config.grad_clip)) if config.grad_clip else optax.identity(),
      scale_by_adam(config.b1, config.b2, moments_dtype=moments),
      optax.add_decayed_weights(float(config.weight_decay), mask=decay_mask),
      optax.scale_by_learning_rate(schedule))
  return tx, schedule


def piecewise(step: int, total: int, first: float, final: float, switch_frac: float) -> float:
  """`first` for the first switch_frac of training, then `final` (the MTP weight and gamma schedules)."""
  return float(first if step < math.floor(total * switch_frac) else final)
