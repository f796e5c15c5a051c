"""The pipeline executor: explicit per-stage programs on sub-meshes, driven by a schedule from Python.

Each pipeline rank is a sub-mesh of devices (axes ('data', 'expert')). The model is cut into stages
(dsv3.pipeline.stages); every stage's forward F, full backward B, input-only backward B* and deferred
weight-gradient W are jitted programs, compiled once per stage shape and sub-mesh because the stage's
parameters are committed to that sub-mesh (replicated) and the micro-batch is sharded over its 'data'
axis. Which rank holds which stage is the schedule's placement:
  gpipe / 1f1b / zb1p   P stages, stage r on rank r;
  dualpipe              P stages in two directions, each fed half of the batch: rank r holds stage r of
                        direction 0 and stage P-1-r of direction 1 (two copies of the same parameters,
                        whose gradients are summed), so the embedding and the head/MTP stages share ranks;
  dualpipev             2P stages in a V: rank r holds stages r and 2P-1-r.

Why a Python driver and not one big SPMD program: the schedules interleave different stages' forward and
backward cells in orders (zero-bubble W cells, overlapped F&B pairs) that a single traced program cannot
express without serialising them; separate programs plus JAX's asynchronous dispatch let each sub-mesh
run its own op stream while the host only enqueues work. The driver walks all ranks' op lists in the
order of their simulated start times (schedules.simulate), which respects every cross-rank dependency,
dispatches each op as soon as it is reached, and ships activations and gradients to the consumer's
sub-mesh with jax.device_put right after they are produced, so transfers overlap compute. An F&B unit is
its forward and backward dispatched back to back (two programs in flight on one sub-mesh).

`pipeline_value_and_grad` returns exactly what jax.value_and_grad of losses.objective over
model.forward_train returns for the whole batch (all three loss terms are means over equal
micro-batches), the gradients summed over micro-batches and stage copies and re-assembled into the
params tree, and the per-expert loads summed over every micro-batch (the tree of variables['routing']).
"""
from __future__ import annotations

import collections
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3 import losses
from dsv3.config import ModelConfig
from dsv3.pipeline import schedules, stages

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


# ---------------------------------------------------------------------------------------------------
# Validation and set-up.
# ---------------------------------------------------------------------------------------------------
def num_stages_for(schedule: str, num_ranks: int) -> int:
  """Model stages for `num_ranks` pipeline ranks: DualPipeV folds 2 stages onto every rank."""
  return 2 * num_ranks if schedule == "dualpipev" else num_ranks


def make_schedule(schedule: str, num_ranks: int, microbatches: int) -> schedules.Schedule:
  """The op lists for `schedule`, with errors phrased in the config fields a user sets."""
  if schedule not in SCHEDULES:
    raise ValueError(f"pipeline.schedule must be one of {SCHEDULES} when mesh.pipeline > 1, got {schedule!r}")
  if not isinstance(num_ranks, int) or num_ranks < 1:
    raise ValueError(f"mesh.pipeline must be a positive integer, got {num_ranks!r}")
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"pipeline.microbatches must be a positive integer, got {microbatches!r}")
  if schedule == "dualpipe":
    if num_ranks < 2 or num_ranks % 2:
      raise ValueError(f"mesh.pipeline must be even (>= 2) for dualpipe: its two directions mirror each "
                       f"other, got {num_ranks}")
    if microbatches % 2 or microbatches < 2 * num_ranks:
      raise ValueError(f"pipeline.microbatches must be even and >= 2 * mesh.pipeline = {2 * num_ranks} for "
                       f"dualpipe (half of them enter from each end), got {microbatches}")
    return schedules.dualpipe(num_ranks, microbatches)
  if schedule == "dualpipev":
    if microbatches < 2 * num_ranks:
      raise ValueError(f"pipeline.microbatches must be >= 2 * mesh.pipeline = {2 * num_ranks} for "
                       f"dualpipev, got {microbatches}")
    return schedules.dualpipev(num_ranks, microbatches)
  return {"gpipe": schedules.gpipe, "1f1b": schedules.one_f_one_b, "zb1p": schedules.zb1p}[schedule](
      num_ranks, microbatches)


def stage_meshes(num_ranks: int, devices=None) -> List[Mesh]:
  """One ('data', 'expert') sub-mesh per rank: given meshes pass through; a device list is cut into
  `num_ranks` equal contiguous slices, each a data-parallel group (expert axis of size 1)."""
  if devices is not None and all(isinstance(d, Mesh) for d in devices):
    meshes = list(devices)
    if len(meshes) != num_ranks:
      raise ValueError(f"mesh.pipeline = {num_ranks} but {len(meshes)} stage meshes were given")
    return meshes
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) % num_ranks:
    raise ValueError(f"mesh.pipeline = {num_ranks} must divide the number of devices ({len(devices)})")
  per = len(devices) // num_ranks
  return [Mesh(np.array(devices[r * per:(r + 1) * per]).reshape(per, 1), ("data", "expert"))
          for r in range(num_ranks)]


