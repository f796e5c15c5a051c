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

from dsv3 import layout
from dsv3.config import ModelConfig, require_model_config
from dsv3.kernels import backend
from dsv3.nn.layers import compute_dtype
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel
from dsv3.pipeline import per_device, rank_state, reduction, schedules, stages
from dsv3.pipeline.dispatch import EXECUTE, Call, Execute, sds
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


class Plan:
  """Everything about one (config, schedule, ranks, micro-batches, devices) that does not depend on data."""

  def __init__(self, cfg: ModelConfig, schedule: str, num_ranks: int, microbatches: int, devices=None,
               compiler_options=None, transfer: str = "auto", fb_barriers: bool = True,
               collectives_in_flight: int = 2):
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
    if backend.mesh_platform(self.mesh) == "gpu":     # F&B overlap: see stages.forward_backward
      compiler_options = tuple(sorted({**stages.gpu_overlap_options(collectives_in_flight),
                                       **dict(compiler_options or ())}.items()))
    self.programs = stages.programs(compiler_options, fb_barriers)
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
    self.program_cache = {}     # jitted glue programs (dsv3.pipeline.reduction), by their static key


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------
def _halves(op):
  return (op.forward, op.backward) if op.kind == "FB" else (op,)


class _Step:
  """One step's walk of the schedule: the stage copies, the micro-batch tokens, what moves between cells.
  Each cell takes its inputs, runs its program (F, B, B*, W or a fused F&B) and sends its outputs on."""

  def __init__(self, plan: Plan, exe: Execute, tokens, mtp_weight, alpha):
    self.plan, self.exe = plan, exe
    self.tokens = exe.tokens(tokens)
    batch, width = self.tokens.shape
    self.mb = schedules.microbatch_rows(batch, plan.microbatches)
    self.hidden = jax.ShapeDtypeStruct((self.mb, width - 1, plan.cfg.hidden_size), compute_dtype(plan.cfg))
    self.spec = sharding.batch_spec(plan.meshes[0], self.mb)     # sub-meshes are alike: one row layout
    self.weights_coefs = (mtp_weight, alpha)
    self.copies: Dict[tuple, dict] = {}
    self.accs = {}     # per rank: its per-unit gradient accumulators
    self.micro, self.acts, self.grads_in, self.saved = {}, {}, {}, {}
    self.deferred = [collections.deque() for _ in plan.schedule]

  def name(self, r: int, kind: str, *stages_) -> str:
    return f"rank{r}_{kind}" + "".join(f"_stage{s}" for s in stages_)

  def take_copies(self, rank_variables):
    """Stage copies on the ranks this process runs; their parameters as per-device working copies where the
    micro-batch rows split over the sub-mesh, so gradients are reduced once per step (per_device.Devices).
    A rank copies each of its units once, and keeps one accumulator per unit in its master's dtype (FP32):
    its stage copies share them (DualPipe's rank 0 runs stage 0, which embeds, and the last stage, whose
    MTP module embeds)."""
    plan, exe, cfg = self.plan, self.exe, self.plan.cfg
    for r in exe.ranks(plan):
      devices = per_device.Devices.of(plan.meshes[r], self.mb)
      params, routing = rank_variables[r]["params"], rank_variables[r].get("routing", {})
      copied = exe.glue(lambda: devices.copies(params, cfg), lambda: devices.abstract_copies(params, cfg))
      self.accs[r] = exe.glue(lambda: stages.accumulators(copied, params),
                              lambda: stages.abstract_accumulators(copied, params))
      coefs = exe.constant(np.asarray([*self.weights_coefs, 1.0 / plan.microbatches], np.float32),
                           NamedSharding(plan.meshes[r], P()))
      for d, s in reduction.stage_copies(plan, r):
        sp = plan.specs[s]
        self.copies[d, s] = dict(params=stages.stage_variables(copied, {}, sp)[0], rank=r, spec=sp,
                                 routing=stages.stage_variables(params, routing, sp)[1], coefs=coefs,
                                 key=sp.program_key, aux=[], devices=devices, stage=s)

  def acc(self, c):
    """Stage copy c's gradient accumulator, made of its rank's per-unit accumulators."""
    return stages.stage_variables(self.accs[c["rank"]], {}, c["spec"])[0]

  def set_acc(self, c, tree):
    """Stores a program's new accumulator of stage copy c back into its rank's per-unit accumulators."""
    units = layout.by_unit(self.accs[c["rank"]])
    units.update(stages.stage_units(c["spec"], tree))
    self.accs[c["rank"]] = layout.from_units(units)

  def place_tokens(self):
    """Micro-batch tokens go to the first and last stage of their direction (the embedding and the loss)."""
    plan = self.plan
    for d, s in self.copies:
      if s in (0, plan.num_stages - 1):
        where = NamedSharding(plan.meshes[plan.owner[d, s]], self.spec)
        for m in range(plan.per_direction):
          g = d * plan.per_direction + m
          self.micro[d, s, m] = self.exe.rows(self.tokens, g * self.mb, (g + 1) * self.mb, where)

  def forward_inputs(self, r, op):
    d, s = self.plan.schedule.placement[r][op.phase]
    return (self.copies[d, s], (self.acts.pop((d, s, op.microbatch)) if s > 0 else None),
            self.micro.get((d, s, op.microbatch)))

  def forward_done(self, r, op, y, vjps, aux):
    plan = self.plan
    d, s = plan.schedule.placement[r][op.phase]
    if self.exe.mine(plan, r):
      self.saved[d, s, op.microbatch] = vjps
      self.copies[d, s]["aux"].append(aux)
    if s + 1 < plan.num_stages:
      self.acts[d, s + 1, op.microbatch] = self.exe.move(plan, y, r, plan.owner[d, s + 1], self.hidden, self.spec)
    return y

  def backward_inputs(self, r, op):
    d, s = self.plan.schedule.placement[r][op.phase]
    m = op.microbatch
    return (self.copies[d, s], (self.grads_in.pop((d, s, m)) if s + 1 < self.plan.num_stages else None),
            self.saved.pop((d, s, m)))

  def backward_done(self, r, op, c, vjps, dx, out):
    plan = self.plan
    d, s = plan.schedule.placement[r][op.phase]
    if self.exe.mine(plan, r):
      if op.input_only:
        self.deferred[r].append((c, vjps, out))
      else:
        self.set_acc(c, out)
    if s > 0:
      self.grads_in[d, s - 1, op.microbatch] = self.exe.move(plan, dx, r, plan.owner[d, s - 1], self.hidden, self.spec)
    return dx, out

  def forward(self, r, op):
    y = vjps = aux = None
    if self.exe.mine(self.plan, r):
      c, x, tok = self.forward_inputs(r, op)
      call = Call(self.name(r, "F", c["stage"]), "F", r, self.plan.meshes[r], c["key"])
      y, vjps, aux = self.exe.call(call, self.plan.programs.forward, self.plan.cfg, c["key"], c["params"],
                                   c["routing"], x, tok, c["coefs"], c["devices"])
    return self.forward_done(r, op, y, vjps, aux)

  def backward(self, r, op):
    c = vjps = dx = out = None
    if self.exe.mine(self.plan, r):
      c, g, vjps = self.backward_inputs(r, op)
      kind = "Bstar" if op.input_only else "B"
      call = Call(self.name(r, kind, c["stage"]), kind, r, self.plan.meshes[r], c["key"])
      if op.input_only:
        dx, out = self.exe.call(call, self.plan.programs.backward_input, c["key"], vjps, g, c["coefs"], c["params"])
      else:
        dx, out = self.exe.call(call, self.plan.programs.backward, c["key"], vjps, g, c["coefs"], self.acc(c),
                                c["params"])
    return self.backward_done(r, op, c, vjps, dx, out)

  def forward_backward(self, r, op):
    """An F&B cell as one program (stages.forward_backward): F's all-to-alls can overlap B's GEMMs."""
    f, b = op.forward, op.backward
    y = f_vjps = aux = c = b_vjps = dx = out = None
    if self.exe.mine(self.plan, r):
      fc, x, tok = self.forward_inputs(r, f)
      c, g, b_vjps = self.backward_inputs(r, b)
      kind = "FBstar" if b.input_only else "FB"
      call = Call(self.name(r, kind, fc["stage"], c["stage"]), kind, r, self.plan.meshes[r],
                  (fc["key"], c["key"], b.input_only))
      (y, f_vjps, aux), (dx, out) = self.exe.call(
          call, self.plan.programs.forward_backward, self.plan.cfg, fc["key"], c["key"], b.input_only,
          fc["devices"], fc["params"], fc["routing"], x, tok, fc["coefs"], b_vjps, g,
          None if b.input_only else self.acc(c), c["params"])
    return self.forward_done(r, f, y, f_vjps, aux), self.backward_done(r, b, c, b_vjps, dx, out)

  def weights(self, r, op):
    if not self.exe.mine(self.plan, r):
      return None
    c, vjps, cts = self.deferred[r].popleft()
    call = Call(self.name(r, "W", c["stage"]), "W", r, self.plan.meshes[r], c["key"])
    acc = self.exe.call(call, self.plan.programs.backward_weights, c["key"], vjps, cts, self.acc(c), c["params"])
    self.set_acc(c, acc)
    return acc

  def cell(self, r, op):
    return dict(F=self.forward, B=self.backward, FB=self.forward_backward, W=self.weights)[op.kind](r, op)

  def rank_sums(self, r, params):
    """Rank r's gradients and loads summed over its micro-batches and copies (reduction.rank_sums_program)."""
    plan = self.plan
    copies = [self.copies[ds] for ds in reduction.stage_copies(plan, r)]
    shared = sum(len(plan.layout.holders(u)) > 1 for u in layout.by_unit(params))
    call = Call(self.name(r, "sums"), "sums", r, plan.meshes[r], (tuple(c["key"] for c in copies), shared))
    return self.exe.call(call, reduction.rank_sums_program(plan, r, params, copies[0]["devices"]),
                         self.accs[r], [c["aux"] for c in copies])


