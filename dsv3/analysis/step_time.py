"""How long a compiled training step takes on its target: the step composed from its programs' costs.

Each program is costed by dsv3.analysis.hlo_cost on a chip's figures (dsv3.analysis.chip_figures). A pipelined
step runs the schedule's simulator (dsv3.pipeline.schedules.simulate) with the slowest rank's F, B, W and F&B
programs as cell costs and the activation transfer between ranks as the edge cost, and adds the gradient
sums, update and guard programs that follow it. `--compile_only` writes the result as DIR/compiled/estimate.json.

  python -m dsv3.analysis.step_time DIR [--target=h800]     # re-estimate a dry run's programs
"""
from __future__ import annotations

import json
import os
import re

import ml_collections
from absl import flags

from dsv3 import cli, plan
from dsv3.analysis import chip_figures, hlo_cost
from dsv3.analysis.chip_figures import Figures
from dsv3.pipeline import schedules

# ---------------------------------------------------------------------------------------------------
# A step: the programs one training step runs, composed as the executor runs them.
# ---------------------------------------------------------------------------------------------------
AFTER_PIPELINE = ("sums", "update")


def _kind_from_name(name: str) -> str:
  """A program's kind from its name ('rank3_FBstar_stage3_stage12' -> 'FBstar'; 'train_step' -> 'train'), for
  a memory.json written before its rows carried `kind`."""
  found = re.match(r"rank\d+_([A-Za-z]+)", name)
  return found.group(1) if found else name.split("_")[0]


def _edge_seconds(settings: dict, fig: Figures) -> tuple:
  """(seconds, bytes) of one micro-batch's hidden states crossing to the next pipeline rank, per device: its
  share of the micro-batch rows x seq_len x hidden in the compute dtype, over the link between the ranks."""
  mesh, model = settings["mesh"], settings["model"]
  shards = int(mesh["data"]) * int(mesh["expert"])
  rows = schedules.microbatch_rows(int(settings["batch_size"]), int(settings["pipeline"]["microbatches"]), shards)
  width = 4 if str(model.get("dtype", "bfloat16")) in ("float32", "fp32") else 2
  nbytes = rows / shards * int(settings["seq_len"]) * int(model["hidden_size"]) * width
  ib = shards >= fig.gpus_per_node        # a rank fills a node or more: its neighbour is in another node
  return nbytes / (fig.ib if ib else fig.nvlink) + (fig.ib_latency if ib else fig.nvlink_latency), nbytes


def estimate(memory: dict, hlo_dir: str, fig: Figures, echo=None) -> dict:
  """estimate.json's dict for a dry run (memory.json's dict, its <program>.hlo.txt files in `hlo_dir`) on
  `fig`'s target: each program's time (`program_time`), the step (a pipelined one through the schedule's
  simulator), tokens/s per device, MFU, and the assumptions."""

  settings = memory["settings"]
  factor = float(settings["model"].get("ep_buffer_factor", 0) or 0)
  # Only expert-parallel buffers are sized by the factor (one expert shard: the rows are the routed ones).
  fill = 1.0 / factor if factor > 1 and int(settings["mesh"]["expert"]) > 1 else 1.0
  times = {}
  for row in memory["programs"]:
    with open(os.path.join(hlo_dir, row["hlo"])) as f:
      times[row["program"]] = dict(kind=row.get("kind") or _kind_from_name(row["program"]), position=row["position"],
                                   **hlo_cost.program_time(f.read(), fig, row.get("devices"), fill).as_dict())
    if echo:
      echo(f"estimated {row['program']}: {times[row['program']]['seconds'] * 1e3:.2f} ms")
  devices = int(memory["devices"])
  tokens = int(settings["batch_size"]) * int(settings["seq_len"])
  schedule = str(settings.get("pipeline", {}).get("schedule", "none"))
  pipelined = memory.get("ranks") is not None
  cells, simulated, edge = None, None, None
  if pipelined:
    ranks = memory["ranks"]
    cost = lambda kind: max((times[n]["seconds"] for r in ranks for n in r["programs"]
                             if n in times and times[n]["kind"] == kind), default=None)
    F, W = cost("F"), cost("W") or 0.0
    B = max(x for x in (cost("B"), (cost("Bstar") or 0.0) + W if cost("Bstar") else None) if x is not None)
    FB = max((x for x in (cost("FB"), cost("FBstar") + W if cost("FBstar") else None) if x is not None),
             default=None)
    edge, edge_bytes = _edge_seconds(settings, fig)
    sched = schedules.make(schedule, int(settings["mesh"]["pipeline"]), int(settings["pipeline"]["microbatches"]))
    sim = schedules.simulate(sched, F=F, B=B, W=W, FB=FB, comm=edge)
    after = max(sum(times[n]["seconds"] for n in r["programs"] if n in times and times[n]["kind"] in AFTER_PIPELINE)
                for r in ranks)
    check = max((t["seconds"] for t in times.values() if t["kind"] == "check"), default=0.0)
    step = sim.makespan + after + check
    cells = dict(F=F, B=B, W=W, FB=FB if FB is not None else F + B, edge=edge, edge_bytes=edge_bytes)
    simulated = dict(pipeline_seconds=sim.makespan, bubble_seconds=sim.bubble, after_pipeline_seconds=after,
                     check_seconds=check)
  else:
    step = sum(t["seconds"] for t in times.values() if t["kind"] == "train")
  p = plan.plan(ml_collections.ConfigDict(settings), platform="gpu" if fig.target != "cpu" else "cpu")
  bf16 = fig.flops["bf16"]
  out = dict(
      target=fig.target, step_seconds=step, tokens_per_step=tokens,
      tokens_per_second_per_device=tokens / step / devices,
      mfu=p["flops_per_step"] / step / devices / bf16,
      flops_per_step=p["flops_per_step"], devices=devices, ragged_fill=fill, schedule=schedule, cells=cells, pipeline=simulated,
      programs=times,
      assumptions=dict(
          figures=fig.as_dict(),
          mfu="causal model FLOPs (dsv3.flops: 6 x activated matmul params + causal attention, MTP included) "
              "per step / (step seconds x devices x the chip's dense BF16 peak)",
          kernels="each kernel takes max(GEMM FLOPs / peak for its operand dtype, bytes read + written / HBM "
                  "bandwidth) + a launch cost; a loop its known trip count times its body",
          collectives="one at a time on a communication stream: bytes each device sends (all-to-all (n-1)/n of "
                      "its result, split by the link each peer is on; all-gather / reduce-scatter (n-1)/n; "
                      "all-reduce 2(n-1)/n; a ring across nodes at InfiniBand) + a latency; asynchronous ones "
                      "overlap whatever the schedule runs inside their window. A ragged all-to-all counts its "
                      "static buffer times ragged_fill (1 / model.ep_buffer_factor: the buffers hold that factor x the "
                      "balanced load), as a ragged GEMM kernel its FLOPs; other expert GEMMs (scan, tiled) run "
                      "their static shapes",
          pipeline=("the schedule's simulator (dsv3.pipeline.schedules.simulate) with the slowest rank's F, B "
                    "(B* + W), W and F&B programs as cell costs and one micro-batch's hidden states between "
                    "ranks as the edge; then the slowest rank's gradient sums and update, and the guard's check"
                    if pipelined else "one train_step program (gradient accumulation inside)"),
          not_counted="data loading, host-side metrics and checkpoint saves; XLA's sort stands in for CUB's "
                      "on GPU targets (compile_only's notes)"))
  return out


