"""The train and eval steps: pure module-level functions of (ctx, state, batch), jitted by their callers.

  steps = steps_lib.make(config, cfg, mesh)          # ctx, the state's abstract shapes and shardings
  state = jax.jit(steps.init, out_shardings=steps.saved_shardings)(rng) | {"guard": ...}
  train = steps_lib.jit_train_step(steps)            # train_step(steps.ctx, ...), state donated

The trainer, the compile-only dry run, the pipeline and the benchmarks all call these, so there is one train
step. The state is {step, params, routing, opt_state} (what checkpoints hold) plus `guard`, the divergence
record that `update` keeps on device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from dsv3 import layout, model as model_lib
from dsv3.config import ModelConfig
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel
from dsv3.training import losses, optimizer as opt_lib

# The divergence record before any bad step (guard["step"] < 0: none yet), and the loss-spike rule's running
# state: the loss's EMA, its lowest value so far (inf: none yet), and the steps this run has seen.
CLEAN_GUARD = {"step": np.int32(-1), "loss": np.float32(0), "grad_norm": np.float32(0),
               "update_ratio": np.float32(0), "lr": np.float32(0),
               "loss_ema": np.float32(0), "loss_low": np.float32(np.inf), "seen": np.int32(0)}
# The loss-spike rule's smoothing: an EMA over ~10 steps, so one noisy batch never trips it; a climb does.
LOSS_EMA_DECAY = 0.9


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the step functions take besides arrays: one training config's static settings on one mesh."""
  cfg: ModelConfig
  mesh: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable
  expert_parallel: Optional[ExpertParallel]   # experts split over the mesh's 'expert' axis, if it has one
  alpha: float                                # the sequence-wise balance loss weight of the objective
  grad_accum: int
  max_update_ratio: float                     # the guard's ||update|| / ||params|| limit (0: none)
  max_loss_ratio: float                       # the guard's loss EMA / its lowest value limit (0: none)
  loss_warmup: int                            # steps of each run before that rule arms
  aux_free: bool                              # the routing biases follow the loads (balance.mode)


@dataclasses.dataclass(frozen=True)
class Steps:
  """What `make` returns: the context, the step functions bound to it (pure, un-jitted), the state's layout."""
  ctx: StepContext
  init: Callable                 # rng -> checkpointed state
  train: Callable                # (state, batch, mtp_weight, gamma) -> (state, metrics)
  grads: Callable                # (params, routing, batch, mtp_weight) -> (metrics, grads, loads): train's first half
  update: Callable               # (state, metrics, grads, loads, gamma) -> (state, metrics)
  apply_update: Callable         # (state, grads, loads, gamma, grad_norm, units) -> (state, sums): update's first half
  check: Callable                # (guard, step, metrics, grad_norm, sums) -> (guard, metrics): its second half
  eval: Callable                 # (params, routing, tokens) -> (cross entropy, loads)
  abstract: Any                  # jax.eval_shape(init): the checkpointed state's shapes
  saved_shardings: dict          # of the checkpointed state
  state_shardings: dict          # saved_shardings + the guard's
  batch_sharding: Any
  alpha: float                   # ctx.alpha


def make(config, cfg: ModelConfig, mesh) -> Steps:
  """The steps of training config `config` (model `cfg`) on `mesh`; experts split over its 'expert' axis."""
  tx, lr_schedule = opt_lib.make_optimizer(config)
  ctx = StepContext(cfg=cfg, mesh=mesh, tx=tx, lr_schedule=lr_schedule,
                    expert_parallel=ExpertParallel(mesh) if sharding.axis_size(mesh, "expert") > 1 else None,
                    alpha=losses.balance_alpha(config.balance), grad_accum=int(config.grad_accum_steps),
                    max_update_ratio=float(config.nan_guard.max_update_ratio),
                    max_loss_ratio=float(config.nan_guard.get("max_loss_ratio", 0.0)),
                    loss_warmup=int(config.nan_guard.get("loss_warmup_steps", 0)),
                    aux_free=config.balance.mode == "aux_free")
  bind = lambda fn: functools.partial(fn, ctx)
  abstract = jax.eval_shape(lambda: init(ctx, jax.random.key(config.seed)))   # no array anywhere
  saved = saved_shardings(mesh, abstract)
  return Steps(ctx=ctx, init=bind(init), train=bind(train_step), grads=bind(grads), update=bind(update),
               apply_update=bind(apply_update), check=bind(check), eval=bind(eval_step), abstract=abstract,
               saved_shardings=saved,
               state_shardings=dict(saved, guard={k: sharding.replicated(mesh) for k in CLEAN_GUARD}),
               batch_sharding=sharding.batch_sharding(mesh), alpha=ctx.alpha)


