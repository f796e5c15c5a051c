"""dsv3 against transformers' DeepseekV3ForCausalLM (PyTorch CPU, fp32), MaxText-style: whole-model logits
on random tiny configs, then layer by layer (attention, router choices, MoE output) to localise a mismatch.

The reference model is built by transformers from a checkpoint that dsv3 exported, so these tests also prove
that `hf.save_checkpoint` writes what AutoModelForCausalLM loads.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_model  # noqa: E402

from dsv3 import hf, model  # noqa: E402


def tiny(**kw):
  """The parity model: three layers, init range 0.2 (activations of order 1), YaRN past 16 tokens."""
  return tiny_model.config(**{**dict(num_hidden_layers=3, initializer_range=0.2, rope_scaling=tiny_model.yarn(16)),
                              **kw})


CONFIGS = {
    "yarn_qlora_groups": tiny(),
    "no_qlora_no_yarn": tiny(q_lora_rank=None, rope_scaling=None, n_group=2, topk_group=1),
    "all_moe_one_group": tiny(first_k_dense_replace=0, n_group=1, topk_group=1, num_experts_per_tok=3,
                              norm_topk_prob=False, routed_scaling_factor=1.0),
    "dense_heavy_yarn_mscale": tiny(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, n_group=8,
                                    topk_group=3, rope_scaling=dict(tiny_model.yarn(16), mscale=0.707)),
}


def random_variables(cfg, seed):
  """model.init plus noise on every leaf: norms != 1 and a nonzero correction bias, so nothing is trivially equal."""
  v = model.init(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  variables = random_variables(cfg, seed=len(request.param))
  path = str(tmp_path_factory.mktemp(request.param) / "ckpt")
  hf.save_checkpoint(cfg, variables, path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  return cfg, variables, ref, path


def tokens(seed=0, shape=(2, 12)):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, 97), np.int64)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-30))


def test_logits_match_transformers(pair):
  cfg, variables, ref, _ = pair
  tok = tokens()
  with torch.no_grad():
    expected = ref(torch.tensor(tok)).logits.numpy()
  got = model.forward(cfg, variables, tok)
  assert got.dtype == jnp.float32 and got.shape == expected.shape
  assert rel_err(got, expected) <= 1e-4


def test_load_roundtrip_is_exact(pair):
  cfg, variables, _, path = pair
  cfg2, variables2 = hf.load_checkpoint(path)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, variables2)


def test_greedy_generation_matches_transformers(pair):
  cfg, variables, ref, _ = pair
  prompt = tokens(seed=3, shape=(2, 5))
  with torch.no_grad():
    expected = ref.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0).numpy()
  seq = prompt
  for _ in range(6):                                  # plain full-sequence argmax: the definition of greedy
    seq = np.concatenate([seq, np.asarray(model.forward(cfg, variables, seq)[:, -1].argmax(-1))[:, None]], 1)
  np.testing.assert_array_equal(seq, expected)


# ---------------------------------------------------------------------------------------------------
# Layer by layer.
# ---------------------------------------------------------------------------------------------------
def _layer_params(cfg, variables, i):
  moe = i >= cfg.first_k_dense_replace
  stack, j = ("moe_layers", i - cfg.first_k_dense_replace) if moe else ("dense_layers", i)
  pick = lambda tree: jax.tree.map(lambda a: a[j], tree[stack])
  out = {"params": pick(variables["params"])}
  if moe:
    out["routing"] = pick(variables["routing"])
  return out, moe


def test_layer_by_layer(pair):
  """Each decoder layer, fed the reference's own input, gives the reference's output; MoE router picks agree."""
  from dsv3.nn.layers import rope_cos_sin
  from dsv3.model import Block
  from dsv3.nn.moe import MoE, route
  cfg, variables, ref, _ = pair
  tok = tokens(seed=1)
  with torch.no_grad():
    out = ref(torch.tensor(tok), output_hidden_states=True)
  hidden = [h.numpy() for h in out.hidden_states]
  positions = np.broadcast_to(np.arange(tok.shape[1]), tok.shape)
  cos, sin = rope_cos_sin(cfg, jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(variables["params"]["embed_tokens"]["embedding"])[tok], hidden[0], rtol=0,
                             atol=1e-6)
  for i in range(cfg.num_hidden_layers - 1):           # the last entry of hidden_states is after the final norm
    lv, moe = _layer_params(cfg, variables, i)
    got, _ = Block(cfg, moe).apply(lv, jnp.asarray(hidden[i]), None, cos, sin, 0)
    assert rel_err(got, hidden[i + 1]) <= 1e-4, f"layer {i} ({'MoE' if moe else 'dense'}) differs"

    layer = ref.model.layers[i]
    with torch.no_grad():
      h_norm = layer.post_attention_layernorm(torch.tensor(hidden[i]))
    if moe:
      x = h_norm.reshape(-1, cfg.hidden_size)
      with torch.no_grad():
        _, ref_w, ref_idx = layer.mlp.gate(x)
        ref_moe = layer.mlp(h_norm).numpy()
      mlp = lv["params"]["mlp"]
      idx, w, _ = route(cfg, jnp.asarray(x.numpy()), mlp["gate"], lv["routing"]["mlp"]["e_score_correction_bias"])
      order_ref, order = np.argsort(ref_idx.numpy(), 1), np.argsort(np.asarray(idx), 1)
      np.testing.assert_array_equal(np.take_along_axis(ref_idx.numpy(), order_ref, 1),
                                    np.take_along_axis(np.asarray(idx), order, 1), err_msg=f"router layer {i}")
      np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                                 np.take_along_axis(ref_w.numpy(), order_ref, 1), rtol=1e-5, atol=1e-6)
      got_moe, _ = MoE(cfg).apply({"params": mlp, "routing": lv["routing"]["mlp"]}, jnp.asarray(h_norm.numpy()))
      assert rel_err(got_moe, ref_moe) <= 1e-4, f"MoE output layer {i}"


def test_attention_alone(pair):
  from dsv3.nn.layers import rope_cos_sin
  from dsv3.nn.mla import MLA
  cfg, variables, ref, _ = pair
  x = np.asarray(jax.random.normal(jax.random.key(7), (2, 9, cfg.hidden_size)), np.float32)
  T = x.shape[1]
  positions = torch.arange(T)[None].expand(2, T)
  layer = ref.model.layers[0]
  mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(2, 1, T, T)
  with torch.no_grad():
    pe = ref.model.rotary_emb(torch.tensor(x), positions)
    expected, _ = layer.self_attn(torch.tensor(x), position_embeddings=pe, attention_mask=mask)
  lv, _ = _layer_params(cfg, variables, 0)
  cos, sin = rope_cos_sin(cfg, jnp.asarray(positions.numpy()))
  got, _ = MLA(cfg).apply({"params": lv["params"]["self_attn"]}, jnp.asarray(x), cos, sin)
  assert rel_err(got, expected.numpy()) <= 1e-4


# ---------------------------------------------------------------------------------------------------
# Formats: rope_parameters layout, sharded safetensors, FP8 with weight_scale_inv, bad checkpoints.
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = CONFIGS["yarn_qlora_groups"]
  variables = random_variables(cfg, seed=11)
  path = str(tmp_path_factory.mktemp("fmt") / "ckpt")
  hf.save_checkpoint(cfg, variables, path)
  return cfg, variables, path


def _copy(src, dst, transform=None):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  if transform:
    transform(dst)
  return dst


def test_newer_rope_parameters_layout(saved, tmp_path):
  cfg, variables, path = saved

  def rewrite(d):
    c = json.load(open(os.path.join(d, "config.json")))
    c.pop("rope_scaling")
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": c.pop("rope_theta"), **dict(cfg.rope)}
    c["rope_parameters"].pop("type")
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
  cfg2, _ = hf.load_checkpoint(_copy(path, str(tmp_path / "new"), rewrite))
  assert cfg2 == cfg


def test_sharded_checkpoint(saved, tmp_path):
  cfg, variables, _ = saved
  out = str(tmp_path / "sharded")
  hf.save_checkpoint(cfg, variables, out, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 3
  _, v2 = hf.load_checkpoint(out)
  tok = tokens()
  np.testing.assert_array_equal(model.forward(cfg, variables, tok), model.forward(cfg, v2, tok))


def test_fp8_block_scaled_checkpoint(tmp_path):
  """DeepSeek's official format: e4m3 weights + one float32 scale_inv per 128x128 block, edge blocks partial."""
  from safetensors.numpy import load_file
  from safetensors.flax import save_file
  cfg = tiny(**tiny_model.FP8_EDGES, num_hidden_layers=2)
  variables = random_variables(cfg, seed=5)
  src = str(tmp_path / "bf")
  hf.save_checkpoint(cfg, variables, src)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  expected, quantized = {}, {}
  for name, w in tensors.items():
    if w.ndim == 2 and "proj" in name and "embed" not in name:
      rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
      pad = np.zeros((rows * 128, cols * 128), np.float32)
      pad[: w.shape[0], : w.shape[1]] = w
      amax = np.abs(pad.reshape(rows, 128, cols, 128)).max((1, 3))
      scale = np.maximum(amax, 1e-12) / 448.0
      q = jnp.asarray(w / np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]).astype(
          jnp.float8_e4m3fn)
      quantized[name], quantized[name + "_scale_inv"] = q, jnp.asarray(scale, jnp.float32)
      expected[name] = np.asarray(q, np.float32) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0],
                                                                                           : w.shape[1]]
    else:
      quantized[name] = jnp.asarray(w)
  assert any(v.shape[0] > 128 for v in expected.values()) and any(v.shape[1] % 128 for v in expected.values())
  dst = str(tmp_path / "fp8")
  os.makedirs(dst)
  save_file(quantized, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  cfg2, v2 = hf.load_checkpoint(dst)
  q_b = np.asarray(v2["params"]["dense_layers"]["self_attn"]["q_b_proj"]["kernel"][0])
  assert q_b.dtype == np.float32
  np.testing.assert_allclose(q_b, expected["model.layers.0.self_attn.q_b_proj.weight"].T, rtol=1e-6)
  _, v_bf16 = hf.load_checkpoint(dst, dtype=jnp.bfloat16)
  assert v_bf16["params"]["dense_layers"]["self_attn"]["q_b_proj"]["kernel"].dtype == jnp.bfloat16


def test_missing_tensor_is_named(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, _, path = saved
  dst = _copy(path, str(tmp_path / "missing"))
  t = load_file(os.path.join(dst, "model.safetensors"))
  del t["model.layers.1.mlp.experts.3.up_proj.weight"]
  save_file(t, os.path.join(dst, "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
    hf.load_checkpoint(dst)


def test_misshaped_tensor_is_named(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, _, path = saved
  dst = _copy(path, str(tmp_path / "bad"))
  t = load_file(os.path.join(dst, "model.safetensors"))
  t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :-1]
  save_file(t, os.path.join(dst, "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=r"o_proj\.weight.*shape"):
    hf.load_checkpoint(dst)


def test_not_a_checkpoint_dir(tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json"):
    hf.load_checkpoint(str(tmp_path))


def test_save_over_existing_checkpoint_replaces_it(saved, tmp_path):
  cfg, variables, _ = saved
  out = str(tmp_path / "ckpt")
  hf.save_checkpoint(cfg, variables, out)
  bumped = jax.tree.map(lambda a: a + 1.0, variables)
  hf.save_checkpoint(cfg, bumped, out, overwrite=True)     # a previous export is replaced only when asked
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]          # no .tmp / .old left behind
  _, loaded = hf.load_checkpoint(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bumped, loaded)
