"""Blockwise (flash-style) attention equals today's dense attention and its memory grows linearly in T.

Forward and q/k/v gradients within 1e-5 in fp32, for T a multiple of the tile, T not a multiple, T below one
tile, and MLA's real head dims (192 / 128); the whole MLA layer and its parameter gradients likewise; under
remat='paper' nothing T x T is saved for backward; the compiled temporary memory of forward+backward at
T=4096 is about that at T=1024 (dense: 16x); 'auto', 'cudnn' and 'tokamax' choose and refuse as documented.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import residuals
import tiny_model

from dsv3 import model
from dsv3.config import ConfigError, ModelConfig
from dsv3.nn import attention as attn
from dsv3.nn.layers import rope_cos_sin
from dsv3.nn.mla import MLA
from dsv3.training import losses

SCALE = 0.3


def qkvw(T, B=2, N=3, dk=12, dv=6, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, T, N, dk)), jax.random.normal(ks[1], (B, T, N, dk)),
          jax.random.normal(ks[2], (B, T, N, dv)), jax.random.normal(ks[3], (B, T, N * dv)))


def value_and_grads(impl, block, q, k, v, w):
  scale = q.shape[-1] ** -0.5                                   # as ModelConfig.softmax_scale() without YaRN
  f = lambda q, k, v: jnp.sum(attn.attention(q, k, v, scale, impl, block) * w)
  return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v), attn.attention(q, k, v, scale, impl, block)


@pytest.mark.parametrize("T,block,dims", [(32, 8, (12, 6)),      # T a multiple of the tile
                                          (29, 8, (12, 6)),      # ragged last tile
                                          (7, 16, (12, 6)),      # one tile shorter than `block`
                                          (20, 8, (192, 128))])  # DeepSeek-V3's q/k and v head dims
def test_blockwise_matches_dense(T, block, dims):
  q, k, v, w = qkvw(T, N=2 if dims[0] > 100 else 3, dk=dims[0], dv=dims[1])
  (_, ref_grads), ref = value_and_grads("dense", 0, q, k, v, w)
  (_, grads), out = value_and_grads("blockwise", block, q, k, v, w)
  assert out.shape == ref.shape == w.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_blockwise_bf16_close_to_fp32():
  q, k, v, w = qkvw(24)
  ref = attn.dense_attention(q, k, v, SCALE)
  bf = lambda x: x.astype(jnp.bfloat16)
  out = attn.blockwise_attention(bf(q), bf(k), bf(v), SCALE, block=8)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2, rtol=0)


# --- the MLA layer ---------------------------------------------------------------------------------
MLA_CFG = tiny_model.config(num_nextn_predict_layers=0, attention_block=4)  # T=11 spans three 4-wide tiles


def test_mla_layer_blockwise_matches_dense():
  T = 11
  x = jax.random.normal(jax.random.key(3), (2, T, MLA_CFG.hidden_size))
  cos, sin = rope_cos_sin(MLA_CFG, jnp.broadcast_to(jnp.arange(T), (2, T)))
  params = MLA(MLA_CFG).init(jax.random.key(0), x, cos, sin)

  def run(impl):
    f = lambda p, x: jnp.sum(MLA(MLA_CFG.replace(attention=impl)).apply(p, x, cos, sin)[0] ** 2)
    return jax.jit(jax.value_and_grad(f, (0, 1)))(params, x)

  (ref, (ref_gp, ref_gx)), (got, (gp, gx)) = run("dense"), run("blockwise")
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gp, ref_gp)


def test_no_score_matrix_saved_under_remat():
  """remat='paper' keeps the output and the logsumexp [B, N, T] per layer, never a [T, T] tensor."""
  T = 36                                                      # no other width is 36
  tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 97)
  variables = model.init(MLA_CFG, jax.random.key(0))

  def shapes(impl):
    cfg = MLA_CFG.replace(attention=impl, remat="paper")
    loss = lambda p: losses.objective(cfg, model.forward_train(cfg, {**variables, "params": p}, tokens),
                                      tokens, 0.3, 1e-4)[0]
    return [a.shape for a in residuals.saved(loss, variables["params"])]

  square = lambda s: len(s) >= 2 and s[-1] == s[-2] == T
  assert any(square(s) for s in shapes("dense"))            # the check would see a score tensor
  blockwise = shapes("blockwise")
  assert not any(square(s) for s in blockwise), blockwise
  assert (1, 2, MLA_CFG.num_attention_heads, T) in blockwise  # logsumexp, one per layer of a stack


# --- memory -----------------------------------------------------------------------------------------
def temp_bytes(impl, T, B=1, N=2, dk=24, dv=16):
  q = jax.ShapeDtypeStruct((B, T, N, dk), jnp.float32)
  v = jax.ShapeDtypeStruct((B, T, N, dv), jnp.float32)
  f = jax.grad(lambda q, k, v: jnp.sum(attn.attention(q, k, v, SCALE, impl, 512) ** 2), (0, 1, 2))
  return jax.jit(f).lower(q, q, v).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly():
  blockwise = temp_bytes("blockwise", 4096) / temp_bytes("blockwise", 1024)
  dense = temp_bytes("dense", 4096) / temp_bytes("dense", 1024)
  assert blockwise < 6, f"blockwise temp(4k)/temp(1k) = {blockwise:.1f}"
  assert dense > 10, f"dense temp(4k)/temp(1k) = {dense:.1f} (expected ~16: the check measures the right thing)"


# --- choosing ---------------------------------------------------------------------------------------
def test_auto_picks_dense_for_short_and_blockwise_for_long_sequences_on_cpu():
  def loops(T):
    q, k, v, _ = qkvw(T, B=1, N=1, dk=8, dv=8)
    return "while" in str(jax.make_jaxpr(lambda q, k, v: attn.attention(q, k, v, SCALE))(q, k, v))
  assert not loops(attn.DENSE_MAX_LEN)
  assert loops(attn.DENSE_MAX_LEN + 1)


def test_cudnn_refuses_what_it_cannot_run():
  q, k, v, _ = qkvw(8)
  with pytest.raises(ValueError, match="bf16/fp16"):
    attn.attention(q, k, v, SCALE, "cudnn")
  if jax.default_backend() == "cpu":
    bf = lambda x: x.astype(jnp.bfloat16)
    assert attn.cudnn_unsupported(bf(q), bf(k), bf(v))          # no cuDNN on a CPU-only install


def test_tokamax_without_tokamax_names_the_setting(monkeypatch):
  """attention='tokamax' where tokamax is not installed: one error naming the setting and the fix."""
  monkeypatch.setattr(attn, "_tokamax", lambda: None)
  q, k, v, _ = qkvw(8)
  with pytest.raises(ValueError, match="model.attention='tokamax' needs tokamax.*pip install"):
    attn.attention(q, k, v, SCALE, "tokamax")


def test_config_validates_attention():
  with pytest.raises(ConfigError, match="model.attention"):
    ModelConfig(attention="flash").validate()
  with pytest.raises(ConfigError, match="model.attention_block"):
    ModelConfig(attention_block=0).validate()


@pytest.mark.parametrize("error", [RuntimeError("cuDNN not found."),            # the plugin without cuDNN
                                   NotImplementedError("The head dim must be <= 128 and a multiple of 8")])
def test_auto_falls_back_when_cudnn_refuses_at_trace_time(monkeypatch, error):
  """'auto' with cuDNN seemingly usable (cudnn_unsupported says '') but jax's cuDNN attention refusing while
  it traces, as it does without the cuDNN libraries or on a pre-Hopper GPU: the fallback runs, and gives
  dense attention's values."""
  q, k, v, _ = qkvw(8, dk=16, dv=8)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  calls = []

  def refuse(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    raise error
  monkeypatch.setattr(attn, "cudnn_unsupported", lambda q, k, v: "")
  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  # Under jit platform_dependent traces every branch, the cuDNN one too (run eagerly, only this platform's).
  out = jax.jit(lambda q, k, v: attn.attention(q, k, v, SCALE))(q, k, v)
  assert calls == ["cudnn"]                      # the cuDNN branch was tried, and refused
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(attn.dense_attention(q, k, v, SCALE), np.float32))


def test_auto_does_not_swallow_other_errors(monkeypatch):
  """Only cuDNN's refusals fall back: a ValueError (shapes cudnn_unsupported should have ruled out) surfaces."""
  q, k, v, _ = qkvw(8, dk=16, dv=8)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

  def bad_shapes(*args, **kwargs):
    raise ValueError("QK must have same head dim")
  monkeypatch.setattr(attn, "cudnn_unsupported", lambda q, k, v: "")
  monkeypatch.setattr(jax.nn, "dot_product_attention", bad_shapes)
  with pytest.raises(ValueError, match="same head dim"):
    jax.jit(lambda q, k, v: attn.attention(q, k, v, SCALE))(q, k, v)