def _batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
  # Shard the micro-batch over the data axis when it divides evenly; replicate otherwise.
  data = mesh.shape.get("data", 1)
  return NamedSharding(mesh, P("data") if batch % data == 0 else P())


class Plan:
  """Everything about one (config, schedule, ranks, micro-batches, meshes) that does not depend on data."""

  def __init__(self, cfg: ModelConfig, schedule: str, num_ranks: int, microbatches: int, devices=None,
               compiler_options=None):
    self.cfg = cfg
    self.programs = stages.programs(compiler_options)
    self.schedule = make_schedule(schedule, num_ranks, microbatches)
    self.num_stages = num_stages_for(schedule, num_ranks)
    if cfg.num_hidden_layers < self.num_stages:
      raise ValueError(f"model.num_hidden_layers = {cfg.num_hidden_layers} cannot be cut into "
                       f"{self.num_stages} pipeline stages (mesh.pipeline = {num_ranks}, schedule "
                       f"{schedule!r}); every stage needs at least one layer")
    self.specs = stages.split_layers(cfg, self.num_stages)
    self.meshes = stage_meshes(num_ranks, devices)
    self.microbatches = microbatches
    self.directions = 2 if schedule == "dualpipe" else 1
    self.per_direction = microbatches // self.directions
    # (direction, stage) -> rank; a stage copy is identified by its (direction, stage).
    self.owner = {ds: r for r, phases in enumerate(self.schedule.placement) for ds in phases}
    sim = schedules.simulate(self.schedule)
    # Simulated start times give a global order in which every op comes after the ops it depends on.
    self.order = sorted((start, r, i) for r, line in enumerate(sim.timelines)
                        for i, (start, _, _) in enumerate(line))
    self.prediction = sim


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------
def _halves(op):
  return (op.forward, op.backward) if op.kind == "FB" else (op,)


def run(plan: Plan, variables, tokens, mtp_weight, alpha, timings: Optional[list] = None):
  """Executes one step. Returns (loss, metrics, grads, loads).

  timings: if a list, every op is waited for (block_until_ready) and (rank, op string, start, end) in
  seconds is appended: serialised, for measuring per-op costs, not for speed.
  """
  cfg, sched = plan.cfg, plan.schedule
  params, routing = variables["params"], variables.get("routing", {})
  tokens = jnp.asarray(tokens, jnp.int32)
  batch = tokens.shape[0]
  if batch % plan.microbatches:
    raise ValueError(f"pipeline.microbatches = {plan.microbatches} must divide the batch size {batch}")
  mb = batch // plan.microbatches

  # Stage copies: parameters committed (replicated) to the owning rank's sub-mesh.
  copies: Dict[tuple, dict] = {}
  placed: Dict[tuple, tuple] = {}

  def place(a, r, rep):
    # Stages on one rank that use the same array (DualPipe's embedding for stage 0 and for the MTP of
    # stage P-1) share one copy on the sub-mesh. The source is kept in the entry so its id stays unique.
    hit = placed.get((r, id(a)))
    if hit is None or hit[0] is not a:
      hit = placed[r, id(a)] = (a, jax.device_put(a, rep))
    return hit[1]

  for (d, s), r in plan.owner.items():
    mesh = plan.meshes[r]
    p, rt = stages.stage_variables(cfg, params, routing, plan.specs[s])
    rep = NamedSharding(mesh, P())
    p, rt = jax.tree.map(lambda a: place(a, r, rep), (p, rt))
    coefs = jax.device_put(jnp.asarray([mtp_weight, alpha, 1.0 / plan.microbatches], jnp.float32), rep)
    copies[d, s] = dict(params=p, routing=rt, coefs=coefs, acc=stages.zeros_like(p),
                        key=plan.specs[s].program_key, shard=_batch_sharding(mesh, mb), aux=[])

  # Micro-batch tokens go to the first and last stage of their direction (the embedding and the loss).
  micro = {}
  for d in range(plan.directions):
    for m in range(plan.per_direction):
      g = d * plan.per_direction + m
      rows = tokens[g * mb:(g + 1) * mb]
      for s in {0, plan.num_stages - 1}:
        micro[d, s, m] = jax.device_put(rows, copies[d, s]["shard"])

  acts, grads_in, saved = {}, {}, {}
  deferred = [collections.deque() for _ in sched]

  def forward(r, op):
    d, s = sched.placement[r][op.phase]
    c, m = copies[d, s], op.microbatch
    x = acts.pop((d, s, m)) if s > 0 else None
    toks = micro.get((d, s, m))
    y, vjps, aux = plan.programs.forward(cfg, c["key"], c["params"], c["routing"], x, toks, c["coefs"])
    saved[d, s, m] = vjps
    c["aux"].append(aux)
    if s + 1 < plan.num_stages:
      acts[d, s + 1, m] = jax.device_put(y, copies[d, s + 1]["shard"])
    return y, aux["loss"]

  def backward(r, op):
    d, s = sched.placement[r][op.phase]
    c, m = copies[d, s], op.microbatch
    g = grads_in.pop((d, s, m)) if s + 1 < plan.num_stages else None
    vjps = saved.pop((d, s, m))
    if op.input_only:
      dx, cts = plan.programs.backward_input(c["key"], vjps, g, c["coefs"])
      deferred[r].append((c, vjps, cts))
      out = cts
    else:
      dx, c["acc"] = plan.programs.backward(c["key"], vjps, g, c["coefs"], c["acc"])
      out = c["acc"]
    if s > 0:
      grads_in[d, s - 1, m] = jax.device_put(dx, copies[d, s - 1]["shard"])
    return dx, out

  def weights(r):
    c, vjps, cts = deferred[r].popleft()
    c["acc"] = plan.programs.backward_weights(c["key"], vjps, cts, c["acc"])
    return c["acc"]

  for _, r, i in plan.order:
    op = sched[r][i]
    start = time.perf_counter()
    results = []
    for half in _halves(op):
      if half.kind == "F":
        results.append(forward(r, half))
      elif half.kind == "B":
        results.append(backward(r, half))
      else:
        results.append(weights(r))
    if timings is not None:
      jax.block_until_ready(results)
      timings.append((r, str(op), start, time.perf_counter()))

  return _assemble(plan, params, routing, copies)


