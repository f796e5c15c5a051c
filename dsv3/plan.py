"""The planner: parameter counts, KV cache, training FLOPs and per-device memory of a training config.

Everything is read off the real model: `jax.eval_shape(model.init, ...)` gives every variable's shape and
dtype without allocating (the 671B model builds in well under a second on CPU), and
`jax.eval_shape(model.init_cache, ...)` gives the latent KV cache. Nothing here restates the architecture;
a change to dsv3/model.py shows up in the plan.

Counting conventions (they reproduce the published DeepSeek-V3 numbers):
  total_params       the main model's 'params' (MTP excluded). The 'routing' collection (the aux-loss-free
                     correction biases) is balancer state, not a parameter: `routing_state` reports it.
  activated_params   per token: every non-routed-expert parameter (embedding and head included, shared
                     experts included) + num_experts_per_tok of the n_routed_experts routed experts per MoE
                     layer.
  mtp_params         the MTP modules; they share the main model's embedding and head, so nothing is counted
                     twice.
  flops_per_token    training (forward + backward) FLOPs of the main model for one token of a seq_len
                     sequence:  6 * activated matmul params  +  3 * h * (d_qk + d_v) * seq_len * layers.
                     Matmul params are activated params minus the embedding lookup and norm scales (plus the
                     embedding again when the head is tied). Attention: QK^T and PV cost 2*h*(d_qk + d_v)
                     FLOPs per visible key in the forward, a causal token sees seq_len/2 keys on average,
                     and backward costs twice the forward. `mtp_flops_per_token` is the same for the MTP
                     modules, the shared head's GEMM included (the MTP logits are a second head GEMM).

Memory per device for the mesh (data, expert, pipeline), devices = data * expert * pipeline:
  * routed experts are sharded over `expert`; everything else is replicated over data and expert;
  * layers are split into contiguous, as-equal-as-possible pipeline stages (first stages take the
    remainder); the embedding sits on the first stage, the final norm, head and MTP modules on the last.
    Rank r holds stage r (1F1B, ZB1P, GPipe), stages r and P-1-r under DualPipe (two copies of the
    parameters), stages r and 2P-1-r under DualPipeV. The plan reports the rank with the most bytes;
  * grads are FP32 (DeepSeek accumulates in FP32);
  * optimizer states (ZeRO-1) are sharded over every axis the parameter is replicated on: data * expert for
    non-expert parameters (the expert axis carries different batch rows too), data for routed experts.
    AdamW keeps two moments in `adam_moments_dtype` (BF16 in the FP8 recipe), plus an FP32 master copy when
    the stored parameters are narrower than FP32 (otherwise the parameters are the master weights).

Usage:
  python -m dsv3.plan --config=configs/deepseek_v3.py            # a table
  python -m dsv3.plan --config=configs/deepseek_v3.py --json     # one JSON object
  python -m dsv3.plan --compare_kv                               # MLA vs GQA KV cache (report Table)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dsv3 import attention as attn_lib, cli, expert_parallel as ep_lib, layout, model, overlap, tiled_gemm
from dsv3.config import ConfigError, ModelConfig, deepseek_v3_671b
from dsv3.layers import KEEP
from dsv3.pipeline import schedules


# ---------------------------------------------------------------------------------------------------
# GQA baselines for the KV-cache comparison (published configs; only what the cache depends on).
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GQAConfig:
  name: str
  num_layers: int
  num_kv_heads: int
  head_dim: int

  def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
    """K and V of every KV head in every layer (BF16 by default)."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element


QWEN2_5_72B = GQAConfig("Qwen2.5-72B", num_layers=80, num_kv_heads=8, head_dim=128)
LLAMA3_1_405B = GQAConfig("LLaMA-3.1-405B", num_layers=126, num_kv_heads=8, head_dim=128)
GQA_BASELINES = (QWEN2_5_72B, LLAMA3_1_405B)


# ---------------------------------------------------------------------------------------------------
# The abstract model.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
  """One variable of the model, described per layer."""
  path: str
  group: str          # 'embed' | 'dense' | 'moe' | 'head' (final norm, lm_head) | 'mtp'
  layers: int         # length of the stacked layer axis (1 when not stacked)
  size: int           # elements per layer
  dtype: str
  routed: bool        # a routed-expert weight [E, ...]: sharded over mesh.expert, k of E active per token
  matmul: bool        # multiplies activations (counts in FLOPs); embedding lookups and norm scales do not
  trainable: bool     # 'params'; the 'routing' biases are state (no grad, no optimizer)

  @property
  def total(self) -> int:
    return self.layers * self.size


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


# Top-level variable names -> planner groups; anything else (final norm, lm_head, ...) sits with the head.
_GROUPS = {"embed_tokens": "embed", layout.DENSE_STACK: "dense", layout.MOE_STACK: "moe"}


def _group(top: str) -> str:
  return "mtp" if top.startswith("mtp") else _GROUPS.get(top, "head")


