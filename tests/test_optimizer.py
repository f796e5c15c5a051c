"""AdamW as DeepSeek trains with it: decay masks, the schedule's shape, BF16 moments, gradient accumulation."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # noqa: E402

from dsv3 import model  # noqa: E402
from dsv3.config import ModelConfig  # noqa: E402
from dsv3.training import optimizer


def test_no_weight_decay_on_norms_or_vectors():
  c = ModelConfig.from_config_dict(tiny.get_config())
  params = jax.eval_shape(lambda: model.init(c, jax.random.key(0)))["params"]
  mask = optimizer.decay_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not any(v for k, v in flat.items() if "norm" in k)
  assert flat["['moe_layers']['mlp']['experts_gate_proj']"] and flat["['lm_head']"]
  assert flat["['moe_layers']['self_attn']['kv_b_proj']['kernel']"]


def test_deepseek_schedule_shape():
  c = tiny.get_config()
  c.num_train_steps, c.warmup_steps, c.learning_rate, c.min_lr_ratio = 100, 10, 1.0, 0.1
  c.decay_start_frac, c.decay_end_frac = 0.5, 0.9
  s = optimizer.learning_rate_schedule(c)
  lr = np.array([float(s(i)) for i in range(100)])
  np.testing.assert_allclose(lr[:10], np.arange(10) / 10, atol=1e-6)     # linear warmup
  assert np.all(lr[10:50] == 1.0)                                          # constant
  assert np.all(np.diff(lr[50:90]) < 0) and abs(lr[89] - 0.1) < 0.01      # cosine decay
  np.testing.assert_allclose(lr[90:], 0.1, atol=1e-6)                      # constant tail


def test_bf16_moments_match_optax_adam_closely():
  params = {"w": jnp.linspace(-1, 1, 64).reshape(8, 8)}
  grads = {"w": jnp.cos(jnp.arange(64.0)).reshape(8, 8)}
  ours = optimizer.scale_by_adam(0.9, 0.95, moments_dtype=jnp.bfloat16)
  ref = optax.scale_by_adam(0.9, 0.95)
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1)
    u2, s2 = ref.update(grads, s2)
  assert s1.mu["w"].dtype == jnp.bfloat16 and s1.nu["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(u1["w"], u2["w"], rtol=2e-2)
  f32 = optimizer.scale_by_adam(0.9, 0.95)
  s3 = f32.init(params)
  for _ in range(3):
    u3, s3 = f32.update(grads, s3)
  np.testing.assert_allclose(u3["w"], u2["w"], rtol=1e-6)


def test_fp8_precision_keeps_moments_in_bf16():
  c = tiny.get_config()
  c.precision = "fp8"
  tx, _ = optimizer.make_optimizer(c)
  state = tx.init({"w": jnp.zeros((4, 4))})
  moments = [x for x in jax.tree.leaves(state) if x.ndim == 2]
  assert moments and all(m.dtype == jnp.bfloat16 for m in moments)


def test_piecewise_schedules():
  assert optimizer.piecewise(0, 100, 0.3, 0.1, 0.5) == 0.3
  assert optimizer.piecewise(49, 100, 0.3, 0.1, 0.5) == 0.3
  assert optimizer.piecewise(50, 100, 0.3, 0.1, 0.5) == 0.1
