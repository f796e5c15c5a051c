"""Trains DeepSeek-V3 (any size) from an ml_collections config.

  python -m dsv3.train --config=configs/tiny.py --workdir=/tmp/dsv3_tiny [--config.num_train_steps=50]

Resume order: a checkpoint in --workdir  >  --config.init_from (HF dir or orbax dir)  >  from scratch.
Running the same command again after a crash, a kill -9 or a SIGTERM continues exactly where the last
checkpoint left off (params, optimizer, routing biases, EMA, data iterator position).

Writes to the workdir: metrics.jsonl (one JSON object per logged step), TensorBoard events (tb/),
orbax checkpoints (checkpoints/).
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go; resumed from if non-empty.")


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. a non-finite loss); the message says at which step and why."""


def main(argv):
  del argv
  from dsv3 import distributed
  distributed.maybe_initialize()            # no-op unless launched as several processes
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory for checkpoints and metrics")
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs training to config.num_train_steps; returns the last logged metrics."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv3 import checkpoint as ckpt_lib
  from dsv3 import data as data_lib
  from dsv3 import ema as ema_lib
  from dsv3 import losses, metrics as metrics_lib, model as model_lib, optimizer as opt_lib, plan, sharding
  from dsv3.config import ModelConfig, validate_train_config

  # ------------------------------------------------------------------------------------------------
  # Config, mesh, data.
  # ------------------------------------------------------------------------------------------------
  validate_train_config(config)
  cfg = ModelConfig.from_config_dict(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  pipelined = config.mesh.pipeline > 1
  if pipelined:   # the schedule and the stage split, checked now rather than at the first step
    from dsv3.pipeline import executor
    executor.get_plan(cfg, config.pipeline.schedule, config.mesh.pipeline, config.pipeline.microbatches,
                      devices=mesh)
  # Pipelined, every process reads the whole global batch: its ranks' first and last stages need the
  # rows of every micro-batch (the embedding takes the inputs, the loss the labels).
  datasets = (data_lib.make_datasets(config, process_index=0, process_count=1) if pipelined
              else data_lib.make_datasets(config))
  datasets.check_vocab(cfg.vocab_size)
  total_steps = int(config.num_train_steps)

  # ------------------------------------------------------------------------------------------------
  # Model, optimizer and their shardings.
  # ------------------------------------------------------------------------------------------------
  tx, lr_schedule = opt_lib.make_optimizer(config)
  # Pipelined too, the state lives on the whole mesh (replicated over 'pipeline'): every rank's sub-mesh
  # holds its stages' variables in place, and the update runs on every rank.
  expert_parallel = None
  if config.mesh.expert > 1:         # pipelined, the executor splits experts inside each stage itself
    from dsv3.expert_parallel import ExpertParallel
    expert_parallel = ExpertParallel(mesh)

  def init_state(rng):
    variables = model_lib.init(cfg, rng)
    return {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
            "routing": variables.get("routing", {}), "opt_state": tx.init(variables["params"])}

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_shardings = {
      "step": sharding.replicated(mesh),
      "params": sharding.param_shardings(mesh, abstract["params"]),
      "routing": sharding.param_shardings(mesh, abstract["routing"]),
      "opt_state": sharding.zero1_shardings(mesh, abstract["opt_state"])}
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------------------------------------------------
  # The train step: pure (state, batch) -> (state, metrics), jitted with shardings and donation.
  # ------------------------------------------------------------------------------------------------
  alpha = losses.balance_alpha(config.balance)
  accum = int(config.grad_accum_steps)

  def loss_fn(params, routing, tokens, mtp_weight):
    out = model_lib.forward_train(cfg, {"params": params, "routing": routing}, tokens[:, :-1], expert_parallel)
    loss, metrics = losses.objective(cfg, out, tokens[:, 1:], mtp_weight, alpha)
    return loss, (metrics, losses.load_tree(out))

  def grads_fn(params, routing, batch, mtp_weight):
    """Mean loss/grads over `accum` micro-batches (gradient accumulation); loads are summed."""
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (_, (metrics, loads)), grads = grad(params, routing, batch, mtp_weight)
      return metrics, grads, loads
    micro = batch.reshape(accum, -1, batch.shape[-1])

    def body(carry, mb):
      (_, (m, l)), g = grad(params, routing, mb, mtp_weight)
      return jax.tree.map(jnp.add, carry, (m, g, l)), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: (grad(params, routing, micro[0], mtp_weight)[0][1][0],
                                                                 params, abstract_loads(routing))))
    (metrics, grads, loads), _ = jax.lax.scan(body, zeros, micro)
    scale = lambda t: jax.tree.map(lambda x: x / accum, t)
    return scale(metrics), scale(grads), loads

  def abstract_loads(routing):
    return jax.tree.map(lambda b: jnp.zeros(b.shape, jnp.float32), routing)

  def apply_update(state, metrics, grads, loads, gamma):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
    routing = state["routing"]
    if config.balance.mode == "aux_free" and routing:
      routing = losses.update_bias(routing, loads, gamma)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state["step"]),
                   finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
    if "moe_layers" in loads:
      vio = losses.max_violation(loads["moe_layers"]["mlp"]["e_score_correction_bias"])
      metrics.update(maxvio_batch_mean=vio.mean(), maxvio_batch_max=vio.max())
    return {"step": state["step"] + 1, "params": params, "routing": routing, "opt_state": opt_state}, metrics

  def train_step(state, batch, mtp_weight, gamma):
    metrics, grads, loads = grads_fn(state["params"], state["routing"], batch, mtp_weight)
    return apply_update(state, metrics, grads, loads, gamma)

  if pipelined:
    update_jit = jax.jit(apply_update, donate_argnums=0, out_shardings=(state_shardings, None))

    def step_fn(state, batch, mtp_weight, gamma):
      # batch: the global batch on the host; gradients and loads come back placed like the state.
      loss, metrics, grads, loads = executor.pipeline_value_and_grad(
          cfg, {"params": state["params"], "routing": state["routing"]}, batch,
          schedule=config.pipeline.schedule, num_stages=config.mesh.pipeline,
          microbatches=config.pipeline.microbatches, mtp_weight=float(mtp_weight), alpha=alpha, devices=mesh)
      return update_jit(state, metrics, grads, loads, gamma)
  else:
    step_fn = jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding, None, None),
                      out_shardings=(state_shardings, None))

  @functools.partial(jax.jit, in_shardings=(state_shardings["params"], state_shardings["routing"], batch_sharding))
  def eval_step(params, routing, tokens):
    out = model_lib.forward_train(cfg, {"params": params, "routing": routing}, tokens[:, :-1],
                                  expert_parallel)
    return losses.cross_entropy(out["logits"], tokens[:, 1:]), losses.load_tree(out)

  # ------------------------------------------------------------------------------------------------
  # Restore: workdir checkpoint > init_from > scratch.
  # ------------------------------------------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps)
  flat_config = ckpt_lib.flatten_config(config)
  abstract_with_shardings = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         abstract, state_shardings)
  ema = None
  writer = metrics_lib.MetricWriter(workdir, total_steps)
  if checkpointer.latest_step() is not None:
    ckpt_lib.check_compatible(checkpointer.read_extras()["config"], flat_config)
    target = {"train": abstract_with_shardings}
    if config.ema_decay:
      target["ema"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), abstract["params"])
    restored = checkpointer.restore(abstract_state=target)
    state = restored.state["train"]
    datasets.train.set_state(restored.extras["data"])
    if config.ema_decay:
      ema = ema_lib.HostEMA(config.ema_decay, abstract["params"])
      ema.load_state_dict({"ema": restored.state["ema"], "step": restored.step, "decay": config.ema_decay})
    writer.truncate_after(restored.step)
    logging.info("Resumed from %s at step %d", checkpointer.step_dir(restored.step), restored.step)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(config.seed))
    if config.init_from:
      state = _init_from(config.init_from, cfg, state, state_shardings)
  if config.ema_decay and ema is None:
    ema = ema_lib.HostEMA(config.ema_decay, state["params"])

  def save(step, force=False):
    if not (force or checkpointer.should_save(step)):
      return False        # decide first: building the tree waits for the EMA and copies it to host
    tree = {"train": state}
    if ema is not None:
      tree["ema"] = ema.value()
    extras = {"data": datasets.train.get_state(), "config": flat_config, "seed": int(config.seed)}
    return checkpointer.save(step, tree, extras, force=force)

  # ------------------------------------------------------------------------------------------------
  # Evaluation: validation loss and perplexity (raw and EMA params), MaxVio_global.
  # ------------------------------------------------------------------------------------------------
  def evaluate(params, routing):
    total, n, loads = 0.0, 0, None
    for batch in itertools_islice(datasets.eval_batches(), config.eval_batches):
      loss, l = eval_step(params, routing, batch_to_global(batch))
      total, n = total + float(loss), n + 1
      loads = l if loads is None else jax.tree.map(jnp.add, loads, l)
    out = {"val_loss": total / max(n, 1), "val_perplexity": float(np.exp(total / max(n, 1)))}
    if loads and "moe_layers" in loads:
      vio = np.asarray(losses.max_violation(loads["moe_layers"]["mlp"]["e_score_correction_bias"]))
      out.update(maxvio_global_mean=float(vio.mean()), maxvio_global_max=float(vio.max()))
    return out

  def batch_to_global(local_batch):
    local_batch = np.asarray(local_batch, np.int32)
    if pipelined:      # every process holds the whole global batch
      return jax.make_array_from_callback(local_batch.shape, batch_sharding, lambda i: local_batch[i])
    return jax.make_array_from_process_local_data(batch_sharding, local_batch)

  # ------------------------------------------------------------------------------------------------
  # The loop.
  # ------------------------------------------------------------------------------------------------
  stop = {"signal": None}

  def on_signal(signum, _):
    stop["signal"] = signum          # finish the step, save, exit 0
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  start_step = int(jax.device_get(state["step"]))
  tokens_per_step = config.batch_size * config.seq_len
  flops = plan.flops_per_token(cfg, config.seq_len, include_mtp=True)
  peak = metrics_lib.device_peak_flops(dtype={"fp8": "fp8", "bf16": "bf16"}.get(config.precision, "fp32"))
  throughput = metrics_lib.Throughput(total_steps, tokens_per_step, start_step, flops, peak, jax.device_count())
  last = {}
  try:
    for step in range(start_step, total_steps):
      mtp_weight = opt_lib.piecewise(step, total_steps, config.mtp_weight, config.mtp_weight_final,
                                     config.mtp_weight_switch_frac)
      gamma = opt_lib.piecewise(step, total_steps, config.balance.gamma, config.balance.gamma_final,
                                config.balance.gamma_switch_frac)
      batch = next(datasets.train)
      batch = np.asarray(batch, np.int32) if pipelined else batch_to_global(batch)
      # The pipeline executor places each stage on its own sub-mesh, so it runs outside any mesh context.
      # Host scalars: jit takes them without recompiling, and the executor reads them without a sync.
      with contextlib.nullcontext() if pipelined else jax.set_mesh(mesh):
        state, metrics = step_fn(state, batch, np.float32(mtp_weight), np.float32(gamma))
      done = step + 1
      if ema is not None:
        ema.update(state["params"], done)
      will_save = done % config.checkpoint_every_steps == 0 or done == total_steps or bool(stop["signal"])
      if done % config.log_every_steps == 0 or will_save:
        # Fetching metrics syncs with the device; do it when logging and before any save, so that a
        # non-finite step is never written over the last good checkpoint.
        metrics = jax.device_get(metrics)
        if not metrics.pop("finite"):
          raise TrainingError(f"step {done}: non-finite loss ({metrics['loss']}) or gradient norm "
                              f"({metrics['grad_norm']}); the last good checkpoint "
                              f"(step {checkpointer.latest_step()}) is left intact. Lower learning_rate "
                              f"or check the data.")
        if done % config.log_every_steps == 0 or done == total_steps:
          last = {k: float(v) for k, v in metrics.items()} | throughput.tick(done)
          writer.write_scalars(done, last)
      if done % config.eval_every_steps == 0 or done == total_steps:
        with throughput.paused():
          evals = evaluate(state["params"], state["routing"])
          if ema is not None:
            ema_params = jax.device_put(ema.value(), state_shardings["params"])
            evals["val_loss_ema"] = evaluate(ema_params, state["routing"])["val_loss"]
          writer.write_scalars(done, evals)
          last.update(evals)
      with throughput.paused():
        saved = save(done, force=bool(stop["signal"]) or done == total_steps)
      if stop["signal"]:
        logging.info("Signal %d: saved step %d (%s), exiting", stop["signal"], done, saved)
        break
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    checkpointer.wait()
    checkpointer.close()
    if ema is not None:
      ema.close()
    writer.close()
  return last


