"""One runner for every layout: the trainer's step, evaluation, state views and programs, pipelined or not.

  runner = make_runner(config, cfg, mesh)          # Runner, or PipelinedRunner when mesh.pipeline > 1
  state = runner.init(rng)                         # opaque to the caller; the divergence guard lives in it
  state, metrics = runner.train(state, runner.place(host_batch), mtp_weight, gamma)
  ce, loads = runner.evaluate(state, runner.place(host_batch), params=None)
  runner.checkpoint(state)                         # what checkpoints hold; runner.restore reads either layout
  runner.params(state), runner.step(state), runner.guard(state)
  state = runner.init(rng, slices.Saved(...))      # init_from: params and routing read straight into place
  for p in runner.programs(batch, compile): ...    # every program one step (and evaluation) runs

Both runners have the same methods and return shapes; only the state inside differs. Unpipelined, the state
is dsv3.training.steps' {step, params, routing, opt_state, guard} on the whole mesh and a step is one SPMD program.
Pipelined, it is {'ranks': rank r's units on its sub-mesh (dsv3.pipeline.pipelined), 'guard'}; checkpoints
and the EMA see each unit once (per-layer), and the step is the executor's schedule of stage programs.

`programs` is how the compile-only dry run knows what to compile: the unpipelined runner's train and eval
steps; the pipelined runner walks the executor's own driver on abstract state (dsv3.pipeline.dispatch.Record),
so every program a step calls is recorded, with its name, its rank and its arguments, and none re-derived.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from dsv3 import layout
from dsv3.config import ModelConfig
from dsv3.interop import slices
from dsv3.parallel import sharding
from dsv3.pipeline import dispatch, per_device, pipelined, reduction, schedules, stages
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import steps as steps_lib


VARIABLES = ("params", "routing")   # what init_from reads; the rest of the state is initialised


def make_runner(config, cfg: ModelConfig, mesh: Mesh):
  """The runner of training config `config` (model `cfg`) on `mesh`: pipelined when its 'pipeline' axis > 1."""
  return (PipelinedRunner if sharding.axis_size(mesh, "pipeline") > 1 else Runner)(config, cfg, mesh)


# ---------------------------------------------------------------------------------------------------
# Programs: what one step runs, each with its name, mesh position and abstract arguments.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
  """One program a step runs. position: 'rank0' (a pipeline rank's sub-mesh) or 'all N devices (SPMD)';
  mesh: where it runs; fn (jitted) and args (ShapeDtypeStructs with shardings): `lower()`. compiled: what the
  `compile` given to `programs` made of it (None: not compiled). same_as: the name of the program of
  another rank with the same shapes whose compiled form this one shares (compiled once)."""
  name: str
  kind: str
  position: str
  mesh: Mesh
  fn: Callable
  args: tuple
  compiled: Any = None
  same_as: Optional[str] = None

  def lower(self):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*self.args)


def compile_program(program: Program):
  """The default `compile` of Runner.programs: XLA's, with the program's own options."""
  return program.lower().compile()


def _signature(x):
  """What identifies a program's arguments whatever sub-mesh they are on: each array's shape, dtype and
  spec, and the static arguments (configs, stage keys, a stage's Devices) with their meshes as shapes."""
  if isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
    return ("array", tuple(x.shape), str(x.dtype), str(getattr(getattr(x, "sharding", None), "spec", None)))
  if isinstance(x, Mesh):
    return ("mesh", tuple(x.axis_names), tuple(x.devices.shape))
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return (type(x).__name__,) + tuple(_signature(getattr(x, f.name)) for f in dataclasses.fields(x))
  if isinstance(x, (tuple, list)):
    return tuple(_signature(v) for v in x)
  return x


def _on(a, mesh: Mesh):
  return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, a.sharding.spec))


