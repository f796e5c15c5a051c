"""The pipeline executor: explicit per-stage programs on sub-meshes, driven by a schedule from Python.

The executor runs on a ('pipeline', 'data', 'expert') mesh; slice r of its 'pipeline' axis is rank r's
sub-mesh. The model is cut into stages (dsv3.pipeline.stages); every stage's forward F, full backward B,
input-only backward B* and deferred weight-gradient W are jitted programs, compiled once per stage shape
and sub-mesh. Inside a stage, micro-batch rows are split over the sub-mesh's ('data', 'expert') axes and,
when 'expert' > 1, the routed experts over 'expert' with the all-to-all dispatch of
dsv3.expert_parallel: PP x DP x EP as in the report. Which rank holds which stage is the schedule's
placement:
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
sub-mesh right after they are produced, so transfers overlap compute. An F&B unit is its forward and
backward dispatched back to back (two programs in flight on one sub-mesh).

Several processes (multi-host): every process runs this same driver over the same global order. It
dispatches the programs of the ranks it holds devices of and skips the others; a transfer between ranks
in different processes is a small collective program (a ppermute, see `Transfers`) that both sides call
at the same point of the order. Variables live on the pipeline mesh replicated over 'pipeline' (the
trainer's state), so each rank reads its stages' parameters from its own shards; at the start of a step
it makes per-device copies of its stages' parameters (stages.Devices), so every backward adds each
device's gradients into its own copy with no communication. At the end each rank sums the copies and
adds its contributions into full-size gradient/load trees (the step's one reduction over the rank's
devices), and one program on the whole mesh sums them over 'pipeline'. Keeping the whole state on every rank costs memory that a stage-sharded
state would not: that is the price of one state tree that checkpoints, EMA and evaluation share.

`pipeline_value_and_grad` returns exactly what jax.value_and_grad of losses.objective over
model.forward_train returns for the whole batch (all three loss terms are means over equal
micro-batches), the gradients summed over micro-batches and stage copies in the params tree, and the
per-expert loads summed over every micro-batch (the tree of variables['routing']).
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3 import sharding
from dsv3.config import ModelConfig
from dsv3.expert_parallel import ExpertParallel
from dsv3.layers import compute_dtype
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


def pipeline_mesh(num_ranks: int, devices=None) -> Mesh:
  """The ('pipeline', 'data', 'expert') mesh the executor runs on; slice r is rank r's sub-mesh.

  devices: None (all devices) or a device list, cut into `num_ranks` contiguous data-parallel groups;
  a Mesh with a 'pipeline' axis (the trainer's); or one ('data', 'expert') Mesh per rank.
  """
  if isinstance(devices, Mesh):
    if devices.shape.get("pipeline") != num_ranks:
      raise ValueError(f"mesh.pipeline = {num_ranks} but the given mesh has axes {dict(devices.shape)}")
    return devices
  if devices is not None and all(isinstance(d, Mesh) for d in devices):
    meshes = list(devices)
    if len(meshes) != num_ranks:
      raise ValueError(f"mesh.pipeline = {num_ranks} but {len(meshes)} stage meshes were given")
    if len({(m.devices.shape, m.axis_names) for m in meshes}) != 1:
      raise ValueError(f"every pipeline rank's sub-mesh needs the same shape and axis names, got "
                       f"{[dict(m.shape) for m in meshes]}")
    return Mesh(np.stack([m.devices for m in meshes]), ("pipeline", *meshes[0].axis_names))
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) % num_ranks:
    raise ValueError(f"mesh.pipeline = {num_ranks} must divide the number of devices ({len(devices)})")
  return Mesh(np.array(devices).reshape(num_ranks, len(devices) // num_ranks, 1), ("pipeline", "data", "expert"))


def stage_meshes(num_ranks: int, devices=None) -> List[Mesh]:
  """One ('data', 'expert') sub-mesh per rank (see pipeline_mesh for `devices`)."""
  return sharding.stage_meshes(pipeline_mesh(num_ranks, devices))


def _token_spec(mesh: Mesh, batch: int) -> P:
  """Micro-batch rows over the sub-mesh's token axes ('data' and 'expert') when they divide evenly."""
  for axes in (("data", "expert"), ("data",)):
    size = int(np.prod([mesh.shape.get(a, 1) for a in axes]))
    if batch % size == 0:
      return P(axes if size > 1 else None)
  return P()


class Transfers:
  """Moves activations and gradients between ranks' sub-meshes; works across processes.

  Within one process this is jax.device_put. When either sub-mesh has devices of another process (or
  mode='collective'), it is a two-rank program: the source's shards and placeholder shards on the
  destination form one array over a ('pair', 'data', 'expert') mesh, and a shard_map ppermute over
  'pair' sends each source device's block to the destination device with the same ('data', 'expert')
  coordinates (on GPUs, NCCL send/recv). Every process holding a device of either rank calls it, and
  all processes walk the schedule in the same global order, so these collectives line up.
  """

  def __init__(self, meshes: List[Mesh], mode: str = "auto"):
    if mode not in ("auto", "collective"):
      raise ValueError(f"transfer must be 'auto' or 'collective', got {mode!r}")
    self.meshes, self.mode = meshes, mode
    me = jax.process_index()
    self.devices = [set(m.devices.flat) for m in meshes]
    owners = [{d.process_index for d in m.devices.flat} for m in meshes]
    self.mine = [me in o for o in owners]             # this process takes part in rank r's programs
    self.local = [o == {me} for o in owners]          # rank r lives entirely in this process
    self._programs, self._placeholders = {}, {}

  def __call__(self, x, src: int, dst: int, like: jax.ShapeDtypeStruct, spec: P):
    """x on rank `src` (None where this process holds none of src) -> the array on `dst` (None where
    this process holds none of dst)."""
    if not (self.mine[src] or self.mine[dst]):
      return None
    target = NamedSharding(self.meshes[dst], spec)
    if self.mine[src] and (x.shape, x.dtype) != (like.shape, like.dtype):
      raise AssertionError(f"pipeline transfer {src}->{dst}: got {x.shape} {x.dtype}, expected {like}")
    if src == dst or (self.mode == "auto" and self.local[src] and self.local[dst]):
      return jax.device_put(x, target) if self.mine[dst] else None
    lo, hi = sorted((src, dst))
    pair_sharding, send = self._program(lo, hi, src == lo, spec)
    shards = []
    if self.mine[src]:
      x = jax.device_put(x, NamedSharding(self.meshes[src], spec))
      shards += [s.data for s in x.addressable_shards]
    if self.mine[dst]:
      shards += [self._placeholder(d, target.shard_shape(like.shape), like.dtype)
                 for d in target.addressable_devices]
    both = jax.make_array_from_single_device_arrays((2 * like.shape[0], *like.shape[1:]),
                                                    pair_sharding, shards)
    out = send(both)
    if not self.mine[dst]:
      return None
    return jax.make_array_from_single_device_arrays(
        like.shape, target, [s.data for s in out.addressable_shards if s.device in self.devices[dst]])

  def _program(self, lo: int, hi: int, forward: bool, spec: P):
    """(sharding of the two-rank array, the jitted send) for ranks lo < hi, sending lo->hi if `forward`.

    The two-rank array stacks the ranks' blocks on the leading axis: rows [0, n) on lo, [n, 2n) on hi,
    each split like `spec` within its rank, so its shards are exactly the ranks' own shards."""
    key = (lo, hi, forward, spec)
    if key not in self._programs:
      lo_mesh, hi_mesh = self.meshes[lo], self.meshes[hi]
      pair_mesh = Mesh(np.stack([lo_mesh.devices, hi_mesh.devices]), ("pair", *lo_mesh.axis_names))
      first = (tuple(spec) + (None,))[0]
      first = () if first is None else (first if isinstance(first, tuple) else (first,))
      pair_spec = P(("pair", *first), *tuple(spec)[1:])
      perm = [(0, 1)] if forward else [(1, 0)]
      body = lambda block: jax.lax.ppermute(block, "pair", perm)
      send = jax.jit(jax.shard_map(body, mesh=pair_mesh, in_specs=pair_spec, out_specs=pair_spec))
      self._programs[key] = NamedSharding(pair_mesh, pair_spec), send
    return self._programs[key]

  def _placeholder(self, device, shape, dtype):
    # Never written to (the input is not donated), so one buffer per device/shape serves every transfer.
    key = (device, tuple(shape), jnp.dtype(dtype))
    if key not in self._placeholders:
      self._placeholders[key] = jax.device_put(np.zeros(shape, dtype), device)
    return self._placeholders[key]


class Plan:
  """Everything about one (config, schedule, ranks, micro-batches, devices) that does not depend on data."""

  def __init__(self, cfg: ModelConfig, schedule: str, num_ranks: int, microbatches: int, devices=None,
               compiler_options=None, transfer: str = "auto"):
    self.cfg = cfg
    self.programs = stages.programs(compiler_options)
    self.schedule = make_schedule(schedule, num_ranks, microbatches)
    self.num_stages = num_stages_for(schedule, num_ranks)
    if cfg.num_hidden_layers < self.num_stages:
      raise ValueError(f"model.num_hidden_layers = {cfg.num_hidden_layers} cannot be cut into "
                       f"{self.num_stages} pipeline stages (mesh.pipeline = {num_ranks}, schedule "
                       f"{schedule!r}); every stage needs at least one layer")
    self.specs = stages.split_layers(cfg, self.num_stages)
    self.mesh = pipeline_mesh(num_ranks, devices)
    self.meshes = sharding.stage_meshes(self.mesh)
    self.transfers = Transfers(self.meshes, transfer)
    # Expert parallelism inside every stage: its routed experts over the sub-mesh's 'expert' axis.
    self.expert_parallel = [ExpertParallel(m) if m.shape.get("expert", 1) > 1 else None for m in self.meshes]
    self.local_ranks = [r for r in range(num_ranks) if self.transfers.mine[r]]
    if not self.local_ranks:
      raise ValueError(f"process {jax.process_index()} holds no device of the pipeline mesh; every process "
                       f"must take part in at least one pipeline rank")
    self.microbatches = microbatches
    self.directions = 2 if schedule == "dualpipe" else 1
    self.per_direction = microbatches // self.directions
    # (direction, stage) -> rank; a stage copy is identified by its (direction, stage).
    self.owner = {ds: r for r, phases in enumerate(self.schedule.placement) for ds in phases}
    sim = schedules.simulate(self.schedule)
    # Simulated start times give a global order in which every op comes after the ops it depends on;
    # every process walks the same order, which keeps cross-process transfers in step.
    self.order = sorted((start, r, i) for r, line in enumerate(sim.timelines)
                        for i, (start, _, _) in enumerate(line))
    self.prediction = sim
    self._totals = {}

  def on_mesh(self, x) -> bool:
    """Whether `x` is an array placed on this plan's pipeline mesh."""
    return isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == self.mesh

  def leaf_spec(self, x) -> P:
    """Where a variable lives within a sub-mesh: its own spec if it is on the pipeline mesh, else replicated."""
    if not self.on_mesh(x):
      return P()
    if "pipeline" in jax.tree.leaves(tuple(x.sharding.spec)):
      raise ValueError(f"pipeline executor: variables must be replicated over the 'pipeline' axis, got "
                       f"spec {x.sharding.spec}")
    return x.sharding.spec

  def on_rank(self, tree, r: int):
    """`tree` on rank r's sub-mesh. Variables on the pipeline mesh are replicated over 'pipeline', so
    rank r's shards already hold it: the result shares their buffers (no copy). Anything else must be
    addressable here and is copied (replicated) onto the sub-mesh."""
    mesh, devices = self.meshes[r], self.transfers.devices[r]

    def leaf(x):
      spec = self.leaf_spec(x)
      if self.on_mesh(x):
        return jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(mesh, spec), [s.data for s in x.addressable_shards if s.device in devices])
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError("pipeline executor: variables spanning processes must live on the pipeline mesh "
                         "(the trainer's ('pipeline', 'data', 'expert') mesh), replicated over 'pipeline'")
      return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree.map(leaf, tree)


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------
def _halves(op):
  return (op.forward, op.backward) if op.kind == "FB" else (op,)


