"""ModelConfig <-> HF `config.json` dict (DeepseekV3Config), both the legacy `rope_theta` + `rope_scaling`
layout and the newer `rope_parameters` one. The model API takes a ModelConfig: an HF dict is converted here,
once, where it enters (dsv3.hf.load_checkpoint, the command lines).
"""
from __future__ import annotations

from typing import Any, Mapping

from dsv3.config import ConfigError, ModelConfig

# ModelConfig fields that are HF config.json keys of the same name and meaning.
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "q_lora_rank",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
             "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob",
             "routed_scaling_factor", "scoring_func", "num_nextn_predict_layers", "rope_theta",
             "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
             "bos_token_id", "eos_token_id")


def from_hf_dict(d: Mapping[str, Any], **overrides) -> ModelConfig:
  """From an HF config.json dict (legacy rope_scaling or newer rope_parameters layout)."""
  kw = {}
  for f in HF_FIELDS:
    if f in d and d[f] is not None:
      kw[f] = d[f]
  if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
    kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
  if d.get("q_lora_rank", 0) is None:
    kw["q_lora_rank"] = None
  if isinstance(kw.get("eos_token_id"), (list, tuple)):
    kw["eos_token_id"] = int(kw["eos_token_id"][0])
  rope = None
  if d.get("rope_parameters"):                     # newer layout: theta lives inside
    rp = dict(d["rope_parameters"])
    if "rope_theta" in rp:
      kw["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.get("rope_type", rp.get("type", "default"))
    rope = None if rtype == "default" else rp
  elif d.get("rope_scaling"):
    rope = dict(d["rope_scaling"])
  if rope is not None:
    rope = dict(rope)
    rtype = rope.pop("rope_type", None) or rope.pop("type", None)
    rope.pop("type", None)
    if rtype not in ("yarn", "deepseek_yarn"):
      raise ConfigError(f"rope_scaling: type {rtype!r} is not supported; dsv3 implements YaRN "
                        f"(DeepSeek-V3) or plain RoPE (no rope_scaling)")
    rope["type"] = "yarn"
    kw["rope_scaling"] = tuple(sorted((k, v) for k, v in rope.items() if v is not None))
  else:
    kw["rope_scaling"] = None
  kw.update(overrides)
  return ModelConfig(**kw).validate()


def to_hf_dict(cfg: ModelConfig, legacy_rope: bool = True) -> dict:
  """The HF config.json dict transformers' DeepseekV3 reads (YaRN as rope_scaling, or as rope_parameters)."""
  d = {f: getattr(cfg, f) for f in HF_FIELDS}
  d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
           num_key_value_heads=cfg.num_attention_heads, attention_bias=False, attention_dropout=0.0,
           topk_method="noaux_tc", rope_interleave=True, torch_dtype="float32", use_cache=True)
  rope = cfg.rope
  if legacy_rope:
    d["rope_scaling"] = ({k: v for k, v in rope.items() if k != "type"} | {"type": "yarn", "rope_type": "yarn"}
                         if rope else None)
  else:
    d.pop("rope_theta")
    d["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                             **{k: v for k, v in rope.items() if k != "type"}}
                            if rope else {"rope_type": "default", "rope_theta": cfg.rope_theta})
  return d