class _Recorder:
  """Collects a step's programs as it is walked (dispatch.Record's on_call) and gives each call its abstract
  outputs, read off the compiled program: the next programs then take their inputs exactly as the compiled
  ones lay them out. A program of the same name at the same position is the same program (recorded once);
  one of the same shapes at another rank is compiled once (`same_as`)."""

  def __init__(self, compile: Optional[Callable]):
    self.compile = compile_program if compile is None else compile
    self.programs: List[Program] = []
    self.outputs, self.first = {}, {}

  def on_call(self, call: dispatch.Call, fn, args):
    position = f"rank{call.rank}" if call.rank is not None else f"all {call.mesh.size} devices"
    return self.add(call.name, call.kind, position, call.mesh, fn, args, call.key)

  def add(self, name, kind, position, mesh, fn, args, key=()):
    if (position, name) in self.outputs:
      return self.outputs[position, name]
    program = Program(name, kind, position, mesh, fn, tuple(args))
    signature = (kind, _signature(key), _signature(jax.tree.leaves(args)))
    first = self.first.get(signature, program)
    if first is program:
      program.compiled = self.compile(program)
      if program.compiled is not None:
        self.first[signature] = program
    else:
      program.compiled, program.same_as = first.compiled, first.name
    if program.compiled is None:         # not compiled: the traced shapes (no layouts) stand in
      with jax.set_mesh(mesh):
        outputs = fn.trace(*args).out_info
    elif first is program:
      outputs = program.compiled.out_info
    else:
      # Compiled for another rank: its layouts on this sub-mesh, in this call's own pytree (static parts,
      # e.g. a VJP's Devices, name this rank's mesh).
      with jax.set_mesh(mesh):
        structure = fn.trace(*args).out_tree
      outputs = jax.tree.unflatten(structure, [_on(a, mesh) for a in jax.tree.leaves(program.compiled.out_info)])
    self.programs.append(program)
    self.outputs[position, name] = outputs
    return outputs


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---------------------------------------------------------------------------------------------------
# Unpipelined: dsv3.training.steps' SPMD step on the whole mesh.
# ---------------------------------------------------------------------------------------------------
class Runner:
  """The unpipelined runner: one SPMD train step and eval step (dsv3.training.steps) on the whole mesh."""
  pipelined = False

  def __init__(self, config, cfg: ModelConfig, mesh: Mesh):
    self.config, self.cfg, self.mesh = config, cfg, mesh
    self.steps = steps = steps_lib.make(config, cfg, mesh)
    self._train = steps_lib.jit_train_step(steps)
    self._eval = steps_lib.jit_eval_step(steps)

  # -- the data and the state ------------------------------------------------------------------------
  @property
  def batch_share(self) -> dict:
    """Which rows of each global batch this process reads (dsv3.data.make_datasets' arguments): its own."""
    return {}

  def place(self, host_batch):
    """This process's rows of a batch as the global array the step takes."""
    return jax.make_array_from_process_local_data(self.steps.batch_sharding, np.asarray(host_batch, np.int32))

  def init(self, rng, saved: Optional[slices.Saved] = None):
    """A fresh state. With `saved` (an HF dir's or a checkpoint's variables, either layout: init_from) its
    params and routing biases are read straight into their shardings and only the rest is initialised
    (the random parameters are never made)."""
    skip = VARIABLES if saved is not None else ()
    shardings = {k: v for k, v in self.steps.saved_shardings.items() if k not in skip}
    def init(r):     # named: the first program a run compiles shows in the logs as jit(init)
      return {k: v for k, v in self.steps.init(r).items() if k not in skip}
    state = jax.jit(init, out_shardings=shardings)(rng)
    if saved is not None:
      state.update(self.load(saved, VARIABLES)[0])
    return self._with_guard(state)

  def _with_guard(self, saved_state):
    return dict(saved_state, guard=jax.device_put(steps_lib.CLEAN_GUARD, self.steps.state_shardings["guard"]))

  @property
  def checkpoint_like(self) -> dict:
    """The checkpointed state's shapes and shardings: {step, params, routing, opt_state}, stacked."""
    return _placed(self.steps.abstract, self.steps.saved_shardings)

  def checkpoint(self, state) -> dict:
    """What checkpoints hold: the state without its guard (a checkpoint is written only once its step is
    known good, so the guard would be clean)."""
    return {k: v for k, v in state.items() if k != "guard"}

  def params(self, state):
    """The parameters as the EMA keeps them (the layout of checkpoint_like['params'])."""
    return state["params"]

  def step(self, state) -> int:
    return int(jax.device_get(state["step"]))

  def guard(self, state):
    return state["guard"]

  def restore(self, checkpointer, ema=None):
    """(state, orbax Restored) of the latest good checkpoint, whichever layout wrote it (`restore`)."""
    targets, restored = restore(checkpointer, self, ema)
    return self._with_guard(targets[0]), restored

  def targets(self) -> list:
    """The checkpointed state as ShapeDtypeStructs on the shardings it is read straight into: [the whole
    state] on the mesh; the pipelined runner's is per rank."""
    return [self.checkpoint_like]

  def load(self, saved: slices.Saved, keys: tuple = ()) -> list:
    """`targets()` (their top-level `keys`; default all) read from `saved` by slices, whichever layout
    wrote it: each process reads only its own devices' blocks, each straight onto its devices."""
    keys = keys or tuple(self.steps.abstract)
    unstack = lambda t: layout.map_state(lambda v: layout.unstack(self.cfg, v), t)
    route = slices.Route({k: self.steps.abstract[k] for k in keys}, unstack, self.pipelined, saved.per_layer,
                         saved.prefix)
    targets = [None if t is None else {k: t[k] for k in keys} for t in self.targets()]
    return slices.place(targets, route, saved.source, saved.what)

  # -- the step --------------------------------------------------------------------------------------
  def train(self, state, batch, mtp_weight, gamma):
    """One step: (state, metrics); `state` is donated. mtp_weight, gamma: host scalars (no recompiling)."""
    with jax.set_mesh(self.mesh):
      return self._train(state, batch, np.float32(mtp_weight), np.float32(gamma))

  def evaluate(self, state, batch, params=None):
    """(cross entropy, loads [num_moe_layers, E] on the host, or None without MoE layers) of a batch, with
    the state's params or `params` (the EMA's, as `params(state)` lays them out)."""
    with jax.set_mesh(self.mesh):
      ce, loads = self._eval(state["params"] if params is None else params, state["routing"], batch)
    return ce, (np.asarray(layout.moe_loads(loads)[0]) if self.cfg.num_moe_layers else None)

  def programs(self, batch, compile: Optional[Callable] = None, baselines: bool = False) -> List[Program]:
    """The train step and the eval step, on abstract state and a `batch`-shaped batch ([B, T+1] int32).
    compile(program) -> the compiled program, or None to leave it uncompiled (default: compile_program).
    baselines: pipelined only (see PipelinedRunner.programs)."""
    rec = _Recorder(compile)
    steps = self.steps
    state = _placed(dict(steps.abstract, guard=jax.eval_shape(lambda: steps_lib.CLEAN_GUARD)), steps.state_shardings)
    tokens = jax.ShapeDtypeStruct(tuple(batch.shape), jnp.int32, sharding=steps.batch_sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(self.mesh))
    where = f"all {self.mesh.size} devices (SPMD)"
    rec.add("train_step", "train", where, self.mesh, self._train, (state, tokens, scalar, scalar))
    rec.add("eval_step", "eval", where, self.mesh, self._eval, (state["params"], state["routing"], tokens))
    return rec.programs

  def rank_holdings(self, batch) -> None:
    """Pipelined only: what each rank holds across its programs (see PipelinedRunner)."""
    return None


