"""The pipelined train step on per-rank state: what dsv3.steps is to an unpipelined run.

  ps = PipelinedSteps(config, cfg, mesh)
  ranks = ps.init(rng)                                     # rank r's units on its sub-mesh (rank_state)
  ranks, guard, metrics = ps.train(ranks, guard, batch, mtp_weight, gamma)
  ps.view(ranks)                                           # each unit once: checkpoints, EMA, exports

One step: the executor's gradients, each unit's reduced once among its holders; the whole model's gradient
norm (one small all-reduce over 'pipeline'); every rank's optimizer and routing-bias update of its own
units (dsv3.steps.apply_update, clipped by that norm); then the divergence guard from the summed norms.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import layout, sharding, steps as steps_lib
from dsv3.pipeline import executor

SUMS = ("update", "params", "new_params", "vio_sum", "vio_max")   # a rank's row of the guard's sums


class PipelinedSteps:
  """The pipelined run's state layout and programs for training config `config` (model `cfg`) on `mesh`."""

  def __init__(self, config, cfg, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.steps = steps_lib.make(config, cfg, mesh)
    self.plan = executor.get_plan(cfg, config.pipeline.schedule, int(config.mesh.pipeline),
                                  int(config.pipeline.microbatches), devices=mesh)
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
  def init(self, rng):
    """Rank r's part of the initial state, computed on its sub-mesh (the other units' init is dead code)."""
    out = [None] * self.layout.num_ranks
    for r in self.ranks:
      keep = lambda rng, r=r: self.layout.restrict(layout.map_state(self.unstack, self.steps.init(rng)), r)
      out[r] = jax.jit(keep, out_shardings=self.rank_shardings[r])(rng)
    return out

  def with_stacked_variables(self, ranks, variables):
    """`ranks` with their params and routing biases taken from stacked `variables` replicated over
    'pipeline' on the whole mesh (init_from); the optimizer state is kept."""
    out = list(ranks)
    for r in self.ranks:
      keep = lambda v, r=r: self.layout.restrict({k: self.unstack(v[k]) for k in ("params", "routing")}, r)
      shardings = {k: self.rank_shardings[r][k] for k in ("params", "routing")}
      out[r] = dict(ranks[r], **jax.jit(keep, out_shardings=shardings)(self.on_rank(variables, r)))
    return out

  def from_stacked_state(self, state):
    """Per-rank states from a stacked state replicated over 'pipeline' on the whole mesh."""
    out = [None] * self.layout.num_ranks
    for r in self.ranks:
      keep = lambda s, r=r: self.layout.restrict(layout.map_state(self.unstack, s), r)
      out[r] = jax.jit(keep, out_shardings=self.rank_shardings[r])(self.on_rank(state, r))
    return out

  def on_rank(self, tree, r: int):
    """A tree replicated over 'pipeline' on the whole mesh, as rank r's view (no copy)."""
    return jax.tree.map(lambda x: self.layout.on_rank(x, r), tree)

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

  def update_program(self, r: int):
    """Rank r's jitted update: (rank state, grads, loads, gamma, grad_norm) -> (rank state, its SUMS row)."""
    if r not in self._updates:
      units = frozenset(self.layout.primary(self.rank_abstract[r]["params"], r)
                        | self.layout.primary(self.rank_abstract[r]["routing"], r))
      self._updates[r] = jax.jit(functools.partial(self._update_fn, units), donate_argnums=0,
                                 out_shardings=(self.rank_shardings[r], None))
    return self._updates[r]

  def _check_fn(self, guard, step, metrics, grad_norm, rows):
    sums = dict(zip(SUMS[:-1], rows[:, :-1].sum(0)), vio_max=rows[:, -1].max())
    if not self.cfg.num_moe_layers:
      sums = {k: v for k, v in sums.items() if not k.startswith("vio")}
    return self.steps.check(guard, step, metrics, grad_norm, sums)

  def train(self, ranks, guard, batch, mtp_weight, gamma):
    """One step: (ranks, guard, metrics). `batch`: the global batch on the host; ranks are donated."""
    variables = [None if s is None else {"params": s["params"], "routing": s["routing"]} for s in ranks]
    _, metrics, grads, loads, grad_norm = executor.run(self.plan, variables, batch, float(mtp_weight),
                                                       self.steps.alpha, donate=True)
    new, rows = [None] * len(ranks), {}
    for r in self.ranks:
      ranks[r] = dict(ranks[r], params=variables[r]["params"])     # made back from the step's copies
      gamma_r = jax.device_put(np.float32(gamma), NamedSharding(self.layout.meshes[r], P()))
      new[r], rows[r] = self.update_program(r)(ranks[r], grads[r], loads[r], gamma_r, self.layout.on_rank(grad_norm, r))
    step = jax.make_array_from_single_device_arrays(
        (), NamedSharding(self.mesh, P()), [s.data for r in self.ranks for s in new[r]["step"].addressable_shards])
    guard, metrics = self.check_program(guard, step, metrics, grad_norm, self.layout.gather_rows(rows))
    return new, guard, metrics

  def evaluate(self, ranks, tokens):
    """(cross entropy, loads [num_moe_layers, E]) of a batch, as host values."""
    variables = [None if s is None else {"params": s["params"], "routing": s["routing"]} for s in ranks]
    return executor.evaluate(self.plan, variables, tokens)


# ---------------------------------------------------------------------------------------------------
# Resuming across layouts: a checkpoint written stacked (unpipelined) or per-layer (pipelined, any degree)
# restores into either.
# ---------------------------------------------------------------------------------------------------
def _with(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(checkpointer, cfg, steps, mesh, ps=None, ema=None):
  """Restores the latest good checkpoint into the run's layout: per-rank states when `ps` (a pipelined
  run), else the stacked state on `mesh`. `ema`: a HostEMA to load (its params_like in the run's layout).

  Same layout: each array is read straight into its target shards. Across layouts: the saved layout is read
  with the params and optimizer state replicated over 'pipeline' (the whole model per device, once) and
  converted on device, and the EMA is read and converted on the host."""
  saved = checkpointer.saved_abstract()
  per_layer = layout.is_per_layer(saved["train"]["params"])
  if ps is not None and per_layer:
    target, convert = _with(ps.abstract, ps.view_shardings), ps.split
  elif ps is not None:
    rules = {k: jax.tree.map(lambda _: NamedSharding(mesh, P()), v) if k == "step" else
             _param_rules(mesh, v) for k, v in steps.abstract.items()}
    target, convert = _with(steps.abstract, rules), ps.from_stacked_state
  elif per_layer:
    abstract = jax.eval_shape(lambda s: layout.map_state(lambda t: layout.unstack(cfg, t), s), steps.abstract)
    target = _with(abstract, steps_lib.saved_shardings(mesh, abstract))
    convert = jax.jit(lambda s: layout.map_state(lambda t: layout.stack(cfg, t), s),
                      out_shardings=steps.saved_shardings)
  else:
    target, convert = _with(steps.abstract, steps.saved_shardings), lambda s: s
  same_layout = per_layer == (ps is not None)
  tree = {"train": target}
  if ema is not None:
    tree["ema"] = ema.checkpoint_target() if same_layout else saved["ema"]
  restored = checkpointer.restore(abstract_state=tree)
  state = convert(restored.state["train"])
  if ema is not None:
    values = restored.state["ema"]
    if not same_layout:
      values = jax.tree.map(np.asarray, values)
      values = layout.unstack(cfg, values) if ps is not None else layout.stack(cfg, values)
    ema.load_state_dict({"ema": values, "step": restored.step, "decay": ema.decay})
  return state, restored


def _param_rules(mesh, tree):
  return sharding.param_shardings(mesh, tree)