def _host_tokens(tokens) -> np.ndarray:
  """The global batch as a host array: every process reads the rows its first and last stages need."""
  if isinstance(tokens, jax.Array) and not (tokens.is_fully_addressable or tokens.is_fully_replicated):
    raise ValueError("pipeline executor: pass the global batch as a host (numpy) array in every process, "
                     "or as a replicated jax.Array; got an array split across processes")
  return np.asarray(tokens, np.int32)


def run(plan: Plan, variables, tokens, mtp_weight, alpha, timings: Optional[list] = None):
  """Executes one step. Returns (loss, metrics, grads, loads).

  timings: if a list, every op is waited for (block_until_ready) and (rank, op string, start, end) in
  seconds is appended: serialised, for measuring per-op costs, not for speed.
  """
  cfg, sched, move = plan.cfg, plan.schedule, plan.transfers
  params, routing = variables["params"], variables.get("routing", {})
  tokens = _host_tokens(tokens)
  batch, width = tokens.shape
  if batch % plan.microbatches:
    raise ValueError(f"pipeline.microbatches = {plan.microbatches} must divide the batch size {batch}")
  mb = batch // plan.microbatches
  hidden = jax.ShapeDtypeStruct((mb, width - 1, cfg.hidden_size), compute_dtype(cfg))

  spec = _token_spec(plan.meshes[0], mb)       # sub-meshes are alike: one row layout for every rank

  # Stage copies on the ranks this process takes part in; their parameters as per-device copies where the
  # micro-batch rows split over the sub-mesh, so gradients are reduced once per step (stages.Devices).
  copies: Dict[tuple, dict] = {}
  views = {r: plan.on_rank((params, routing), r) for r in plan.local_ranks}
  devices = {r: stages.Devices.of(plan.meshes[r], mb) for r in plan.local_ranks}
  for (d, s), r in plan.owner.items():
    if r not in views:
      continue
    mesh = plan.meshes[r]
    p, rt = stages.stage_variables(cfg, *views[r], plan.specs[s])
    p = devices[r].copies(p)
    coefs = jax.device_put(np.asarray([mtp_weight, alpha, 1.0 / plan.microbatches], np.float32),
                           NamedSharding(mesh, P()))
    copies[d, s] = dict(params=p, routing=rt, coefs=coefs, acc=stages.zeros_like(p),
                        key=plan.specs[s].program_key, aux=[], devices=devices[r])

  # Micro-batch tokens go to the first and last stage of their direction (the embedding and the loss).
  micro = {}
  for d, s in copies:
    if s in (0, plan.num_stages - 1):
      for m in range(plan.per_direction):
        g = d * plan.per_direction + m
        rows = tokens[g * mb:(g + 1) * mb]
        micro[d, s, m] = jax.make_array_from_callback(
            rows.shape, NamedSharding(plan.meshes[plan.owner[d, s]], spec), lambda i, rows=rows: rows[i])

  acts, grads_in, saved = {}, {}, {}
  deferred = [collections.deque() for _ in sched]

  def forward(r, op):
    d, s = sched.placement[r][op.phase]
    m, y = op.microbatch, None
    if move.mine[r]:
      c = copies[d, s]
      x = acts.pop((d, s, m)) if s > 0 else None
      y, vjps, aux = plan.programs.forward(cfg, c["key"], c["params"], c["routing"], x, micro.get((d, s, m)),
                                           c["coefs"], c["devices"])
      saved[d, s, m] = vjps
      c["aux"].append(aux)
    if s + 1 < plan.num_stages:
      acts[d, s + 1, m] = move(y, r, plan.owner[d, s + 1], hidden, spec)
    return y

  def backward(r, op):
    d, s = sched.placement[r][op.phase]
    m, dx, out = op.microbatch, None, None
    if move.mine[r]:
      c = copies[d, s]
      g = grads_in.pop((d, s, m)) if s + 1 < plan.num_stages else None
      vjps = saved.pop((d, s, m))
      if op.input_only:
        dx, out = plan.programs.backward_input(c["key"], vjps, g, c["coefs"])
        deferred[r].append((c, vjps, out))
      else:
        dx, c["acc"] = plan.programs.backward(c["key"], vjps, g, c["coefs"], c["acc"])
        out = c["acc"]
    if s > 0:
      grads_in[d, s - 1, m] = move(dx, r, plan.owner[d, s - 1], hidden, spec)
    return dx, out

  def weights(r):
    if not move.mine[r]:
      return None
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
    if timings is not None and move.mine[r]:
      jax.block_until_ready(results)
      timings.append((r, str(op), start, time.perf_counter()))

  return _assemble(plan, params, routing, copies)