# ---------------------------------------------------------------------------------------------------
# Pipelined: per-rank state, the executor's schedule of stage programs.
# ---------------------------------------------------------------------------------------------------
class PipelinedRunner(Runner):
  """The pipelined runner: rank r's units on its sub-mesh (dsv3.pipeline.pipelined.PipelinedSteps), stepped
  by the pipeline executor; checkpoints and the EMA see each unit once (the per-unit view)."""
  pipelined = True

  def __init__(self, config, cfg: ModelConfig, mesh: Mesh):
    self.config, self.cfg, self.mesh = config, cfg, mesh
    self.ps = pipelined.PipelinedSteps(config, cfg, mesh)
    self.steps = self.ps.steps

  @property
  def batch_share(self) -> dict:
    """Every process reads the whole global batch: its ranks' first and last stages need the rows of every
    micro-batch (the embedding takes the inputs, the loss the labels)."""
    return dict(process_index=0, process_count=1)

  def place(self, host_batch):
    """The global batch stays on the host: the executor places each micro-batch on its stages."""
    return np.asarray(host_batch, np.int32)

  def init(self, rng, saved: Optional[slices.Saved] = None):
    ranks = self.ps.init(rng, skip=VARIABLES if saved is not None else ())
    if saved is not None:
      ranks = [None if s is None else dict(s, **v) for s, v in zip(ranks, self.load(saved, VARIABLES))]
    return {"ranks": ranks, "guard": self._guard()}

  def _guard(self):
    return jax.device_put(steps_lib.CLEAN_GUARD, self.ps.guard_sharding)

  @property
  def checkpoint_like(self) -> dict:
    """The checkpointed state's shapes and shardings: the per-unit (per-layer) view."""
    return _placed(self.ps.abstract, self.ps.view_shardings)

  def checkpoint(self, state) -> dict:
    return self.ps.view(state["ranks"])

  def params(self, state):
    return self.ps.params_view(state["ranks"])

  def step(self, state) -> int:
    return int(jax.device_get(next(s for s in state["ranks"] if s is not None)["step"]))

  def restore(self, checkpointer, ema=None):
    ranks, restored = restore(checkpointer, self, ema)
    return {"ranks": ranks, "guard": self._guard()}, restored

  def targets(self) -> list:
    """Per rank, its part of the state on its own sub-mesh (None for ranks without local devices)."""
    return self.ps.rank_targets()

  def train(self, state, batch, mtp_weight, gamma):
    # The executor places each stage on its own sub-mesh, so it runs outside any mesh context.
    return self.ps.train(state, batch, np.float32(mtp_weight), np.float32(gamma))

  def evaluate(self, state, batch, params=None):
    ce, loads = self.ps.evaluate(state, batch, params)
    return ce, (loads if self.cfg.num_moe_layers else None)

  def programs(self, batch, compile: Optional[Callable] = None, baselines: bool = False) -> List[Program]:
    """Every program of one step and one evaluation, as the executor calls them (dispatch.Record walks its
    driver on abstract state): each rank's F, B or B* and W, F&B cells, gradient sums, update and eval
    stages on its sub-mesh, then the guard's check on the whole mesh; in rank order. baselines: also the
    step walked unfused (each F&B cell as its F then its B: the F and B programs every F&B fuses)."""
    rec = _Recorder(compile)
    exe = dispatch.Record(rec.on_call)
    state = self.ps.abstract_state()
    tokens = jax.ShapeDtypeStruct(tuple(batch.shape), jnp.int32)      # the host batch
    for fused in (True, False) if baselines else (True,):
      self.ps.train(state, tokens, np.float32(0), np.float32(0), exe, fused=fused)
    self.ps.evaluate(state, tokens, exe=exe)
    rank = lambda p: int(p.position[4:]) if p.position.startswith("rank") else len(self.ps.plan.meshes)
    return sorted(rec.programs, key=rank)

  def rank_holdings(self, batch) -> list:
    """Per rank, what it holds across the step's programs (abstract trees): its state; its per-device
    parameter copies and their accumulators (one of each per unit, shared by the rank's stages, as
    executor.take_copies makes them, and evaluation too); and how many micro-batches' residuals it keeps in flight at most (the
    schedule's simulated peak)."""
    plan = self.ps.plan
    rows = schedules.microbatch_rows(int(batch.shape[0]), plan.microbatches)
    out = []
    for r, sub in enumerate(plan.meshes):
      state = _placed(self.ps.rank_abstract[r], self.ps.rank_shardings[r])
      devices = per_device.Devices.of(sub, rows)
      copies = devices.abstract_copies(state["params"], self.cfg)
      out.append(dict(rank=r, stages=[int(s) for _, s in reduction.stage_copies(plan, r)], state=state,
                      copies=copies, accumulators=stages.abstract_accumulators(copies, state["params"]),
                      inflight_microbatches=int(plan.prediction.peak_activations[r])))
    return out