def format_table(est: dict) -> str:
  """The estimate as printed after a dry run."""
  fig = est["assumptions"]["figures"]
  lines = [f"step-time estimate for {est['target']} ({est['devices']} devices, {est['schedule']}): compiled "
           f"programs costed at {_rate(fig['flops']['bf16'], 'FLOP/s')} BF16 ({_rate(fig['flops']['fp8'], 'FLOP/s')} "
           f"FP8), HBM {_rate(fig['hbm'], 'B/s')}, NVLink {_rate(fig['nvlink'], 'B/s')}, InfiniBand "
           f"{_rate(fig['ib'], 'B/s')} per device",
           f"{'program':<28} {'ms':>10} {'compute ms':>11} {'comm ms':>9} {'exposed ms':>11} {'TFLOPs':>8}"]
  for name, t in est["programs"].items():
    lines.append(f"{name:<28} {t['seconds'] * 1e3:>10.2f} {t['compute'] * 1e3:>11.2f} {t['communication'] * 1e3:>9.2f} "
                 f"{t['exposed'] * 1e3:>11.2f} {t['flops'] / 1e12:>8.3f}")
  if est["cells"]:
    c, p = est["cells"], est["pipeline"]
    lines.append(f"cells: F {c['F'] * 1e3:.2f} ms, B {c['B'] * 1e3:.2f}, W {c['W'] * 1e3:.2f}, F&B {c['FB'] * 1e3:.2f}, "
                 f"edge {c['edge'] * 1e3:.3f} ms; pipeline {p['pipeline_seconds'] * 1e3:.1f} ms (bubble "
                 f"{p['bubble_seconds'] * 1e3:.1f}), then sums + update {p['after_pipeline_seconds'] * 1e3:.1f} ms")
  lines.append(f"step {est['step_seconds']:.4g} s; {est['tokens_per_second_per_device']:,.0f} tokens/s per device; "
               f"MFU {est['mfu']:.1%} (compiled, not run)")
  return "\n".join(lines)


def _rate(value: float, unit: str) -> str:
  for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if value >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def write(memory: dict, out_dir: str, fig: Figures, echo=print) -> dict:
  """Estimates the dry run in `out_dir` (its memory.json's dict given), writes out_dir/estimate.json (through a
  temporary file: never a half-written one) and prints the table."""
  est = estimate(memory, out_dir, fig)
  tmp = os.path.join(out_dir, "estimate.json.tmp")
  with open(tmp, "w") as f:
    json.dump(est, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "estimate.json"))
  echo(format_table(est))
  return est


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`python -m dsv3.analysis.step_time`'s flags (importing the module defines none)."""
  flags.DEFINE_string("target", None, f"Whose figures to cost with: {', '.join(sorted(chip_figures.FIGURES))} or cpu (measured "
                      "here); default the dry run's own target.", flag_values=flag_values)


def main(argv):
  if len(argv) != 2:
    raise cli.UsageError("usage: python -m dsv3.analysis.step_time DIR [--target=h800]: DIR is a --compile_only "
                         "workdir (it holds compiled/memory.json)")
  out_dir = os.path.join(argv[1], "compiled")
  path = os.path.join(out_dir, "memory.json")
  if not os.path.exists(path):
    raise cli.UsageError(f"{path} does not exist: run python -m dsv3.train --compile_only=TARGET "
                         f"--workdir={argv[1]} first")
  with open(path) as f:
    memory = json.load(f)
  target = flags.FLAGS.target or memory["target"]
  try:
    fig = chip_figures.measure_cpu() if target == "cpu" else chip_figures.figures(target)
  except chip_figures.UnknownTargetError as e:
    raise cli.UsageError(f"--target: {e}") from None
  write(memory, out_dir, fig)


if __name__ == "__main__":
  define_flags()
  cli.run(main)

