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
sub-mesh right after they are produced, so transfers overlap compute. An F&B unit is one program
(stages.forward_backward) whose forward and backward chunks share no data, so that on a GPU the compiler
overlaps one chunk's expert all-to-all with the other's GEMMs (dsv3.overlap measures it).

Several processes (multi-host): every process runs this same driver over the same global order. It
dispatches the programs of the ranks it holds devices of and skips the others; a transfer between ranks
in different processes is a small collective program (a ppermute, see dsv3.pipeline.transfers) that both sides call
at the same point of the order.

Variables are per rank (dsv3.pipeline.rank_state): rank r's tree holds the units of its stages only. At
the start of a step a rank makes per-device copies of its stages' parameters (stages.Devices), so every
backward adds each device's gradients into its own copy with no communication. At the end each rank sums
the copies into ZeRO-1 shards (the step's one reduction over its devices); a unit held by several ranks is
summed among its holders only; the scalars (losses, the squared gradient norm) are summed over 'pipeline'.

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

from dsv3 import hf_config, layout, sharding, steps as steps_lib
from dsv3.config import ModelConfig
from dsv3.expert_parallel import ExpertParallel
from dsv3.layers import compute_dtype
from dsv3.pipeline import rank_state, schedules, stages
from dsv3.pipeline.transfers import Transfers


# ---------------------------------------------------------------------------------------------------
# Validation and set-up.
# ---------------------------------------------------------------------------------------------------
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


class Plan:
  """Everything about one (config, schedule, ranks, micro-batches, devices) that does not depend on data."""

  def __init__(self, cfg: ModelConfig, schedule: str, num_ranks: int, microbatches: int, devices=None,
               compiler_options=None, transfer: str = "auto"):
    self.cfg = cfg
    self.schedule = schedules.make(schedule, num_ranks, microbatches)
    self.num_stages = schedules.num_stages(schedule, num_ranks)
    if cfg.num_hidden_layers < self.num_stages:
      raise ValueError(f"model.num_hidden_layers = {cfg.num_hidden_layers} cannot be cut into "
                       f"{self.num_stages} pipeline stages (mesh.pipeline = {num_ranks}, schedule "
                       f"{schedule!r}); every stage needs at least one layer")
    self.specs = stages.split_layers(cfg, self.num_stages)
    self.mesh = pipeline_mesh(num_ranks, devices)
    self.meshes = sharding.stage_meshes(self.mesh)
    if self.mesh.devices.flat[0].platform in ("gpu", "cuda", "rocm"):     # F&B overlap: see stages.forward_backward
      compiler_options = tuple(sorted({**stages.GPU_OVERLAP_OPTIONS, **dict(compiler_options or ())}.items()))
    self.programs = stages.programs(compiler_options)
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
    self.layout = rank_state.RankLayout(self.mesh, [[self.specs[s] for _, s in phases]
                                                    for phases in self.schedule.placement])
    self._programs = {}


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


def run(plan: Plan, rank_variables, tokens, mtp_weight, alpha, timings: Optional[list] = None,
        donate: bool = False, fused: bool = True):
  """Executes one step on per-rank variables: rank_variables[r] = {'params', 'routing'} of rank r's units
  on its sub-mesh (rank_state; None where this process holds none of rank r).

  donate: each rank's params are donated into the step's per-device copies (stages.Devices.copies_taking),
  so a rank does not hold them twice, and rank_variables[r]['params'] is replaced by equal arrays made back
  from the copies at the end (the trainer's step). Otherwise the params are left as they are.

  Returns (loss, metrics, grads, loads, grad_norm): grads[r] and loads[r] shaped like rank r's params and
  routing (None for ranks of other processes), each unit's summed over its holders and placed like its
  optimizer state (ZeRO-1); loss, metrics and the whole model's gradient norm over the pipeline mesh.

  timings: if a list, every op is waited for (block_until_ready) and (rank, op string, start, end) in
  seconds is appended: serialised, for measuring per-op costs, not for speed.
  fused: an F&B cell is one program (stages.forward_backward); False dispatches its F and B programs back
  to back (the same numbers; the baseline that overlaps nothing).
  """
  cfg, sched, move = plan.cfg, plan.schedule, plan.transfers
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
  devices = {r: stages.Devices.of(plan.meshes[r], mb) for r in plan.local_ranks}
  taken = {}              # rank -> the shardings of the params it gave to its copies (donate)
  for r in devices:
    mine = stage_copies(plan, r)
    specs = [plan.specs[s] for _, s in mine]
    params, routing = rank_variables[r]["params"], rank_variables[r].get("routing", {})
    routings = [stages.stage_variables(params, routing, spec)[1] for spec in specs]
    if donate and devices[r].axes:
      taken[r] = jax.tree.map(lambda x: x.sharding, params)
      trees = devices[r].copies_taking(params, specs)
    else:
      trees = [devices[r].copies(stages.stage_variables(params, routing, spec)[0]) for spec in specs]
    coefs = jax.device_put(np.asarray([mtp_weight, alpha, 1.0 / plan.microbatches], np.float32),
                           NamedSharding(plan.meshes[r], P()))
    for (d, s), p, rt in zip(mine, trees, routings):
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

  # Each cell is: take its inputs, run its program (F, B, B*, W or a fused F&B), send its outputs on.
  def forward_inputs(r, op):
    d, s = sched.placement[r][op.phase]
    c = copies[d, s]
    return c, (acts.pop((d, s, op.microbatch)) if s > 0 else None), micro.get((d, s, op.microbatch))

  def forward_done(r, op, y, vjps, aux):
    d, s = sched.placement[r][op.phase]
    if move.mine[r]:
      saved[d, s, op.microbatch] = vjps
      copies[d, s]["aux"].append(aux)
    if s + 1 < plan.num_stages:
      acts[d, s + 1, op.microbatch] = move(y, r, plan.owner[d, s + 1], hidden, spec)
    return y

  def backward_inputs(r, op):
    d, s = sched.placement[r][op.phase]
    m = op.microbatch
    return copies[d, s], (grads_in.pop((d, s, m)) if s + 1 < plan.num_stages else None), saved.pop((d, s, m))

  def backward_done(r, op, c, vjps, dx, out):
    d, s = sched.placement[r][op.phase]
    if move.mine[r]:
      if op.input_only:
        deferred[r].append((c, vjps, out))
      else:
        c["acc"] = out
    if s > 0:
      grads_in[d, s - 1, op.microbatch] = move(dx, r, plan.owner[d, s - 1], hidden, spec)
    return dx, out

  def forward(r, op):
    y = vjps = aux = None
    if move.mine[r]:
      c, x, tok = forward_inputs(r, op)
      y, vjps, aux = plan.programs.forward(cfg, c["key"], c["params"], c["routing"], x, tok, c["coefs"],
                                           c["devices"])
    return forward_done(r, op, y, vjps, aux)

  def backward(r, op):
    c = vjps = dx = out = None
    if move.mine[r]:
      c, g, vjps = backward_inputs(r, op)
      if op.input_only:
        dx, out = plan.programs.backward_input(c["key"], vjps, g, c["coefs"], c["params"])
      else:
        dx, out = plan.programs.backward(c["key"], vjps, g, c["coefs"], c["acc"], c["params"])
    return backward_done(r, op, c, vjps, dx, out)

  def forward_backward(r, op):
    """An F&B cell as one program (stages.forward_backward): F's all-to-alls can overlap B's GEMMs."""
    f, b = op.forward, op.backward
    y = f_vjps = aux = c = b_vjps = dx = out = None
    if move.mine[r]:
      fc, x, tok = forward_inputs(r, f)
      c, g, b_vjps = backward_inputs(r, b)
      (y, f_vjps, aux), (dx, out) = plan.programs.forward_backward(
          cfg, fc["key"], c["key"], b.input_only, fc["devices"], fc["params"], fc["routing"], x, tok, fc["coefs"],
          b_vjps, g, None if b.input_only else c["acc"], c["params"])
    return forward_done(r, f, y, f_vjps, aux), backward_done(r, b, c, b_vjps, dx, out)

  def weights(r):
    if not move.mine[r]:
      return None
    c, vjps, cts = deferred[r].popleft()
    c["acc"] = plan.programs.backward_weights(c["key"], vjps, cts, c["acc"], c["params"])
    return c["acc"]

  run_op = dict(F=forward, B=backward, FB=forward_backward, W=lambda r, op: weights(r))
  for _, r, i in plan.order:
    op = sched[r][i]
    start = time.perf_counter()
    results = run_op[op.kind](r, op) if fused else [run_op[half.kind](r, half) for half in _halves(op)]
    if timings is not None and move.mine[r]:
      jax.block_until_ready(results)
      timings.append((r, str(op), start, time.perf_counter()))

  out = _assemble(plan, rank_variables, copies)
  for r, shardings in taken.items():
    mine = stage_copies(plan, r)
    rank_variables[r]["params"] = devices[r].params_from_copies(
        [copies[ds]["params"] for ds in mine], [plan.specs[s] for _, s in mine], shardings)
  return out


# ---------------------------------------------------------------------------------------------------
# Gathering the results: per rank, then each shared unit among its holders, then the scalars.
# ---------------------------------------------------------------------------------------------------
SCALARS = ("loss", "balance", "ce", "mtp_loss", "grad_sq")    # a rank's row of whole-model sums


def _rank_sums(stage_specs, devices, shared, shardings, accs, auxes):
  """One rank's gradients and loads by unit, summed over its micro-batches and stage copies.

  Every unit comes back reduced (the per-device copies summed into their ZeRO-1 shards, the rank's one
  reduction); `shared` units (also held by other ranks) with a leading axis of one row, for the sum among
  their holders. Also returns the rank's row of SCALARS."""
  grads, loads = {}, {}
  add = lambda d, k, v: d.__setitem__(k, v if k not in d else jax.tree.map(jnp.add, d[k], v))
  total = lambda xs: sum(xs[1:], xs[0])
  row = dict.fromkeys(SCALARS, jnp.zeros((), jnp.float32))
  for spec, acc, aux in zip(stage_specs, accs, auxes):
    for unit, g in stages.stage_units(spec, acc):
      add(grads, unit, g)
    for name in ("loss", "balance", "ce", "mtp_loss"):
      if aux[0].get(name) is not None:
        row[name] = row[name] + total([a[name] for a in aux])
    moe = [l for l, is_moe in zip(spec.layers, spec.moe) if is_moe]
    for j, l in enumerate(moe):
      add(loads, layout.unit_of(layout.LAYERS, layout.layer_key(l)), layout.bias_tree(total([a["loads"][j] for a in aux])))
    for key in (aux[0].get("mtp_loads") or {}):
      add(loads, key, jax.tree.map(lambda *xs: total(xs), *[a["mtp_loads"][key] for a in aux]))
  # Every unit's copies summed into its ZeRO-1 shards here (the rank's one reduction); a shared unit's shards
  # get a leading axis of one row for the sum among its holders, which then moves 1/devices of the unit.
  reduced = {u: jax.tree.map(jax.lax.with_sharding_constraint, devices.sum_copies(g), shardings[u])
             for u, g in grads.items()}
  own = {u: g for u, g in reduced.items() if u not in shared}
  shared_grads = {u: jax.tree.map(lambda x: x[None], g) for u, g in reduced.items() if u in shared}
  row["grad_sq"] = steps_lib.sq_norm(own)
  return (own, shared_grads, {u: l for u, l in loads.items() if u not in shared},
          {u: jax.tree.map(lambda x: x[None], l) for u, l in loads.items() if u in shared},
          jnp.stack([row[k] for k in SCALARS])[None])


def _group_sum(grad_shardings, load_shardings, sq_sharding, grads, loads):
  """Shared units' rows from all their holders ([holders * rows, ...]) summed: the gradients into their
  ZeRO-1 shards, replicated over the holders; and the holders' squared norm, counted on the first."""
  grads = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x.sum(0), s), grads, grad_shardings)
  loads = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x.sum(0), s), loads, load_shardings)
  holders = sq_sharding.mesh.shape["pipeline"]
  sq = jnp.zeros((holders,), jnp.float32).at[0].set(steps_lib.sq_norm(grads))
  return grads, loads, jax.lax.with_sharding_constraint(sq, sq_sharding)