def jit_train_step(steps: Steps):
  """train_step as the trainer runs it: (state, batch, mtp_weight, gamma), the state donated and kept on
  its shardings."""
  return jax.jit(functools.partial(train_step, steps.ctx), donate_argnums=0,
                 in_shardings=(steps.state_shardings, steps.batch_sharding, None, None),
                 out_shardings=(steps.state_shardings, None))


def jit_eval_step(steps: Steps):
  """eval_step as the trainer runs it: (params, routing, tokens) on the state's and the batch's shardings."""
  return jax.jit(functools.partial(eval_step, steps.ctx),
                 in_shardings=(steps.state_shardings["params"], steps.state_shardings["routing"],
                               steps.batch_sharding))


def saved_shardings(mesh, abstract) -> dict:
  """Where the checkpointed state {step, params, routing, opt_state} (or some of its keys) lives on `mesh`
  (a pipeline rank's sub-mesh too): routed experts over 'expert', the rest replicated, the optimizer state
  ZeRO-1."""
  rules = {"step": lambda _: sharding.replicated(mesh), "params": functools.partial(sharding.param_shardings, mesh),
           "routing": functools.partial(sharding.param_shardings, mesh),
           "opt_state": functools.partial(sharding.zero1_shardings, mesh)}
  return {k: rules[k](v) for k, v in abstract.items()}


