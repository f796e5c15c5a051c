"""The training config (ml_collections): every field the trainer reads, and its validation.

configs/*.py start from `base_train_config` and override (dsv3.cli.load_config loads them); `model` is a
ModelConfig as a block (its precision is the top-level field), `data` is dsv3.data's block.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from dsv3 import data
from dsv3.config import ConfigError, ModelConfig, closest_key
from dsv3.pipeline import schedules


def model_config_dict(cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A ModelConfig as an ml_collections ConfigDict (the `model` block of a training config)."""
  d = dataclasses.asdict(cfg)
  d.pop("precision")                      # set at the top level (config.precision)
  d["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  return ml_collections.ConfigDict(d, type_safe=False)


# Metrics that config.keep_best_by may rank checkpoints by (lower is better).
KEEP_BEST_BY = ("val_loss",)


def base_train_config(model: ModelConfig):
  """Every field the trainer reads, with DeepSeek-V3's recipe as the default."""
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
  c.eval_batches = 4                      # global validation batches per evaluation (0: all that fit)
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  # Best checkpoints: with keep_best_by='val_loss', the keep_best checkpoints with the lowest val_loss are kept
  # besides the latest keep_checkpoints ('' keeps by recency only). A checkpoint carries the val_loss of the
  # evaluation at its own step, so eval_every_steps must divide checkpoint_every_steps (the last step always
  # evaluates); one saved without an evaluation (on SIGTERM) is kept by recency only.
  c.keep_best_by = ""                     # '' | 'val_loss'
  c.keep_best = 1
  c.init_from = ""                        # HF checkpoint dir or orbax dir; used when the workdir is empty
  # Divergence guard: a step whose loss, gradient norm or update is non-finite, whose update norm exceeds
  # max_update_ratio x the parameter norm (0: no ratio check), or, after loss_warmup_steps steps of the run,
  # whose loss exceeds max_loss_ratio x the lowest EMA of the loss so far (0: no spike check; the EMA spans ~10
  # steps) stops the run before any later checkpoint.
  c.nan_guard = ml_collections.ConfigDict(dict(max_update_ratio=1.0, max_loss_ratio=1.5, loss_warmup_steps=5))
  # Profiling: a jax.profiler trace of steps start_step .. start_step+num_steps-1 (numbered as in
  # metrics.jsonl: step 1 is the first) in workdir/profile (TensorBoard's profile plugin, Perfetto). 0: off.
  c.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
  # Parallelism.
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, pipeline=1))
  # fb_barriers: DualPipe's F&B cells tie each piece of one chunk to the other's (stages.forward_backward).
  # collectives_in_flight: on GPUs, how many asynchronous collectives a stage program may have in flight at once
  # (XLA's parallel collective overlap limit): more lets more of the other chunk's GEMMs into the all-to-alls'
  # windows, for more memory (docs/results.md, "DualPipe's overlap").
  c.pipeline = ml_collections.ConfigDict(dict(schedule="none", microbatches=1, fb_barriers=True,
                                              collectives_in_flight=2))
  c.data = data.default_data_config()
  return c


def check_variant(file: str, arg, variants=()) -> None:
  """ConfigError unless `arg` (the ARG of --config=FILE:ARG) is empty or one of `variants`."""
  if arg and arg not in variants:
    choices = f"one of {', '.join(variants)}" if variants else "none: it has no variants"
    raise ConfigError(f"--config={file}:{arg}: unknown variant {arg!r}; {file} takes {choices}")


def need(cond, field: str, msg: str) -> None:
  """ConfigError 'config.<field>: <msg>' unless `cond`."""
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(c, field: str, lo, hi=None, lo_open=False, hi_open=False, hint="") -> None:
  """config.<field> (dotted) is a real number in [lo, hi] (open ends where asked); `hint` says what it means."""
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


def _check_known_fields(c, base) -> None:
  """Every field of the top level and of the balance, mesh, pipeline, profile and nan_guard blocks is one `base`
  has."""
  for block in ("", "balance", "mesh", "pipeline", "profile", "nan_guard"):
    if block and block not in c:
      continue
    given, known = (c, base) if not block else (c[block], base[block])
    prefix = f"{block}." if block else ""
    for k in sorted(given.keys()):
      need(k in known, prefix + k,
           f"unknown field{closest_key(k, known.keys(), prefix=f'config.{prefix}')}")


