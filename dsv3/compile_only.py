"""Compile-only dry run: every program of one training step, compiled for a target, never allocated.

  python -m dsv3.train --config=configs/small.py --workdir=DIR --compile_only=h100 --config.mesh.expert=8

TARGET 'cpu' compiles for this process's (simulated) CPU devices; 'h100', 'h800' and 'h200' for a deviceless
GPU topology of 8 GPUs per host (jax.experimental.topologies, the chip's GpuTargetConfigProto in
dsv3/gpu_specs/; an H800 compiles as an H100), which needs requirements-aot.txt's toolchain (GPU_AOT.md).
The state and batch are abstract (the trainer's shapes and shardings). Unpipelined, the programs are the
trainer's train and eval steps (dsv3.steps); pipelined, each distinct rank's stage programs (F, B or B* and
W, F&B cells), gradient sums, update and evaluation on its sub-mesh, then the guard's check. Writes
DIR/compiled/memory.json (dsv3.compiled_memory: per program, per rank, the worst, and dsv3.plan's estimate)
and each program's scheduled HLO as DIR/compiled/<program>.hlo.txt. A mesh over MAX_COMPILE_DEVICES compiles
as a stand-in with the same per-device shapes (`stand_in`). GPU kernels are chosen by the target mesh's
platform (dsv3.backend); XLA:GPU sorts compile without CUB (its scratch size needs a device).
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
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import cli, compiled_memory, grouped_gemm, overlap, plan, sharding
from dsv3 import steps as steps_lib
from dsv3 import workdir as workdir_lib
from dsv3.config import ModelConfig
from dsv3.train_config import validate_train_config
from dsv3.layers import compute_dtype
from dsv3.pipeline import executor, per_device, pipelined, reduction, stages

TARGETS = ("cpu", "h100", "h800", "h200")
_SPEC_FILES = {"h100": "h100_sxm.txtpb", "h800": "h100_sxm.txtpb", "h200": "h200.txtpb"}
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}
GPUS_PER_HOST = 8
MAX_COMPILE_DEVICES = 256     # a larger mesh compiles as its stand-in (`stand_in`)
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
  """What JAX reads when its backends start (so, before): JAX_PLATFORMS=cpu for a GPU target (GPU_AOT.md),
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
  """The GpuTargetConfigProto text for `target`'s chip: dsv3/gpu_specs/, the texts XLA ships
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


def _step_programs(config, cfg, mesh):
  """[(name, jitted fn, abstract args)] of the unpipelined trainer's steps (dsv3.steps) on `mesh`: the train
  step and the eval step, jitted as the trainer jits them."""
  steps = steps_lib.make(config, cfg, mesh)
  abstract = dict(steps.abstract, guard=jax.eval_shape(lambda: steps_lib.CLEAN_GUARD))
  state = _placed(abstract, steps.state_shardings)
  batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32, sharding=steps.batch_sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  return [("train_step", steps_lib.jit_train_step(steps), (state, batch, scalar, scalar)),
          ("eval_step", steps_lib.jit_eval_step(steps), (state["params"], state["routing"], batch))]


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _compile(out: list, name: str, position: str, mesh, lowered, options, echo):
  """Compiles `lowered`, appends (name, position, mesh, compiled) to `out`, echoes its time and peak."""
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=options)
  out.append((name, position, mesh, compiled))
  peak = compiled_memory.program_memory(compiled)["peak_bytes"]
  echo(f"compiled {name} in {time.perf_counter() - start:.0f} s: peak {compiled_memory.gb(peak)} GB per device")
  return compiled


def _shapes(tree) -> tuple:
  return tuple(sorted((a.shape, str(a.dtype)) for a in jax.tree.leaves(tree)))


def _pipelined_programs(config, cfg, mesh, options, echo=print, only=None):
  """(programs, ranks) of one pipelined step (dsv3.pipeline.pipelined).

  programs: [(name, position, sub-mesh, compiled)], each rank's on its ('data', 'expert') sub-mesh with its
  own state (rank_state: its stages' units only):
  - F, and B, or B* and W where its op list has input-only backwards, of each stage it runs, as
    executor.run calls them: one micro-batch of activations and tokens; B, B* and W take F's residuals as
    the compiled F lays them out;
  - `sums`: its micro-batch gradients (per-device copies) reduced once into their ZeRO-1 shards;
  - `update`: the optimizer and routing-bias update of its units;
  - `eval` of each stage it runs in evaluation (direction 0), on one micro-batch of the eval batch;
  then `check`, the divergence guard, on the whole mesh. A program of the same shapes as one already
  compiled for another rank (sub-meshes are alike) is not compiled again; the rank reuses its figures.

  ranks: per rank, the programs it runs and what it holds at once during the step (compiled_memory.rank_peak): its
  state, its stage copies' per-device parameter copies and gradient accumulators, and its in-flight
  micro-batches' residuals.
  only: compile only these program kinds ('F', 'B', 'Bstar', 'W', 'FB', 'FBstar', 'sums', 'update', 'eval',
  'check'; F and B* always: others lower against their outputs); None: all.
  """
  ps = pipelined.PipelinedSteps(config, cfg, mesh)
  plan = ps.plan
  mb = int(config.batch_size) // plan.microbatches
  sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  on = lambda tree, sub: jax.tree.map(lambda a: sds(a.shape, a.dtype, NamedSharding(sub, a.sharding.spec)), tree)
  out, ranks, done = [], [], {}      # done: program key -> (its name, the compiled program)

  def program(key, name, position, sub, lower):
    if only is not None and key[0] not in (*only, "F", "Bstar"):
      return name, None
    if key not in done:
      done[key] = name, _compile(out, name, position, sub, lower(), options, echo)
    return done[key]

  for r, sub in enumerate(plan.meshes):
    state = _placed(ps.rank_abstract[r], ps.rank_shardings[r])
    devices = per_device.Devices.of(sub, mb)
    mine = reduction.stage_copies(plan, r)
    copies = [devices.abstract_copies(stages.stage_variables(state["params"], state["routing"], plan.specs[s])[0])
              for _, s in mine]
    # The step takes the params into its per-device copies (executor.run(donate=True)) where rows split.
    size = compiled_memory.bytes_per_device
    info = dict(rank=r, stages=[int(s) for _, s in mine], programs=[],
                inflight_microbatches=int(plan.prediction.peak_activations[r]),
                state_bytes=size(state), params_bytes=size(state["params"]), params_in_copies=bool(devices.axes),
                copies_bytes=2 * sum(size(c) for c in copies))   # the copies and their accumulators
    ranks.append(info)
    rep = NamedSharding(sub, P())
    scalar = sds((), jnp.float32, rep)
    coefs = sds((3,), jnp.float32, rep)
    pos = f"rank{r}"
    name = lambda kind, s: f"rank{r}_{kind}_stage{s}"
    forward = {}      # program key -> (its parameter copies, its aux) for the rank's gradient sums
    args = {}         # phase -> its stage's (key, F's args, B's args) for the rank's F&B programs
    with jax.set_mesh(sub):
      for phase, (_, s) in enumerate(plan.schedule.placement[r]):
        st, key = plan.specs[s], plan.specs[s].program_key
        kinds = {op.input_only for unit in plan.schedule[r] for op in executor._halves(unit)
                 if op.kind == "B" and op.phase == phase}
        p, rt = stages.stage_variables(state["params"], state["routing"], st)
        p = devices.abstract_copies(p)        # the per-device parameter copies executor.run makes
        rows = NamedSharding(sub, executor._token_spec(sub, mb))
        hidden = sds((mb, config.seq_len, cfg.hidden_size), compute_dtype(cfg), rows)
        tokens = sds((mb, config.seq_len + 1), jnp.int32, rows) if st.first or st.last else None
        x, g = None if st.first else hidden, None if st.last else hidden
        f_name, f = program(("F", key), name("F", s), pos, sub, lambda: plan.programs.forward.lower(
            cfg, key, p, rt, x, tokens, coefs, devices))
        forward[key] = p, on(f.out_info[2], sub)
        vjps = on(f.out_info[1], sub)
        if not f_name.startswith(f"rank{r}_"):
          # F was compiled for another rank: its VJPs carry that rank's Devices as static data, so they take
          # this rank's pytree (traced, not compiled) around the same residual layout.
          here = jax.eval_shape(lambda *a, key=key: stages.forward(cfg, key, *a, devices), p, rt, x, tokens, coefs)
          vjps = jax.tree.unflatten(jax.tree.structure(here[1]), jax.tree.leaves(vjps))
        args[phase] = key, s, (p, rt, x, tokens), (vjps, g, p)
        names = [f_name]
        if False in kinds:
          names.append(program(("B", key), name("B", s), pos, sub, lambda: plan.programs.backward.lower(
              key, vjps, g, coefs, p, p))[0])
        if True in kinds:
          b_name, bi = program(("Bstar", key), name("Bstar", s), pos, sub, lambda: plan.programs.backward_input.lower(
              key, vjps, g, coefs, p))
          cts = on(bi.out_info[1], sub)
          names += [b_name, program(("W", key), name("W", s), pos, sub, lambda: plan.programs.backward_weights.lower(
              key, vjps, cts, p, p))[0]]
        info["programs"] += [n for n in names if n not in info["programs"]]
      # F&B cells: one program per (forward stage, backward stage) pair in the rank's op list.
      for fp, bp, input_only in sorted({(u.forward.phase, u.backward.phase, u.backward.input_only)
                                        for u in plan.schedule[r] if u.kind == "FB"}):
        (fkey, fs, f_args, _), (bkey, bs, _, (vjps, g, p)) = args[fp], args[bp]
        kind = "FBstar" if input_only else "FB"
        info["programs"].append(program(
            (kind, fkey, bkey), f"rank{r}_{kind}_stage{fs}_stage{bs}", pos, sub,
            lambda: plan.programs.forward_backward.lower(cfg, fkey, bkey, input_only, devices, *f_args, coefs, vjps,
                                                         g, None if input_only else p, p))[0])
      per_copy = lambda ds: sum(1 for unit in plan.schedule[r] for op in executor._halves(unit)
                                if op.kind == "F" and plan.schedule.placement[r][op.phase] == ds)
      accs = [forward[plan.specs[s].program_key][0] for _, s in mine]
      auxes = [[forward[plan.specs[s].program_key][1]] * per_copy((d, s)) for d, s in mine]
      units = _shapes(state)
      sums_key = ("sums", tuple((plan.specs[s].program_key, per_copy((d, s))) for d, s in mine), units)
      info["programs"].append(program(sums_key, f"rank{r}_sums", pos, sub, lambda: reduction.rank_sums_program(
          plan, r, state["params"], devices).lower(accs, auxes))[0])
      grads = _placed(state["params"], sharding.zero1_shardings(sub, ps.rank_abstract[r]["params"]))
      loads = jax.tree.map(lambda a: sds(a.shape, jnp.float32, rep), state["routing"])
      info["programs"].append(program(("update", units), f"rank{r}_update", pos, sub, lambda: ps.update_program(
          r).lower(state, grads, loads, scalar, scalar))[0])
      # Evaluation runs the eval batch in micro-batches of the training step's size (executor.evaluate).
      batch = sds((mb, config.seq_len + 1), jnp.int32, NamedSharding(sub, executor._token_spec(sub, mb)))
      whole = per_device.Devices(sub, (), plan.expert_parallel[r])
      for s in range(plan.num_stages):
        if plan.owner[0, s] != r:
          continue
        st = plan.specs[s]
        p, rt = stages.stage_variables(state["params"], state["routing"], st)
        x = None if st.first else sds((mb, config.seq_len, cfg.hidden_size), compute_dtype(cfg), batch.sharding)
        info["programs"].append(program(("eval", st.program_key), name("eval", s), pos, sub,
                                        lambda: plan.programs.evaluate.lower(
                                            cfg, st.program_key, p, rt, x, batch if st.first or st.last else None,
                                            coefs, whole))[0])
  rep = sharding.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  guard = _placed(jax.eval_shape(lambda: steps_lib.CLEAN_GUARD), ps.guard_sharding)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  metrics = {k: scalar for k in ("ce", "mtp_loss", "balance_loss", "loss")}
  rows = jax.ShapeDtypeStruct((plan.layout.num_ranks, len(pipelined.SUMS)), jnp.float32,
                              sharding=NamedSharding(mesh, P("pipeline")))
  if only is not None and "check" not in only:
    return out, ranks
  with jax.set_mesh(mesh):
    _compile(out, "check", f"all {mesh.size} devices", mesh,
             ps.check_program.lower(guard, step, metrics, scalar, rows), options, echo)
  return out, ranks


def stand_in(config):
  """(config to compile, note or None). A mesh of more than MAX_COMPILE_DEVICES devices compiles as a
  stand-in with the same per-device shapes: the expert axis cut to one node (8) and the routed experts and
  the batch cut by the same factor, so every device holds as many experts, rows and micro-batch rows as in
  the full mesh (EP8 with 32 experts for EP64 with 256). Node-limited routing keeps its groups.
  The non-expert optimizer shards are split over fewer devices (data x 8, not data x expert), so the
  stand-in holds a little more than the full mesh: its figures are an upper bound."""
  mesh = config.mesh
  devices = int(mesh.data) * int(mesh.expert) * int(mesh.pipeline)
  if devices <= MAX_COMPILE_DEVICES or int(mesh.expert) <= GPUS_PER_HOST:
    return config, None
  factor = int(mesh.expert) // GPUS_PER_HOST
  m = config.model
  if int(mesh.expert) % GPUS_PER_HOST or m.n_routed_experts % factor or config.batch_size % factor:
    raise CompileOnlyError(
        f"--compile_only: {devices} devices is too many to compile here, and no stand-in keeps the per-device "
        f"shapes: mesh.expert={mesh.expert} must be a multiple of {GPUS_PER_HOST} dividing n_routed_experts="
        f"{m.n_routed_experts} and batch_size={config.batch_size}")
  experts = m.n_routed_experts // factor
  if m.n_group > 1 and (experts % m.n_group or experts // m.n_group < 2):
    raise CompileOnlyError(f"--compile_only: the stand-in's {experts} experts do not split into model.n_group="
                           f"{m.n_group} groups of >= 2; compile a mesh of <= {MAX_COMPILE_DEVICES} devices")
  small = config.copy_and_resolve_references()
  small.mesh.expert = GPUS_PER_HOST
  small.model.n_routed_experts = experts
  small.batch_size = config.batch_size // factor
  note = (f"stand-in: the {devices}-device mesh {dict(mesh)} compiles as mesh.expert {mesh.expert} -> "
          f"{GPUS_PER_HOST}, model.n_routed_experts {m.n_routed_experts} -> {experts}, batch_size "
          f"{config.batch_size} -> {small.batch_size}: the same {m.n_routed_experts // int(mesh.expert)} experts, "
          f"rows and micro-batch rows per device; non-expert optimizer shards over data x {GPUS_PER_HOST} "
          f"instead of data x {mesh.expert} (an upper bound)")
  return small, note


def compile_step(config, workdir: str, target: str, echo=print) -> dict:
  """Compiles every program of one training step of `config` for `target`; returns memory.json's dict.

  Writes DIR/compiled/memory.json and DIR/compiled/<program>.hlo.txt; prints the table through `echo`.
  Raises CompileOnlyError for an unknown target or a missing GPU toolchain.
  """
  check_toolchain(target)

  gpu = target != "cpu"
  full = config
  config, stand_in_note = stand_in(config)
  config = config.copy_and_resolve_references()
  notes = [stand_in_note] if stand_in_note else []
  if gpu:
    notes.append("XLA flag --xla_gpu_enable_cub_radix_sort=false: sorts compile as XLA's sort (CUB's scratch size "
                 "needs a device), so the MoE dispatch sorts differ from what a GPU run executes")
    if config.precision == "fp8":
      notes.append("FP8 GEMMs (every linear's and expert's forward, input and weight gradient) in "
                   "dsv3.fp8_triton's kernels")
    elif config.model.grouped_gemm in ("auto", "tokamax"):
      notes.append("expert GEMMs in tokamax's grouped kernels (model.grouped_gemm 'auto' on GPU; "
                   "dsv3.grouped_gemm.deviceless tells tokamax the target chip)")
  cfg = ModelConfig.from_config_dict(config)
  devices = target_devices(target, int(config.mesh.data) * int(config.mesh.expert) * int(config.mesh.pipeline))
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  is_pipelined = int(config.mesh.pipeline) > 1
  options = GPU_COMPILER_OPTIONS if gpu else None
  ranks = None
  kernels = grouped_gemm.deviceless(devices) if gpu else contextlib.nullcontext()
  if is_pipelined:
    with kernels:
      programs, ranks = _pipelined_programs(config, cfg, mesh, options, echo)
    notes.append(f"pipeline ({config.pipeline.schedule}, {config.pipeline.microbatches} micro-batches): each "
                 f"rank's programs on its own state (its stages' units), compiled once per distinct rank; a "
                 f"rank's peak adds what it holds across programs (state, parameter copies and accumulators, "
                 f"in-flight residuals) to each phase's compiled figures; the holders' sums of units shared "
                 f"between ranks, the sum of the scalar rows over 'pipeline' and the transfers are not compiled")
    if gpu:
      notes.append(f"stage programs with XLA options {stages.GPU_OVERLAP_OPTIONS} (the executor's on GPUs); each "
                   f"F&B program's line says how much of its expert all-to-all traffic runs under the other chunk")
  else:
    programs = []
    with jax.set_mesh(mesh), kernels:
      for name, fn, args in _step_programs(config, cfg, mesh):
        _compile(programs, name, f"all {len(devices)} devices (SPMD)", mesh, fn.lower(*args), options, echo)
  out_dir = os.path.join(workdir, "compiled")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name, position, sub, compiled in programs:
    text = compiled.as_text()
    with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(text)
    rows.append(dict(program=name, position=position, devices=[d.id for d in sub.devices.flat],
                     hlo=f"{name}.hlo.txt", **compiled_memory.program_memory(compiled)))
    if gpu and re.match(r"rank\d+_FB", name):     # what the F&B cell overlaps (dsv3.overlap)
      rows[-1]["overlap"] = {k: v for k, v in overlap.summary(text).items() if k != "rows"}
  worst = compiled_memory.peaks(rows, ranks)
  estimate = plan.plan(config, platform="gpu" if gpu else "cpu")["memory_per_device"]   # its code paths
  result = dict(
      target=target, device_kind=str(getattr(devices[0], "device_kind", devices[0].platform)),
      platform=devices[0].platform, devices=len(devices), mesh=dict(mesh.shape),
      capacity_bytes_per_device=capacity_bytes(target), programs=rows, **worst,
      estimated_peak_bytes_per_device=estimate["total_with_activations_bytes"],
      estimate=dict(source="dsv3.memory.step_memory: parameters + ZeRO-1 optimizer states as the trainer holds them, "
                           "FP32 gradients (pipelined: the per-device parameter copies and accumulators) of the "
                           "worst rank, and activations (remat-saved residuals of every layer x in-flight "
                           "micro-batches, one layer's backward or the head's working set, logits)", **estimate),
      peak_over_estimate=worst["max_peak_bytes_per_device"] / max(estimate["total_with_activations_bytes"], 1),
      compiler_options=dict(options or {}),
      stand_in=None if stand_in_note is None else dict(note=stand_in_note, mesh=dict(full.mesh),
                                                      n_routed_experts=int(full.model.n_routed_experts),
                                                      batch_size=int(full.batch_size)),
      notes=notes)
  with open(os.path.join(out_dir, "memory.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  echo(compiled_memory.format_table(result))
  return result