def _assemble(plan: Plan, rank_variables, copies):
  """Per-rank gradients and loads (each unit reduced once, among its holders) and the whole-model scalars."""
  cfg, lay = plan.cfg, plan.layout
  zero1 = lambda r, tree: sharding.zero1_shardings(
      plan.meshes[r], jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  own, shared, own_loads, shared_loads, rows = {}, {}, {}, {}, {}
  for r in plan.local_ranks:
    mine = stage_copies(plan, r)
    program = rank_sums_program(plan, r, rank_variables[r]["params"], copies[mine[0]]["devices"])
    own[r], shared[r], own_loads[r], shared_loads[r], rows[r] = program(
        [copies[ds]["acc"] for ds in mine], [copies[ds]["aux"] for ds in mine])

  # Shared units: one program per group of holders sums their rows (every process holding one of them runs it).
  grads = {r: dict(own[r]) for r in plan.local_ranks}
  loads = {r: dict(own_loads[r]) for r in plan.local_ranks}
  pieces = {r: [] for r in plan.local_ranks}
  groups = {}
  for r in plan.local_ranks:
    for u in shared[r]:
      groups.setdefault(lay.holders(u), set()).add(u)
    for u in shared_loads[r]:
      groups.setdefault(lay.holders(u), set()).add(u)
  for holders, units in sorted(groups.items()):
    mesh, local = lay.group_mesh(holders), [r for r in holders if r in grads]
    first = local[0]

    def stacked(per_rank, u):
      def leaf(*xs):
        x = xs[0]
        lead = tuple(x.sharding.spec)[0] if len(x.sharding.spec) else None
        lead = () if lead is None else (lead if isinstance(lead, tuple) else (lead,))
        spec = P(("pipeline", *lead), *tuple(x.sharding.spec)[1:])
        return jax.make_array_from_single_device_arrays(
            (len(holders) * x.shape[0], *x.shape[1:]), NamedSharding(mesh, spec),
            [s.data for y in xs for s in y.addressable_shards])
      return jax.tree.map(leaf, *[per_rank[r][u] for r in local])
    g_units = sorted(u for u in units if u in shared[first])
    l_units = sorted(u for u in units if u in shared_loads[first])
    g_in = {u: stacked(shared, u) for u in g_units}
    l_in = {u: stacked(shared_loads, u) for u in l_units}
    to_group = lambda s: NamedSharding(mesh, s.spec)
    key = ("group", holders, tuple(g_units), tuple(l_units),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves((g_in, l_in))))
    if key not in plan._programs:
      param = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
      g_out = {u: jax.tree.map(to_group, zero1(first, jax.tree.map(param, g_in[u]))) for u in g_units}
      l_out = {u: jax.tree.map(lambda _: NamedSharding(mesh, P()), l_in[u]) for u in l_units}
      plan._programs[key] = jax.jit(functools.partial(_group_sum, g_out, l_out, NamedSharding(mesh, P("pipeline"))))
    g_sum, l_sum, sq = plan._programs[key](g_in, l_in)
    for r in local:
      grads[r].update({u: jax.tree.map(lambda x: lay.on_rank(x, r), g) for u, g in g_sum.items()})
      loads[r].update({u: jax.tree.map(lambda x: lay.on_rank(x, r), l) for u, l in l_sum.items()})
      pieces[r].append(lay.on_rank(sq, r))

  for r in plan.local_ranks:
    if pieces[r]:
      rows[r] = _add_grad_sq(rows[r], pieces[r])
  totals = _sum_over_ranks(lay.gather_rows(rows), NamedSharding(plan.mesh, P()))
  # Each micro-batch's loss is spread over the stages (every stage's balance share, the last stage's CE
  # and MTP); the batch value is the mean over micro-batches of the per-micro-batch sums.
  mean = {k: totals[i] / plan.microbatches for i, k in enumerate(SCALARS)}
  metrics = {"ce": mean["ce"]}
  if cfg.num_nextn_predict_layers:
    metrics["mtp_loss"] = mean["mtp_loss"]
  if cfg.num_moe_layers:
    metrics["balance_loss"] = mean["balance"]
  metrics["loss"] = mean["loss"]
  out = lambda per_rank: [layout.from_units(per_rank[r]) if r in per_rank else None for r in range(len(plan.meshes))]
  return mean["loss"], metrics, out(grads), out(loads), jnp.sqrt(totals[SCALARS.index("grad_sq")])