@functools.lru_cache(maxsize=16)
def abstract_variables(cfg: ModelConfig):
  """ShapeDtypeStructs of model.init's variables (nothing is allocated)."""
  return jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))


@functools.lru_cache(maxsize=16)
def leaves(cfg: ModelConfig) -> tuple:
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]:
    names = [_key_name(k) for k in path]
    collection, group = names[0], _group(names[1])
    stacked = group in ("dense", "moe")
    layers = x.shape[0] if stacked else 1
    shape = x.shape[1:] if stacked else x.shape
    out.append(Leaf(path="/".join(names), group=group, layers=layers, size=int(np.prod(shape, dtype=np.int64)),
                    dtype=jnp.dtype(x.dtype).name, routed=names[-1].startswith("experts_"),
                    matmul=group != "embed" and len(shape) >= 2, trainable=collection == "params"))
  return tuple(out)


def _active_fraction(cfg: ModelConfig) -> float:
  return cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0


def _count(cfg, pred, activated=False) -> float:
  frac = _active_fraction(cfg)
  total = 0.0
  for leaf in leaves(cfg):
    if leaf.trainable and pred(leaf):
      total += leaf.total * (frac if activated and leaf.routed else 1.0)
  return total


def param_counts(cfg: ModelConfig) -> dict:
  """Parameter counts of the main model and the MTP modules (see the module docstring)."""
  main = lambda l: l.group != "mtp"
  mtp = lambda l: l.group == "mtp"
  routing = sum(l.total for l in leaves(cfg) if not l.trainable)
  return dict(
      total_params=int(_count(cfg, main)),
      activated_params=int(round(_count(cfg, main, activated=True))),
      routed_expert_params=int(_count(cfg, lambda l: main(l) and l.routed)),
      embedding_params=int(_count(cfg, lambda l: l.group == "embed")),
      mtp_params=int(_count(cfg, mtp)),
      mtp_activated_params=int(round(_count(cfg, mtp, activated=True))),
      routing_state=int(routing))


# ---------------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------------
def _attention_flops(cfg: ModelConfig, seq_len: int, layers: int) -> float:
  # Forward 2*h*(d_qk + d_v) per visible key; causal: seq_len/2 keys on average; x3 for fwd + bwd.
  return 3.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len * layers


def _head_params(cfg: ModelConfig) -> float:
  # The head's GEMM; with tied embeddings its kernel is the embedding, which is no matmul leaf of its own.
  if cfg.tie_word_embeddings:
    return _count(cfg, lambda l: l.group == "embed")
  return _count(cfg, lambda l: l.group == "head" and l.matmul)


def flops_per_token(model_config: Any, seq_len: int, include_mtp: bool = False) -> float:
  """Training FLOPs (forward + backward) per token of a seq_len sequence; MFU's numerator.

  `model_config`: a ModelConfig, an HF config dict or a training ConfigDict.
  """
  cfg = ModelConfig.from_any(model_config)
  matmul = _count(cfg, lambda l: l.group != "mtp" and l.matmul, activated=True)
  if cfg.tie_word_embeddings:
    matmul += _head_params(cfg)
  flops = 6.0 * matmul + _attention_flops(cfg, seq_len, cfg.num_hidden_layers)
  return flops + (mtp_flops_per_token(cfg, seq_len) if include_mtp else 0.0)


def mtp_flops_per_token(model_config: Any, seq_len: int) -> float:
  """Training FLOPs per token of the MTP modules, including their pass through the shared head."""
  cfg = ModelConfig.from_any(model_config)
  depths = cfg.num_nextn_predict_layers
  matmul = _count(cfg, lambda l: l.group == "mtp" and l.matmul, activated=True) + depths * _head_params(cfg)
  return 6.0 * matmul + _attention_flops(cfg, seq_len, depths)


# ---------------------------------------------------------------------------------------------------
# KV cache.
# ---------------------------------------------------------------------------------------------------
def kv_cache(cfg: ModelConfig) -> dict:
  """Bytes per token of the BF16 latent cache, from model.init_cache's shapes (one sequence, one slot)."""
  cache = jax.eval_shape(lambda: model.init_cache(cfg, 1, 1, jnp.bfloat16))
  main = {k: v for k, v in cache.items() if k != "mtp"}
  nbytes = lambda t: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
  # Stacked caches are [layers, batch=1, len=1, width]; the widths are the latent and rope-key dims.
  layers = sum(jax.tree.leaves(stack)[0].shape[0] for stack in main.values())
  widths = sorted({x.shape[-1] for x in jax.tree.leaves(main)}, reverse=True)
  return dict(kv_cache_bytes_per_token=nbytes(main), kv_cache_mtp_bytes_per_token=nbytes(cache.get("mtp", [])),
              kv_cache_layers=int(layers), kv_cache_widths=[int(w) for w in widths])


