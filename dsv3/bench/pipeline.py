"""Pipeline executor benchmark on simulated CPU devices: measured step time and per-op costs, next to the
schedule simulator's prediction.

  python -m dsv3.bench.pipeline [--ranks 4] [--microbatches 8] [--steps 3] [--unfused]

THIS RUNS ON CPU: 8 simulated host "devices" (common.use_cpu_devices) share the machine's cores, so sub-meshes do not
really run concurrently and the measured step time is close to the sum of all ops. What the CPU run can
measure honestly is the cost of each op kind (F, B, B*, W, F&B), timed one op at a time with
block_until_ready (an F&B cell is one program, stages.forward_backward; --unfused adds DualPipe(V) rows
with its F and B programs back to back). Those costs are fed to schedules.simulate to get the step time and
the per-rank idle fraction that the schedule would have on truly parallel ranks, printed next to the
simulator's prediction with the paper's unit costs (F=1, B=2, W=1). On GPUs the same executor overlaps ranks through JAX's
asynchronous dispatch, and the measured step time is the one to compare with the "sim (measured costs)"
column.
"""
from __future__ import annotations

import collections
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dsv3 import model
from dsv3.bench import common
from dsv3.config import ModelConfig
from dsv3.pipeline import executor, schedules


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.bench.pipeline`."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("ranks", 4, "Pipeline ranks (each gets devices / ranks of the 8 devices).", **fv)
  flags.DEFINE_integer("microbatches", 8, "Micro-batches per step.", **fv)
  flags.DEFINE_integer("batch", 16, "Sequences per step.", **fv)
  flags.DEFINE_integer("seq", 32, "Tokens per sequence.", **fv)
  flags.DEFINE_integer("steps", 3, "Timed steps per schedule.", **fv)
  flags.DEFINE_list("schedules", list(schedules.NAMES), "Comma-separated schedules to run.", **fv)
  flags.DEFINE_bool("unfused", False, "Also run DualPipe(V) with each F&B cell as its F and B programs "
                    "(the baseline).", **fv)

BENCH_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                   n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                   max_position_embeddings=256, rope_scaling=None, remat="none")


def _variables(cfg: ModelConfig):
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)


def op_costs(timings):
  """Median seconds per op kind from (rank, op string, start, end) records (robust to stray pauses)."""
  by_kind = collections.defaultdict(list)
  for _, op, start, end in timings:
    kind = "FB" if "&" in op else ("W" if op == "W" else ("B*" if op.endswith("*") else op[0]))
    by_kind[kind].append(end - start)
  return {k: statistics.median(v) for k, v in by_kind.items()}


def simulated(sched, costs):
  """Simulator result with measured costs; kinds a schedule never runs are derived from the others."""
  F = costs["F"]
  W = costs.get("W", 0.0)
  B = costs.get("B", costs.get("B*", 0.0) + W)
  FB = costs.get("FB", F + B)
  return schedules.simulate(sched, F=F, B=max(B, W), W=W, FB=FB)


def bench(schedule: str, ranks: int, microbatches: int, steps: int, cfg: ModelConfig, variables, tokens,
          fused: bool = True):
  kwargs = dict(schedule=schedule, num_stages=ranks, microbatches=microbatches, mtp_weight=0.3, alpha=1e-4,
                fused=fused)
  jax.block_until_ready(executor.pipeline_value_and_grad(cfg, variables, tokens, **kwargs))   # compile
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(executor.pipeline_value_and_grad(cfg, variables, tokens, **kwargs))
    times.append(time.perf_counter() - start)
  timings = []
  for _ in range(steps):
    timings.append([])
    executor.pipeline_value_and_grad(cfg, variables, tokens, timings=timings[-1], **kwargs)
  costs = op_costs([t for run in timings for t in run])
  serial = statistics.median(sum(e - s for _, _, s, e in run) for run in timings)
  plan = executor.get_plan(cfg, schedule, ranks, microbatches)
  measured_sim = simulated(plan.schedule, costs)
  unit_sim = schedules.simulate(plan.schedule)
  idle = lambda res: [b / res.makespan for b in res.bubble_per_rank]
  return dict(step=statistics.median(times), serial=serial, costs=costs,
              sim_step=measured_sim.makespan, idle_measured=idle(measured_sim), idle_unit=idle(unit_sim))


def main(argv):
  del argv
  common.use_cpu_devices(8)
  args = common.flag_args(define_flags)
  cfg = ModelConfig(**BENCH_MODEL).validate()
  variables = _variables(cfg)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size, jnp.int32)
  devices = jax.devices()
  print(f"CPU benchmark ({len(devices)} simulated {devices[0].platform} devices sharing {os.cpu_count()} cores; "
        f"sub-meshes do not truly run in parallel here): P={args.ranks} ranks of "
        f"{len(devices) // args.ranks} devices, {args.microbatches} micro-batches of "
        f"{args.batch // args.microbatches}x{args.seq} tokens, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
  print("step: measured wall time of one step (async dispatch); serial: sum of per-op times with "
        "block_until_ready;\nsim: schedules.simulate with those measured per-op costs (ideal parallel ranks); "
        "idle: per-rank idle fraction, simulated with measured costs vs. unit costs F=1 B=2 W=1.")
  print(f"{'schedule':<10} {'step ms':>8} {'serial ms':>10} {'sim ms':>8}  {'op costs ms':<40} idle (measured costs) | idle (unit costs)")
  runs = [(name, True) for name in args.schedules]
  if args.unfused:
    runs += [(name, False) for name, _ in runs if name.startswith("dualpipe")]
  for name, fused in runs:
    r = bench(name, args.ranks, args.microbatches, args.steps, cfg, variables, tokens, fused)
    name += "" if fused else " (F,B)"
    costs = " ".join(f"{k}={v * 1e3:.1f}" for k, v in sorted(r["costs"].items()))
    fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)
    print(f"{name:<10} {r['step'] * 1e3:>8.1f} {r['serial'] * 1e3:>10.1f} {r['sim_step'] * 1e3:>8.1f}  "
          f"{costs:<40} {fmt(r['idle_measured'])} | {fmt(r['idle_unit'])}", flush=True)


if __name__ == "__main__":
  define_flags()
  common.run(main)