def stage_copies(plan: Plan, r: int) -> list:
  """The (direction, stage) copies rank r runs, in the order its gradient sums take them."""
  return sorted(ds for ds, owner in plan.owner.items() if owner == r)


def rank_sums_program(plan: Plan, r: int, params, devices: stages.Devices):
  """Rank r's jitted _rank_sums for its (abstract or real) per-layer `params`: (accumulators, auxes) of its
  stage copies -> (own grads, shared rows, own loads, shared load rows, SCALARS row)."""
  mine = stage_copies(plan, r)
  key = ("sums", r, tuple(mine), devices, jax.tree.structure(params),
         tuple((x.shape, x.dtype) for x in jax.tree.leaves(params)))
  if key not in plan._programs:
    units = layout.by_unit(params)
    shared = tuple(sorted(u for u in units if len(plan.layout.holders(u)) > 1))
    shardings = {u: sharding.zero1_shardings(
        plan.meshes[r], jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)) for u, t in units.items()}
    plan._programs[key] = jax.jit(functools.partial(
        _rank_sums, tuple(plan.specs[s] for _, s in mine), devices, shared, shardings))
  return plan._programs[key]


def _add_grad_sq(row, pieces):
  return row.at[0, SCALARS.index("grad_sq")].add(sum(p[0] for p in pieces))