def itertools_islice(it, n):
  import itertools
  return itertools.islice(it, n) if n else it


def _init_from(path: str, cfg, state, shardings):
  """Params (and routing biases) from an HF checkpoint dir or an orbax dsv3 checkpoint."""
  import jax
  from dsv3 import hf
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from: {path!r} does not exist; point it at an HF checkpoint dir "
                            f"(config.json + safetensors) or a dsv3 orbax checkpoint dir, or set it to ''")
  if os.path.exists(os.path.join(path, "config.json")):
    loaded_cfg, variables = hf.load_checkpoint(path)
    diffs = [f for f in hf.ModelConfig._HF_FIELDS if getattr(loaded_cfg, f) != getattr(cfg, f)]
    if diffs:
      raise ValueError(f"config.init_from: the checkpoint's {diffs[0]}={getattr(loaded_cfg, diffs[0])!r} differs "
                       f"from config.model.{diffs[0]}={getattr(cfg, diffs[0])!r} (differing: {diffs}); "
                       f"make config.model match the checkpoint")
  else:
    from dsv3 import convert
    variables = convert.load_orbax_variables(path)
  cast = lambda new, old: jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
  return dict(state, params=jax.device_put(cast(variables["params"], state["params"]), shardings["params"]),
              routing=jax.device_put(cast(variables.get("routing", {}), state["routing"]), shardings["routing"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