def _check_steps_and_optimizer(c) -> None:
  """The step counts, the learning-rate schedule, AdamW, the losses' weights, precision and the EMA."""
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
  _number(c, "learning_rate", 0, lo_open=True)
  _number(c, "min_lr_ratio", 0, 1)
  need(c.lr_schedule in ("deepseek", "cosine"), "lr_schedule",
       f"must be 'deepseek' or 'cosine', got {c.lr_schedule!r}")
  _number(c, "decay_start_frac", 0, 1)
  _number(c, "decay_end_frac", 0, 1)
  need(c.decay_start_frac <= c.decay_end_frac, "decay_start_frac",
       f"need 0 <= decay_start_frac <= decay_end_frac <= 1, got {c.decay_start_frac} > {c.decay_end_frac}")
  _number(c, "b1", 0, 1, hi_open=True, hint=" (Adam's first-moment decay, 0.9)")
  _number(c, "b2", 0, 1, hi_open=True, hint=" (Adam's second-moment decay, 0.95)")
  _number(c, "weight_decay", 0, hint=" (0 disables it)")
  _number(c, "grad_clip", 0, hint=" (0 disables clipping)")
  _number(c, "mtp_weight", 0, 1, hint=" (the MTP loss weight lambda, 0.3 in the report)")
  _number(c, "mtp_weight_final", 0, 1, hint=" (the MTP loss weight lambda, 0.1 in the report)")
  _number(c, "mtp_weight_switch_frac", 0, 1, hint=" (the share of training before mtp_weight_final)")
  _number(c, "ema_decay", 0, 1, hi_open=True, hint=" (0 disables the EMA)")
  need(c.precision in ("fp32", "bf16", "fp8"), "precision", f"must be 'fp32', 'bf16' or 'fp8', got {c.precision!r}")
  need(c.adam_moments_dtype in ("float32", "bfloat16"), "adam_moments_dtype",
       f"must be 'float32' or 'bfloat16', got {c.adam_moments_dtype!r}")
  need(isinstance(c.init_from, str), "init_from",
       f"must be a path string (an HF or orbax checkpoint dir) or '' for none, got {c.init_from!r}")
  need(c.balance.mode in ("aux_free", "aux_loss", "none"), "balance.mode",
       f"must be 'aux_free', 'aux_loss' or 'none', got {c.balance.mode!r}")
  _number(c, "balance.gamma", 0, hint=" (the bias update speed, 0.001)")
  _number(c, "balance.gamma_final", 0, hint=" (0 in the report)")
  _number(c, "balance.gamma_switch_frac", 0, 1, hint=" (the share of training before gamma_final)")
  _number(c, "balance.sequence_alpha", 0, hint=" (0 disables the sequence-wise balance loss)")
  _number(c, "balance.aux_loss_alpha", 0)
  if "nan_guard" in c:
    _number(c, "nan_guard.max_update_ratio", 0, hint=" (0 disables the update-size check)")
    if "max_loss_ratio" in c.nan_guard:
      _number(c, "nan_guard.max_loss_ratio", 0, hint=" (0 disables the loss-spike check)")
      ratio = c.nan_guard.max_loss_ratio
      need(ratio == 0 or ratio > 1, "nan_guard.max_loss_ratio",
           f"must be 0 (no loss-spike check) or > 1 (a step's loss over this many times the lowest loss EMA "
           f"stops the run; 1.5 by default), got {ratio!r}: a ratio <= 1 would stop a run whose loss merely "
           f"stops falling")
    if "loss_warmup_steps" in c.nan_guard:
      v = c.nan_guard.loss_warmup_steps
      need(is_int(v) and v >= 0, "nan_guard.loss_warmup_steps",
           f"must be an integer >= 0 (steps of each run before the loss-spike check starts), got {v!r}")


def _check_checkpoints_and_profile(c) -> None:
  """Best-checkpoint keeping (keep_best_by, keep_best) and the profiler's window."""
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
    need(is_int(c.profile.start_step) and c.profile.start_step >= 1, "profile.start_step",
         f"must be an integer >= 1 (the first traced step; step 1 includes compilation), got "
         f"{c.profile.start_step!r}")
    need(is_int(c.profile.num_steps) and c.profile.num_steps >= 0, "profile.num_steps",
         f"must be an integer >= 0 (0: no trace), got {c.profile.num_steps!r}")
    need(c.profile.num_steps == 0 or c.profile.start_step <= c.num_train_steps, "profile.start_step",
         f"{c.profile.start_step} is after the last step (num_train_steps={c.num_train_steps}), so nothing would be "
         f"traced; lower it or set --config.profile.num_steps=0")


def validate_train_config(c) -> None:
  """Checks the training config before anything expensive; errors name the field and the fix.

  Covers unknown fields (naming the closest valid one), every value's type and range, seq_len against
  model.max_position_embeddings, the mesh against the batch and the experts, the model block
  (ModelConfig.validate) and the data block (data.validate_data_config).
  """
  _check_known_fields(c, base_train_config(ModelConfig()))
  _check_steps_and_optimizer(c)
  _check_checkpoints_and_profile(c)
  _check_layout(c)
  cfg = ModelConfig.from_config_dict(c)
  data.validate_data_config(c.data, model_vocab_size=cfg.vocab_size)


def _check_layout(c) -> None:
  """The mesh against the batch and the experts; the pipeline schedule and its micro-batches."""
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
  need(isinstance(c.pipeline.fb_barriers, bool), "pipeline.fb_barriers",
       f"must be True or False, got {c.pipeline.fb_barriers!r}")
  need(is_int(c.pipeline.collectives_in_flight) and c.pipeline.collectives_in_flight >= 1,
       "pipeline.collectives_in_flight", f"must be an integer >= 1, got {c.pipeline.collectives_in_flight!r}")
  shards = c.mesh.data * c.mesh.expert
  need(c.batch_size % (shards * c.grad_accum_steps) == 0, "batch_size",
       f"{c.batch_size} must be divisible by mesh.data*mesh.expert*grad_accum_steps = "
       f"{shards}*{c.grad_accum_steps}; change batch_size or the mesh")
  if c.mesh.pipeline > 1:
    # The cut into micro-batches and the schedule's own rules (DualPipe's even count, ...) live with the schedules.
    try:
      schedules.microbatch_rows(c.batch_size, c.pipeline.microbatches, shards)
      schedules.make(c.pipeline.schedule, c.mesh.pipeline, c.pipeline.microbatches)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    stages = schedules.num_stages(c.pipeline.schedule, c.mesh.pipeline)
    need(c.model.num_hidden_layers >= stages, "mesh.pipeline",
         f"model.num_hidden_layers={c.model.num_hidden_layers} cannot be cut into {stages} pipeline stages "
         f"(schedule {c.pipeline.schedule!r}); every stage needs a layer: lower mesh.pipeline")