@functools.partial(jax.jit, static_argnums=1)
def _sum_over_ranks(rows, target):
  """[P, k] rows summed over 'pipeline', replicated over the pipeline mesh."""
  return jax.lax.with_sharding_constraint(rows.sum(0), target)


def evaluate(plan: Plan, rank_variables, tokens):
  """Forward only through direction 0's stages in order, in micro-batches of the training step's size (so
  evaluation holds no more activations than training; the whole batch at once where it does not split).

  Returns (cross entropy, loads) as host values: loads [num_moe_layers, E] per MoE layer (the main
  layers' routing loads, for MaxVio), summed over the batch."""
  cfg, move = plan.cfg, plan.transfers
  tokens = _host_tokens(tokens)
  batch, width = tokens.shape
  chunks = plan.microbatches if batch % plan.microbatches == 0 else 1
  mb = batch // chunks
  hidden = jax.ShapeDtypeStruct((mb, width - 1, cfg.hidden_size), compute_dtype(cfg))
  spec = _token_spec(plan.meshes[0], mb)
  moe = [l for l in range(cfg.num_hidden_layers) if layout.is_moe(cfg, l)]
  width_row = 1 + len(moe) * cfg.n_routed_experts
  rows = {}
  for c in range(chunks):
    chunk, x = tokens[c * mb:(c + 1) * mb], None
    for s in range(plan.num_stages):
      r, spec_s = plan.owner[0, s], plan.specs[s]
      y = None
      if move.mine[r]:
        mesh = plan.meshes[r]
        devices = stages.Devices(mesh, (), plan.expert_parallel[r])
        p, rt = stages.stage_variables(rank_variables[r]["params"], rank_variables[r].get("routing", {}), spec_s)
        data = (jax.make_array_from_callback(chunk.shape, NamedSharding(mesh, spec), lambda i, t=chunk: t[i])
                if spec_s.first or spec_s.last else None)
        coefs = jax.device_put(np.asarray([0.0, 0.0, 1.0], np.float32), NamedSharding(mesh, P()))
        y, aux = plan.programs.evaluate(cfg, spec_s.program_key, p, rt, x, data, coefs, devices)
        row = rows[r] if r in rows else _zeros_row(width_row, mesh)
        rows[r] = _eval_row(row, aux, tuple(moe.index(l) for l, m in zip(spec_s.layers, spec_s.moe) if m),
                            width_row, cfg.n_routed_experts)
      if s + 1 < plan.num_stages:
        x = move(y, r, plan.owner[0, s + 1], hidden, spec)
  for r in plan.local_ranks:      # ranks running no stage of direction 0 (DualPipe's) add nothing
    if r not in rows:
      rows[r] = _zeros_row(width_row, plan.meshes[r])
  total = np.asarray(_sum_over_ranks(plan.layout.gather_rows(rows), NamedSharding(plan.mesh, P())))
  # Equal chunks: the batch's mean cross entropy is the mean of theirs.
  return float(total[0]) / chunks, total[1:].reshape(len(moe), cfg.n_routed_experts)