def sq_norm(tree) -> jax.Array:
  """The sum of squares of every element of `tree`, in float32."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sq_norm(tree))


# ---------------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------------
def init(ctx: StepContext, rng):
  variables = model_lib.init(ctx.cfg, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
          "routing": variables.get("routing", {}), "opt_state": ctx.tx.init(variables["params"])}


def train_step(ctx: StepContext, state, batch, mtp_weight, gamma):
  """One training step: (state, metrics). batch: int32 [batch_size, seq_len + 1]."""
  metrics, g, loads = grads(ctx, state["params"], state["routing"], batch, mtp_weight)
  return update(ctx, state, metrics, g, loads, gamma)


def eval_step(ctx: StepContext, params, routing, tokens):
  """(cross entropy, loads) of the main model on `tokens`."""
  out = model_lib.forward_train(ctx.cfg, {"params": params, "routing": routing}, tokens[:, :-1],
                                ctx.expert_parallel)
  return losses.cross_entropy(out["logits"], tokens[:, 1:]), losses.load_tree(out)


def loss_fn(ctx: StepContext, params, routing, tokens, mtp_weight, *, ep):
  """(loss, (metrics, loads)) of the training objective, experts dispatched by `ep`."""
  out = model_lib.forward_train(ctx.cfg, {"params": params, "routing": routing}, tokens[:, :-1], ep)
  loss, metrics = losses.objective(ctx.cfg, out, tokens[:, 1:], mtp_weight, ctx.alpha)
  return loss, (metrics | losses.dropped_metrics(ctx.cfg, out), losses.load_tree(out))


def grads(ctx: StepContext, params, routing, batch, mtp_weight):
  """Mean loss/grads over ctx.grad_accum micro-batches (gradient accumulation); loads are summed."""
  if ctx.grad_accum == 1:
    grad = jax.value_and_grad(functools.partial(loss_fn, ctx, ep=ctx.expert_parallel), has_aux=True)
    (_, (metrics, loads)), g = grad(params, routing, batch, mtp_weight)
    return metrics, g, loads
  return accumulated_grads(ctx, params, routing, batch.reshape(ctx.grad_accum, -1, batch.shape[-1]), mtp_weight)


def accumulated_grads(ctx: StepContext, params, routing, micro, mtp_weight):
  """Gradient accumulation with ONE reduction per step. Inside shard_map over the token axes every
  device differentiates its own rows of each micro-batch and adds the partial gradients up locally
  (check_vma=False: no psum per micro-batch); after the loop each leaf is reduce-scattered once into its
  ZeRO-1 shards (the optimizer state's layout). micro: [accum, rows, T+1]."""
  mesh, accum = ctx.mesh, ctx.grad_accum
  if sharding.axis_size(mesh, "pipeline") > 1:
    raise ValueError("steps.grads: the pipelined step reduces its gradients in dsv3.pipeline")
  token_axes = sharding.token_axes(mesh, split=True)
  local_ep = dataclasses.replace(ctx.expert_parallel, manual=True) if ctx.expert_parallel else None
  param_specs = sharding.param_specs(mesh, params)
  grad_specs = jax.tree.map(lambda s: s.spec, sharding.zero1_shardings(mesh, params))
  devices = int(np.prod([sharding.axis_size(mesh, a) for a in token_axes]))
  grad = jax.value_and_grad(functools.partial(loss_fn, ctx, ep=local_ep), has_aux=True)

  def reduce(g, param_spec, grad_spec):
    """psum over the token axes the parameter is not split over, scattering over the axes ZeRO-1 adds."""
    axes = [a for a in token_axes if a not in jax.tree.leaves(tuple(param_spec))]
    padded = lambda spec: tuple(spec) + (None,) * (g.ndim - len(spec))
    gained = [(i, z) for i, (p, z) in enumerate(zip(padded(param_spec), padded(grad_spec))) if p != z]
    if gained:
      dim, scatter = gained[0]
      scatter = tuple(scatter) if isinstance(scatter, tuple) else (scatter,)
      g = jax.lax.psum_scatter(g, scatter, scatter_dimension=dim, tiled=True)
      axes = [a for a in axes if a not in scatter]
    return (jax.lax.psum(g, tuple(axes)) if axes else g) / (devices * accum)

  def body(params, routing, micro, mtp_weight):
    def one(carry, mb):
      (_, (m, l)), g = grad(params, routing, mb, mtp_weight)
      return jax.tree.map(jnp.add, carry, (m, g, l)), None
    shapes = lambda: (grad(params, routing, micro[0], mtp_weight)[0][1][0], params,
                      jax.tree.map(lambda b: b.astype(jnp.float32), routing))
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(shapes))
    (metrics, g, loads), _ = jax.lax.scan(one, zeros, micro)
    g = jax.tree.map(reduce, g, param_specs, grad_specs)
    loads = jax.tree.map(lambda l: jax.lax.psum(l, token_axes) if token_axes else l, loads)
    # Dropped MoE assignments are the step's total (expert-parallel dispatch has summed them over the
    # devices already); the load ratio is the worst device's; the rest are means.
    for k, v in metrics.items():
      if k.startswith("ep_dropped"):
        metrics[k] = v if local_ep or not token_axes else jax.lax.psum(v, token_axes)
      elif k == "ep_load_ratio":
        metrics[k] = (jax.lax.pmax(v, token_axes) if token_axes else v) / accum
      else:
        metrics[k] = (jax.lax.pmean(v, token_axes) if token_axes else v) / accum
    return metrics, g, loads

  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  fn = jax.shard_map(body, mesh=mesh, check_vma=False,
                     in_specs=(param_specs, replicated(routing), P(None, token_axes or None), P()),
                     out_specs=(P(), grad_specs, replicated(routing)))
  return fn(params, routing, micro, mtp_weight)


def update(ctx: StepContext, state, metrics, grads, loads, gamma):
  """The optimizer update, the routing-bias update and the divergence guard, all on device."""
  grad_norm = global_norm(grads)
  new, sums = apply_update(ctx, state, grads, loads, gamma, grad_norm)
  guard, metrics = check(ctx, state["guard"], new["step"], metrics, grad_norm, sums)
  return dict(new, guard=guard), metrics


