"""Absorbed-MLA decoding against the latent cache reproduces the full-sequence forward pass.

Prefill of a prompt, then one token at a time: the logits at every position must equal `model.forward`'s
on the whole sequence, whatever the prefill length, for full-rank and low-rank queries, with plain RoPE
and with YaRN. The cache must hold only the latent (kv_lora_rank) and the shared rotary key
(qk_rope_head_dim) per token per layer.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model

from dsv3 import model

# Both query paths and both RoPE variants; each case also uses its own prefill lengths (1 = no prefill).
CASES = {"qlora_yarn": (dict(q_lora_rank=24, rope_scaling=tiny_model.yarn()), (1, 5)),
         "full_q_rope": (dict(q_lora_rank=None, rope_scaling=None), (4, 9))}
B, T, MAX_LEN = 2, 12, 16


def random_variables(cfg, seed):
  """O(1)-scale random weights (1/sqrt(fan_in)), norm weights near 1, nonzero routing biases.

  Filling eval_shape's tree from numpy avoids compiling model.init, which dominates a tiny test's time.
  """
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      value = 1 + 0.1 * rng.standard_normal(leaf.shape)
    elif "routing" in name:
      value = 0.1 * rng.standard_normal(leaf.shape)
    elif "embedding" in name:
      value = rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])
    return jnp.asarray(value, leaf.dtype)
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_cfg):
  overrides, prefills = CASES[request.param]
  cfg = tiny_cfg.replace(**overrides)
  variables = random_variables(cfg, seed=len(request.param))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, jnp.int32)
  return cfg, variables, tokens, model.forward(cfg, variables, tokens), prefills


def _decode_all(cfg, variables, tokens, prefill):
  cache = model.init_cache(cfg, B, MAX_LEN, jnp.float32)
  logits, hidden, cache = model.decode(cfg, variables, tokens[:, :prefill], cache, 0)
  out, hiddens = [logits], [hidden]
  for i in range(prefill, T):
    logits, hidden, cache = model.decode(cfg, variables, tokens[:, i:i + 1], cache, i)
    out.append(logits)
    hiddens.append(hidden)
  return jnp.concatenate(out, 1), jnp.concatenate(hiddens, 1), cache


def test_prefill_then_steps_match_forward(case):
  cfg, variables, tokens, reference, prefills = case
  for prefill in prefills:
    logits, hidden, _ = _decode_all(cfg, variables, tokens, prefill)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    assert hidden.shape == (B, T, cfg.hidden_size)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0, err_msg=f"prefill={prefill}")


def test_cache_holds_only_latents(case):
  cfg, variables, tokens, _, _ = case
  cache = model.init_cache(cfg, B, MAX_LEN, jnp.float32)
  per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  assert cache["dense"]["kv"].shape == (cfg.num_dense_layers, B, MAX_LEN, cfg.kv_lora_rank)
  assert cache["dense"]["k_rope"].shape == (cfg.num_dense_layers, B, MAX_LEN, cfg.qk_rope_head_dim)
  assert cache["moe"]["kv"].shape == (cfg.num_moe_layers, B, MAX_LEN, cfg.kv_lora_rank)
  assert cache["moe"]["k_rope"].shape == (cfg.num_moe_layers, B, MAX_LEN, cfg.qk_rope_head_dim)
  assert len(cache["mtp"]) == cfg.num_nextn_predict_layers
  assert cache["mtp"][0]["kv"].shape == (B, MAX_LEN, cfg.kv_lora_rank)
  layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  assert sum(x.size for x in jax.tree.leaves(cache)) == B * MAX_LEN * layers * per_token
  # Decoding writes into the cache in place: shapes and dtypes never grow with the sequence.
  _, _, after = _decode_all(cfg, variables, tokens, case[4][-1])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), model.init_cache(cfg, B, MAX_LEN, jnp.float32))
  # Only the T written positions are nonzero: nothing past the cache index is touched.
  assert not np.any(np.asarray(after["moe"]["kv"][:, :, T:]))
  assert np.all(np.any(np.asarray(after["moe"]["kv"][:, :, :T]) != 0, axis=-1))
