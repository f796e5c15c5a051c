"""Compile-only dry run: every program of one training step, compiled for a target, never allocated.

  python -m dsv3.train --config=configs/small.py --workdir=DIR --compile_only=h100 --config.mesh.expert=8

TARGET 'cpu' compiles for this process's (simulated) CPU devices; 'h100', 'h800' and 'h200' for a deviceless
GPU topology of 8 GPUs per host (jax.experimental.topologies, the chip's GpuTargetConfigProto in
dsv3/analysis/gpu_specs/; an H800 compiles as an H100), which needs the compile-only toolchain (docs/compile_only.md).
The state and batch are abstract (the trainer's shapes and shardings). The programs are exactly those the
trainer's runner runs (dsv3.training.runner.Runner.programs): unpipelined, its train and eval steps; pipelined, the
executor's own driver walked on abstract state, each rank's stage programs (F, B or B* and W, F&B cells),
gradient sums, update and evaluation on its sub-mesh, then the guard's check. Writes
DIR/compiled/memory.json (dsv3.analysis.compiled_memory: per program, per rank, the worst, and dsv3.plan's estimate),
each program's scheduled HLO as DIR/compiled/<program>.hlo.txt, and DIR/compiled/estimate.json
(dsv3.analysis.step_time: each program's time on the target, the step, tokens/s per device, MFU). Every program compiles on its own devices of
the full mesh (a stage program on its rank's sub-mesh: EP64 x DP2 = 128 GPUs in the 671B layout), so its
per-device shapes are the run's, every expert buffer included (memory.json's exact_shapes). GPU kernels are chosen by the target mesh's
platform (dsv3.kernels.backend); XLA:GPU sorts compile without CUB (its scratch size needs a device).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from dsv3 import cli, plan
from dsv3.analysis import chip_figures, compiled_memory, overlap, step_time
from dsv3.config import ModelConfig
from dsv3.kernels import grouped_gemm
from dsv3.parallel import sharding
from dsv3.pipeline import stages
from dsv3.training import runner as runner_lib
from dsv3.training import workdir as workdir_lib
from dsv3.training.train_config import validate_train_config

TARGETS = ("cpu", "h100", "h800", "h200")
_SPEC_FILES = {"h100": "h100_sxm.txtpb", "h800": "h100_sxm.txtpb", "h200": "h200.txtpb"}
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}
GPUS_PER_HOST = 8
# The compile-only GPU toolchain past jax 0.12 (pyproject.toml's `aot` extra), and what each piece does.
GPU_TOOLCHAIN = (
    ("jax-cuda12-pjrt", "XLA's CUDA compiler"),
    ("jax-cuda12-plugin", "the Triton and Mosaic GPU lowerings of tokamax's and dsv3's kernels"),
    ("nvidia-cuda-nvcc", "CUDA 13's ptxas, which assembles the Triton kernels"),
)
INSTALL_HINT = ('in a Python 3.12 venv (python3.12 -m venv .venv-aot), from the repository: '
                '.venv-aot/bin/pip install -e ".[aot]" (the whole toolchain), then run with .venv-aot/bin/python')


class CompileOnlyError(cli.UsageError):
  """The dry run cannot run as asked (unknown target, missing toolchain); the message says the fix."""


def prepare_environment(target: str, num_devices: int) -> None:
  """What JAX reads when its backends start (so, before): JAX_PLATFORMS=cpu for a GPU target (docs/compile_only.md),
  and for 'cpu' as many simulated devices as the mesh needs unless XLA_FLAGS already sets a count."""
  if target in _SPEC_FILES:
    if not jax.config.jax_platforms:          # JAX read the environment at import: set its config instead
      os.environ["JAX_PLATFORMS"] = "cpu"
      jax.config.update("jax_platforms", "cpu")
  elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={num_devices}").strip()


def run(config, workdir: str, target: str) -> dict:
  """The --compile_only=TARGET entry point: checks the config, locks the workdir, compiles, reports."""
  if target not in TARGETS:
    raise CompileOnlyError(f"--compile_only: unknown target {target!r}; use one of {', '.join(TARGETS)}")
  prepare_environment(target, int(config.mesh.data) * int(config.mesh.expert) * int(config.mesh.pipeline))
  check_toolchain(target)                   # before the workdir is made or locked
  validate_train_config(config)
  with workdir_lib.lock(workdir):
    return compile_step(config, workdir, target)


def check_toolchain(target: str) -> None:
  """Raises CompileOnlyError (one line) unless this Python can compile `target`: for a GPU target, Python
  3.12 with jax 0.12 and every piece of GPU_TOOLCHAIN at its version. The message names what is missing and
  the one command that installs it. (A venv with XLA's compiler but not jax-cuda12-plugin would otherwise
  start and die deep in XLA: "Failed to lookup host symbol: ragged_dot_sm90_mosaic_gpu".)"""
  if target not in TARGETS:
    raise CompileOnlyError(f"--compile_only: unknown target {target!r}; use one of {', '.join(TARGETS)}")
  if target == "cpu":
    return

  def installed(dist):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return None

  jaxlib = installed("jaxlib") or "none"
  if tuple(int(x) for x in re.findall(r"\d+", jaxlib)[:2]) < (0, 12):
    missing = [f"jax 0.12 (this is jaxlib {jaxlib})"]
  else:
    missing = [f"{dist} ({role})" for dist, role in GPU_TOOLCHAIN if installed(dist) is None]
    missing += [f"{dist}=={jaxlib} ({role}; this is {installed(dist)})" for dist, role in GPU_TOOLCHAIN
                if dist.startswith("jax-") and installed(dist) not in (None, jaxlib)]
  if missing:
    raise CompileOnlyError(f"--compile_only={target} needs the compile-only GPU toolchain; this Python lacks "
                           f"{', '.join(missing)}: {INSTALL_HINT}")


def gpu_spec(target: str) -> str:
  """The GpuTargetConfigProto text for `target`'s chip: dsv3/analysis/gpu_specs/, the texts XLA ships
  (xla/backends/gpu/target_config/specs/) as embedded in jax-cuda12-plugin 0.12.0.1's library."""
  path = os.path.join(os.path.dirname(__file__), "gpu_specs", _SPEC_FILES[target])
  with open(path) as f:
    return f.read()


