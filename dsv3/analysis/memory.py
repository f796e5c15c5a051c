"""The per-device memory model of a training step: parameters, gradients, ZeRO-1 optimizer states,
per-device copies and activations, for the pipeline rank that holds the most.

Conventions: routed experts are sharded over `expert`, everything else replicated over data and expert;
gradients are FP32; the optimizer states are sharded over every axis a parameter is replicated on (data *
expert, routed experts over data), two moments in `adam_moments_dtype` plus an FP32 master copy when the
stored parameters are narrower. Stages and their placement are dsv3.pipeline's (stages.split_layers,
schedules.placement); activations are counted per token from the code's tensors.
"""
from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np

from dsv3 import layout
from dsv3.abstract_model import leaves
from dsv3.config import ConfigError, ModelConfig
from dsv3.kernels import tiled_gemm
from dsv3.nn import attention as attn_lib
from dsv3.nn.layers import KEEP, working_dtype
from dsv3.parallel import expert_parallel as ep_lib
from dsv3.pipeline import schedules, stages as stages_lib


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

  Pipelined, a rank holds its stages' units once: the params (the FP32 master) ZeRO-sharded like their
  optimizer state (rank_state.RankLayout.rank_shardings), and per unit an accumulator in the master's dtype
  ('grads') and, when `copies` (rows split over the sub-mesh, per_device.Devices), a per-device working copy
  in the dtype the model reads the leaf in ('copies', nn.layers.working_dtype), which its stage copies share
  (dsv3.pipeline.executor).
  Unpipelined, 'grads' are the FP32 gradients and there are no copies.
  """
  for name, v in (("data", data), ("expert", expert), ("pipeline", pipeline)):
    if not is_count(v):
      raise ConfigError(f"config.mesh.{name}: must be a positive integer, got {v!r}")
  if cfg.num_moe_layers and cfg.n_routed_experts % expert:
    raise ConfigError(f"config.mesh.expert: n_routed_experts={cfg.n_routed_experts} must be divisible by "
                      f"mesh.expert={expert}; pick a divisor of {cfg.n_routed_experts}")
  if moments_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.adam_moments_dtype: must be 'float32' or 'bfloat16', got {moments_dtype!r}")
  num_stages, held = _rank_stages(schedule, pipeline)
  last = num_stages - 1
  stage_of = {l: spec.index for spec in stages_lib.split_layers(cfg, num_stages) for l in spec.layers}
  # elements[stage][(routed, dtype, trainable)]; the embedding apart: stage 0 and the last stage need it
  elements = [collections.Counter() for _ in range(num_stages)]
  embed = collections.Counter()
  working = lambda leaf: working_dtype(leaf.path.split("/")[-1], leaf.dtype, cfg).name   # per_device's copies

  for leaf in leaves(cfg):
    key = (leaf.routed, leaf.dtype, leaf.trainable, working(leaf))
    if leaf.group in ("dense", "moe"):
      stack = leaf.path.split("/")[1]
      for i in range(leaf.layers):
        elements[stage_of[layout.layer_of(cfg, stack, i)]][key] += leaf.size
    elif leaf.group == "embed":
      embed[key] += leaf.total
    else:
      elements[last][key] += leaf.total
  local = lambda routed, n: -(-n // expert) if routed else n

  def rank_bytes(stages):
    params, grads, opt, copy = (collections.Counter() for _ in range(4))
    units = sum((elements[s] for s in stages), collections.Counter())
    if 0 in stages or last in stages:
      units += embed
    for (routed, dtype, trainable, _), n in units.items():
      n = local(routed, n)
      zero = data if routed else data * expert
      shard = -(-n // zero)
      params[dtype] += (shard if pipeline > 1 and trainable else n) * jnp.dtype(dtype).itemsize
      if not trainable:
        continue
      if pipeline == 1:
        grads["float32"] += n * 4
      opt[moments_dtype] += 2 * shard * jnp.dtype(moments_dtype).itemsize
      if jnp.dtype(dtype).itemsize < 4:
        opt["float32"] += shard * 4
    if pipeline > 1:           # per unit of the rank (its stage copies share them): an accumulator, a copy
      for (routed, dtype, trainable, work), n in units.items():
        if trainable:
          grads[dtype] += local(routed, n) * jnp.dtype(dtype).itemsize
          if copies:
            copy[work] += local(routed, n) * jnp.dtype(work).itemsize
    return dict(params=dict(params), grads=dict(grads), optimizer=dict(opt), copies=dict(copy),
                total_bytes=sum(params.values()) + sum(grads.values()) + sum(opt.values()) + sum(copy.values()))

  per_rank = [rank_bytes(st) for st in held]
  worst = max(range(pipeline), key=lambda r: per_rank[r]["total_bytes"])
  return dict(devices=data * expert * pipeline, pipeline_stages=num_stages, rank=worst,
              rank_stages=held[worst], rank_layers=rank_layers(cfg, num_stages, held[worst]),
              optimizer_shards=dict(non_expert=data * expert, routed_expert=data),
              per_rank=per_rank, per_rank_stages=held,
              per_rank_total_bytes=[r["total_bytes"] for r in per_rank], **per_rank[worst])


def rank_layers(cfg: ModelConfig, num_stages: int, stages) -> list:
  """The global layers of `stages` (stage indices) when the model is cut into `num_stages` stages."""
  specs = stages_lib.split_layers(cfg, num_stages)
  return [l for s in stages for l in specs[s].layers]


def _pipeline_inflight(schedule: str, P: int, microbatches: int) -> list:
  """Per rank, the most micro-batches whose forward residuals it holds at once (dsv3.pipeline's simulator)."""
  if P <= 1 or schedule == "none":
    return [1]
  try:
    sched = schedules.make(schedule, P, microbatches)
  except ValueError:       # a layout the executor refuses: 1F1B's bound, one per downstream rank
    return [min(P - r, microbatches) for r in range(P)]
  return [int(n) for n in schedules.simulate(sched).peak_activations]


def _fuses_fb(schedule: str, P: int, microbatches: int) -> bool:
  """Whether `schedule` has overlapped F&B cells, which the executor runs as one program each."""
  if P <= 1 or schedule == "none":
    return False
  try:
    return any(op.kind == "FB" for line in schedules.make(schedule, P, microbatches) for op in line)
  except ValueError:       # a layout the executor refuses
    return False


def _routed_expert_bytes(cfg: ModelConfig, n: int, data: int, expert: int, platform: str, scanned: bool,
                         keep) -> tuple:
  """(all, saved, forward, dispatch rows) of one MoE layer's routed experts on a device holding n tokens: the
  bytes of every tensor, those the remat policy keeps (`keep(name)`), the forward's peak (its dispatch, grouped
  GEMM and combine run one after another), and the expert-parallel buffers' rows."""
  if not cfg.num_moe_layers:
    return 0, 0, 0, {}
  c = 2 if cfg.dtype == "bfloat16" else 4                       # compute dtype bytes
  H, k, E, I = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
  if expert > 1:
    b = ep_lib.buffer_rows(cfg, n, expert, ep_lib.default_transport(platform))
    m, e_local = b["expand"], E // expert                        # grouped-GEMM rows on this device
    # dispatch: the send and receive buffers of hidden rows, the combined rows coming back (f32). An FP8 payload
    # (cfg.ep_fp8_dispatch) does not shrink them: the backward moves BF16 gradient rows through as many rows.
    dispatch = dict(send_rows=b["send"], recv_rows=b["recv"], expand_rows=m)
    transport = (b["send"] + b["recv"]) * H * c + (b["recv"] + n) * H * 4
    # The forward alone: its dispatch buffers carry the payload (FP8 rows are unpacked on arrival), and the
    # grouped GEMM reads its rows from the last hop's receive buffer.
    last_recv = b["hops"][-1]["recv"] if "hops" in b else b["recv"]
    payload = ep_lib.fp8_row_bytes(H) if cfg.ep_fp8_dispatch else H * c
    forward_dispatch = (b["send"] + b["recv"]) * payload + (last_recv * H * c if cfg.ep_fp8_dispatch else 0)
    forward_source, forward_combine = last_recv * H * c, (b["recv"] + n) * H * 4
  else:
    # Without expert parallelism the routed experts sort the whole micro-batch's assignments (a sort the
    # SPMD partitioner cannot split over 'data'), so every device runs all data * n tokens' rows.
    m, e_local = data * n * k, E
    dispatch = dict(expand_rows=m)
    transport = data * n * H * 4                                 # the scatter-added float32 output
    forward_dispatch, forward_source, forward_combine = 0, 0, transport
  gemm = {"expert_x": (m * H, c),                                # rows gathered into expert order
          "expert_gate": (m * I, c), "expert_up": (m * I, c),    # grouped-GEMM outputs (named for remat)
          "expert_act": (m * I, c),                              # silu(gate) * up, the down GEMM's input
          "expert_out": (m * H, c)}                              # down GEMM output
  if platform == "cpu" and cfg.grouped_gemm in ("auto", "tiled") and cfg.precision != "fp8":
    bm = tiled_gemm.default_block_m(m, e_local)
    tiles = tiled_gemm.num_tiles(m, e_local, bm)
    # dsv3.kernels.tiled_gemm: row tiles of the GEMM inputs and each tile's gathered expert weight, per GEMM
    gemm["tiles"] = (tiles * bm * (H + I) + 3 * tiles * H * I, c)
  elif platform != "cpu" and cfg.grouped_gemm == "ragged_dot" and cfg.precision != "fp8":
    # XLA:GPU expands ragged_dot into a dense dot per expert over all rows: f32 [experts, rows, width]
    # intermediates. In a layer's backward three of the widest are live at once under nn.scan, four
    # unrolled (read off XLA:GPU's buffer assignment in the compile-only dry run, jax 0.12, configs/small.py).
    gemm["ragged_dense"] = ((3 if scanned else 4) * e_local * m * max(H, I), 4)
  elif cfg.grouped_gemm == "scan":
    # dsv3.kernels.tiled_gemm.scan_ragged_dot: one tile at a time; padded copies of its input and output gradient
    gemm["scan_pad"] = (2 * m * max(H, I), c)
  routed_all = sum(e * b for e, b in gemm.values()) + transport
  routed_saved = sum(e * b for name, (e, b) in gemm.items() if keep(name)) if cfg.remat != "full" else 0
  # The forward's grouped GEMM: its rows and outputs, one of the backward's widest dense ragged_dot buffers,
  # and one of scan's two padded copies (the other pads the output gradient).
  share = {"ragged_dense": 1 / (3 if scanned else 4), "scan_pad": 1 / 2}
  forward_gemm = forward_source + sum(e * b * share.get(name, 1) for name, (e, b) in gemm.items())
  routed_forward = max(forward_dispatch, forward_gemm, forward_combine)
  return routed_all, routed_saved, int(routed_forward), dispatch


def activation_plan(cfg: ModelConfig, rows: int, seq_len: int, data: int = 1, expert: int = 1,
                    layers: int = None, mtp: bool = True, head: bool = True, platform: str = "gpu",
                    inflight: int = 1, scanned: bool = None) -> dict:
  """Bytes per device of the activations and temporaries of one forward + backward of one micro-batch.

  rows: sequences per device per micro-batch; layers: the main-model layers run (default all; a count, dense
  first, or (dense, MoE)); mtp / head: whether those run here; platform: 'cpu' or 'gpu', for the code paths
  it picks (grouped GEMM, attention); inflight: micro-batches whose residuals the rank holds at once;
  scanned: layers under nn.scan (default cfg.scan_layers; pipeline stages unroll). Peak = saved residuals x
  inflight + the larger of one layer's backward working set and the head's (logits of every head, one's
  gradient), counted per token from the code's tensors (mla, attention, moe, expert_parallel, model).
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

  E = cfg.n_routed_experts
  routed_all, routed_saved, routed_forward, dispatch = _routed_expert_bytes(cfg, n, data, expert, platform,
                                                                           scanned, keep)
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

  def forward(moe: bool) -> float:
    """A layer's forward working set: its tensors once, the routed experts' at their forward peak."""
    return layer(moe, False) - (routed_all - routed_forward if moe else 0)

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
  forward_working = max([forward(False)] * bool(dense_layers) + [forward(True)] * bool(moe_layers)
                        + [forward(moe_mtp)] * bool(depths) + [0])
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
              layer_working_bytes=int(layer_working), forward_working_bytes=int(forward_working),
              head_working_bytes=int(head_working),
              moe_rows=dispatch, activation_bytes=int(saved + working))


_KEEP = frozenset(KEEP) | {"moe_out"}    # what remat='paper' saves (dsv3.nn.layers.KEEP)


# ---------------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------------
def step_memory(cfg: ModelConfig, batch: int, seq_len: int, data: int, expert: int, pipeline: int = 1,
                schedule: str = "none", microbatches: int = 1, grad_accum: int = 1,
                moments_dtype: str = "float32", platform: str = "gpu") -> dict:
  """Peak bytes per device of one training step as the trainer lays it out: memory_plan's state plus
  activation_plan's activations; pipelined, for the worst rank (its stages' state, each stage copy's
  accumulator and per-device parameter copy, and the residuals of its simulated peak of micro-batches in
  flight). Adds to memory_plan's keys: state_bytes, grad_bytes, copies_bytes, grad_accum_bytes,
  'activations' (activation_plan's terms) and total_with_activations_bytes (the estimated peak).
  """
  if pipeline > 1:
    rows = batch // microbatches // (data * expert)
    split = rows > 0 and (batch // microbatches) % (data * expert) == 0
    out = memory_plan(cfg, data, expert, pipeline, schedule, moments_dtype, copies=split and data * expert > 1)
    num_stages = out["pipeline_stages"]
    inflight = _pipeline_inflight(schedule, pipeline, microbatches)
    fused = _fuses_fb(schedule, pipeline, microbatches)
    totals = []
    specs = stages_lib.split_layers(cfg, num_stages)
    for r, stages in enumerate(out["per_rank_stages"]):
      mem = out["per_rank"][r]
      # A micro-batch in flight holds one stage's residuals: the rank's worst stage's.
      kinds = lambda s: (specs[s].moe.count(False), specs[s].moe.count(True))
      acts = [activation_plan(cfg, max(rows, 1), seq_len, data, expert, layers=kinds(s),
                              mtp=s == num_stages - 1, head=s == num_stages - 1, platform=platform,
                              inflight=inflight[r], scanned=False) for s in stages]
      act = dict(max(acts, key=lambda a: a["activation_bytes"]))
      # An F&B cell is one program (executor.forward_backward): while one chunk's backward works, the other
      # chunk's forward holds at most its own peak, a layer's forward working set or its logits.
      act["fb_forward_working_bytes"] = max(max(a["forward_working_bytes"], a["logits_bytes"]) for a in acts) if fused else 0
      act["activation_bytes"] += act["fb_forward_working_bytes"]
      params = sum(mem["params"].values())
      state = params + sum(mem["optimizer"].values())
      grads, copies = sum(mem["grads"].values()), sum(mem["copies"].values())
      step = state + grads + copies + act["activation_bytes"]
      totals.append((max(step, state + copies), r, state, grads, copies, act))
    total, r, state, grads, copies, act = max(totals, key=lambda t: t[0])
    stages = out["per_rank_stages"][r]
    out = dict(out, rank=r, rank_stages=stages, rank_layers=rank_layers(cfg, num_stages, stages), **out["per_rank"][r])
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



def is_count(v) -> bool:
  """An integer >= 1 (numpy integers too, bools not)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
