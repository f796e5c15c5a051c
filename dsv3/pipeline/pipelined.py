"""The pipelined train step on per-rank state: what dsv3.training.steps is to an unpipelined run.

  ps = PipelinedSteps(config, cfg, mesh)
  state = {"ranks": ps.init(rng), "guard": ...}            # rank r's units on its sub-mesh (rank_state)
  state, metrics = ps.train(state, batch, mtp_weight, gamma)
  ps.view(state["ranks"])                                   # each unit once: checkpoints, EMA, exports

One step: the executor's gradients, each unit's reduced once among its holders; the whole model's gradient
norm (one small all-reduce over 'pipeline'); every rank's optimizer and routing-bias update of its own
units (dsv3.training.steps.apply_update, clipped by that norm); then the divergence guard from the summed norms.
`exe=dispatch.Record(...)` walks the same step on abstract state and records its programs (the dry run).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import layout
from dsv3.pipeline import dispatch, executor
from dsv3.training import steps as steps_lib

SUMS = ("update", "params", "new_params", "vio_sum", "vio_max")   # a rank's row of the guard's sums


class PipelinedSteps:
  """The pipelined run's state layout and programs for training config `config` (model `cfg`) on `mesh`."""

  def __init__(self, config, cfg, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.steps = steps_lib.make(config, cfg, mesh)
    self.plan = executor.get_plan(cfg, config.pipeline.schedule, int(config.mesh.pipeline),
                                  int(config.pipeline.microbatches), devices=mesh,
                                  fb_barriers=bool(config.pipeline.fb_barriers),
                                  collectives_in_flight=int(config.pipeline.collectives_in_flight))
    self.layout = lay = self.plan.layout
    self.stacked_abstract = self.steps.abstract
    self.abstract = jax.eval_shape(lambda s: layout.map_state(self.unstack, s), self.steps.abstract)
    self.view_shardings = lay.view_shardings(self.abstract)
    self.ranks = [r for r in range(lay.num_ranks) if lay.local[r]]     # the ranks this process runs
    self.rank_abstract = {r: lay.restrict(self.abstract, r) for r in range(lay.num_ranks)}
    self.rank_shardings = {r: lay.rank_shardings(self.rank_abstract[r], r) for r in range(lay.num_ranks)}
    self._updates = {}
    self.guard_sharding = {k: NamedSharding(mesh, P()) for k in steps_lib.CLEAN_GUARD}
    # (guard, step, metrics, grad_norm, [P, len(SUMS)] rows) -> (guard, metrics), on the whole mesh.
    self.check_program = jax.jit(self._check_fn, donate_argnums=0, out_shardings=(self.guard_sharding, None))

  def unstack(self, tree):
    return layout.unstack(self.cfg, tree)

  # -------------------------------------------------------------------------------------------------
  # State: per rank, and the per-unit view.
  # -------------------------------------------------------------------------------------------------
  def init(self, rng, skip: tuple = ()):
    """Rank r's part of the initial state, computed on its sub-mesh (the other units' init is dead code);
    without the top-level keys `skip` (e.g. ('params', 'routing') when they are read from a checkpoint: then
    never made)."""
    out = [None] * self.layout.num_ranks
    for r in self.ranks:
      def keep(rng, r=r):
        state = self.layout.restrict(layout.map_state(self.unstack, self.steps.init(rng)), r)
        return {k: v for k, v in state.items() if k not in skip}
      shardings = {k: v for k, v in self.rank_shardings[r].items() if k not in skip}
      out[r] = jax.jit(keep, out_shardings=shardings)(rng)
    return out

  def rank_targets(self, ranks=None) -> list:
    """Per rank, its part of the state as ShapeDtypeStructs on its own shardings, for `ranks` (default: those
    with local devices; None for the others): what a checkpoint or init_from is read straight into
    (dsv3.interop.slices), and what a dry run walks the step on."""
    ranks = self.ranks if ranks is None else ranks
    placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return [jax.tree.map(placed, self.rank_abstract[r], self.rank_shardings[r]) if r in ranks else None
            for r in range(self.layout.num_ranks)]

  def view(self, ranks):
    """The per-unit view of the state (dsv3.pipeline.rank_state): what checkpoints and the EMA see."""
    return self.layout.view(ranks, self.abstract)

  def split(self, state):
    """Per-rank states from a per-unit view (a restored checkpoint)."""
    return self.layout.split(state, self.abstract)

  def params_view(self, ranks):
    params = [None if s is None else s["params"] for s in ranks]
    return self.layout.view(params, self.abstract["params"])

  def with_params(self, ranks, params_view):
    """`ranks` with the params of a per-unit params view (EMA params, for evaluation)."""
    split = self.layout.split({"params": params_view, "routing": {}},
                              {"params": self.abstract["params"], "routing": {}})
    return [None if s is None else dict(s, params=p["params"]) for s, p in zip(ranks, split)]

  # -------------------------------------------------------------------------------------------------
  # The step.
  # -------------------------------------------------------------------------------------------------
  def _update_fn(self, units, state, grads, loads, gamma, grad_norm):
    new, sums = self.steps.apply_update(state, grads, loads, gamma, grad_norm, units)
    return new, jnp.stack([sums.get(k, jnp.zeros((), jnp.float32)) for k in SUMS])[None]

  def update_units(self, r: int) -> frozenset:
    """The units whose norms rank r's update counts: those it is the first holder of."""
    return frozenset(self.layout.primary(self.rank_abstract[r]["params"], r)
                     | self.layout.primary(self.rank_abstract[r]["routing"], r))

  def update_program(self, r: int):
    """Rank r's jitted update: (rank state, grads, loads, gamma, grad_norm) -> (rank state, its SUMS row)."""
    if r not in self._updates:
      self._updates[r] = jax.jit(functools.partial(self._update_fn, self.update_units(r)), donate_argnums=0,
                                 out_shardings=(self.rank_shardings[r], None))
    return self._updates[r]

  def _check_fn(self, guard, step, metrics, grad_norm, rows):
    sums = dict(zip(SUMS[:-1], rows[:, :-1].sum(0)), vio_max=rows[:, -1].max())
    if not self.cfg.num_moe_layers:
      sums = {k: v for k, v in sums.items() if not k.startswith("vio")}
    return self.steps.check(guard, step, metrics, grad_norm, sums)

  def abstract_state(self) -> dict:
    """The state's ShapeDtypeStructs with their shardings, every rank's (what a dry run walks the step on)."""
    placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return {"ranks": self.rank_targets(range(self.layout.num_ranks)),
            "guard": jax.tree.map(placed, jax.eval_shape(lambda: steps_lib.CLEAN_GUARD), self.guard_sharding)}

  def train(self, state, batch, mtp_weight, gamma, exe: dispatch.Execute = dispatch.EXECUTE, fused: bool = True):
    """One step: (state, metrics). `batch`: the global batch on the host; the state is donated. fused=False:
    each F&B cell as its F then its B (executor.run's no-overlap baseline)."""
    ranks, plan, lay = state["ranks"], self.plan, self.layout
    variables = [None if s is None else {"params": s["params"], "routing": s["routing"]} for s in ranks]
    _, metrics, grads, loads, grad_norm = executor.run(plan, variables, batch, float(mtp_weight), self.steps.alpha,
                                                       fused=fused, exe=exe)
    new, rows = [None] * len(ranks), {}
    for r in exe.ranks(plan):
      here = NamedSharding(lay.meshes[r], P())
      rank = ranks[r]
      gamma_r = exe.constant(np.float32(gamma), here)
      norm_r = exe.glue(lambda: lay.on_rank(grad_norm, r), lambda: dispatch.sds((), jnp.float32, here))
      call = dispatch.Call(f"rank{r}_update", "update", r, lay.meshes[r], (len(self.update_units(r)),))
      new[r], rows[r] = exe.call(call, self.update_program(r), rank, grads[r], loads[r], gamma_r, norm_r)
    whole = NamedSharding(self.mesh, P())
    step = exe.glue(lambda: jax.make_array_from_single_device_arrays(
        (), whole, [s.data for r in exe.ranks(plan) for s in new[r]["step"].addressable_shards]),
        lambda: dispatch.sds((), jnp.int32, whole))
    by_rank = NamedSharding(self.mesh, P("pipeline"))
    rows = exe.glue(lambda: lay.gather_rows(rows),
                    lambda: dispatch.sds((lay.num_ranks, len(SUMS)), jnp.float32, by_rank))
    guard, metrics = exe.call(dispatch.Call("check", "check", None, self.mesh), self.check_program,
                              state["guard"], step, metrics, grad_norm, rows)
    return {"ranks": new, "guard": guard}, metrics

  def evaluate(self, state, tokens, params=None, exe: dispatch.Execute = dispatch.EXECUTE):
    """(cross entropy, loads [num_moe_layers, E]) of a batch, as host values; of the state's params or of
    a per-unit params view `params` (the EMA's)."""
    ranks = state["ranks"] if params is None else self.with_params(state["ranks"], params)
    variables = [None if s is None else {"params": s["params"], "routing": s["routing"]} for s in ranks]
    return executor.evaluate(self.plan, variables, tokens, exe)

