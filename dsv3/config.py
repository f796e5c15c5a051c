"""The model's hyper-parameters: one frozen dataclass, named as in HF's DeepseekV3Config.

`ModelConfig` is hashable so it can be a static argument of `jax.jit`. It converts from and to the HF
`config.json` dict (both the legacy `rope_theta` + `rope_scaling` layout and the newer `rope_parameters`
one) and from the `model` block of an ml_collections training config. `validate()` raises errors that
name the offending field and say how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping, Optional

from dsv3.pipeline import schedules


class ConfigError(ValueError):
  """A configuration value is wrong; the message names the field and the fix."""


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
  attention: str = "auto"                 # 'auto' | 'dense' | 'blockwise' | 'cudnn' (dsv3/attention.py)
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
    need(self.attention in ("auto", "dense", "blockwise", "cudnn"), "attention",
         f"must be 'auto', 'dense', 'blockwise' or 'cudnn', got {self.attention!r}")
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

  # ----------------------------------------------------------------------------------------------
  _HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob",
                "routed_scaling_factor", "scoring_func", "num_nextn_predict_layers", "rope_theta",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
                "bos_token_id", "eos_token_id")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From an HF config.json dict (legacy rope_scaling or newer rope_parameters layout)."""
    kw = {}
    for f in cls._HF_FIELDS:
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
    return cls(**kw).validate()

  def to_hf_dict(self, legacy_rope: bool = True) -> dict:
    d = {f: getattr(self, f) for f in self._HF_FIELDS}
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
             num_key_value_heads=self.num_attention_heads, attention_bias=False, attention_dropout=0.0,
             topk_method="noaux_tc", rope_interleave=True, torch_dtype="float32", use_cache=True)
    rope = self.rope
    if legacy_rope:
      d["rope_scaling"] = ({k: v for k, v in rope.items() if k != "type"} | {"type": "yarn", "rope_type": "yarn"}
                           if rope else None)
    else:
      d.pop("rope_theta")
      d["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": self.rope_theta,
                               **{k: v for k, v in rope.items() if k != "type"}}
                              if rope else {"rope_type": "default", "rope_theta": self.rope_theta})
    return d

  @classmethod
  def from_any(cls, cfg) -> "ModelConfig":
    """Accepts a ModelConfig, an HF dict, or a training ConfigDict (uses its `.model` block)."""
    if isinstance(cfg, ModelConfig):
      return cfg
    if hasattr(cfg, "model") and not isinstance(cfg, Mapping):
      return cls.from_config_dict(cfg)
    if isinstance(cfg, Mapping) and "model" in cfg and isinstance(cfg["model"], Mapping):
      return cls.from_config_dict(cfg)
    return cls.from_hf_dict(dict(cfg))

  @classmethod
  def from_config_dict(cls, config) -> "ModelConfig":
    """From a training config: its `model` block plus the top-level `precision`."""
    m = dict(config["model"])
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - names)
    if unknown:
      valid = sorted(names - {"precision"})
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


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def deepseek_v3_671b() -> ModelConfig:
  """The exact published DeepSeek-V3 config (671B total, 37B activated)."""
  return ModelConfig(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                     num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                     norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                     max_position_embeddings=163840, dtype="bfloat16", precision="bf16").validate()