def run(plan: Plan, rank_variables, tokens, mtp_weight, alpha, timings: Optional[list] = None,
        fused: bool = True, exe: Execute = EXECUTE):
  """One step on per-rank variables (rank_variables[r] = rank r's {'params', 'routing'} on its sub-mesh, None
  where this process holds none of it). Returns (loss, metrics, grads, loads, grad_norm): grads[r] and loads[r]
  like rank r's params and routing, each unit summed over its holders and placed like its ZeRO-1 state.

  timings: a list to append (rank, op, start, end) to, every op
  waited for (per-op costs, not speed). fused: False runs an F&B cell as F then B (the no-overlap baseline).
  exe: Record(...) walks this same code with abstract arrays and records each program (the dry run).
  """
  step = _Step(plan, exe, tokens, mtp_weight, alpha)
  step.take_copies(rank_variables)
  step.place_tokens()
  for _, r, i in plan.order:
    op = plan.schedule[r][i]
    start = time.perf_counter()
    results = step.cell(r, op) if fused else [step.cell(r, half) for half in _halves(op)]
    if timings is not None and exe.mine(plan, r):
      jax.block_until_ready(results)
      timings.append((r, str(op), start, time.perf_counter()))
  sums = {r: step.rank_sums(r, rank_variables[r]["params"]) for r in exe.ranks(plan)}
  return exe.assemble(plan, sums, rank_variables)