# ---------------------------------------------------------------------------------------------------
# Resuming across layouts: a checkpoint written stacked (unpipelined) or per-layer (pipelined, any degree)
# restores into either runner, read by slices straight into the runner's own shardings.
# ---------------------------------------------------------------------------------------------------
def restore(checkpointer, runner: Runner, ema=None):
  """(runner.targets() read from the latest good checkpoint, orbax Restored). `ema`: a HostEMA to load (its
  params_like in the runner's layout: runner.checkpoint_like['params']).

  Whichever layout wrote it, each process reads only the blocks of its own devices (a pipelined rank's
  units, the EMA's distinct local pieces), straight into their shardings: nothing is read whole or
  replicated over 'pipeline'. A step that cannot be read falls back to the one before (Checkpointer.restore);
  one whose shapes do not fit the config raises CheckpointMismatchError naming the tensor and both shapes."""
  def read(step):
    where = f"checkpoint {os.path.dirname(step.directory)}"
    saved = slices.Saved(step, ("train",), where)
    load_ema = ema is not None and any(k[:1] == ("ema",) for k in step.shapes)   # else filled by its next update
    if load_ema:   # checked first: a mismatch is named before anything is read
      route = slices.Route(runner.steps.abstract["params"], lambda t: layout.unstack(runner.cfg, t),
                           runner.pipelined, saved.per_layer, ("ema",))
      paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(runner.checkpoint_like["params"])[0]]
      route.check(step, [ckpt_lib.leaf_key(p) for p in paths], where)
    state = runner.load(saved)
    if load_ema:
      ema.load_blocks(lambda path, bounds: route.block(step, ckpt_lib.leaf_key(path), bounds), step.step)
    return state
  restored = checkpointer.restore(read=read)
  return restored.state, restored