# ---------------------------------------------------------------------------------------------------
# Gathering the results: per rank, then summed over the 'pipeline' axis.
# ---------------------------------------------------------------------------------------------------
def _rank_totals(cfg: ModelConfig, stage_specs, param_shapes, routing_shapes, devices, accs, auxes):
  """One rank's contributions as full trees: gradients shaped like the params (zero where the rank holds
  nothing), loads shaped like the routing biases, and the loss terms, each summed over micro-batches and
  over the rank's stage copies. Every leaf gets a leading axis of 1: the rank's row of a [P, ...] array.
  The accumulators' per-device copies are summed here: the step's one gradient reduction on the rank."""
  accs = [devices.sum_copies(acc) for acc in accs]
  grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes)
  loads = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), routing_shapes)
  scalars = {k: jnp.zeros((), jnp.float32) for k in ("loss", "balance", "ce", "mtp_loss")}
  total = lambda xs: sum(xs[1:], xs[0])
  for spec, acc, aux in zip(stage_specs, accs, auxes):
    for path, g in stages.scatter_gradients(cfg, spec, acc):
      if len(path) == 2:
        grads[path[0]] = jax.tree.map(lambda t, x: t.at[path[1]].add(x), grads[path[0]], g)
      else:
        grads[path[0]] = jax.tree.map(jnp.add, grads[path[0]], g)
    for name in scalars:
      if aux[0].get(name) is not None:
        scalars[name] = scalars[name] + total([a[name] for a in aux])
    moe_layers = [l - cfg.first_k_dense_replace for l, moe in zip(spec.layers, spec.moe) if moe]
    if moe_layers:
      bias = loads["moe_layers"]["mlp"]["e_score_correction_bias"]
      for j, l in enumerate(moe_layers):
        bias = bias.at[l].add(total([a["loads"][j] for a in aux]))
      loads["moe_layers"]["mlp"]["e_score_correction_bias"] = bias
    for key in (aux[0].get("mtp_loads") or {}):
      loads[key] = jax.tree.map(lambda t, *xs: t + total(xs), loads[key], *[a["mtp_loads"][key] for a in aux])
  return jax.tree.map(lambda x: x[None], {"grads": grads, "loads": loads, "scalars": scalars})