def _target(leaf):
  """Where an output that mirrors `leaf` should live: the leaf's own sharding, or the default device."""
  sharding = getattr(leaf, "sharding", None)
  return sharding if sharding is not None else jax.devices()[0]


def _slice_target(leaf):
  """Placement for one layer slice of a stacked leaf (the leaf's sharding without the layer axis)."""
  sharding = _target(leaf)
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  return sharding


@jax.jit
def _sum_microbatches(auxes):
  """One stage copy's per-micro-batch aux (identical trees) summed, on its own sub-mesh."""
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *auxes)


@jax.jit
def _sum_and_stack(layer_parts, other_parts, load_parts, scalars, mtp_loads):
  """Adds up every contribution, already moved next to its destination, in one program.

  layer_parts: {stack: [per layer: [contributions]]}; other_parts: {key: [contributions]};
  load_parts: [per MoE layer: [contributions]]; scalars: {name: [contributions]}; mtp_loads: [trees].
  """
  total = lambda xs: sum(xs[1:], xs[0])
  tree_total = lambda xs: jax.tree.map(lambda *leaves: total(leaves), *xs)
  grads = {k: tree_total(v) for k, v in other_parts.items()}
  for stack, layers in layer_parts.items():
    grads[stack] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[tree_total(p) for p in layers])
  loads = jnp.stack([total(p) for p in load_parts]) if load_parts else None
  return grads, {k: total(v) for k, v in scalars.items()}, loads, (tree_total(mtp_loads) if mtp_loads else {})


