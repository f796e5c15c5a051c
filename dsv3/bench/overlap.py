"""DualPipe's overlap in the GPU compiler's schedule: fused F&B programs against their unfused F and B.

  .venv-aot/bin/python -m dsv3.bench.overlap [--config=configs/small.py] [--target=h100] [--expert=8,16] \
      [--config.precision=fp8] [--nopgle] [--nobaselines]

For each expert degree EP, compiles (deviceless; needs the compile-only toolchain, requirements-aot.txt) pipeline rank
0 of a DualPipe run of the config on mesh pipeline 2 x expert EP, EP GPUs per rank (EP 16: a rank spans two
8-GPU hosts): its F&B programs (stages.forward_backward) and the F and B programs each one fuses. From each
program's scheduled HLO (dsv3.analysis.overlap) it prints, over the expert all-to-alls (dispatch and combine, and
their transposes in the backward): how many, their bytes per device, the fraction that is asynchronous, and
the fraction of bytes whose start..done window holds GEMMs of the other chunk (F&B) or any GEMM; the F and B
programs also as they compiled before (XLA's default scheduling, XLA_DEFAULTS), each F&B program without its
barriers (pipeline.fb_barriers=False: XLA orders the two chunks freely), and each F&B program compiled
again with a latency profile from the step-time cost model (--pgle: XLA's profile-guided latency estimator fed
dsv3.analysis.hlo_cost.latency_profile, no device needed). The expert kernels are those model.grouped_gemm
picks for the target ('auto': tokamax's, or the FP8 kernels). Then the
DualPipe bubble the schedule simulator gives with the F&B cost that overlap implies (overlap.fb_cost)
against F + B. --json writes everything, every collective's window included.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Optional

from absl import flags
from ml_collections import config_flags

from dsv3.analysis import chip_figures, compile_only, hlo_cost, overlap
from dsv3.bench import common
from dsv3.kernels import grouped_gemm
from dsv3.parallel import sharding
from dsv3.pipeline import schedules, stages


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.bench.overlap`."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                                         "small.py"), "Training config file.", **fv)
  flags.DEFINE_enum("target", "h100", ["h100", "h800", "h200"], "GPU to compile for.", **fv)
  flags.DEFINE_list("expert", ["8", "16"], "Expert-parallel degrees (GPUs per pipeline rank).", **fv)
  flags.DEFINE_integer("microbatches", 8, "DualPipe micro-batches (>= 2 x 2 ranks).", **fv)
  flags.DEFINE_float("comm_ratio", 1.0, "Expert all-to-all time over compute time when nothing "
                     "overlaps (report §3.2.1: about 1 for cross-node EP), for the F&B cost.", **fv)
  flags.DEFINE_string("json", None, "Also write the results here.", **fv)
  flags.DEFINE_bool("pgle", True, "Also compile each F&B program with a latency profile from the step-time "
                    "cost model (dsv3.analysis.hlo_cost.latency_profile).", **fv)
  flags.DEFINE_bool("baselines", True, "Also the F and B programs under XLA's default scheduling (before), and "
                    "the F&B programs without their barriers (pipeline.fb_barriers=False).", **fv)


# XLA's defaults for what stages.GPU_OVERLAP_OPTIONS sets: how the stage programs compiled before it.
XLA_DEFAULTS = {"xla_gpu_enable_latency_hiding_scheduler": False,
                "xla_gpu_experimental_collective_start_as_early_as_possible": False,
                stages.IN_FLIGHT_OPTION: 1}


STAGE_KINDS = ("F", "B", "Bstar", "W", "FB", "FBstar")


def rank0_programs(config, target: str, echo=print, options=None, pgle: bool = False,
                   kinds=STAGE_KINDS) -> dict:
  """{program name: overlap.summary} of pipeline rank 0's stage programs of `kinds` (F, B, B*, W and F&B, and
  the F and B each F&B fuses), compiled for `target` as the trainer's runner runs them (with `options` over
  the stage programs' own; the expert kernels model.grouped_gemm picks for the target, 'auto': tokamax's on
  GPU); the other programs are walked, not compiled. pgle: each F&B program compiled again with a latency
  profile from dsv3.analysis.step_time's cost model (its summary under '<name>+pgle')."""
  config = config.copy_and_resolve_references()
  devices = compile_only.target_devices(target, int(config.mesh.pipeline) * int(config.mesh.expert)
                                        * int(config.mesh.data))
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  rank0 = lambda p: p.position == "rank0" and p.kind in kinds
  options = {**compile_only.GPU_COMPILER_OPTIONS, **(options or {})}
  with grouped_gemm.deviceless(devices):
    _, programs = compile_only.compiled_programs(config, mesh, options, echo, select=rank0, baselines=True)
    found = {p.name: overlap.summary(p.compiled.as_text()) for p in programs
             if rank0(p) and p.same_as is None and p.compiled is not None}
    if pgle:
      figures = chip_figures.figures(target)
      factor = float(config.model.ep_buffer_factor)
      with tempfile.TemporaryDirectory() as tmp:
        for p in programs:
          if rank0(p) and p.kind in ("FB", "FBstar") and p.same_as is None and p.compiled is not None:
            path = os.path.join(tmp, f"{p.name}.pbtxt")
            with open(path, "w") as f:
              f.write(hlo_cost.latency_profile(p.compiled.as_text(), figures,
                                                ragged_fill=1 / factor if factor > 1 else 1.0))
            start = time.perf_counter()
            again = p.lower().compile(compiler_options={**options, hlo_cost.PGLE_OPTION: path})
            echo(f"compiled {p.name} with the cost model's latency profile in {time.perf_counter() - start:.0f} s")
            found[p.name + "+pgle"] = overlap.summary(again.as_text())
  return found