def _assemble(plan: Plan, params, routing, copies):
  """Sums every rank's contributions over the 'pipeline' axis (one program on the whole pipeline mesh,
  which every process calls) into gradients placed like the params and loads placed like the routing
  biases; the loss terms become batch means."""
  cfg = plan.cfg
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  specs = {"grads": jax.tree.map(plan.leaf_spec, params), "loads": jax.tree.map(plan.leaf_spec, routing),
           "scalars": {k: P() for k in ("loss", "balance", "ce", "mtp_loss")}}
  is_spec = lambda x: isinstance(x, P)
  rows = {}
  for r in plan.local_ranks:
    mine = sorted(ds for ds, owner in plan.owner.items() if owner == r)
    devices = copies[mine[0]]["devices"]
    key = (r, tuple(mine), devices, jax.tree.structure(params),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves(params)))
    if key not in plan._totals:
      out = jax.tree.map(lambda sp: NamedSharding(plan.meshes[r], P(None, *sp)), specs, is_leaf=is_spec)
      plan._totals[key] = jax.jit(functools.partial(
          _rank_totals, cfg, tuple(plan.specs[s] for _, s in mine), shapes(params), shapes(routing), devices),
          out_shardings=out)
    rows[r] = plan._totals[key]([copies[ds]["acc"] for ds in mine], [copies[ds]["aux"] for ds in mine])

  # This process's rows, as one [P, ...] array per leaf over the pipeline mesh.
  num_ranks = plan.mesh.shape["pipeline"]
  flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
  flat_rows = {r: jax.tree.leaves(t) for r, t in rows.items()}
  template, treedef = jax.tree.flatten(rows[plan.local_ranks[0]])
  stacked = [jax.make_array_from_single_device_arrays(
      (num_ranks, *leaf.shape[1:]), NamedSharding(plan.mesh, P("pipeline", *sp)),
      [s.data for r in rows for s in flat_rows[r][i].addressable_shards])
      for i, (leaf, sp) in enumerate(zip(template, flat_specs))]
  targets = [NamedSharding(plan.mesh, sp) for sp in flat_specs]
  summed = _sum_over_ranks(stacked, tuple(targets))
  totals = jax.tree.unflatten(treedef, summed)

  # Each micro-batch's loss is spread over the stages (every stage's balance share, the last stage's CE
  # and MTP); the batch value is the mean over micro-batches of the per-micro-batch sums.
  mean = {k: v / plan.microbatches for k, v in totals["scalars"].items()}
  metrics = {"ce": mean["ce"]}
  if cfg.num_nextn_predict_layers:
    metrics["mtp_loss"] = mean["mtp_loss"]
  if cfg.num_moe_layers:
    metrics["balance_loss"] = mean["balance"]
  metrics["loss"] = mean["loss"]
  return mean["loss"], metrics, totals["grads"], totals["loads"]


