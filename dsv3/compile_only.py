"""Compile-only dry run: every program of one training step, compiled for a target, never allocated.

  python -m dsv3.train --config=configs/small.py --workdir=DIR --compile_only=h100 --config.mesh.expert=8

TARGET 'cpu' compiles for this process's (simulated) CPU devices; 'h100', 'h800' and 'h200' compile for a
GPU cluster that need not be there (GPU_AOT.md): a deviceless topology of 8 GPUs per host (1x1xN below 8)
from `jax.experimental.topologies`, described by XLA's GpuTargetConfigProto for the chip (dsv3/gpu_specs/).
An H800 compiles as an H100 and is reported against its 80 GB. GPU targets need the optional toolchain of
requirements-aot.txt (Python 3.12, JAX 0.12, the CUDA plugin).

The state is abstract (jax.eval_shape of the trainer's init, with the trainer's shardings), the batch an
abstract int32 [batch_size, seq_len + 1]: no parameter, checkpoint or data is touched. For each program
and mesh position it records `compiled.memory_analysis()` per device (argument, output, temp, alias,
peak: the larger of the compiler's peak and argument + output + temp - alias; both are kept), writes
DIR/compiled/memory.json and each program's scheduled HLO as DIR/compiled/<program>.hlo.txt, and prints
a table. `estimated_peak_bytes_per_device` is dsv3.plan's analytic figure for the same layout
(dsv3.plan.step_memory: parameters, FP32 gradients, ZeRO-1 optimizer states and activations).

Unpipelined, one step is the train step (plus the eval step). Pipelined (mesh.pipeline > 1), it is each
rank's programs on its ('data', 'expert') sub-mesh and its own state (its stages' units): per stage F, and
B or B* and W as the schedule has them (rank<r>_<F|B|Bstar|W>_stage<s>), the gradient sums, the update and
the evaluation stages; then the guard's check on the whole mesh. There is no fused F&B program: the
executor dispatches an F&B unit as its F and B back to back.

GPU choices are made from the target's devices, not jax.default_backend() (which stays 'cpu' here):
grouped_gemm 'auto' becomes 'ragged_dot' (the Triton kernel needs a GPU to lower), expert-parallel
dispatch takes the mesh's platform (ragged all-to-all), attention 'auto' is lax.platform_dependent.
XLA:GPU sorts are compiled with --xla_gpu_enable_cub_radix_sort=false: CUB's scratch size needs a device,
so MoE dispatch sorts compile as XLA's own sort, not the CUB sort a GPU run executes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import cli, plan, sharding
from dsv3 import steps as steps_lib
from dsv3 import workdir as workdir_lib
from dsv3.config import ModelConfig, validate_train_config
from dsv3.layers import compute_dtype
from dsv3.pipeline import executor, pipelined, stages

TARGETS = ("cpu", "h100", "h800", "h200")
_SPEC_FILES = {"h100": "h100_sxm.txtpb", "h800": "h100_sxm.txtpb", "h200": "h200.txtpb"}
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}
GPUS_PER_HOST = 8
INSTALL_HINT = ("PYENV_VERSION=3.12.1 python -m venv .venv-aot && .venv-aot/bin/pip install -r requirements-aot.txt "
                "&& .venv-aot/bin/pip install --no-deps jax-cuda12-plugin==0.12.0.1, then run with "
                ".venv-aot/bin/python")


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
  """Raises CompileOnlyError (one line) unless `target` can be compiled by this Python's JAX."""
  if target not in TARGETS:
    raise CompileOnlyError(f"--compile_only: unknown target {target!r}; use one of {', '.join(TARGETS)}")
  if target == "cpu":
    return
  version = tuple(int(x) for x in re.findall(r"\d+", jax.__version__)[:2])
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  (optional: only in the compile-only GPU toolchain)
    has_plugin = True
  except ImportError:
    has_plugin = False
  if version < (0, 12) or not has_plugin:
    raise CompileOnlyError(
        f"--compile_only={target} needs the compile-only GPU toolchain (Python 3.12, jax>=0.12 and its CUDA "
        f"plugin; this is jax {jax.__version__}{'' if has_plugin else ' without jax-cuda12-plugin'}): {INSTALL_HINT}")


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