# ---------------------------------------------------------------------------------------------------
# Training configuration (ml_collections). configs/*.py start from this and override.
# ---------------------------------------------------------------------------------------------------
def model_config_dict(cfg: ModelConfig):
  """A ModelConfig as an ml_collections ConfigDict (the `model` block of a training config)."""
  import ml_collections
  d = dataclasses.asdict(cfg)
  d.pop("precision")                      # set at the top level (config.precision)
  d["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  return ml_collections.ConfigDict(d, type_safe=False)


# Metrics that config.keep_best_by may rank checkpoints by (lower is better).
KEEP_BEST_BY = ("val_loss",)


def base_train_config(model: ModelConfig):
  """Every field the trainer reads, with DeepSeek-V3's recipe as the default."""
  import ml_collections
  from dsv3 import data
  c = ml_collections.ConfigDict()
  c.model = model_config_dict(model)
  c.precision = "fp32"                    # 'fp32' | 'bf16' | 'fp8'
  c.seed = 0
  c.num_train_steps = 1000
  c.batch_size = 8                        # global, in sequences
  c.seq_len = 128
  c.grad_accum_steps = 1
  # Optimizer: AdamW(0.9, 0.95, wd 0.1), clip 1.0 (report §4.2).
  c.learning_rate = 3e-4
  c.min_lr_ratio = 0.1
  c.lr_schedule = "deepseek"              # 'deepseek' (warmup, constant, cosine, constant tail) | 'cosine'
  c.warmup_steps = 20
  c.decay_start_frac = 0.5                # deepseek schedule: cosine decay from here ...
  c.decay_end_frac = 0.9                  # ... to min_lr at here, then constant
  c.b1, c.b2, c.weight_decay, c.grad_clip = 0.9, 0.95, 0.1, 1.0
  c.adam_moments_dtype = "float32"        # 'bfloat16' in the FP8 recipe
  # Losses.
  c.mtp_weight = 0.3                      # lambda for the first mtp_weight_switch_frac of training ...
  c.mtp_weight_final = 0.1                # ... then this (report §4.2)
  c.mtp_weight_switch_frac = 0.67
  # Load balance (report §2.1.2).
  c.balance = ml_collections.ConfigDict()
  c.balance.mode = "aux_free"             # 'aux_free' (bias) | 'aux_loss' | 'none'
  c.balance.gamma = 0.001                 # bias update speed ...
  c.balance.gamma_final = 0.0             # ... after gamma_switch_frac of training
  c.balance.gamma_switch_frac = 0.95
  c.balance.sequence_alpha = 1e-4         # complementary sequence-wise balance loss
  c.balance.aux_loss_alpha = 0.001        # only in 'aux_loss' mode (the ablation baseline)
  # EMA of parameters in host memory.
  c.ema_decay = 0.999                     # 0 disables
  # Logging, evaluation, checkpoints.
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_batches = 4
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  # Best checkpoints: with keep_best_by='val_loss', the keep_best checkpoints with the lowest val_loss are kept
  # besides the latest keep_checkpoints ('' keeps by recency only). A checkpoint carries the val_loss of the
  # evaluation at its own step, so eval_every_steps must divide checkpoint_every_steps (the last step always
  # evaluates); one saved without an evaluation (on SIGTERM) is kept by recency only.
  c.keep_best_by = ""                     # '' | 'val_loss'
  c.keep_best = 1
  c.init_from = ""                        # HF checkpoint dir or orbax dir; used when the workdir is empty
  # Divergence guard: a step whose loss, gradient norm or update is non-finite, or whose update norm
  # exceeds max_update_ratio x the parameter norm, stops the run before any later checkpoint (0: no ratio check).
  c.nan_guard = ml_collections.ConfigDict(dict(max_update_ratio=1.0))
  # Profiling: a jax.profiler trace of steps start_step .. start_step+num_steps-1 (numbered as in
  # metrics.jsonl: step 1 is the first) in workdir/profile (TensorBoard's profile plugin, Perfetto). 0: off.
  c.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
  # Parallelism.
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, pipeline=1))
  c.pipeline = ml_collections.ConfigDict(dict(schedule="none", microbatches=1))
  c.data = data.default_data_config()
  return c


def closest_key(key: str, keys, prefix: str = "") -> str:
  """'; did you mean <prefix><k>?' for the k in `keys` closest to `key` (difflib), or '' when none is close."""
  close = difflib.get_close_matches(key, list(keys), n=1)
  return f"; did you mean {prefix}{close[0]}?" if close else ""


def dotted_keys(c, prefix: str = "") -> list:
  """Every field of a (nested) ConfigDict / mapping as a dotted path, blocks included: ['mesh', 'mesh.data']."""
  out = []
  for k in c.keys():
    out.append(prefix + str(k))
    v = c[k]
    if hasattr(v, "keys") and callable(v.keys):
      out += dotted_keys(v, f"{prefix}{k}.")
  return out