def combine(*summaries: dict) -> dict:
  """Programs run one after the other (an unfused F&B cell: its F, then its B) as one summary."""
  return overlap.from_rows([r for s in summaries for r in s["rows"]], gemms=sum(s["gemms"] for s in summaries))


def overlap_rows(found: dict, defaults: Optional[dict] = None, free: Optional[dict] = None) -> list:
  """Per F&B program: its summary and that of the F and B programs it fuses (the unfused baseline), and of
  those compiled with XLA's default scheduling (`defaults`: rank0_programs with XLA_DEFAULTS), and of the
  F&B program without its barriers (`free`: rank0_programs with pipeline.fb_barriers=False), if given."""
  rows = []
  for name, s in found.items():
    if name.endswith("+pgle"):
      continue
    kind, *stage = name.split("_")[1:]
    if kind not in ("FB", "FBstar"):
      continue
    f, b = (f"rank0_{k}_{st}" for k, st in zip(("F", "Bstar" if kind == "FBstar" else "B"), stage))
    row = dict(program=name, fused=s, unfused=combine(found[f], found[b]), unfused_programs=[f, b])
    if name + "+pgle" in found:
      row["fused_pgle"] = found[name + "+pgle"]
    if defaults:
      row["unfused_xla_defaults"] = combine(defaults[f], defaults[b])
    if free:
      row["fused_free"] = free[name]
    rows.append(row)
  return rows


def bubble_rows(ranks: int, microbatches: int, fb: float) -> list:
  """DualPipe on `ranks` ranks with the paper's unit costs (F 1, B 2, W 1): F&B as F + B, and as `fb`."""
  sched = schedules.dualpipe(ranks, microbatches)
  out = []
  for label, cost in (("F&B = F + B (unfused)", 3.0), (f"F&B = {fb:.2f} (fused, compiled overlap)", fb)):
    res = schedules.simulate(sched, F=1.0, B=2.0, W=1.0, FB=cost)
    out.append(dict(fb=label, makespan=res.makespan, bubble=res.bubble))
  return out


def main(argv):
  del argv
  F = flags.FLAGS
  compile_only.check_toolchain(F.target)
  compile_only.prepare_environment(F.target, 0)
  results = []
  for ep in map(int, F.expert):
    config = F.config.copy_and_resolve_references()
    config.mesh.data, config.mesh.expert, config.mesh.pipeline = 1, ep, 2
    config.pipeline.schedule, config.pipeline.microbatches = "dualpipe", F.microbatches
    config.batch_size = max(int(config.batch_size), ep * F.microbatches)
    print(f"EP{ep}: compiling rank 0 of DualPipe PP2 x EP{ep} for {F.target} ...", flush=True)
    defaults = rank0_programs(config, F.target, options=XLA_DEFAULTS) if F.baselines else None
    free = None
    if F.baselines:
      config_free = config.copy_and_resolve_references()
      config_free.pipeline.fb_barriers = False
      free = rank0_programs(config_free, F.target, kinds=("FB", "FBstar"))
    for row in overlap_rows(rank0_programs(config, F.target, pgle=F.pgle), defaults, free):
      row["ep"] = ep
      results.append(row)
  print(f"\nExpert all-to-alls of pipeline rank 0 ({F.target}, compiled; stages.GPU_OVERLAP_OPTIONS): "
        "fused F&B program vs its F and B compiled apart")
  print("| EP | F&B program | schedule | all-to-alls | MiB / device | async | window holds other chunk's GEMMs "
        "| window holds any GEMM |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    for label, s in (("fused, barriers", r["fused"]), ("fused, barriers + cost-model PGLE", r.get("fused_pgle")),
                     ("fused, no barriers", r.get("fused_free")), ("F, B apart", r["unfused"]),
                     ("F, B apart, XLA's default scheduling (before)", r.get("unfused_xla_defaults"))):
      if s is None:
        continue
      print(f"| {r['ep']} | {r['program']} | {label} | {s['count']} | {s['bytes'] / 2**20:.2f} | "
            + " | ".join(overlap.percent(s[k]) for k in overlap.FRACTIONS) + " |")
  best = lambda r: max(x["hidden_by_other_chunk"] for x in (r["fused"], r.get("fused_pgle") or r["fused"]))
  worst = min((best(r) for r in results if r["fused"]["count"]), default=None)
  if worst is None:
    print(f"\n{overlap.NO_ALL_TO_ALL}: no F&B program of rank 0 has an expert all-to-all")
    return
  fb = overlap.fb_cost(1.0, 2.0, worst, F.comm_ratio)
  bubbles = bubble_rows(8, 20, fb)
  print(f"\nDualPipe PP8, 20 micro-batches, F 1 B 2 W 1, all-to-all : compute = {F.comm_ratio:g} : 1; the fused "
        f"cell hides {worst:.0%} of its all-to-all bytes behind the other chunk (the worst program above)")
  print("| F&B cost | step (simulated) | bubble |\n|---|---|---|")
  for b in bubbles:
    print(f"| {b['fb']} | {b['makespan']:.1f} | {b['bubble']:.1f} |")
  for r in results:
    print("\n" + overlap.format_rows(f"EP{r['ep']} {r['program']} (fused)", r["fused"]))
  if F.json:
    with open(F.json, "w") as f:
      options = stages.gpu_overlap_options(F.config.pipeline.collectives_in_flight)
      json.dump(dict(target=F.target, options=options, programs=results, bubble=bubbles),
                f, indent=1, default=str)


if __name__ == "__main__":
  define_flags()
  common.run(main)