def _memory(compiled) -> dict:
  """Per-device bytes of one compiled program (memory_analysis); peak: see the module doc."""
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = dict(argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
             temp_bytes=get("temp_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
             generated_code_bytes=get("generated_code_size_in_bytes"))
  # XLA:GPU's peak comes from buffer assignment's heap simulation; XLA:CPU's can be below the arguments plus
  # the temp buffer that are live together, so the larger of the two is reported, and both are kept.
  out["compiler_peak_bytes"] = get("peak_memory_in_bytes")
  out["sum_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  out["peak_bytes"] = max(out["compiler_peak_bytes"], out["sum_bytes"])
  return out


def _step_programs(config, cfg, mesh):
  """[(name, jitted fn, abstract args)] of the unpipelined trainer's steps (dsv3.steps) on `mesh`: the train
  step and the eval step."""
  steps = steps_lib.make(config, cfg, mesh)
  rep = sharding.replicated(mesh)
  abstract = dict(steps.abstract, guard=jax.eval_shape(lambda: steps_lib.CLEAN_GUARD))
  state = _placed(abstract, steps.state_shardings)
  batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32, sharding=steps.batch_sharding)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  evaluate = jax.jit(steps.eval, in_shardings=(steps.state_shardings["params"], steps.state_shardings["routing"],
                                               steps.batch_sharding))
  train = jax.jit(steps.train, donate_argnums=0, in_shardings=(steps.state_shardings, steps.batch_sharding, rep, rep),
                  out_shardings=(steps.state_shardings, None))
  return [("train_step", train, (state, batch, scalar, scalar)),
          ("eval_step", evaluate, (state["params"], state["routing"], batch))]


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _pipelined_programs(config, cfg, mesh, options):
  """[(name, position, sub-mesh, compiled)] of one pipelined step (dsv3.pipeline.pipelined), per rank on its
  ('data', 'expert') sub-mesh with its own state (rank_state: its stages' units only):

  - F, and B, or B* and W where its op list has input-only backwards, of each stage copy (stages of the
    same shape on one rank compile once), as executor.run calls them: one micro-batch of activations and
    tokens; B, B* and W take F's residuals as the compiled F lays them out;
  - `sums`: its micro-batch gradients (per-device copies) reduced once into their ZeRO-1 shards;
  - `update`: the optimizer and routing-bias update of its units;
  - `eval` of each stage it runs in evaluation (direction 0), the eval batch as one micro-batch;
  then `check`, the divergence guard, on the whole mesh.
  """
  ps = pipelined.PipelinedSteps(config, cfg, mesh)
  plan = ps.plan
  mb = int(config.batch_size) // plan.microbatches
  sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  out = []
  for r, sub in enumerate(plan.meshes):
    state = _placed(ps.rank_abstract[r], ps.rank_shardings[r])
    rep = NamedSharding(sub, P())
    scalar = sds((), jnp.float32, rep)
    coefs = sds((3,), jnp.float32, rep)
    devices = stages.Devices.of(sub, mb)
    name = lambda kind, s: f"rank{r}_{kind}_stage{s}"
    compiled = {}      # program key -> (F, its aux) for the rank's gradient sums
    for phase, (_, s) in enumerate(plan.schedule.placement[r]):
      st = plan.specs[s]
      kinds = {op.input_only for unit in plan.schedule[r] for op in executor._halves(unit)
               if op.kind == "B" and op.phase == phase}
      if st.program_key in compiled:
        continue
      p, rt = stages.stage_variables(state["params"], state["routing"], st)
      p = devices.abstract_copies(p)        # the per-device parameter copies executor.run makes
      rows = NamedSharding(sub, executor._token_spec(sub, mb))
      hidden = sds((mb, config.seq_len, cfg.hidden_size), compute_dtype(cfg), rows)
      tokens = sds((mb, config.seq_len + 1), jnp.int32, rows) if st.first or st.last else None
      x, g = None if st.first else hidden, None if st.last else hidden
      with jax.set_mesh(sub):
        f = plan.programs.forward.lower(cfg, st.program_key, p, rt, x, tokens, coefs,
                                        devices).compile(compiler_options=options)
        out.append((name("F", s), f"rank{r}", sub, f))
        compiled[st.program_key] = (p, f.out_info[2])
        vjps = f.out_info[1]
        if False in kinds:
          b = plan.programs.backward.lower(st.program_key, vjps, g, coefs, p).compile(compiler_options=options)
          out.append((name("B", s), f"rank{r}", sub, b))
        if True in kinds:
          bi = plan.programs.backward_input.lower(st.program_key, vjps, g, coefs).compile(compiler_options=options)
          out.append((name("Bstar", s), f"rank{r}", sub, bi))
          w = plan.programs.backward_weights.lower(st.program_key, vjps, bi.out_info[1], p).compile(
              compiler_options=options)
          out.append((name("W", s), f"rank{r}", sub, w))
    mine = executor.stage_copies(plan, r)
    per_copy = lambda ds: sum(1 for unit in plan.schedule[r] for op in executor._halves(unit)
                              if op.kind == "F" and plan.schedule.placement[r][op.phase] == ds)
    accs = [compiled[plan.specs[s].program_key][0] for _, s in mine]
    auxes = [[compiled[plan.specs[s].program_key][1]] * per_copy((d, s)) for d, s in mine]
    with jax.set_mesh(sub):
      sums = executor.rank_sums_program(plan, r, state["params"], devices).lower(accs, auxes)
      out.append((f"rank{r}_sums", f"rank{r}", sub, sums.compile(compiler_options=options)))
      grads = _placed(state["params"], sharding.zero1_shardings(sub, ps.rank_abstract[r]["params"]))
      loads = jax.tree.map(lambda a: sds(a.shape, jnp.float32, rep), state["routing"])
      update = ps.update_program(r).lower(state, grads, loads, scalar, scalar)
      out.append((f"rank{r}_update", f"rank{r}", sub, update.compile(compiler_options=options)))
      batch = sds((config.batch_size, config.seq_len + 1), jnp.int32,
                  NamedSharding(sub, executor._token_spec(sub, config.batch_size)))
      whole = stages.Devices(sub, (), plan.expert_parallel[r])
      for s in range(plan.num_stages):
        if plan.owner[0, s] != r:
          continue
        st = plan.specs[s]
        p, rt = stages.stage_variables(state["params"], state["routing"], st)
        x = None if st.first else sds((config.batch_size, config.seq_len, cfg.hidden_size), compute_dtype(cfg),
                                      batch.sharding)
        e = plan.programs.evaluate.lower(cfg, st.program_key, p, rt, x, batch if st.first or st.last else None,
                                         coefs, whole)
        out.append((name("eval", s), f"rank{r}", sub, e.compile(compiler_options=options)))
  rep = sharding.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  guard = _placed(jax.eval_shape(lambda: steps_lib.CLEAN_GUARD), ps.guard_sharding)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  metrics = {k: scalar for k in ("ce", "mtp_loss", "balance_loss", "loss")}
  rows = jax.ShapeDtypeStruct((plan.layout.num_ranks, len(pipelined.SUMS)), jnp.float32,
                              sharding=NamedSharding(mesh, P("pipeline")))
  with jax.set_mesh(mesh):
    check = ps.check_program.lower(guard, step, metrics, scalar, rows).compile(compiler_options=options)
  out.append(("check", f"all {mesh.size} devices", mesh, check))
  return out


def _estimate(config, target: str) -> dict:
  """dsv3.plan's per-device step memory for `config` compiled for `target` (its CPU or GPU code paths)."""
  return plan.plan(config, platform="cpu" if target == "cpu" else "gpu")["memory_per_device"]


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
    if config.model.grouped_gemm == "auto":
      config.model.grouped_gemm = "ragged_dot"
      notes.append("model.grouped_gemm 'auto' -> 'ragged_dot' (the Triton kernel needs a GPU to lower)")
  cfg = ModelConfig.from_config_dict(config)
  devices = target_devices(target, int(config.mesh.data) * int(config.mesh.expert) * int(config.mesh.pipeline))
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  is_pipelined = int(config.mesh.pipeline) > 1
  options = GPU_COMPILER_OPTIONS if gpu else None
  if is_pipelined:
    programs = _pipelined_programs(config, cfg, mesh, options)
    notes.append(f"pipeline ({config.pipeline.schedule}, {config.pipeline.microbatches} micro-batches): each "
                 f"rank's programs on its own state (its stages' units); a rank holds its state, accumulators "
                 f"and the residuals of its in-flight micro-batches at once, which the per-program figures do "
                 f"not add up; the holders' sums of units shared between ranks, the sum of the scalar rows "
                 f"over 'pipeline' and the transfers are not compiled")
  else:
    programs = []
    with jax.set_mesh(mesh):
      for name, fn, args in _step_programs(config, cfg, mesh):
        programs.append((name, f"all {len(devices)} devices (SPMD)", mesh,
                         fn.lower(*args).compile(compiler_options=options)))
  out_dir = os.path.join(workdir, "compiled")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name, position, sub, compiled in programs:
    with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(compiled.as_text())
    rows.append(dict(program=name, position=position, devices=[d.id for d in sub.devices.flat],
                     hlo=f"{name}.hlo.txt", **_memory(compiled)))
  worst = max(rows, key=lambda r: r["peak_bytes"])
  estimate = _estimate(config, target)
  result = dict(
      target=target, device_kind=str(getattr(devices[0], "device_kind", devices[0].platform)),
      platform=devices[0].platform, devices=len(devices), mesh=dict(mesh.shape),
      capacity_bytes_per_device=capacity_bytes(target), programs=rows,
      max_peak_bytes_per_device=worst["peak_bytes"], max_peak_program=worst["program"],
      max_peak_position=worst["position"],
      estimated_peak_bytes_per_device=estimate["total_with_activations_bytes"],
      estimate=dict(source="dsv3.plan.step_memory: parameters + ZeRO-1 optimizer states as the trainer holds them, "
                           "FP32 gradients of the worst pipeline rank, and activations (remat-saved residuals "
                           "of every layer x in-flight micro-batches, one layer's backward or the head's "
                           "working set, logits)", **estimate),
      peak_over_estimate=worst["peak_bytes"] / max(estimate["total_with_activations_bytes"], 1),
      compiler_options=dict(options or {}), stand_in=None, notes=notes)
  with open(os.path.join(out_dir, "memory.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  echo(format_table(result))
  return result


def _gb(n: Optional[int]) -> str:
  return "-" if n is None else f"{n / 1e9:.3f}"


def format_table(result: dict) -> str:
  """The per-device memory table (GB = 1e9 bytes) with the worst position, the estimate and the notes."""
  head = (f"compile-only {result['target']} ({result['device_kind']}, {result['devices']} devices, mesh "
          f"{result['mesh']}): memory per device, GB")
  cols = ("program", "position", "argument", "output", "temp", "alias", "peak")
  lines = [head, f"{cols[0]:<24} {cols[1]:<26}" + "".join(f"{c:>10}" for c in cols[2:])]
  for r in result["programs"]:
    lines.append(f"{r['program']:<24} {r['position']:<26}" + "".join(
        f"{_gb(r[k + '_bytes']):>10}" for k in cols[2:]))
  cap = result["capacity_bytes_per_device"]
  lines.append(f"max peak {_gb(result['max_peak_bytes_per_device'])} GB ({result['max_peak_program']}, "
               f"{result['max_peak_position']})" + (f" of {_gb(cap)} GB" if cap else "")
               + f"; dsv3.plan estimate {_gb(result['estimated_peak_bytes_per_device'])} GB (with activations), "
               f"ratio {result['peak_over_estimate']:.2f}")
  lines += [f"note: {n}" for n in result["notes"]]
  return "\n".join(lines)