def capacity_bytes(target: str) -> Optional[int]:
  """Device memory of `target`'s chip (the spec's device_memory_size); None for 'cpu'."""
  if target not in _SPEC_FILES:
    return None
  found = re.search(r"device_memory_size:\s*(\d+)", gpu_spec(target))
  return int(found.group(1)) if found else None


def target_devices(target: str, count: int):
  """`count` devices of `target`: this process's CPU devices, or a deviceless GPU topology's."""
  if target == "cpu":
    devices = jax.devices()
    if len(devices) != count:
      raise CompileOnlyError(
          f"--compile_only=cpu: the mesh needs {count} devices but this process has {len(devices)}; run with "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return devices
  hosts, per_host = (count // GPUS_PER_HOST, GPUS_PER_HOST) if count >= GPUS_PER_HOST else (1, count)
  if hosts * per_host != count:
    raise CompileOnlyError(f"--compile_only={target}: {count} devices is not a whole number of "
                           f"{GPUS_PER_HOST}-GPU hosts; make mesh.data x mesh.expert x mesh.pipeline a multiple of 8")
  topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_spec(target),
                                      topology=f"1x{hosts}x{per_host}")
  return list(topo.devices)


def _compile(program: runner_lib.Program, options, echo):
  """Compiles `program` with XLA `options`, echoes its time and peak."""
  start = time.perf_counter()
  compiled = program.lower().compile(compiler_options=options)
  peak = compiled_memory.program_memory(compiled)["peak_bytes"]
  echo(f"compiled {program.name} in {time.perf_counter() - start:.0f} s: peak {compiled_memory.gb(peak)} GB per device")
  return compiled


def compiled_programs(config, mesh, options=None, echo=print, select=None, baselines=False) -> tuple:
  """(runner, programs): every program one training step of `config` on `mesh` runs, as the trainer's runner
  runs them (dsv3.training.runner.Runner.programs), compiled with XLA `options`. A program of the same shapes as one
  compiled for another rank is not compiled again (its `same_as`). select(program) -> False leaves a program
  uncompiled (a study that needs only some; the next programs then take its traced shapes). baselines: also
  the unfused F and B programs of each F&B cell (a study of the overlap)."""
  runner = runner_lib.make_runner(config, ModelConfig.from_config_dict(config), mesh)
  batch = jax.ShapeDtypeStruct((int(config.batch_size), int(config.seq_len) + 1), jnp.int32)
  compile = lambda p: _compile(p, options, echo) if select is None or select(p) else None
  return runner, runner.programs(batch, compile, baselines=baselines)


def rank_info(holding: dict, programs: list, ema: bool) -> dict:
  """A pipeline rank's row of memory.json's 'ranks' (what compiled_memory.rank_peak reads): its programs (by
  the name they compiled under) and the bytes per device it holds across them. ema: the run keeps an EMA,
  whose evaluation puts a copy of the rank's params on its devices (HostEMA.value, laid out as they are)."""
  size = compiled_memory.bytes_per_device
  names = []
  for p in programs:
    if p.position == f"rank{holding['rank']}" and (p.same_as or p.name) not in names:
      names.append(p.same_as or p.name)
  state = holding["state"]
  return dict(rank=holding["rank"], stages=holding["stages"], programs=names,
              inflight_microbatches=holding["inflight_microbatches"], state_bytes=size(state),
              params_bytes=size(state["params"]), ema_bytes=size(state["params"]) if ema else 0,
              copies_bytes=size(holding["copies"]) + size(holding["accumulators"]),
              parameter_copies_bytes=size(holding["copies"]))


def compile_step(config, workdir: str, target: str, echo=print) -> dict:
  """Compiles every program of one training step of `config` for `target`; returns memory.json's dict.

  Writes DIR/compiled/memory.json and DIR/compiled/<program>.hlo.txt; prints the table through `echo`.
  Raises CompileOnlyError for an unknown target or a missing GPU toolchain.
  """
  check_toolchain(target)

  gpu = target != "cpu"
  config = config.copy_and_resolve_references()
  notes = []
  if gpu:
    notes.append("XLA flag --xla_gpu_enable_cub_radix_sort=false: sorts compile as XLA's sort (CUB's scratch size "
                 "needs a device), so the MoE dispatch sorts differ from what a GPU run executes")
    if config.precision == "fp8":
      notes.append("FP8 GEMMs (every linear's and expert's forward, input and weight gradient) in "
                   "dsv3.kernels.fp8_triton's kernels")
    elif config.model.grouped_gemm in ("auto", "tokamax"):
      notes.append("expert GEMMs in tokamax's grouped kernels (model.grouped_gemm 'auto' on GPU; "
                   "dsv3.kernels.grouped_gemm.deviceless tells tokamax the target chip)")
  devices = target_devices(target, int(config.mesh.data) * int(config.mesh.expert) * int(config.mesh.pipeline))
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  options = GPU_COMPILER_OPTIONS if gpu else None
  with grouped_gemm.deviceless(devices) if gpu else contextlib.nullcontext():
    runner, programs = compiled_programs(config, mesh, options, echo)
  holdings = runner.rank_holdings(jax.ShapeDtypeStruct((int(config.batch_size), int(config.seq_len) + 1), jnp.int32))
  ema = bool(config.ema_decay)
  if holdings is None:      # unpipelined: one holding, the whole state on every device's share
    state = runner.checkpoint_like
    ranks = None
    single = dict(state_bytes=compiled_memory.bytes_per_device(state),
                  ema_bytes=compiled_memory.bytes_per_device(state["params"]) if ema else 0)
  else:
    ranks = [rank_info(h, programs, ema) for h in holdings]
    single = None
  if runner.pipelined:
    notes.append(f"pipeline ({config.pipeline.schedule}, {config.pipeline.microbatches} micro-batches): each "
                 f"rank's programs on its own state (its stages' units), as the executor calls them, compiled "
                 f"once per distinct shape; a rank's peak adds what it holds across programs (state, parameter "
                 f"copies and accumulators, in-flight residuals) to each phase's compiled figures; the holders' "
                 f"sums of units shared between ranks, the sum of the scalar rows over 'pipeline' and the "
                 f"transfers are not compiled")
    if gpu:
      overlap_options = stages.gpu_overlap_options(config.pipeline.collectives_in_flight)
      notes.append(f"stage programs with XLA options {overlap_options} (the executor's on GPUs; the last is "
                   f"pipeline.collectives_in_flight); each F&B program's line says how much of its expert "
                   f"all-to-all traffic runs under the other chunk")
  notes.append("phases: evaluation holds the state" + (", the EMA's device copy of the params (HostEMA.value)"
                                                          if ema else "") + " and an eval program's temporaries; "
               "a checkpoint save copies the state to the host (orbax), holding nothing more on the device")
  out_dir = os.path.join(workdir, "compiled")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for p in programs:
    if p.same_as is not None or p.compiled is None:
      continue
    text = p.compiled.as_text()
    with open(os.path.join(out_dir, f"{p.name}.hlo.txt"), "w") as f:
      f.write(text)
    rows.append(dict(program=p.name, kind=p.kind, position=p.position, devices=[d.id for d in p.mesh.devices.flat],
                     hlo=f"{p.name}.hlo.txt", **compiled_memory.program_memory(p.compiled)))
    if gpu and p.kind in ("FB", "FBstar"):     # what the F&B cell overlaps (dsv3.analysis.overlap)
      rows[-1]["overlap"] = {k: v for k, v in overlap.summary(text).items() if k != "rows"}
  worst = compiled_memory.peaks(rows, ranks, single)
  estimate = plan.plan(config, platform="gpu" if gpu else "cpu")["memory_per_device"]   # its code paths
  result = dict(
      target=target, device_kind=str(getattr(devices[0], "device_kind", devices[0].platform)),
      platform=devices[0].platform, devices=len(devices), mesh=dict(mesh.shape),
      capacity_bytes_per_device=capacity_bytes(target), programs=rows, **worst,
      estimated_peak_bytes_per_device=estimate["total_with_activations_bytes"],
      estimate=dict(source="dsv3.analysis.memory.step_memory: parameters + ZeRO-1 optimizer states as the trainer "
                           "holds them, "
                           "FP32 gradients (pipelined: the per-device parameter copies and accumulators) of the "
                           "worst rank, and activations (remat-saved residuals of every layer x in-flight "
                           "micro-batches, one layer's backward or the head's working set, logits)", **estimate),
      peak_over_estimate=worst["max_peak_bytes_per_device"] / max(estimate["total_with_activations_bytes"], 1),
      compiler_options=dict(options or {}),
      exact_shapes=True,       # every program compiled on its own devices of the full mesh
      settings=config.to_dict(),   # what was compiled: the resolved config, overrides included
      notes=notes)
  if worst["ranks"] is not None:      # the planner beside each rank's compiled peak
    for r, plan_bytes in zip(worst["ranks"], estimate["per_rank_peak_bytes"]):
      r.update(plan_bytes=int(plan_bytes), peak_over_plan=r["peak_bytes"] / max(int(plan_bytes), 1))
  result["shortfalls"] = compiled_memory.shortfalls(result)
  with open(os.path.join(out_dir, "memory.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  echo(compiled_memory.format_table(result))
  figures = chip_figures.figures(target) if gpu else chip_figures.measure_cpu(devices=len(devices))
  step_time.write(json.loads(json.dumps(result, default=str)), out_dir, figures, echo)
  return result
