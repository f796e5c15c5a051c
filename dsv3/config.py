"""The model's hyper-parameters: one frozen dataclass, named as in HF's DeepseekV3Config.

`ModelConfig` is hashable so it can be a static argument of `jax.jit`; `validate()` raises a ConfigError that
names the field and the fix. The HF config.json conversion is dsv3.interop.hf_config; the training config that embeds
this one as its `model` block is dsv3.training.train_config.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Mapping, Optional

# Settings that moved: a config file or command line that still sets the old dotted name is told the new one.
MOVED = {"data.eval_batches": "eval_batches", "data.vocab_size": "model.vocab_size", "model.precision": "precision"}


class ConfigError(ValueError):
  """A configuration value is wrong; the message names the field and the fix."""


def closest_key(key: str, keys, prefix: str = "") -> str:
  """'; did you mean <prefix><k>?' for the k in `keys` closest to `key` (difflib), or '' when none is close.

  A field in MOVED (its dotted path is `prefix` without 'config.', then `key`) names its new place instead."""
  moved = MOVED.get(prefix.removeprefix("config.") + key)
  if moved:
    return f"; it moved: set config.{moved} instead"
  close = difflib.get_close_matches(key, list(keys), n=1)
  return f"; did you mean {prefix}{close[0]}?" if close else ""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432          # dense SwiGLU layers
  moe_intermediate_size: int = 2048       # each routed / shared expert
  num_hidden_layers: int = 61
  first_k_dense_replace: int = 3          # the first k layers are dense, the rest MoE
  num_attention_heads: int = 128
  # MLA
  q_lora_rank: Optional[int] = 1536       # None: a full-rank q_proj (DeepSeek-V2-Lite style)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # MoE
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  scoring_func: str = "sigmoid"
  # MTP
  num_nextn_predict_layers: int = 1
  # RoPE / YaRN. rope_scaling is a tuple of (key, value) pairs so the dataclass stays hashable.
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = (("type", "yarn"), ("factor", 40.0),
                                   ("original_max_position_embeddings", 4096),
                                   ("beta_fast", 32.0), ("beta_slow", 1.0),
                                   ("mscale", 1.0), ("mscale_all_dim", 1.0))
  max_position_embeddings: int = 163840
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int = 0
  eos_token_id: int = 1
  # Numerics and memory (not part of the HF format).
  dtype: str = "float32"                  # compute dtype of activations: float32 | bfloat16
  param_dtype: str = "float32"
  precision: str = "fp32"                 # 'fp32' | 'bf16' | 'fp8' (fp8 = DeepSeek block-scaled GEMMs)
  remat: str = "paper"                    # 'none' | 'paper' (RMSNorm + MLA up-proj) | 'full'
  capacity_factor: float = 0.0            # 0: dropless (DeepSeek-V3). >0: drop tokens over capacity
  ep_buffer_factor: float = 3.5           # expert-parallel buffers = factor x balanced rows; 0: worst case
  ep_node_size: int = 0                   # devices of mesh.expert per node: two-hop dispatch (cross a node
  #                                         boundary once per node, then fan out inside it); 0: flat, one hop
  ep_fp8_dispatch: bool = False           # expert-parallel dispatch rows as FP8 E4M3, 1x128 scales (combine stays)
  grouped_gemm: str = "auto"              # 'auto' | 'ragged_dot' | 'tiled' (flat on CPU) | 'scan' (one tile at
  #                                         a time: no [experts, rows, width] buffer) | 'tokamax' (GPU kernels)
  attention: str = "auto"                 # 'auto' | 'dense' | 'blockwise' | 'cudnn' | 'tokamax' (dsv3/nn/attention.py)
  attention_block: int = 512              # blockwise attention's query/key tile
  scan_layers: bool = True                # False: each layer stack runs unrolled (same params; no scan
                                          # carry/residual stacking, so faster on CPU; compile grows with depth)

  def __post_init__(self):
    # Canonical form: a sorted tuple of pairs (hashable, order-independent), whatever the caller passed.
    if self.rope_scaling is not None:
      items = self.rope_scaling.items() if isinstance(self.rope_scaling, Mapping) else self.rope_scaling
      object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in items)) or None)

  # ----------------------------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  @property
  def rope(self) -> dict:
    return dict(self.rope_scaling or ())

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def validate(self) -> "ModelConfig":
    def need(cond, field, msg):
      if not cond:
        raise ConfigError(f"model.{field}: {msg}")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
              "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
      need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
           f"must be a positive integer, got {getattr(self, f)!r}")
    need(self.kv_lora_rank is not None, "kv_lora_rank", "is required for MLA (DeepSeek-V3 uses 512)")
    need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
         "q_lora_rank", f"must be a positive integer or None, got {self.q_lora_rank!r}")
    need(isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
         "qk_rope_head_dim", f"must be a positive even number (RoPE rotates pairs), got {self.qk_rope_head_dim!r}")
    need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
         f"must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace}")
    if self.num_moe_layers > 0:
      need(self.n_routed_experts > 0, "n_routed_experts", "must be positive when there are MoE layers")
      need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
      need(self.n_group > 0 and self.n_routed_experts % self.n_group == 0, "n_group",
           f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
      need(1 <= self.topk_group <= self.n_group, "topk_group",
           f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
      per_group = self.n_routed_experts // self.n_group
      need(per_group >= 2 or self.n_group == 1, "n_group",
           f"each group needs >= 2 experts (group score = sum of the top-2); got {per_group} per group")
      need(1 <= self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
           f"must be in [1, topk_group * experts_per_group = {self.topk_group * per_group}], "
           f"got {self.num_experts_per_tok}")
      need(self.scoring_func == "sigmoid", "scoring_func", "only 'sigmoid' (DeepSeek-V3) is supported")
    need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(self.dtype in ("float32", "bfloat16"), "dtype", f"must be 'float32' or 'bfloat16', got {self.dtype!r}")
    need(self.param_dtype in ("float32", "bfloat16"), "param_dtype",
         f"must be 'float32' or 'bfloat16', got {self.param_dtype!r}")
    need(self.precision in ("fp32", "bf16", "fp8"), "precision",
         f"must be one of 'fp32', 'bf16', 'fp8', got {self.precision!r}")
    need(self.remat in ("none", "paper", "full"), "remat",
         f"must be one of 'none', 'paper', 'full', got {self.remat!r}")
    need(self.grouped_gemm in ("auto", "ragged_dot", "tiled", "scan", "tokamax"), "grouped_gemm",
         f"must be 'auto', 'ragged_dot', 'tiled', 'scan' or 'tokamax', got {self.grouped_gemm!r}")
    need(self.attention in ("auto", "dense", "blockwise", "cudnn", "tokamax"), "attention",
         f"must be 'auto', 'dense', 'blockwise', 'cudnn' or 'tokamax', got {self.attention!r}")
    need(isinstance(self.scan_layers, bool), "scan_layers", f"must be True or False, got {self.scan_layers!r}")
    need(isinstance(self.attention_block, int) and self.attention_block > 0, "attention_block",
         f"must be a positive integer, got {self.attention_block!r}")
    need(self.capacity_factor >= 0, "capacity_factor", "must be >= 0 (0 = dropless)")
    need(self.ep_buffer_factor >= 0, "ep_buffer_factor", "must be >= 0 (0 = worst-case, dropless buffers)")
    need(isinstance(self.ep_node_size, int) and self.ep_node_size >= 0, "ep_node_size",
         f"must be an integer >= 0 (devices of mesh.expert per node; 0 = flat one-hop dispatch), "
         f"got {self.ep_node_size!r}")
    need(isinstance(self.ep_fp8_dispatch, bool), "ep_fp8_dispatch",
         f"must be True or False, got {self.ep_fp8_dispatch!r}")
    rope = self.rope
    if rope:
      need(rope.get("type", rope.get("rope_type")) == "yarn", "rope_scaling",
           f"only YaRN scaling is supported (type='yarn'), got {rope!r}; set rope_scaling=None for plain RoPE")
      need(float(rope.get("factor", 0)) >= 1, "rope_scaling.factor", "must be >= 1")
      need(int(rope.get("original_max_position_embeddings", 0)) > 0,
           "rope_scaling.original_max_position_embeddings", "must be a positive integer")
    return self

  # ----------------------------------------------------------------------------------------------
  def softmax_scale(self) -> float:
    """1/sqrt(d_qk), times YaRN's mscale^2 correction (DeepSeek's `softmax_scale`)."""
    scale = self.qk_head_dim ** -0.5
    rope = self.rope
    if rope and rope.get("mscale_all_dim"):
      m = yarn_get_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
      scale = scale * m * m
    return scale

  @classmethod
  def from_config_dict(cls, config) -> "ModelConfig":
    """From a training config: its `model` block plus the top-level `precision` (the one owner of it)."""
    m = dict(config["model"])
    valid = sorted({f.name for f in dataclasses.fields(cls)} - {"precision"})
    unknown = sorted(set(m) - set(valid))
    if unknown:
      hint = closest_key(unknown[0], valid, prefix="model.") or f"; valid fields are {valid}"
      raise ConfigError(f"model.{unknown[0]}: unknown field{hint}")
    if m.get("rope_scaling") is not None and not isinstance(m["rope_scaling"], tuple):
      m["rope_scaling"] = tuple(sorted(dict(m["rope_scaling"]).items()))
    if "precision" in config and config["precision"] is not None:
      m["precision"] = config["precision"]
      if config["precision"] in ("bf16", "fp8"):
        # Mixed precision: BF16 activations; FP8 GEMMs take BF16 in and out (the report's recipe).
        m["dtype"] = "bfloat16"
    return cls(**m).validate()


def require_model_config(cfg, where: str) -> ModelConfig:
  """`cfg` itself when it is a ModelConfig; else a TypeError naming `where` and the converter to call.

  The model API (model, generate, plan, hf.save_checkpoint, ...) takes a ModelConfig only; an HF config.json
  dict or a training config is converted once, where it enters (hf.load_checkpoint, the command lines, the
  trainer), not in every function."""
  if isinstance(cfg, ModelConfig):
    return cfg
  if hasattr(cfg, "model") or (isinstance(cfg, Mapping) and "model" in cfg):
    fix = "a training config: convert it with dsv3.config.ModelConfig.from_config_dict(config)"
  elif isinstance(cfg, Mapping):
    fix = "an HF config.json dict: convert it with dsv3.interop.hf_config.from_hf_dict(d)"
  else:
    fix = "build one with dsv3.config.ModelConfig(...) or load it with dsv3.hf.load_checkpoint"
  raise TypeError(f"{where}: expects a dsv3.config.ModelConfig, got {type(cfg).__name__} ({fix})")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def deepseek_v3_671b() -> ModelConfig:
  """The exact published DeepSeek-V3 config (671B total, 37B activated): ModelConfig's defaults, in BF16."""
  return ModelConfig(dtype="bfloat16", precision="bf16").validate()
