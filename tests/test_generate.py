"""generate(): greedy equals an argmax loop over model.forward, sampling is seeded, top-p and eos behave;
speculative_generate() with the MTP drafts reproduces greedy decoding exactly.

One tiny MoE config with two MTP depths (so drafts are chained) serves most tests, and every test keeps the
same batch, prompt length and max_new_tokens so that the jitted decode loops compile once per module.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model

from dsv3 import generate, model

B, T, N = 2, 5, 12


def random_variables(cfg, seed):
  """O(1)-scale random weights (1/sqrt(fan_in)), norm weights near 1, nonzero routing biases (no compile)."""
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


def agreeing_variables(cfg, seed, layer_scale=0.1, mtp_scale=0.2):
  """Weights under which the MTP drafts usually match the main model, so acceptance is well above chance.

  The main layers' outputs are scaled down, making the model close to a bigram model: the next token is
  nearly head(norm(Emb(t))). Each MTP depth is set to compute exactly that from the token it reads:
  eh_proj passes the normed embedding through (identity on the embedding half, zero on the hidden half),
  its block's output projections are scaled down too, and its head norm is the main final norm. The MTP
  block still attends over its own cache (mtp_scale > 0), so a stale MTP cache entry changes drafts.
  """
  v = random_variables(cfg, seed)
  p = jax.tree.map(lambda a: a, v["params"])   # fresh dicts: edited in place below
  H = cfg.hidden_size

  def rescale(layer, factor):
    for path in (("self_attn", "o_proj", "kernel"), ("mlp", "down_proj", "kernel"), ("mlp", "experts_down_proj"),
                 ("mlp", "shared_experts", "down_proj", "kernel")):
      node = layer
      for key in path[:-1]:
        node = node.get(key, {})
      if path[-1] in node:
        node[path[-1]] = node[path[-1]] * factor

  rescale(p["dense_layers"], layer_scale)
  rescale(p["moe_layers"], layer_scale)
  for k in range(cfg.num_nextn_predict_layers):
    mtp = p[f"mtp_{k}"]
    mtp["eh_proj"]["kernel"] = jnp.concatenate([jnp.eye(H), jnp.zeros((H, H))], axis=0)
    mtp["enorm"]["weight"] = jnp.ones((H,))
    mtp["shared_head_norm"]["weight"] = p["norm"]["weight"]
    rescale(mtp["block"], mtp_scale)
  return {"params": p, "routing": v["routing"]}


def _expected_stats(cfg, variables, greedy):
  """The acceptance statistics that exact MTP caches must give, replayed from one full-sequence pass.

  model.forward_train's MTP logits at position i are what depth k predicts from committed tokens only. A
  drafting step at length L reads every depth at position L-2; depth k's draft counts if it and all earlier
  depths' drafts equal the greedy tokens (only then did depth k read committed tokens). So any stale or
  misplaced MTP cache entry shows up as a different count.
  """
  out = jax.jit(model.forward_train, static_argnums=0)(cfg, variables, jnp.asarray(greedy))
  mtp = np.argmax(np.asarray(out["mtp_logits"]), -1)                   # [D, B, T+N]
  # The main model's choice after the last token: the verify call sees one position past T+N-1.
  g = np.concatenate([greedy, np.argmax(np.asarray(out["logits"])[:, -1:], -1)], axis=1)
  D, L, steps, agreed = cfg.num_nextn_predict_layers, T + 1, 0, 0
  while L < T + N:
    ok, count = np.ones(B, bool), np.zeros(B, int)
    for k in range(D):
      ok &= (L + k < g.shape[1]) and (mtp[k, :, L - 2] == g[:, L + k])
      count += ok
    steps, agreed, L = steps + 1, agreed + count.sum(), L + count.min() + 1
  return steps, agreed / (steps * D * B)


def _check_mtp_caches(cfg, variables, prompts):
  """Speculative decoding's MTP caches end up as a fresh MTP prefill over the committed tokens makes them.

  Depth k's entry at position i depends on tokens up to i+k; every such entry that reads committed tokens
  only must be exact after the loop, whatever drafts were rejected on the way.
  """
  ids, _, _, spec_cache = generate._speculative(variables, prompts, jnp.int32(-1), cfg=cfg, max_new_tokens=N,
                                                cache_dtype="float32")
  S = spec_cache[0]["kv"].shape[1]
  cache = model.init_cache(cfg, B, S, jnp.float32)
  fresh, cache["mtp"] = cache["mtp"], []
  _, hidden, _ = model.decode(cfg, variables, ids, cache, 0)
  hid = jnp.zeros((B, S, cfg.hidden_size), hidden.dtype).at[:, :T + N].set(hidden)
  tokens = jnp.zeros((B, S), jnp.int32).at[:, :T + N].set(ids)
  _, fresh = jax.jit(generate._draft, static_argnums=(0, 6))(cfg, variables, hid, tokens, fresh, 0, T + N,
                                                              T + N - 1)
  for k in range(cfg.num_nextn_predict_layers):
    valid = T + N - 1 - k                  # depth k+1 at position i reads token i+k+1 <= T+N-1
    for name in ("kv", "k_rope"):
      np.testing.assert_allclose(spec_cache[k][name][:, :valid], fresh[k][name][:, :valid], atol=1e-4,
                                 err_msg=f"MTP depth {k + 1} cache {name!r}")


@pytest.fixture(scope="module")
def setup(tiny_cfg):
  cfg = tiny_cfg.replace(rope_scaling=tiny_model.yarn(), num_nextn_predict_layers=2)
  variables = random_variables(cfg, seed=0)
  prompts = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, jnp.int32)
  greedy = generate.generate(cfg, variables, prompts, max_new_tokens=N, temperature=0.0)
  return cfg, variables, prompts, np.asarray(greedy)


def _eos_reference(greedy, eos):
  """What an eos stop must produce: each row's greedy tokens up to its first eos, eos after it."""
  out = greedy.copy()
  for row in out:
    hits = np.flatnonzero(row[T:] == eos)
    if hits.size:
      row[T + hits[0]:] = eos
  return out