@functools.partial(jax.jit, static_argnums=1)
def _sum_over_ranks(stacked, targets):
  """[P, ...] rows summed over 'pipeline', each result placed at its target sharding."""
  return [jax.lax.with_sharding_constraint(x.sum(0, dtype=x.dtype), t) for x, t in zip(stacked, targets)]


_PLANS: Dict[tuple, Plan] = {}


def get_plan(cfg: ModelConfig, schedule: str, num_stages: int, microbatches: int, devices=None,
             compiler_options=None, transfer: str = "auto") -> Plan:
  """Plans are cached per (config, schedule, ranks, micro-batches, devices); the compiled stage programs
  are cached by jit itself (per stage shape and sub-mesh), so they are shared across schedules."""
  if devices is None or isinstance(devices, Mesh):
    dev_key = devices
  else:
    dev_key = tuple((tuple(m.devices.flat), m.axis_names) if isinstance(m, Mesh) else m for m in devices)
  options = tuple(sorted(compiler_options.items())) if compiler_options else None
  key = (cfg, schedule, num_stages, microbatches, dev_key, options, transfer)
  if key not in _PLANS:
    _PLANS[key] = Plan(cfg, schedule, num_stages, microbatches, devices, options, transfer)
  return _PLANS[key]


def pipeline_value_and_grad(cfg: ModelConfig, variables, tokens, *, schedule: str, num_stages: int,
                            microbatches: int, mtp_weight, alpha, devices=None, timings=None,
                            compiler_options=None, transfer: str = "auto"):
  """Pipelined equivalent of value_and_grad(objective(forward_train(...))) on one batch.

  tokens: int32 [B, T+1] (inputs tokens[:, :-1], labels tokens[:, 1:]), the global batch as a host
  array (in every process), cut into `microbatches` equal micro-batches (DualPipe: the first half go
  down direction 0, the second half direction 1).
  num_stages: the pipeline degree (mesh.pipeline), i.e. the number of ranks; DualPipeV runs 2x that many
  model stages on them.
  devices: None (all devices, split evenly), a device list, a Mesh with a 'pipeline' axis, or one Mesh
  per rank. Variables that live on that pipeline mesh (replicated over 'pipeline', as the trainer keeps
  them) are used in place; other variables must be addressable and are copied to every rank.
  Multi-process: every process calls this with the same arguments; each runs the programs of the ranks
  it holds devices of.
  timings: see `run`. compiler_options: XLA options for the stage programs (a dict), e.g.
  {'xla_backend_optimization_level': 0} to compile faster on CPU. transfer: 'auto' (device_put within a
  process, a collective program across processes) or 'collective' (always the collective program).
  Returns (loss, metrics, grads like variables['params'], loads like variables['routing']), on the
  pipeline mesh: placed like the variables if they live there, else replicated.
  """
  plan = get_plan(ModelConfig.from_any(cfg), schedule, num_stages, microbatches, devices, compiler_options,
                  transfer)
  return run(plan, variables, tokens, mtp_weight, alpha, timings)