def kv_comparison(model_config: Any = None) -> list:
  """DeepSeek-V3's MLA cache (from the real model) next to the GQA baselines, BF16 bytes per token."""
  cfg = deepseek_v3_671b() if model_config is None else ModelConfig.from_any(model_config)
  kv = kv_cache(cfg)
  rows = [dict(model="DeepSeek-V3 (MLA)", layers=kv["kv_cache_layers"],
               per_layer="latent " + " + ".join(map(str, kv["kv_cache_widths"])),
               kv_cache_bytes_per_token=kv["kv_cache_bytes_per_token"])]
  for g in GQA_BASELINES:
    rows.append(dict(model=f"{g.name} (GQA)", layers=g.num_layers, per_layer=f"2 x {g.num_kv_heads} x {g.head_dim}",
                     kv_cache_bytes_per_token=g.kv_cache_bytes_per_token()))
  base = rows[0]["kv_cache_bytes_per_token"]
  for r in rows:
    r["ratio"] = r["kv_cache_bytes_per_token"] / base
  return rows


# ---------------------------------------------------------------------------------------------------
# Memory per device.
# ---------------------------------------------------------------------------------------------------
def _stage_layers(num_layers: int, stages: int) -> list:
  return [list(a) for a in np.array_split(np.arange(num_layers), stages)]


def _rank_stages(schedule: str, P: int) -> tuple[int, list]:
  """(number of model stages, the stages each pipeline rank holds) under `schedule` (schedules.placement)."""
  if schedule not in ("none",) + schedules.NAMES:
    raise ConfigError(f"config.pipeline.schedule: unknown {schedule!r}; use 'none' or one of "
                      f"{', '.join(schedules.NAMES)}")
  if schedule == "dualpipe" and P > 1 and P % 2:
    raise ConfigError(f"config.mesh.pipeline: DualPipe needs an even number of ranks, got {P}")
  return schedules.num_stages(schedule, P), schedules.stages_held(schedule, P)