def test_greedy_matches_argmax_loop_over_forward(setup):
  cfg, variables, prompts, greedy = setup
  assert greedy.shape == (B, T + N) and greedy.dtype == np.int32
  # The growing sequence lives in a fixed-size buffer: forward is causal, so the padding after position
  # i cannot change the logits at i, and one compiled forward serves every step.
  seq = np.zeros((B, T + N), np.int32)
  seq[:, :T] = prompts
  for i in range(T, T + N):
    seq[:, i] = np.argmax(np.asarray(model.forward(cfg, variables, seq))[:, i - 1], -1)
  np.testing.assert_array_equal(greedy, seq)


def test_sampling_is_seeded(setup):
  cfg, variables, prompts, greedy = setup
  sample = lambda seed: np.asarray(generate.generate(cfg, variables, prompts, max_new_tokens=N, temperature=1.0,
                                                     rng=jax.random.key(seed)))
  a, b, c = sample(1), sample(1), sample(2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  np.testing.assert_array_equal(a[:, :T], prompts)
  assert a.min() >= 0 and a.max() < cfg.vocab_size


def test_tiny_top_p_is_greedy(setup):
  cfg, variables, prompts, greedy = setup
  out = generate.generate(cfg, variables, prompts, max_new_tokens=N, temperature=1.0, top_p=1e-6,
                          rng=jax.random.key(3))
  np.testing.assert_array_equal(out, greedy)


def test_eos_pads_finished_rows(setup):
  cfg, variables, prompts, greedy = setup
  eos = int(greedy[0, T + 2])
  out = np.asarray(generate.generate(cfg, variables, prompts, max_new_tokens=N, eos_id=eos))
  assert out.shape == greedy.shape
  np.testing.assert_array_equal(out, _eos_reference(greedy, eos))
  assert (out[0, T + 2:] == eos).all()


def test_one_dim_prompt_and_bf16_cache(setup):
  cfg, variables, prompts, greedy = setup
  out = generate.generate(cfg, variables, np.asarray(prompts[0]), max_new_tokens=N)
  np.testing.assert_array_equal(out, greedy[0])
  out = np.asarray(generate.generate(cfg, variables, prompts, max_new_tokens=N, cache_dtype=jnp.bfloat16))
  assert out.shape == (B, T + N) and out.min() >= 0 and out.max() < cfg.vocab_size
  np.testing.assert_array_equal(out[:, :T], prompts)


def test_bad_arguments_name_the_parameter(setup):
  cfg, variables, prompts, _ = setup
  with pytest.raises(ValueError, match="top_p"):
    generate.generate(cfg, variables, prompts, top_p=0.0)
  with pytest.raises(ValueError, match="prompt_ids"):
    generate.generate(cfg, variables, prompts + cfg.vocab_size)
  with pytest.raises(ValueError, match="num_nextn_predict_layers"):
    generate.speculative_generate(cfg.replace(num_nextn_predict_layers=0), variables, prompts)


def test_speculative_equals_greedy_random_weights(setup):
  cfg, variables, prompts, greedy = setup
  ids, stats = generate.speculative_generate(cfg, variables, prompts, max_new_tokens=N)
  np.testing.assert_array_equal(ids, greedy)
  assert 0.0 <= stats["batch_acceptance_rate"] <= stats["acceptance_rate"] <= 1.0
  assert 1.0 <= stats["tokens_per_step"] <= cfg.num_nextn_predict_layers + 1
  print("random weights, 2 MTP depths:", stats)


def test_speculative_equals_greedy_when_drafts_agree(setup):
  cfg, _, prompts, _ = setup
  variables = agreeing_variables(cfg, seed=3)
  greedy = np.asarray(generate.generate(cfg, variables, prompts, max_new_tokens=N))
  ids, stats = generate.speculative_generate(cfg, variables, prompts, max_new_tokens=N)
  np.testing.assert_array_equal(ids, greedy)
  print("agreeing weights, 2 MTP depths:", stats)
  steps, rate = _expected_stats(cfg, variables, greedy)
  assert stats["steps"] == steps and stats["acceptance_rate"] == pytest.approx(rate)
  assert stats["acceptance_rate"] > 0.5 and stats["tokens_per_step"] > 1.5
  _check_mtp_caches(cfg, variables, prompts)
  # With an eos the speculative path pads and stops exactly as generate() does.
  eos = int(greedy[1, T + 4])
  ids, _ = generate.speculative_generate(cfg, variables, prompts, max_new_tokens=N, eos_id=eos)
  np.testing.assert_array_equal(ids, _eos_reference(greedy, eos))
  np.testing.assert_array_equal(generate.generate(cfg, variables, prompts, max_new_tokens=N, eos_id=eos), ids)


def test_speculative_one_depth(tiny_cfg):
  cfg = tiny_cfg.replace(rope_scaling=tiny_model.yarn())
  variables = agreeing_variables(cfg, seed=3)
  prompts = jax.random.randint(jax.random.key(4), (B, T), 0, cfg.vocab_size, jnp.int32)
  greedy = np.asarray(generate.generate(cfg, variables, prompts, max_new_tokens=N))
  ids, stats = generate.speculative_generate(cfg, variables, prompts, max_new_tokens=N)
  np.testing.assert_array_equal(ids, greedy)
  print("agreeing weights, 1 MTP depth:", stats)
  _check_mtp_caches(cfg, variables, prompts)
  assert 0.0 < stats["acceptance_rate"] <= 1.0 and stats["steps"] < N
