"""The pipeline executor: per-stage programs on sub-meshes, driven from Python in a schedule's order.

Runs on a ('pipeline', 'data', 'expert') mesh, slice r being rank r's sub-mesh (PP x DP x EP); the schedule's
placement says which stages each rank holds. A Python driver rather than one SPMD program, because the
schedules interleave different stages' cells (zero-bubble W, overlapped F&B) in orders one traced program
cannot express without serialising them; JAX's asynchronous dispatch lets every sub-mesh run its own stream.
`pipeline_value_and_grad` returns exactly what jax.value_and_grad of the unpipelined objective returns.
README.md, "Pipeline stages and the executor", gives the design (order, multi-host transfers, reduction).
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

from dsv3 import layout, sharding
from dsv3.config import ModelConfig, require_model_config
from dsv3.expert_parallel import ExpertParallel
from dsv3.layers import compute_dtype
from dsv3.pipeline import per_device, rank_state, reduction, schedules, stages
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
    self.directions = len({d for phases in self.schedule.placement for d, _ in phases})
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
  """One step on per-rank variables (rank_variables[r] = rank r's {'params', 'routing'} on its sub-mesh, None
  where this process holds none of it). Returns (loss, metrics, grads, loads, grad_norm): grads[r] and loads[r]
  like rank r's params and routing, each unit summed over its holders and placed like its ZeRO-1 state.

  donate: the params are donated into the step's per-device copies (not held twice) and replaced by equal
  arrays at the end (the trainer's step). timings: a list to append (rank, op, start, end) to, every op
  waited for (per-op costs, not speed). fused: False runs an F&B cell as F then B (the no-overlap baseline).
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
  # micro-batch rows split over the sub-mesh, so gradients are reduced once per step (per_device.Devices).
  copies: Dict[tuple, dict] = {}
  devices = {r: per_device.Devices.of(plan.meshes[r], mb) for r in plan.local_ranks}
  taken = {}              # rank -> the shardings of the params it gave to its copies (donate)
  for r in devices:
    mine = reduction.stage_copies(plan, r)
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

  out = reduction.assemble(plan, rank_variables, copies)
  for r, shardings in taken.items():
    mine = reduction.stage_copies(plan, r)
    rank_variables[r]["params"] = devices[r].params_from_copies(
        [copies[ds]["params"] for ds in mine], [plan.specs[s] for _, s in mine], shardings)
  return out


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
        devices = per_device.Devices(mesh, (), plan.expert_parallel[r])
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
  total = np.asarray(reduction.sum_over_ranks(plan.layout.gather_rows(rows), NamedSharding(plan.mesh, P())))
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
  """value_and_grad(objective(forward_train(...))) on one batch, pipelined, on the model's stacked variables:
  the reference entry point (tests, notebooks; the trainer keeps per-rank state, dsv3.pipeline.pipelined).

  tokens: int32 [B, T+1], the global batch on the host, cut into `microbatches` (DualPipe: the first half go
  down direction 0). num_stages: the pipeline degree (ranks; DualPipeV runs 2x that many stages). devices:
  None, a device list, a Mesh with a 'pipeline' axis or one Mesh per rank (addressable: one process).
  compiler_options: XLA options for the stage programs; transfer: 'auto' or 'collective'; timings, fused:
  see `run`. Returns (loss, metrics, grads like params, loads like routing) as host arrays.
  """
  plan = get_plan(require_model_config(cfg, "pipeline_value_and_grad"), schedule, num_stages, microbatches, devices, compiler_options,
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