def memory_plan(cfg: ModelConfig, data: int, expert: int, pipeline: int, schedule: str = "none",
                moments_dtype: str = "float32", copies: bool = True) -> dict:
  """Bytes per device of params / grads / optimizer states, by dtype, for the pipeline rank holding most.

  Pipelined, a rank holds the units of its stages once (dsv3.pipeline.rank_state; the embedding sits on the
  first and the last stage), and per stage it runs, a gradient accumulator shaped like that stage's
  parameters ('grads') and, when `copies` (micro-batch rows split over the sub-mesh, stages.Devices), a
  per-device copy of them ('copies'). Unpipelined, 'grads' are the FP32 gradients and there are no copies.
  """
  for name, v in (("data", data), ("expert", expert), ("pipeline", pipeline)):
    if not _is_int(v) or v < 1:
      raise ConfigError(f"config.mesh.{name}: must be a positive integer, got {v!r}")
  if cfg.num_moe_layers and cfg.n_routed_experts % expert:
    raise ConfigError(f"config.mesh.expert: n_routed_experts={cfg.n_routed_experts} must be divisible by "
                      f"mesh.expert={expert}; pick a divisor of {cfg.n_routed_experts}")
  if moments_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.adam_moments_dtype: must be 'float32' or 'bfloat16', got {moments_dtype!r}")
  num_stages, held = _rank_stages(schedule, pipeline)
  last = num_stages - 1
  stage_of = {}
  for s, ls in enumerate(_stage_layers(cfg.num_hidden_layers, num_stages)):
    stage_of.update({int(l): s for l in ls})
  # elements[stage][(routed, dtype, trainable)]; the embedding apart: stage 0 and the last stage need it
  elements = [collections.Counter() for _ in range(num_stages)]
  embed = collections.Counter()
  for leaf in leaves(cfg):
    key = (leaf.routed, leaf.dtype, leaf.trainable)
    if leaf.group in ("dense", "moe"):
      first = 0 if leaf.group == "dense" else cfg.num_dense_layers
      for i in range(leaf.layers):
        elements[stage_of[first + i]][key] += leaf.size
    elif leaf.group == "embed":
      embed[key] += leaf.total
    else:
      elements[last][key] += leaf.total
  with_embed = lambda s: elements[s] + embed if s in (0, last) else elements[s]
  local = lambda routed, n: -(-n // expert) if routed else n

  def rank_bytes(stages):
    params, grads, opt, copy = (collections.Counter() for _ in range(4))
    units = sum((elements[s] for s in stages), collections.Counter())
    if 0 in stages or last in stages:
      units += embed
    for (routed, dtype, trainable), n in units.items():
      n = local(routed, n)
      params[dtype] += n * jnp.dtype(dtype).itemsize
      if not trainable:
        continue
      if pipeline == 1:
        grads["float32"] += n * 4
      zero = data if routed else data * expert
      shard = -(-n // zero)
      opt[moments_dtype] += 2 * shard * jnp.dtype(moments_dtype).itemsize
      if jnp.dtype(dtype).itemsize < 4:
        opt["float32"] += shard * 4
    if pipeline > 1:           # per stage copy: its accumulator, and its per-device parameter copy
      for s in stages:
        for (routed, dtype, trainable), n in with_embed(s).items():
          if trainable:
            grads[dtype] += local(routed, n) * jnp.dtype(dtype).itemsize
            if copies:
              copy[dtype] += local(routed, n) * jnp.dtype(dtype).itemsize
    return dict(params=dict(params), grads=dict(grads), optimizer=dict(opt), copies=dict(copy),
                total_bytes=sum(params.values()) + sum(grads.values()) + sum(opt.values()) + sum(copy.values()))

  per_rank = [rank_bytes(st) for st in held]
  worst = max(range(pipeline), key=lambda r: per_rank[r]["total_bytes"])
  return dict(devices=data * expert * pipeline, pipeline_stages=num_stages, rank=worst,
              rank_stages=held[worst], rank_layers=_rank_layers(cfg, num_stages, held[worst]),
              optimizer_shards=dict(non_expert=data * expert, routed_expert=data),
              per_rank=per_rank, per_rank_stages=held,
              per_rank_total_bytes=[r["total_bytes"] for r in per_rank], **per_rank[worst])


def _rank_layers(cfg: ModelConfig, num_stages: int, stages) -> list:
  split = _stage_layers(cfg.num_hidden_layers, num_stages)
  return [int(l) for s in stages for l in split[s]]


def pipeline_time(schedule: str, P: int, microbatches: int, fb_hidden: float, comm_ratio: float = 1.0):
  """The schedule's simulated step in the paper's cell units (F 1, B 2, W 1) with F&B cells at F + B and at
  dsv3.overlap.fb_cost: `fb_hidden` of each chunk's expert all-to-all time under the other chunk's compute,
  all-to-all : compute = comm_ratio. None where there is no pipeline or the executor refuses the layout."""
  if P <= 1 or schedule == "none":
    return None
  try:
    sched = schedules.make(schedule, P, microbatches)
  except ValueError:
    return None
  fb = overlap.fb_cost(1.0, 2.0, fb_hidden, comm_ratio)
  apart, fused = (schedules.simulate(sched, F=1.0, B=2.0, W=1.0, FB=cost) for cost in (3.0, fb))
  return dict(fb_hidden=fb_hidden, comm_ratio=comm_ratio, fb_cost=fb, step_unfused=apart.makespan,
              step_fused=fused.makespan, bubble_unfused=apart.bubble, bubble_fused=fused.bubble)


# ---------------------------------------------------------------------------------------------------
# Activations and temporaries of one training step, per device.
# ---------------------------------------------------------------------------------------------------
def _pipeline_inflight(schedule: str, P: int, microbatches: int) -> list:
  """Per rank, the most micro-batches whose forward residuals it holds at once (dsv3.pipeline's simulator)."""
  if P <= 1 or schedule == "none":
    return [1]
  try:
    sched = schedules.make(schedule, P, microbatches)
  except ValueError:       # a layout the executor refuses: 1F1B's bound, one per downstream rank
    return [min(P - r, microbatches) for r in range(P)]
  return [int(n) for n in schedules.simulate(sched).peak_activations]


def activation_plan(cfg: ModelConfig, rows: int, seq_len: int, data: int = 1, expert: int = 1,
                    layers: int = None, mtp: bool = True, head: bool = True, platform: str = "gpu",
                    inflight: int = 1, scanned: bool = None) -> dict:
  """Bytes per device of the activations and temporaries of one forward + backward of one micro-batch.

  rows: sequences per device per micro-batch (batch / (data * expert) / grad_accum, or / microbatches
  pipelined); layers: the main-model layers run (default all; a count, dense first, or (dense, MoE));
  mtp / head: whether the MTP modules and the
  vocabulary head run here; platform: 'cpu' or 'gpu', the choices the code makes from it (CPU: the tiled
  grouped GEMM and dense attention up to attention.DENSE_MAX_LEN tokens; GPU: ragged_dot, and blockwise
  attention above DENSE_MAX_LEN unless cuDNN is installed); inflight: micro-batches whose saved residuals
  the rank holds at once (pipeline schedules; 1 otherwise); scanned: the layers run under nn.scan (default
  cfg.scan_layers; pipeline stages unroll them).

  Model: peak = saved residuals of every layer (what model.remat keeps, stacked by nn.scan) x inflight
  + the larger of one layer's backward working set (its forward recomputed, the activations the remat
  policy drops) and the vocabulary head's (every head's logits, one's gradient). Elements are counted per
  token from the code's tensors (dsv3/mla.py, attention.py, moe.py, expert_parallel.py, model.py).
  """
  c = 2 if cfg.dtype == "bfloat16" else 4                         # compute dtype bytes
  scanned = cfg.scan_layers if scanned is None else scanned
  T, n = seq_len, rows * seq_len                                 # tokens per device per micro-batch
  H, nh, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
  dn, dr, dv, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  rq = cfg.q_lora_rank or 0
  policy = cfg.remat
  keep = lambda name: policy == "none" or (policy == "paper" and name in _KEEP)

  # --- attention (per token, bytes) ----------------------------------------------------------------
  impl = cfg.attention
  if impl == "auto":
    impl = "dense" if T <= attn_lib.DENSE_MAX_LEN else "blockwise"     # cuDNN needs its libraries: see docs
  dense_attn = impl == "dense"
  qk = nh * (dn + dr)
  mla = {                                                        # name -> (elements per token, bytes each)
      "rmsnorm": (H + rq + C, c),                                # the three RMSNorm outputs (input, q_a, kv_a)
      "q_a": (rq, c),                                            # q_a_proj output
      "kv_a": (C + dr, c),                                       # kv_a_proj_with_mqa output
      "mla_up": (qk + nh * (dn + dv), c),                        # q_b_proj and kv_b_proj outputs
      "qkv": (2 * qk + nh * dv, c),                              # attention inputs q, k (rope + broadcast), v
      # dense: the [heads, T] probabilities per token; blockwise: the logsumexp per head (float32)
      "attn_probs": (nh * T, c) if dense_attn else (nh, 4),
      "attn_out": (nh * dv, c),                                  # attention output (o_proj input)
      "attn_o": (H, c),                                          # o_proj output
  }
  # The dense path's float32 scores and masked scores exist while the layer runs (forward or recompute).
  attn_work = 2 * nh * T * 4 if dense_attn else 2 * nh * min(T, cfg.attention_block) * 4
  residual = (2 * H * c) + attn_work                             # the residual stream and the second norm

  def ffn(inter):                                                # SwiGLU: gate, up, silu(gate) * up, out
    return {"mlp_gate": (inter, c), "mlp_up": (inter, c), "mlp_act": (inter, c), "mlp_out": (H, c)}

  def per_token(terms, saved):
    return sum(e * b for name, (e, b) in terms.items() if not saved or keep(name))

  # --- routed experts (bytes per device per MoE layer) ----------------------------------------------
  k, E, I = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
  routed_saved = routed_all = 0
  dispatch = {}
  if cfg.num_moe_layers:
    if expert > 1:
      b = ep_lib.buffer_rows(cfg, n, expert, "dense" if platform == "cpu" else "ragged")
      m, e_local = b["expand"], E // expert                      # grouped-GEMM rows on this device
      # dispatch: the send and receive buffers of hidden rows, the combined rows coming back (f32)
      dispatch = dict(send_rows=b["send"], recv_rows=b["recv"], expand_rows=m)
      transport = (b["send"] + b["recv"]) * H * c + (b["recv"] + n) * H * 4
    else:
      # Without expert parallelism the routed experts sort the whole micro-batch's assignments (a sort the
      # SPMD partitioner cannot split over 'data'), so every device runs all data * n tokens' rows.
      m, e_local = data * n * k, E
      dispatch = dict(expand_rows=m)
      transport = data * n * H * 4                               # the scatter-added float32 output
    gemm = {"expert_x": (m * H, c),                              # rows gathered into expert order
            "expert_gate": (m * I, c), "expert_up": (m * I, c),  # grouped-GEMM outputs (named for remat)
            "expert_act": (m * I, c),                            # silu(gate) * up, the down GEMM's input
            "expert_out": (m * H, c)}                            # down GEMM output
    if platform == "cpu" and cfg.grouped_gemm in ("auto", "tiled") and cfg.precision != "fp8":
      bm = tiled_gemm.default_block_m(m, e_local)
      tiles = tiled_gemm.num_tiles(m, e_local, bm)
      # dsv3.tiled_gemm: row tiles of the GEMM inputs and each tile's gathered expert weight, per GEMM
      gemm["tiles"] = (tiles * bm * (H + I) + 3 * tiles * H * I, c)
    elif platform != "cpu" and cfg.grouped_gemm == "ragged_dot" and cfg.precision != "fp8":
      # XLA:GPU expands ragged_dot into a dense dot per expert over all rows: f32 [experts, rows, width]
      # intermediates (GPU_AOT.md). In a layer's backward three of the widest are live at once under
      # nn.scan, four unrolled (read off XLA:GPU's buffer assignment, jax 0.12, configs/small.py).
      gemm["ragged_dense"] = ((3 if scanned else 4) * e_local * m * max(H, I), 4)
    elif cfg.grouped_gemm == "scan":
      # dsv3.tiled_gemm.scan_ragged_dot: one tile at a time; padded copies of its input and output gradient
      gemm["scan_pad"] = (2 * m * max(H, I), c)
    routed_all = sum(e * b for e, b in gemm.values()) + transport
    routed_saved = sum(e * b for name, (e, b) in gemm.items() if keep(name)) if policy != "full" else 0
  router = {"router_logits": (E, 4), "scores": (E, 4),          # float32 router logits and sigmoid scores
            "moe_out": (H, c)}                                   # the MoE output (routed + shared)
  shared = ffn(cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else {}

  def layer(moe: bool, saved: bool) -> float:
    """Bytes of one layer's activations: all of them (saved=False) or those the remat policy keeps."""
    terms = dict(mla, **(dict(router, **{"shared_" + a: b for a, b in shared.items()}) if moe
                         else ffn(cfg.intermediate_size)))
    if saved:
      tok = H * c + (0 if policy == "full" else per_token(
          {a: b for a, b in terms.items() if not a.startswith("shared_")}, True)
          + sum(e * b for a, (e, b) in shared.items() if keep(a)))
      return n * tok + (routed_saved if moe else 0)
    tok = per_token(terms, False) + residual
    return n * tok + (routed_all if moe else 0)

  dense_layers, moe_layers = cfg.num_dense_layers, cfg.num_moe_layers
  if isinstance(layers, tuple):                                  # (dense, MoE) layers of a pipeline stage
    dense_layers, moe_layers = layers
  elif layers is not None:                                       # a count, dense layers first
    dense_layers, moe_layers = min(layers, dense_layers), max(0, layers - dense_layers)
  depths = cfg.num_nextn_predict_layers if mtp else 0
  moe_mtp = cfg.num_moe_layers > 0
  saved_layers = (dense_layers * layer(False, True) + moe_layers * layer(True, True)
                  + depths * layer(moe_mtp, True))               # residuals kept for backward, every layer
  layer_working = max([layer(False, False)] * bool(dense_layers) + [layer(True, False)] * bool(moe_layers)
                      + [layer(moe_mtp, False)] * bool(depths) + [0])
  heads = (1 + depths) if head else 0
  logits = heads * n * V * 4                                     # float32 logits of every head
  head_working = (n * V * 4 + n * H * c) if head else 0          # one head's logits gradient and its input
  # The logits live from the head's forward (or its recomputation: a pipeline stage checkpoints the head
  # under any remat policy) through the head's backward, which comes before every layer's backward.
  kept_logits = logits if (inflight > 1 and policy == "none") else 0
  saved = (saved_layers + kept_logits) * inflight
  working = max(layer_working, logits + head_working - kept_logits)
  return dict(tokens_per_microbatch=n, remat=policy, attention=impl, inflight_microbatches=inflight,
              saved_residual_bytes=int(saved_layers), logits_bytes=int(logits),
              layer_working_bytes=int(layer_working), head_working_bytes=int(head_working),
              moe_rows=dispatch, activation_bytes=int(saved + working))


_KEEP = frozenset(KEEP) | {"moe_out"}    # what remat='paper' saves (dsv3.layers.KEEP)


# ---------------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------------
def step_memory(cfg: ModelConfig, batch: int, seq_len: int, data: int, expert: int, pipeline: int = 1,
                schedule: str = "none", microbatches: int = 1, grad_accum: int = 1,
                moments_dtype: str = "float32", platform: str = "gpu") -> dict:
  """Peak bytes per device of one training step as the trainer lays it out: memory_plan's state
  (parameters, gradients, ZeRO-1 optimizer) plus activation_plan's activations and temporaries.

  Pipelined, every rank is planned and the worst one reported: it holds its stages' parameters and optimizer
  shards (the trainer's stage-sharded state, dsv3.pipeline.rank_state), each stage copy's accumulator and
  per-device parameter copy (which stand in for the params during the step), and the residuals of its
  in-flight micro-batches (the schedule's simulated peak for that rank; each holds one stage's). Returns memory_plan's keys plus: state_bytes (parameters + optimizer), grad_bytes
  (gradients or accumulators), copies_bytes, grad_accum_bytes (the accumulator of grad_accum > 1), the
  activation_plan terms under 'activations', and total_with_activations_bytes (the estimated peak).
  """
  if pipeline > 1:
    rows = batch // microbatches // (data * expert)
    split = rows > 0 and (batch // microbatches) % (data * expert) == 0
    out = memory_plan(cfg, data, expert, pipeline, schedule, moments_dtype, copies=split and data * expert > 1)
    num_stages = out["pipeline_stages"]
    inflight = _pipeline_inflight(schedule, pipeline, microbatches)
    totals = []
    split_layers = _stage_layers(cfg.num_hidden_layers, num_stages)
    for r, stages in enumerate(out["per_rank_stages"]):
      mem = out["per_rank"][r]
      # A micro-batch in flight holds one stage's residuals: the rank's worst stage's.
      kinds = lambda s: (sum(l < cfg.num_dense_layers for l in split_layers[s]),
                         sum(l >= cfg.num_dense_layers for l in split_layers[s]))
      act = max((activation_plan(cfg, max(rows, 1), seq_len, data, expert, layers=kinds(s),
                                 mtp=s == num_stages - 1, head=s == num_stages - 1, platform=platform,
                                 inflight=inflight[r], scanned=False) for s in stages),
                key=lambda a: a["activation_bytes"])
      params = sum(mem["params"].values())
      state = params + sum(mem["optimizer"].values())
      grads, copies = sum(mem["grads"].values()), sum(mem["copies"].values())
      # The step takes the params into its copies (executor.run(donate=True)): not held twice.
      step = state - (params if copies else 0) + grads + copies + act["activation_bytes"]
      totals.append((max(step, state + copies), r, state, grads, copies, act))
    total, r, state, grads, copies, act = max(totals, key=lambda t: t[0])
    stages = out["per_rank_stages"][r]
    out = dict(out, rank=r, rank_stages=stages, rank_layers=_rank_layers(cfg, num_stages, stages), **out["per_rank"][r])
    return dict(out, state_bytes=int(state), grad_bytes=int(grads), copies_bytes=int(copies), grad_accum_bytes=0,
                activations=act, activation_bytes=act["activation_bytes"], total_with_activations_bytes=int(total),
                per_rank_peak_bytes=[int(t[0]) for t in totals])
  out = memory_plan(cfg, data, expert, pipeline, schedule, moments_dtype)
  state = sum(out["params"].values()) + sum(out["optimizer"].values())
  grads = sum(out["grads"].values())
  accum = grads if grad_accum > 1 else 0                         # the micro-batch sum next to one micro-batch's
  rows = batch // (data * expert) // grad_accum
  act = activation_plan(cfg, rows, seq_len, data, expert, platform=platform)
  total = state + grads + accum + act["activation_bytes"]
  return dict(out, state_bytes=int(state), grad_bytes=int(grads), copies_bytes=0, grad_accum_bytes=int(accum),
              activations=act, activation_bytes=act["activation_bytes"], total_with_activations_bytes=int(total))


def _get(config, name, default):
  try:
    value = config[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _positive(tc, path: str, default):
  """tc's `path` (dotted) or `default` when absent; ConfigError naming config.<path> unless an integer >= 1."""
  node = tc
  for part in path.split("."):
    node = _get(node, part, None)
  value = default if node is None else node
  if not _is_int(value) or value < 1:
    raise ConfigError(f"config.{path}: must be a positive integer, got {value!r}; set --config.{path}")
  return int(value)


def plan(train_config, platform: str = "gpu", fb_hidden: float = 1.0) -> dict:
  """Everything above for a training config (an ml_collections ConfigDict, or a bare ModelConfig).

  fb_hidden: the share of an F&B cell's expert all-to-all time the other chunk hides, for `pipeline_time`
  (1: DualPipe's design point; python -m dsv3.bench.overlap measures what the GPU compiler schedules).
  Raises ConfigError naming the field when a value it reads (seq_len, batch_size, mesh.*, pipeline.*,
  adam_moments_dtype) is out of range.
  """
  cfg = ModelConfig.from_any(train_config)
  tc = {} if isinstance(train_config, ModelConfig) else train_config
  seq_len = _positive(tc, "seq_len", min(4096, cfg.max_position_embeddings))
  batch = _positive(tc, "batch_size", 1)
  data, expert, pipeline = (_positive(tc, f"mesh.{k}", 1) for k in ("data", "expert", "pipeline"))
  microbatches = _positive(tc, "pipeline.microbatches", 1)
  accum = _positive(tc, "grad_accum_steps", 1)
  schedule = str(_get(_get(tc, "pipeline", {}), "schedule", "none"))
  if seq_len > cfg.max_position_embeddings:
    raise ConfigError(f"config.seq_len: {seq_len} exceeds config.model.max_position_embeddings="
                      f"{cfg.max_position_embeddings}; lower config.seq_len or raise max_position_embeddings")
  moments = str(_get(tc, "adam_moments_dtype", "bfloat16" if cfg.precision == "fp8" else "float32"))
  out = dict(param_counts(cfg))
  out.update(kv_cache(cfg))
  main_flops = flops_per_token(cfg, seq_len)
  mtp_flops = mtp_flops_per_token(cfg, seq_len)
  out.update(flops_per_token=main_flops, mtp_flops_per_token=mtp_flops,
             attention_flops_per_token=_attention_flops(cfg, seq_len, cfg.num_hidden_layers),
             seq_len=seq_len, batch_size=batch, tokens_per_step=batch * seq_len,
             flops_per_step=(main_flops + mtp_flops) * batch * seq_len, precision=cfg.precision,
             param_dtype=cfg.param_dtype, adam_moments_dtype=moments,
             mesh=dict(data=data, expert=expert, pipeline=pipeline), pipeline_schedule=schedule,
             memory_per_device=step_memory(cfg, batch, seq_len, data, expert, pipeline, schedule, microbatches, accum,
                                           moments, platform),
             kv_comparison=kv_comparison(cfg),
             pipeline_time=pipeline_time(schedule, pipeline, microbatches, fb_hidden))
  return out


# ---------------------------------------------------------------------------------------------------
# Printing.
# ---------------------------------------------------------------------------------------------------
def _n(x) -> str:
  return f"{int(x):,} ({x / 1e9:.2f}B)"


def _gib(x) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_kv_table(rows) -> str:
  lines = [f"{'model':<22}{'layers':>7}  {'cached per layer':<20}{'KV bytes/token (BF16)':>22}{'vs MLA':>9}"]
  for r in rows:
    lines.append(f"{r['model']:<22}{r['layers']:>7}  {r['per_layer']:<20}"
                 f"{r['kv_cache_bytes_per_token']:>22,}{r['ratio']:>8.2f}x")
  return "\n".join(lines)


def _ranges(xs) -> str:
  """[0, 1, 2, 3, 58, 59, 60] -> '0-3, 58-60'."""
  out, start = [], None
  for i, x in enumerate(xs):
    if start is None:
      start = x
    if i + 1 == len(xs) or xs[i + 1] != x + 1:
      out.append(f"{start}-{x}" if x != start else f"{x}")
      start = None
  return ", ".join(out) or "none"


def format_plan(p: dict) -> str:
  m = p["memory_per_device"]
  mesh = p["mesh"]
  by_dtype = lambda d: ", ".join(f"{k} {_gib(v)}" for k, v in sorted(d.items())) or "-"
  rows = [
      ("total params (main)", _n(p["total_params"])),
      ("activated params / token", _n(p["activated_params"])),
      ("routed expert params", _n(p["routed_expert_params"])),
      ("MTP params", _n(p["mtp_params"])),
      ("MTP activated / token", _n(p["mtp_activated_params"])),
      ("routing state (biases)", f"{p['routing_state']:,}"),
      ("KV cache bytes / token", f"{p['kv_cache_bytes_per_token']:,} (BF16 latent, {p['kv_cache_layers']} layers "
                                 f"x {'+'.join(map(str, p['kv_cache_widths']))})"),
      ("train FLOPs / token", f"{p['flops_per_token'] / 1e9:.1f} GFLOPs (seq_len {p['seq_len']}, causal; "
                              f"attention {p['attention_flops_per_token'] / 1e9:.1f})"),
      ("  + MTP FLOPs / token", f"{p['mtp_flops_per_token'] / 1e9:.1f} GFLOPs"),
      ("tokens / step", f"{p['tokens_per_step']:,} ({p['batch_size']} x {p['seq_len']})"),
      ("FLOPs / step", f"{p['flops_per_step']:.3e}"),
      ("mesh", f"data {mesh['data']} x expert {mesh['expert']} x pipeline {mesh['pipeline']} = "
               f"{m['devices']} devices, schedule {p['pipeline_schedule']}, precision {p['precision']}"),
      ("worst pipeline rank", f"{m['rank']} (stages {m['rank_stages']}, layers {_ranges(m['rank_layers'])})"),
      ("  params", by_dtype(m["params"])),
      ("  grads", by_dtype(m["grads"])),
      ("  optimizer (ZeRO-1)", f"{by_dtype(m['optimizer'])} (moments {p['adam_moments_dtype']}, shards "
                               f"{m['optimizer_shards']['non_expert']} / experts {m['optimizer_shards']['routed_expert']})"),
      ("  total", _gib(m["total_bytes"])),
  ]
  t = p.get("pipeline_time")
  if t:
    rows.append(("pipeline step (F=1 B=2 W=1)", f"{t['step_unfused']:.1f} with F&B = F + B; {t['step_fused']:.1f} with "
                 f"F&B = {t['fb_cost']:.2f} ({t['fb_hidden']:.0%} of its all-to-all hidden, all-to-all : compute "
                 f"= {t['comm_ratio']:g})"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _define_flags():
  """Flags live only in the CLI process, so that importing dsv3.plan (the trainer does) defines none."""
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
  flags.DEFINE_bool("json", False, "Print exactly one JSON object instead of the table.")
  flags.DEFINE_float("fb_hidden", 1.0, "Share of an F&B cell's expert all-to-all time hidden under the other "
                     "chunk, for the pipeline step (python -m dsv3.bench.overlap measures it for a GPU).")
  flags.DEFINE_bool("compare_kv", False, "Print MLA's KV cache next to the GQA baselines "
                    "(the model of --config, or DeepSeek-V3 671B without one).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  config = F.config
  if F.compare_kv and not F.json:
    print(format_kv_table(kv_comparison(config)))
    return
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/deepseek_v3.py")
  result = plan(config, fb_hidden=F.fb_hidden)
  print(json.dumps(result) if F.json else format_plan(result))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