def apply_update(ctx: StepContext, state, grads, loads, gamma, grad_norm, units=None):
  """The optimizer and routing-bias updates of the model or of a part of it, clipped by `grad_norm` (the
  whole model's). Returns (state, sums): squared norms of the update and of the params before and after,
  and the MaxVio sum and max over MoE layers, over the given `units` (dsv3.layout.select; None: all), so
  that a pipeline rank can count each unit it shares with another rank once."""
  updates, opt_state = ctx.tx.update(grads, state["opt_state"], state["params"], global_norm=grad_norm)
  params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
  routing = state["routing"]
  if ctx.aux_free and routing:
    routing = losses.update_bias(routing, loads, gamma)
  part = (lambda t: t) if units is None else (lambda t: layout.select(t, units))
  sums = {"update": sq_norm(part(updates)), "params": sq_norm(part(state["params"])),
          "new_params": sq_norm(part(params))}
  vio = [losses.max_violation(l) for l in layout.moe_loads(part(loads))]
  if vio:
    vio = jnp.concatenate([jnp.atleast_1d(v) for v in vio])
    sums.update(vio_sum=vio.sum(), vio_max=vio.max())
  return {"step": state["step"] + 1, "params": params, "routing": routing, "opt_state": opt_state}, sums


def check(ctx: StepContext, guard, step, metrics, grad_norm, sums):
  """The divergence guard and the step's metrics from the whole model's norms (`sums` added up).

  guard is sticky: the first step whose loss, gradient norm, update or new parameters are non-finite,
  whose ||update|| / ||params|| exceeds nan_guard.max_update_ratio, or whose loss spiked (`loss_spike`) is
  recorded there (with its values, the running loss statistics frozen with them) and kept; the host reads it
  only where it syncs anyway (logging, eval, saving)."""
  update_norm = jnp.sqrt(sums["update"])
  update_ratio = update_norm / jnp.maximum(jnp.sqrt(sums["params"]), 1e-30)
  loss = metrics["loss"].astype(jnp.float32)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        & jnp.isfinite(jnp.sqrt(sums["new_params"])))
  if ctx.max_update_ratio > 0:
    ok &= update_ratio <= ctx.max_update_ratio
  running, spiked = loss_spike(ctx, guard, loss)
  ok &= ~spiked
  lr = ctx.lr_schedule(step - 1)
  clean = guard["step"] < 0
  first_bad = clean & ~ok
  now = {"step": step, "loss": loss, "grad_norm": grad_norm, "update_ratio": update_ratio, "lr": lr, **running}
  guard = {k: jnp.where(first_bad | (clean & (k in running)), now[k], guard[k]).astype(guard[k].dtype)
           for k in guard}
  metrics = dict(metrics, grad_norm=grad_norm, update_ratio=update_ratio, lr=lr)
  if "vio_sum" in sums:
    metrics.update(maxvio_batch_mean=sums["vio_sum"] / ctx.cfg.num_moe_layers, maxvio_batch_max=sums["vio_max"])
  return guard, metrics


def loss_spike(ctx: StepContext, guard, loss):
  """The loss-spike rule: ({loss_ema, loss_low, seen} after this step, whether this step's loss spiked).

  The loss's EMA (LOSS_EMA_DECAY) follows the run from its first step and `loss_low` keeps its lowest value:
  a smoothed floor that one noisy batch does not move. After nan_guard.loss_warmup_steps steps of this run, a
  step whose loss exceeds nan_guard.max_loss_ratio x that floor has spiked: a diverging learning rate whose
  updates stay small next to the parameters, which the update-ratio rule misses. A resumed run starts the
  statistics afresh."""
  seen = guard["seen"] + 1
  spiked = jnp.zeros((), bool)
  if ctx.max_loss_ratio > 0:
    spiked = (seen > ctx.loss_warmup) & (loss > ctx.max_loss_ratio * guard["loss_low"])
  ema = jnp.where(guard["seen"] == 0, loss, LOSS_EMA_DECAY * guard["loss_ema"] + (1 - LOSS_EMA_DECAY) * loss)
  return {"loss_ema": ema, "loss_low": jnp.minimum(guard["loss_low"], ema), "seen": seen}, spiked