def _assemble(plan: Plan, params, routing, copies):
  """Sums stage copies' gradients into the params tree, and micro-batch metrics and loads into totals.

  Each copy's results are first reduced over micro-batches on its own sub-mesh, then moved (one
  device_put per copy) to where the corresponding variables live, and added up there in one program:
  a handful of dispatches per step instead of one per leaf.
  """
  cfg = plan.cfg
  stacks = [k for k in ("dense_layers", "moe_layers") if k in params]
  layer_parts = {k: [[] for _ in range(jax.tree.leaves(params[k])[0].shape[0])] for k in stacks}
  other_parts: Dict[str, list] = collections.defaultdict(list)
  load_parts: Dict[int, list] = collections.defaultdict(list)
  scalars: Dict[str, list] = collections.defaultdict(list)
  mtp_loads = []
  scalar_target = _target(jax.tree.leaves(params)[0])
  if isinstance(scalar_target, NamedSharding):
    scalar_target = NamedSharding(scalar_target.mesh, P())
  bias = routing.get("moe_layers", {}).get("mlp", {}).get("e_score_correction_bias")

  for (d, s), c in copies.items():
    spec = plan.specs[s]
    contributions = stages.scatter_gradients(cfg, spec, c["acc"])
    targets = [jax.tree.map(_slice_target if len(path) == 2 else _target, params[path[0]])
               for path, _ in contributions]
    aux = _sum_microbatches(c["aux"])
    moe_layers = [l for l, moe in zip(spec.layers, spec.moe) if moe]
    aux_target = {"loss": scalar_target, "balance": scalar_target,
                  "loads": [_slice_target(bias)] * len(moe_layers)}
    if spec.last:
      aux_target.update(ce=scalar_target, mtp_loads=jax.tree.map(_target, {k: routing[k] for k in aux["mtp_loads"]}))
      if aux["mtp_loss"] is not None:
        aux_target["mtp_loss"] = scalar_target
    aux = {k: aux[k] for k in aux_target}
    moved, aux = jax.device_put(([g for _, g in contributions], aux), (targets, aux_target))
    for (path, _), g in zip(contributions, moved):
      (layer_parts[path[0]][path[1]] if len(path) == 2 else other_parts[path[0]]).append(g)
    for l, load in zip(moe_layers, aux["loads"]):
      load_parts[l].append(load)
    for name in ("loss", "balance", "ce", "mtp_loss"):
      if aux.get(name) is not None:
        scalars[name].append(aux[name])
    if aux.get("mtp_loads"):
      mtp_loads.append(aux["mtp_loads"])

  grads, sums, layer_loads, mtp = _sum_and_stack(
      layer_parts, dict(other_parts), [load_parts[l] for l in sorted(load_parts)], dict(scalars), mtp_loads)
  grads = jax.device_put(grads, jax.tree.map(_target, {k: params[k] for k in grads}))

  # Each micro-batch's loss is spread over the stages (every stage's balance share, the last stage's CE
  # and MTP); the batch value is the mean over micro-batches of the per-micro-batch sums.
  mean = {k: v / plan.microbatches for k, v in sums.items()}
  metrics = {"ce": mean["ce"]}
  if cfg.num_nextn_predict_layers:
    metrics["mtp_loss"] = mean["mtp_loss"]
  if cfg.num_moe_layers:
    metrics["balance_loss"] = mean["balance"]
  metrics["loss"] = mean["loss"]
  loads = losses.load_tree({"aux": {"load": jax.device_put(layer_loads, _target(bias))}
                            if layer_loads is not None else {}})
  loads.update(mtp)
  return mean["loss"], metrics, grads, loads


_PLANS: Dict[tuple, Plan] = {}


def get_plan(cfg: ModelConfig, schedule: str, num_stages: int, microbatches: int, devices=None,
             compiler_options=None) -> Plan:
  """Plans are cached per (config, schedule, ranks, micro-batches, devices); the compiled stage programs
  are cached by jit itself (per stage shape and sub-mesh), so they are shared across schedules."""
  dev_key = None if devices is None else tuple(
      (tuple(m.devices.flat), m.axis_names) if isinstance(m, Mesh) else m for m in devices)
  options = tuple(sorted(compiler_options.items())) if compiler_options else None
  key = (cfg, schedule, num_stages, microbatches, dev_key, options)
  if key not in _PLANS:
    _PLANS[key] = Plan(cfg, schedule, num_stages, microbatches, devices, options)
  return _PLANS[key]


def pipeline_value_and_grad(cfg: ModelConfig, variables, tokens, *, schedule: str, num_stages: int,
                            microbatches: int, mtp_weight, alpha, devices=None, timings=None,
                            compiler_options=None):
  """Pipelined equivalent of value_and_grad(objective(forward_train(...))) on one batch.

  tokens: int32 [B, T+1] (inputs tokens[:, :-1], labels tokens[:, 1:]), cut into `microbatches` equal
  micro-batches (DualPipe: the first half go down direction 0, the second half direction 1).
  num_stages: the pipeline degree (mesh.pipeline), i.e. the number of ranks; DualPipeV runs 2x that many
  model stages on them. devices: None (all devices, split evenly), a device list, or one Mesh per rank.
  timings: see `run`. compiler_options: XLA options for the stage programs (a dict), e.g.
  {'xla_backend_optimization_level': 0} to compile faster on CPU.
  Returns (loss, metrics, grads like variables['params'], loads like variables['routing']).
  """
  plan = get_plan(ModelConfig.from_any(cfg), schedule, num_stages, microbatches, devices, compiler_options)
  return run(plan, variables, tokens, mtp_weight, alpha, timings)