def _zeros_row(width: int, mesh: Mesh) -> jax.Array:
  """A rank's empty [1, width] row, placed on its sub-mesh (rows of all ranks meet in gather_rows)."""
  return jax.device_put(np.zeros((1, width), np.float32), NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _eval_row(row, aux, positions, width, experts):
  """A rank's [1, 1 + moe layers * E] row plus the cross entropy (last stage) and its MoE layers' loads."""
  if aux.get("ce") is not None:
    row = row.at[0, 0].add(aux["ce"])
  for j, pos in enumerate(positions):
    row = row.at[0, 1 + pos * experts:1 + (pos + 1) * experts].add(aux["loads"][j])
  return row


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
                            compiler_options=None, transfer: str = "auto", fused: bool = True):
  """Pipelined equivalent of value_and_grad(objective(forward_train(...))) on one batch, on the model's
  stacked variables: the reference entry point (tests, notebooks). The trainer keeps per-rank state
  (dsv3.pipeline.pipelined) and calls `run` on it.

  tokens: int32 [B, T+1] (inputs tokens[:, :-1], labels tokens[:, 1:]), the global batch as a host
  array, cut into `microbatches` equal micro-batches (DualPipe: the first half go down direction 0, the
  second half direction 1).
  num_stages: the pipeline degree (mesh.pipeline), i.e. the number of ranks; DualPipeV runs 2x that many
  model stages on them.
  devices: None (all devices, split evenly), a device list, a Mesh with a 'pipeline' axis, or one Mesh
  per rank. Each rank receives a copy of its stages' variables (they must be addressable here: one process).
  timings: see `run`. compiler_options: XLA options for the stage programs (a dict), e.g.
  {'xla_backend_optimization_level': 0} to compile faster on CPU. transfer: 'auto' (device_put within a
  process, a collective program across processes) or 'collective' (always the collective program).
  fused: see `run`.
  Returns (loss, metrics, grads like variables['params'], loads like variables['routing']) as host arrays.
  """
  plan = get_plan(hf_config.as_model_config(cfg), schedule, num_stages, microbatches, devices, compiler_options,
                  transfer)
  per_layer = {k: layout.unstack(plan.cfg, jax.tree.map(np.asarray, variables.get(k, {})))
               for k in ("params", "routing")}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), per_layer)
  ranks = []
  for r, mesh in enumerate(plan.meshes):
    part = plan.layout.restrict(per_layer, r)
    ranks.append({k: jax.device_put(part[k], sharding.param_shardings(mesh, part[k])) for k in part})
  loss, metrics, grads, loads, _ = run(plan, ranks, tokens, mtp_weight, alpha, timings, fused=fused)
  whole = lambda per_rank, like: layout.stack(plan.cfg, jax.tree.map(np.asarray, plan.layout.view(per_rank, like)))
  return (loss, metrics, whole(grads, abstract["params"]),
          whole(loads, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract["routing"])))
