"""The planner: parameter counts, KV cache, training FLOPs and per-device memory of a training config.

Everything is read off the real model (dsv3.abstract_model: jax.eval_shape of model.init and init_cache), so
a change to the model shows up here. Memory is dsv3.analysis.memory's. The counting conventions reproduce the
published DeepSeek-V3 numbers: total_params is the main model's 'params' (MTP and the 'routing' biases
excluded); activated_params counts, per token, every non-routed parameter plus k of E routed experts per MoE
layer; mtp_params excludes the shared embedding and head. flops_per_token = 6 * activated matmul params +
3 * h * (d_qk + d_v) * seq_len * layers (causal attention: seq_len/2 keys on average, backward 2x forward).

  python -m dsv3.plan --config=configs/deepseek_v3.py            # a table
  python -m dsv3.plan --config=configs/deepseek_v3.py --json     # one JSON object
  python -m dsv3.plan --compare_kv                               # MLA vs GQA KV cache (report Table)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dsv3 import cli, model
from dsv3.abstract_model import leaves
from dsv3.analysis import memory, overlap
from dsv3.config import ConfigError, ModelConfig, deepseek_v3_671b, require_model_config
from dsv3.flops import attention_flops, count as _count, flops_per_token, mtp_flops_per_token  # noqa: F401
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


def param_counts(cfg: ModelConfig) -> dict:
  """Parameter counts of the main model and the MTP modules (see the module docstring)."""
  require_model_config(cfg, "plan.param_counts")
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
# KV cache.
# ---------------------------------------------------------------------------------------------------
def kv_cache(cfg: ModelConfig) -> dict:
  """Bytes per token of the BF16 latent cache, from model.init_cache's shapes (one sequence, one slot)."""
  require_model_config(cfg, "plan.kv_cache")
  cache = jax.eval_shape(lambda: model.init_cache(cfg, 1, 1, jnp.bfloat16))
  main = {k: v for k, v in cache.items() if k != "mtp"}
  nbytes = lambda t: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
  # Stacked caches are [layers, batch=1, len=1, width]; the widths are the latent and rope-key dims.
  layers = sum(jax.tree.leaves(stack)[0].shape[0] for stack in main.values())
  widths = sorted({x.shape[-1] for x in jax.tree.leaves(main)}, reverse=True)
  return dict(kv_cache_bytes_per_token=nbytes(main), kv_cache_mtp_bytes_per_token=nbytes(cache.get("mtp", [])),
              kv_cache_layers=int(layers), kv_cache_widths=[int(w) for w in widths])


def kv_comparison(cfg: Optional[ModelConfig] = None) -> list:
  """DeepSeek-V3's MLA cache (from the real model; or `cfg`'s) next to the GQA baselines, BF16 bytes per token."""
  cfg = deepseek_v3_671b() if cfg is None else require_model_config(cfg, "plan.kv_comparison")
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



def pipeline_time(schedule: str, P: int, microbatches: int, fb_hidden: float, comm_ratio: float = 1.0):
  """The schedule's simulated step in the paper's cell units (F 1, B 2, W 1) with F&B cells at F + B and at
  dsv3.analysis.overlap.fb_cost: `fb_hidden` of each chunk's expert all-to-all time under the other chunk's compute,
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



def _get(config, name, default):
  try:
    value = config[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _positive(tc, path: str, default):
  """tc's `path` (dotted) or `default` when absent; ConfigError naming config.<path> unless an integer >= 1."""
  node = tc
  for part in path.split("."):
    node = _get(node, part, None)
  value = default if node is None else node
  if not memory.is_count(value):
    raise ConfigError(f"config.{path}: must be a positive integer, got {value!r}; set --config.{path}")
  return int(value)


def plan(train_config, platform: str = "gpu", fb_hidden: float = 1.0) -> dict:
  """Everything above for a training config (an ml_collections ConfigDict or mapping with a `model` block; the
  fields it reads beyond that block default to one sequence of min(4096, max_position_embeddings) tokens on
  one device, unpipelined).

  fb_hidden: the share of an F&B cell's expert all-to-all time the other chunk hides, for `pipeline_time`
  (1: DualPipe's design point; python -m dsv3.bench.overlap measures what the GPU compiler schedules).
  Raises ConfigError naming the field when a value it reads (seq_len, batch_size, mesh.*, pipeline.*,
  adam_moments_dtype) is out of range; TypeError for a bare ModelConfig (the functions above take that).
  """
  if isinstance(train_config, ModelConfig):
    raise TypeError("plan.plan: expects a training config (a ConfigDict with a `model` block), got a "
                    "ModelConfig; wrap it with dsv3.training.train_config.base_train_config(cfg), or call "
                    "param_counts, kv_cache or flops_per_token, which take a ModelConfig")
  cfg = ModelConfig.from_config_dict(train_config)   # the edge: one conversion, here
  tc = train_config
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
             attention_flops_per_token=attention_flops(cfg, seq_len, cfg.num_hidden_layers),
             seq_len=seq_len, batch_size=batch, tokens_per_step=batch * seq_len,
             flops_per_step=(main_flops + mtp_flops) * batch * seq_len, precision=cfg.precision,
             param_dtype=cfg.param_dtype, adam_moments_dtype=moments,
             mesh=dict(data=data, expert=expert, pipeline=pipeline), pipeline_schedule=schedule,
             memory_per_device=memory.step_memory(cfg, batch, seq_len, data, expert, pipeline, schedule, microbatches, accum,
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


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.plan` (importing the module defines none)."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True, **fv)
  flags.DEFINE_bool("json", False, "Print exactly one JSON object instead of the table.", **fv)
  flags.DEFINE_float("fb_hidden", 1.0, "Share of an F&B cell's expert all-to-all time hidden under the other "
                     "chunk, for the pipeline step (python -m dsv3.bench.overlap measures it for a GPU).", **fv)
  flags.DEFINE_bool("compare_kv", False, "Print MLA's KV cache next to the GQA baselines "
                    "(the model of --config, or DeepSeek-V3 671B without one).", **fv)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  config = F.config
  if F.compare_kv and not F.json:
    print(format_kv_table(kv_comparison(None if config is None else ModelConfig.from_config_dict(config))))
    return
  if config is None:
    raise cli.UsageError("--config is required, e.g. --config=configs/deepseek_v3.py")
  result = plan(config, fb_hidden=F.fb_hidden)
  print(json.dumps(result) if F.json else format_plan(result))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