def evaluate(plan: Plan, rank_variables, tokens, exe: Execute = EXECUTE):
  """Forward only through direction 0's stages in order, in micro-batches of the training step's size (so
  evaluation holds no more activations than training; the whole batch at once where it does not split).

  Returns (cross entropy, loads) as host values: loads [num_moe_layers, E] per MoE layer (the main
  layers' routing loads, for MaxVio), summed over the batch."""
  cfg = plan.cfg
  tokens = exe.tokens(tokens)
  batch, width = tokens.shape
  chunks = plan.microbatches if batch % plan.microbatches == 0 else 1
  mb = batch // chunks
  hidden = jax.ShapeDtypeStruct((mb, width - 1, cfg.hidden_size), compute_dtype(cfg))
  spec = sharding.batch_spec(plan.meshes[0], mb)
  moe = [l for l in range(cfg.num_hidden_layers) if layout.is_moe(cfg, l)]
  width_row = 1 + len(moe) * cfg.n_routed_experts
  rows = {r: exe.glue(lambda r=r: _zeros_row(width_row, plan.meshes[r]),
                      lambda r=r: sds((1, width_row), jnp.float32, NamedSharding(plan.meshes[r], P())))
          for r in exe.ranks(plan)}     # ranks running no stage of direction 0 (DualPipe's) add nothing
  working = {}     # per rank: its working copies, made once (per device where the rows split, as in training)
  for r in exe.ranks(plan):
    devices = per_device.Devices.of(plan.meshes[r], mb)
    params = rank_variables[r]["params"]
    working[r] = exe.glue(lambda: devices.copies(params, cfg), lambda: devices.abstract_copies(params, cfg))
  for c in range(chunks):
    x = None
    for s in range(plan.num_stages):
      r, st = plan.owner[0, s], plan.specs[s]
      y = None
      if exe.mine(plan, r):
        mesh = plan.meshes[r]
        devices = per_device.Devices.of(mesh, mb)
        p, rt = stages.stage_variables(working[r], rank_variables[r].get("routing", {}), st)
        data = exe.rows(tokens, c * mb, (c + 1) * mb, NamedSharding(mesh, spec)) if st.first or st.last else None
        coefs = exe.constant(np.asarray([0.0, 0.0, 1.0], np.float32), NamedSharding(mesh, P()))
        y, aux = exe.call(Call(f"rank{r}_eval_stage{s}", "eval", r, mesh, st.program_key), plan.programs.evaluate,
                          cfg, st.program_key, p, rt, x, data, coefs, devices)
        positions = tuple(moe.index(l) for l, m in zip(st.layers, st.moe) if m)
        rows[r] = exe.glue(lambda r=r, aux=aux, positions=positions: _eval_row(
            rows[r], aux, positions, width_row, cfg.n_routed_experts), lambda r=r: rows[r])
      if s + 1 < plan.num_stages:
        x = exe.move(plan, y, r, plan.owner[0, s + 1], hidden, spec)
  total = exe.glue(lambda: np.asarray(reduction.sum_over_ranks(plan.layout.gather_rows(rows),
                                                               NamedSharding(plan.mesh, P()))),
                   lambda: np.zeros(width_row, np.float32))
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
             compiler_options=None, transfer: str = "auto", fb_barriers: bool = True,
             collectives_in_flight: int = 2) -> Plan:
  """Plans are cached per (config, schedule, ranks, micro-batches, devices); the compiled stage programs
  are cached by jit itself (per stage shape and sub-mesh), so they are shared across schedules."""
  if devices is None or isinstance(devices, Mesh):
    dev_key = devices
  else:
    dev_key = tuple((tuple(m.devices.flat), m.axis_names) if isinstance(m, Mesh) else m for m in devices)
  options = tuple(sorted(compiler_options.items())) if compiler_options else None
  key = (cfg, schedule, num_stages, microbatches, dev_key, options, transfer, fb_barriers, collectives_in_flight)
  if key not in _PLANS:
    _PLANS[key] = Plan(cfg, schedule, num_stages, microbatches, devices, options, transfer, fb_barriers,
                       collectives_in_flight)
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
  plan = get_plan(require_model_config(cfg, "pipeline_value_and_grad"), schedule, num_stages, microbatches,
                  devices, compiler_options, transfer)
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