def validate_train_config(c) -> None:
  """Checks the training config before anything expensive; errors name the field and the fix.

  Covers unknown fields (naming the closest valid one), every value's type and range, seq_len against
  model.max_position_embeddings, the mesh against the batch and the experts, the model block
  (ModelConfig.validate) and the data block (data.validate_data_config).
  """
  def need(cond, field, msg):
    if not cond:
      raise ConfigError(f"config.{field}: {msg}")

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  def number(field, lo, hi=None, lo_open=False, hi_open=False, hint=""):
    """A real number in [lo, hi] (open ends where asked); `hint` says what the value means."""
    node = c
    for part in field.split("."):
      node = node[part]
    v = node
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
      raise ConfigError(f"config.{field}: must be a number, got {v!r}")
    ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    rng = (f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}" if hi is not None
           else f"{'>' if lo_open else '>='} {lo}")
    need(ok, field, f"must be {'in ' if hi is not None else ''}{rng}{hint}, got {v!r}")

  base = base_train_config(ModelConfig())
  for block in ("", "balance", "mesh", "pipeline"):
    given, known = (c, base) if not block else (c[block], base[block])
    prefix = f"{block}." if block else ""
    for k in sorted(given.keys()):
      need(k in known, prefix + k,
           f"unknown field{closest_key(k, known.keys(), prefix=f'config.{prefix}')}")
  for f in ("num_train_steps", "batch_size", "seq_len", "log_every_steps", "checkpoint_every_steps",
            "grad_accum_steps", "eval_every_steps", "keep_checkpoints"):
    need(is_int(c[f]) and c[f] > 0, f, f"must be a positive integer, got {c[f]!r}"
         + ("; keep at least 1 so the final checkpoint survives" if f == "keep_checkpoints" else ""))
  need(is_int(c.seed), "seed", f"must be an integer, got {c.seed!r}")
  need(is_int(c.eval_batches) and c.eval_batches >= 0, "eval_batches",
       f"must be an integer >= 0 (0 = every validation batch), got {c.eval_batches!r}")
  need(is_int(c.warmup_steps) and c.warmup_steps >= 0, "warmup_steps",
       f"must be an integer >= 0, got {c.warmup_steps!r}")
  max_pos = c.model.max_position_embeddings
  need(c.seq_len <= max_pos, "seq_len",
       f"{c.seq_len} exceeds config.model.max_position_embeddings={max_pos}; lower config.seq_len to "
       f"<= {max_pos} or raise config.model.max_position_embeddings")
  number("learning_rate", 0, lo_open=True)
  number("min_lr_ratio", 0, 1)
  need(c.lr_schedule in ("deepseek", "cosine"), "lr_schedule",
       f"must be 'deepseek' or 'cosine', got {c.lr_schedule!r}")
  number("decay_start_frac", 0, 1)
  number("decay_end_frac", 0, 1)
  need(c.decay_start_frac <= c.decay_end_frac, "decay_start_frac",
       f"need 0 <= decay_start_frac <= decay_end_frac <= 1, got {c.decay_start_frac} > {c.decay_end_frac}")
  number("b1", 0, 1, hi_open=True, hint=" (Adam's first-moment decay, 0.9)")
  number("b2", 0, 1, hi_open=True, hint=" (Adam's second-moment decay, 0.95)")
  number("weight_decay", 0, hint=" (0 disables it)")
  number("grad_clip", 0, hint=" (0 disables clipping)")
  number("mtp_weight", 0, 1, hint=" (the MTP loss weight lambda, 0.3 in the report)")
  number("mtp_weight_final", 0, 1, hint=" (the MTP loss weight lambda, 0.1 in the report)")
  number("mtp_weight_switch_frac", 0, 1, hint=" (the share of training before mtp_weight_final)")
  number("ema_decay", 0, 1, hi_open=True, hint=" (0 disables the EMA)")
  need(c.precision in ("fp32", "bf16", "fp8"), "precision", f"must be 'fp32', 'bf16' or 'fp8', got {c.precision!r}")
  need(c.adam_moments_dtype in ("float32", "bfloat16"), "adam_moments_dtype",
       f"must be 'float32' or 'bfloat16', got {c.adam_moments_dtype!r}")
  need(isinstance(c.init_from, str), "init_from",
       f"must be a path string (an HF or orbax checkpoint dir) or '' for none, got {c.init_from!r}")
  need(c.balance.mode in ("aux_free", "aux_loss", "none"), "balance.mode",
       f"must be 'aux_free', 'aux_loss' or 'none', got {c.balance.mode!r}")
  number("balance.gamma", 0, hint=" (the bias update speed, 0.001)")
  number("balance.gamma_final", 0, hint=" (0 in the report)")
  number("balance.gamma_switch_frac", 0, 1, hint=" (the share of training before gamma_final)")
  number("balance.sequence_alpha", 0, hint=" (0 disables the sequence-wise balance loss)")
  number("balance.aux_loss_alpha", 0)
  if "nan_guard" in c:
    number("nan_guard.max_update_ratio", 0, hint=" (0 disables the update-size check)")
  if "keep_best_by" in c:
    need(c.keep_best_by in ("",) + KEEP_BEST_BY, "keep_best_by",
         f"must be '' (keep by recency only) or one of {', '.join(KEEP_BEST_BY)}, got {c.keep_best_by!r}")
    need(is_int(c.keep_best) and c.keep_best >= (1 if c.keep_best_by else 0), "keep_best",
         f"must be an integer >= {1 if c.keep_best_by else 0}"
         + (f" with keep_best_by={c.keep_best_by!r} (how many best checkpoints to keep)" if c.keep_best_by else "")
         + f", got {c.keep_best!r}")
    need(not c.keep_best_by or c.checkpoint_every_steps % c.eval_every_steps == 0, "eval_every_steps",
         f"{c.eval_every_steps} must divide checkpoint_every_steps={c.checkpoint_every_steps} with "
         f"keep_best_by={c.keep_best_by!r}: a checkpoint is ranked by the evaluation at its own step; set "
         f"--config.eval_every_steps to a divisor of {c.checkpoint_every_steps}")
  if "profile" in c:
    for k in sorted(c.profile.keys()):
      need(k in base.profile, f"profile.{k}",
           f"unknown field{closest_key(k, base.profile.keys(), prefix='config.profile.')}")
    need(is_int(c.profile.start_step) and c.profile.start_step >= 1, "profile.start_step",
         f"must be an integer >= 1 (the first traced step; step 1 includes compilation), got "
         f"{c.profile.start_step!r}")
    need(is_int(c.profile.num_steps) and c.profile.num_steps >= 0, "profile.num_steps",
         f"must be an integer >= 0 (0: no trace), got {c.profile.num_steps!r}")
    need(c.profile.num_steps == 0 or c.profile.start_step <= c.num_train_steps, "profile.start_step",
         f"{c.profile.start_step} is after the last step (num_train_steps={c.num_train_steps}), so nothing would be "
         f"traced; lower it or set --config.profile.num_steps=0")
  for f in ("data", "expert", "pipeline"):
    need(is_int(c.mesh[f]) and c.mesh[f] >= 1, f"mesh.{f}", f"must be an integer >= 1, got {c.mesh[f]!r}")
  experts, moe_layers = c.model.n_routed_experts, c.model.num_hidden_layers - c.model.first_k_dense_replace
  if moe_layers > 0 and c.mesh.expert > 1:
    need(is_int(experts) and experts % c.mesh.expert == 0, "mesh.expert",
         f"model.n_routed_experts={experts} must be divisible by mesh.expert={c.mesh.expert}; pick a divisor "
         f"of {experts}")
  need(c.pipeline.schedule in ("none",) + schedules.NAMES, "pipeline.schedule",
       f"must be one of none, {', '.join(schedules.NAMES)}; got {c.pipeline.schedule!r}")
  need(c.mesh.pipeline == 1 or c.pipeline.schedule != "none", "pipeline.schedule",
       f"mesh.pipeline={c.mesh.pipeline} needs a schedule: set --config.pipeline.schedule=dualpipe (or 1f1b, ...)")
  need(is_int(c.pipeline.microbatches) and c.pipeline.microbatches >= 1, "pipeline.microbatches",
       f"must be an integer >= 1, got {c.pipeline.microbatches!r}")
  shards = c.mesh.data * c.mesh.expert
  need(c.batch_size % (shards * c.grad_accum_steps) == 0, "batch_size",
       f"{c.batch_size} must be divisible by mesh.data*mesh.expert*grad_accum_steps = "
       f"{shards}*{c.grad_accum_steps}; change batch_size or the mesh")
  if c.mesh.pipeline > 1:
    need(c.batch_size % (c.pipeline.microbatches * shards) == 0, "pipeline.microbatches",
         f"batch_size={c.batch_size} must split into {c.pipeline.microbatches} micro-batches divisible by "
         f"mesh.data*mesh.expert={shards}")
    # The schedule's own rules (DualPipe's even micro-batch count, ...) live with the schedules.
    try:
      schedules.make(c.pipeline.schedule, c.mesh.pipeline, c.pipeline.microbatches)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    stages = schedules.num_stages(c.pipeline.schedule, c.mesh.pipeline)
    need(c.model.num_hidden_layers >= stages, "mesh.pipeline",
         f"model.num_hidden_layers={c.model.num_hidden_layers} cannot be cut into {stages} pipeline stages "
         f"(schedule {c.pipeline.schedule!r}); every stage needs a layer: lower mesh.pipeline")
  cfg = ModelConfig.from_config_dict(c)
  from dsv3 import data  # pylint: disable=g-import-not-at-top  (data imports this module)
  data.validate_data_config(c.data, model_vocab_size=cfg.vocab_size)
