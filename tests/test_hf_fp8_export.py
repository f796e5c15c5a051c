"""hf.save_checkpoint(..., dtype="fp8"): DeepSeek-V3's serving format (e4m3 + 128x128 weight_scale_inv).

The expected values are an independent quantise -> dequantise of the saved weights (torch, block by block,
amax/448). Read back by dsv3's loader, and by transformers' DeepseekV3ForCausalLM: its own FP8 loader
(needs accelerate; on CPU it dequantises) and, always, a torch model built from the dequantised state dict.
"""
import json
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import tiny_model  # noqa: E402

from dsv3 import hf, model  # noqa: E402
from dsv3.interop import safetensors_io as sio  # noqa: E402

# Every Linear dim either <= 128 or a multiple of 128: transformers' CPU dequantiser derives the block
# size from the scale grid (rows // scale_rows), so it cannot read partial edge blocks of multi-block dims.
ALIGNED = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=2, q_lora_rank=128, kv_lora_rank=112, qk_nope_head_dim=48, qk_rope_head_dim=16,
               v_head_dim=16)
EDGES = dict(tiny_model.FP8_EDGES, num_hidden_layers=3)
QUANTISED = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                       r"o_proj)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj|eh_proj)\.weight$")


def random_variables(cfg, seed):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


def dequantised_reference(w):
  """Independent of dsv3 (torch): per 128x128 block scale = amax/448, q = e4m3(w / scale), back = q * scale."""
  w = torch.tensor(np.asarray(w, np.float32))
  out = torch.empty_like(w)
  for r in range(0, w.shape[0], 128):
    for c in range(0, w.shape[1], 128):
      block = w[r: r + 128, c: c + 128]
      scale = block.abs().max() / 448.0
      out[r: r + 128, c: c + 128] = (block / scale).to(torch.float8_e4m3fn).float() * scale
  return out.numpy()


def export(tmp_path, kind, seed=0):
  cfg = tiny_model.config(**(ALIGNED if kind == "aligned" else EDGES))
  variables = random_variables(cfg, seed)
  hf.save_checkpoint(cfg, variables, str(tmp_path / "plain"))
  hf.save_checkpoint(cfg, variables, str(tmp_path / "fp8"), dtype="fp8", max_shard_bytes=300_000)
  return cfg, str(tmp_path / "plain"), str(tmp_path / "fp8")


def reader(path):
  return sio.Reader(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.mark.parametrize("kind", ["aligned", "edges"])
def test_fp8_export_format_and_roundtrip(tmp_path, kind):
  cfg, plain, fp8 = export(tmp_path, kind)
  conf = json.load(open(os.path.join(fp8, "config.json")))
  assert conf["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
  assert os.path.exists(os.path.join(fp8, "model.safetensors.index.json"))
  src, q = reader(plain), reader(fp8)
  weights = [n for n in q.names() if not n.endswith("_scale_inv")]
  assert sorted(weights) == src.names()
  for name in weights:
    if QUANTISED.match(name):
      assert q.stored_dtype(name) == "F8_E4M3" and q.stored_dtype(name + "_scale_inv") == "F32", name
      rows, cols = q.shape(name)
      assert q.shape(name + "_scale_inv") == (-(-rows // 128), -(-cols // 128))
      np.testing.assert_allclose(q.read(name), dequantised_reference(src.read(name)), rtol=1e-6, atol=0,
                                 err_msg=name)
    else:   # embedding, lm head, norms, router gate, correction bias, MTP enorm/hnorm/shared head/embed
      assert q.stored_dtype(name) == "F32" and name + "_scale_inv" not in q, name
      np.testing.assert_array_equal(q.read(name), src.read(name))
  for name in ("lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.3.shared_head.head.weight",
               "model.layers.3.embed_tokens.weight", "model.layers.3.enorm.weight"):
    assert q.stored_dtype(name) == "F32", name
  for name in ("model.layers.3.eh_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
               "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"):
    assert q.stored_dtype(name) == "F8_E4M3", name
  # dsv3's loader: every leaf is the dequantised weight (or the unquantised one), float32.
  cfg2, loaded = hf.load_checkpoint(fp8)
  _, original = hf.load_checkpoint(plain)
  assert cfg2 == cfg
  kernel = lambda v: np.asarray(v["params"]["moe_layers"]["mlp"]["experts_gate_proj"][0, 3])
  np.testing.assert_allclose(kernel(loaded), dequantised_reference(kernel(original).T).T, rtol=1e-6, atol=0)
  np.testing.assert_array_equal(np.asarray(loaded["params"]["lm_head"]), np.asarray(original["params"]["lm_head"]))


def _logits_check(cfg, fp8_path, ref):
  _, variables = hf.load_checkpoint(fp8_path)
  tok = np.asarray(jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size), np.int64)
  with torch.no_grad():
    expected = ref(torch.tensor(tok)).logits.float().numpy()
  got = np.asarray(model.forward(cfg, variables, tok))
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_transformers_fp8_loader_matches_dsv3(tmp_path):
  """transformers' own FP8 path (FineGrainedFP8: on CPU it dequantises at load) on the exported dir."""
  pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate")
  cfg, _, fp8 = export(tmp_path, "aligned", seed=1)
  ref = transformers.AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
  assert ref.model.layers[1].mlp.experts is not None
  _logits_check(cfg, fp8, ref)


def test_transformers_on_dequantised_state_dict_matches_dsv3(tmp_path):
  """The same comparison without transformers' quantizer: its model built from config.json (minus
  quantization_config) and the state dict dequantised here, w = q * scale_inv per block."""
  cfg, _, fp8 = export(tmp_path, "aligned", seed=2)
  conf = json.load(open(os.path.join(fp8, "config.json")))
  conf.pop("quantization_config")
  q = reader(fp8)
  state = {}
  for name in q.names():
    if name.endswith("_scale_inv"):
      continue
    w = q.raw(name).astype(np.float32)
    if name + "_scale_inv" in q:
      s = q.raw(name + "_scale_inv")
      w = w * np.repeat(np.repeat(s, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
    state[name] = torch.tensor(w)
  # transformers' key conversions (stacked experts, the MTP layer dropped) happen in from_pretrained.
  hf_dir = str(tmp_path / "dequantised")
  os.makedirs(hf_dir)
  save_file(state, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
  json.dump(conf, open(os.path.join(hf_dir, "config.json"), "w"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  _logits_check(cfg, fp8, ref)
