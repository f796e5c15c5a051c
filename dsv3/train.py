"""Trains DeepSeek-V3 (any size) from an ml_collections config: one main, big_vision style.

  python -m dsv3.train --config=configs/tiny.py --workdir=/tmp/dsv3_tiny [--config.num_train_steps=50]

Resumes from a checkpoint in --workdir, else from --config.init_from (HF or orbax dir), else from scratch;
the same command after a crash, kill -9 or SIGTERM continues exactly where the last checkpoint left off.
Writes metrics.jsonl, TensorBoard events (tb/), orbax checkpoints (checkpoints/; with keep_best_by also the
best) and, with config.profile, a jax.profiler trace (profile/). A diverged step (dsv3.steps.check) raises
TrainingError naming the last good checkpoint and a learning rate to rerun with. README: "Nothing a user
does loses data" and "Large checkpoints, serving, profiling, best checkpoints".
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import numpy as np
from jax.experimental import multihost_utils

from dsv3 import checkpoint as ckpt_lib
from dsv3 import cli, compile_only, convert, distributed, hf, hf_config
from dsv3 import data as data_lib
from dsv3 import ema as ema_lib
from dsv3 import layout, losses, metrics as metrics_lib, optimizer as opt_lib, plan, resume, sharding
from dsv3 import steps as steps_lib
from dsv3 import workdir as workdir_lib
from dsv3.config import ModelConfig
from dsv3.pipeline import executor, pipelined as pipelined_lib
from dsv3.train_config import validate_train_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go; resumed from if non-empty.")
_COMPILE_ONLY = flags.DEFINE_enum("compile_only", None, ["cpu", "h100", "h800", "h200"],
                                  "Compile one step's programs for this target, write WORKDIR/compiled "
                                  "(memory.json, HLO), print per-device memory and exit: dsv3/compile_only.py.")


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. a non-finite loss); the message says at which step and why."""


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:   # library INFO logs (absl, orbax, jax) only with -v / --verbosity
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory for checkpoints and metrics")
  if _COMPILE_ONLY.value:                   # before any backend starts: GPU targets set JAX_PLATFORMS
    compile_only.run(_CONFIG.value, _WORKDIR.value, _COMPILE_ONLY.value)
    return
  distributed.maybe_initialize()            # no-op unless launched as several processes
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs training to config.num_train_steps; returns the last logged metrics.

  The config is checked before anything touches the disk; the workdir is then created and locked for the
  run (a second run on it fails at once, naming this one's pid and host).
  """
  validate_train_config(config)
  with workdir_lib.lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> dict:
  # ------------------------------------------------------------------------------------------------
  # Setup: the model config, the mesh and (pipelined) the schedule's stage split, checked now.
  # ------------------------------------------------------------------------------------------------
  cfg = ModelConfig.from_config_dict(config)
  mesh = sharding.make_mesh(config.mesh)
  pipelined = config.mesh.pipeline > 1
  if pipelined:
    executor.get_plan(cfg, config.pipeline.schedule, config.mesh.pipeline, config.pipeline.microbatches,
                      devices=mesh)
  total_steps = int(config.num_train_steps)

  # ------------------------------------------------------------------------------------------------
  # Data. Pipelined, every process reads the whole global batch: its ranks' first and last stages need
  # the rows of every micro-batch (the embedding takes the inputs, the loss the labels).
  # ------------------------------------------------------------------------------------------------
  datasets = (data_lib.make_datasets(config, process_index=0, process_count=1) if pipelined
              else data_lib.make_datasets(config))
  datasets.check_vocab(cfg.vocab_size)

  # ------------------------------------------------------------------------------------------------
  # Model and state: dsv3.steps.train_step (pure, module-level), jitted with shardings and donation.
  # ------------------------------------------------------------------------------------------------
  # Pipelined, the state is per rank (dsv3.pipeline.pipelined): state["ranks"][r] holds rank r's units on
  # its sub-mesh, and checkpoints and the EMA see each unit once (ps.view). The checkpointed state leaves
  # out state["guard"]: a checkpoint is only written once its step is known good, so it would be clean.
  ps = pipelined_lib.PipelinedSteps(config, cfg, mesh) if pipelined else None
  steps = ps.steps if pipelined else steps_lib.make(config, cfg, mesh)
  saved_shardings, state_shardings = steps.saved_shardings, steps.state_shardings
  if pipelined:
    def train_step(state, batch, mtp_weight, gamma):
      # batch: the global batch on the host; every rank updates its own units.
      ranks, guard, metrics = ps.train(state["ranks"], state["guard"], batch, mtp_weight, gamma)
      return {"ranks": ranks, "guard": guard}, metrics
  else:
    train_step = steps_lib.jit_train_step(steps)
  eval_step = steps_lib.jit_eval_step(steps)

  def batch_to_global(local_batch):
    """This process's rows of a batch as the global array the steps take (unpipelined runs)."""
    return jax.make_array_from_process_local_data(steps.batch_sharding, np.asarray(local_batch, np.int32))

  # ------------------------------------------------------------------------------------------------
  # Checkpoint / resume: a workdir checkpoint > init_from > scratch.
  # ------------------------------------------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps, best_by=config.keep_best_by,
                                       keep_best=config.keep_best)
  flat_config = resume.flatten_config(config)
  # Sharded like the params, in host memory: each process keeps its own shards.
  params_like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             *((ps.abstract["params"], ps.view_shardings["params"]) if pipelined else
                               (steps.abstract["params"], saved_shardings["params"])))
  ema = ema_lib.HostEMA(config.ema_decay, params_like) if config.ema_decay else None
  writer = metrics_lib.MetricWriter(workdir, total_steps)
  if checkpointer.latest_step() is not None:
    # None, or the (name, old, new) fields that may change on resume (e.g. learning_rate) and did.
    changed = resume.check_compatible(checkpointer.read_extras()["config"], flat_config)
    state, restored = pipelined_lib.restore(checkpointer, cfg, steps, mesh, ps, ema)
    state = {"ranks": state} if pipelined else state
    datasets.train.set_state(restored.extras["data"])
    writer.truncate_after(restored.step)
    writer.console(f"Resumed from {checkpointer.step_dir(restored.step)} at step {restored.step}"
                   + "".join(f"; {n}: {a!r} -> {b!r}" for n, a, b in changed or ()))
  else:
    rng = jax.random.key(config.seed)
    state = {"ranks": ps.init(rng)} if pipelined else jax.jit(steps.init, out_shardings=saved_shardings)(rng)
    if config.init_from:
      variables = _init_from(config.init_from, cfg, steps.abstract, state_shardings)
      if pipelined:
        state = {"ranks": ps.with_stacked_variables(state["ranks"], variables)}
      else:
        state = dict(state, **variables)
    if ema is not None:
      ema.update(ps.params_view(state["ranks"]) if pipelined else state["params"], 0)
  state = dict(state, guard=jax.device_put(steps_lib.CLEAN_GUARD, state_shardings["guard"]))

  def checkpointed(state):
    """The state as checkpoints hold it: stacked, or pipelined each unit once (per-layer)."""
    return ps.view(state["ranks"]) if pipelined else {k: v for k, v in state.items() if k != "guard"}

  def save(step, force=False, metrics=None):
    if not (force or checkpointer.should_save(step)):
      return False        # decide first: building the tree waits for the EMA and copies it to host
    tree = {"train": checkpointed(state)}
    if ema is not None:
      tree["ema"] = ema.state_dict()["ema"]   # global host arrays: orbax writes each process's shards
    extras = {"data": datasets.train.get_state(), "config": flat_config, "seed": int(config.seed)}
    return checkpointer.save(step, tree, extras, force=force, metrics=metrics)

  # ------------------------------------------------------------------------------------------------
  # Eval: validation loss and perplexity (raw and EMA params), MaxVio_global.
  # ------------------------------------------------------------------------------------------------
  def evaluate(state, params=None):
    """Validation loss and MaxVio_global of the state's params, or of `params` (the EMA's, same layout)."""
    total, n, loads = 0.0, 0, None
    if pipelined:
      ranks = state["ranks"] if params is None else ps.with_params(state["ranks"], params)
    for batch in itertools_islice(datasets.eval_batches(), config.eval_batches):
      if pipelined:
        loss, l = ps.evaluate(ranks, np.asarray(batch, np.int32))
      else:
        loss, l = eval_step(state["params"] if params is None else params, state["routing"], batch_to_global(batch))
        l = np.asarray(layout.moe_loads(l)[0]) if cfg.num_moe_layers else None
      total, n = total + float(loss), n + 1
      loads = l if loads is None else loads + l
    out = {"val_loss": total / max(n, 1), "val_perplexity": float(np.exp(total / max(n, 1)))}
    if cfg.num_moe_layers and loads is not None:
      vio = np.asarray(losses.max_violation(loads))
      out.update(maxvio_global_mean=float(vio.mean()), maxvio_global_max=float(vio.max()))
    return out

  # ------------------------------------------------------------------------------------------------
  # The loop.
  # ------------------------------------------------------------------------------------------------
  stop = {"signal": None}

  def on_signal(signum, _):
    stop["signal"] = signum          # finish the step, save, exit 0
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  multi_process = jax.process_count() > 1

  def agreed_stop():
    """Whether any process was signalled. Several processes must save the same step, so they agree
    with one tiny all-gather, only at steps where the loop syncs with the device anyway."""
    local = stop["signal"] is not None
    if not multi_process:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  start_step = int(jax.device_get(next(s for s in state["ranks"] if s is not None)["step"] if pipelined
                                  else state["step"]))
  tokens_per_step = config.batch_size * config.seq_len
  flops = plan.flops_per_token(cfg, config.seq_len, include_mtp=True)
  peak = metrics_lib.device_peak_flops(dtype={"fp8": "fp8", "bf16": "bf16"}.get(config.precision, "fp32"))
  throughput = metrics_lib.Throughput(total_steps, tokens_per_step, start_step, flops, peak, jax.device_count())
  last, done, started = {}, start_step, time.perf_counter()
  run_dropped = None        # MoE assignments dropped since start (a device scalar: no sync per step)
  finished = False
  # The profiled steps [first, end), numbered as in metrics.jsonl; a resumed run traces what is left of them.
  profile_first = int(config.profile.start_step)
  profile_end = profile_first + int(config.profile.num_steps)
  profile_dir, tracing = os.path.join(workdir, "profile"), False
  writer.start(start_step)
  try:
    for step in range(start_step, total_steps):
      if not tracing and profile_first <= step + 1 < profile_end:
        jax.profiler.start_trace(profile_dir)
        tracing = True
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):   # cheap: a host-side marker
        mtp_weight = opt_lib.piecewise(step, total_steps, config.mtp_weight, config.mtp_weight_final,
                                       config.mtp_weight_switch_frac)
        gamma = opt_lib.piecewise(step, total_steps, config.balance.gamma, config.balance.gamma_final,
                                  config.balance.gamma_switch_frac)
        batch = next(datasets.train)
        batch = np.asarray(batch, np.int32) if pipelined else batch_to_global(batch)
        # The pipeline executor places each stage on its own sub-mesh, so it runs outside any mesh context.
        # Host scalars: jit takes them without recompiling, and the executor reads them without a sync.
        with contextlib.nullcontext() if pipelined else jax.set_mesh(mesh):
          state, metrics = train_step(state, batch, np.float32(mtp_weight), np.float32(gamma))
        done = step + 1
        if "ep_dropped" in metrics:
          run_dropped = metrics["ep_dropped"] + (0 if run_dropped is None else run_dropped)
        if ema is not None:
          ema.update(ps.params_view(state["ranks"]) if pipelined else state["params"], done)
      if tracing and done in (profile_end - 1, total_steps):
        with throughput.paused():
          jax.block_until_ready(state)    # the traced steps' device work ends inside the trace
          jax.profiler.stop_trace()
        tracing = False
        writer.console(f"profile of steps {max(profile_first, start_step + 1)}..{done} written to {profile_dir}")
      log_now = done % config.log_every_steps == 0 or done == total_steps
      eval_now = done % config.eval_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
      # One process alone stops at its next step; several agree where they sync anyway (agreed_stop).
      if not (log_now or eval_now or save_now or (stop["signal"] and not multi_process)):
        continue
      # The one host sync: the metrics and the sticky guard, which covers every step so far. Nothing is
      # evaluated or saved past a diverged step, so every checkpoint written is a good one.
      metrics, guard, dropped_so_far = jax.device_get((metrics, state["guard"], run_dropped))
      if guard["step"] >= 0:
        raise TrainingError(_diverged_message(guard, config, checkpointer))
      stopping = agreed_stop()
      if log_now:
        row = {k: float(v) for k, v in metrics.items()} | throughput.tick(done) | metrics_lib.memory_stats()
        if dropped_so_far is not None:
          row["ep_dropped_run"] = float(dropped_so_far)
          if dropped_so_far > 0 and not last.get("ep_dropped_run"):
            logging.warning("step %d: %d MoE (token, expert) assignments dropped so far in this run: an "
                            "expert-parallel buffer overflowed (ep_dropped* in metrics.jsonl); raise "
                            "model.ep_buffer_factor (0 = worst-case buffers, never drops)", done, dropped_so_far)
        writer.write_scalars(done, row)
        last.update(row)
      if eval_now:
        with throughput.paused():
          evals = evaluate(state)
          if ema is not None:
            evals["val_loss_ema"] = evaluate(state, ema.value())["val_loss"]   # the params' layout
          writer.write_scalars(done, evals)
          writer.console(_eval_line(done, evals))
          last.update(evals)
      if save_now or stopping:
        with throughput.paused():
          save(done, force=stopping or done == total_steps, metrics=evals if eval_now else None)
      if stopping:
        sig = stop["signal"]
        writer.console(f"stopping on {'a signal in another process' if sig is None else signal.Signals(sig).name}"
                       f": saved step {done}")
        break
    finished = True
  # ------------------------------------------------------------------------------------------------
  # The end: the trace, the signal handlers, pending saves; a summary of a finished run.
  # ------------------------------------------------------------------------------------------------
  finally:
    if tracing:               # a run that stopped (or failed) inside the profiled steps keeps what it traced
      jax.profiler.stop_trace()
    for s, h in previous.items():
      signal.signal(s, h)
    checkpointer.wait()
    if finished:
      latest = checkpointer.latest_step()
      best = checkpointer.best_step() if config.keep_best_by else None
      writer.summary(
          steps=done - start_step, first_step=start_step, last_step=done, tokens=(done - start_step) * tokens_per_step,
          seconds=time.perf_counter() - started, loss=last.get("loss"), val_loss=last.get("val_loss"),
          checkpoint=checkpointer.step_dir(latest) if latest is not None else None,
          best=None if best is None else
          f"{checkpointer.step_dir(best)} ({config.keep_best_by} {checkpointer.metrics(best)[config.keep_best_by]:.4f})")
    checkpointer.close()
    if ema is not None:
      ema.close()
    writer.close()
  return last


def _eval_line(step: int, evals: dict) -> str:
  """'step 100: val_loss 4.1200 ppl 61.56 val_loss_ema 4.1000 maxvio 0.310' (what the evaluation found)."""
  parts = [f"step {step}: val_loss {evals['val_loss']:.4f} ppl {evals['val_perplexity']:.2f}"]
  if "val_loss_ema" in evals:
    parts.append(f"val_loss_ema {evals['val_loss_ema']:.4f}")
  if "maxvio_global_mean" in evals:
    parts.append(f"maxvio {evals['maxvio_global_mean']:.3f}")
  return " ".join(parts)


def _suggest_lr(lr: float, step_lr: float, ratio: float, max_ratio: float) -> float:
  """A peak learning rate that should not diverge. Adam's update/param norm ratio grows with the step's
  learning rate `step_lr` (the tiny config: ~0.02 at its peak 3e-3), so a known ratio gives the peak
  learning rate at which the ratio would be 1% (at most lr / 10); an unknown one (inf/nan) falls back
  to lr / 10, at most 3e-4 (the DeepSeek-V3 recipe's default)."""
  if math.isfinite(ratio) and max_ratio > 0 and ratio > max_ratio and step_lr > 0:
    new = min(lr / 10, 0.01 * step_lr / ratio)
  else:
    new = min(lr / 10, 3e-4) if lr > 3e-4 else lr / 10
  return float(f"{new:.1g}")


def _diverged_message(guard, config, checkpointer) -> str:
  """The TrainingError text: the first bad step, what was bad, the good checkpoint and the fix."""
  step, loss = int(guard["step"]), float(guard["loss"])
  grad_norm, ratio = float(guard["grad_norm"]), float(guard["update_ratio"])
  max_ratio = float(config.nan_guard.max_update_ratio)
  bad = []
  if not math.isfinite(loss):
    bad.append(f"loss is {loss}")
  if not math.isfinite(grad_norm):
    bad.append(f"gradient norm is {grad_norm}")
  if not math.isfinite(ratio):
    bad.append(f"the update or the new parameters are non-finite (update/param norm ratio {ratio})")
  elif max_ratio > 0 and ratio > max_ratio:
    bad.append(f"update/param norm ratio {ratio:.3g} > config.nan_guard.max_update_ratio={max_ratio:g}")
  values = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}, update/param norm ratio {ratio:.3g}"
  lr = float(config.learning_rate)
  fix = f"--config.learning_rate={_suggest_lr(lr, float(guard['lr']), ratio, max_ratio):g}"
  latest = checkpointer.latest_step()
  if latest is not None:
    where = (f"The last good checkpoint is step {latest} ({checkpointer.step_dir(latest)}); every checkpoint "
             f"is written only after its step is known good. Fix: rerun the same command with {fix} "
             f"(learning_rate was {lr:g}); it resumes from step {latest}.")
  else:
    where = (f"No checkpoint was written before it, so nothing is kept. Fix: start fresh (an empty "
             f"--workdir, or this one: it has no checkpoint) with {fix} (learning_rate was {lr:g}), or a longer "
             f"--config.warmup_steps.")
  return (f"step {step}: training diverged: {'; '.join(bad) or 'unknown'} ({values}). {where} "
          f"To trip later or never on large updates, raise or zero --config.nan_guard.max_update_ratio.")


def itertools_islice(it, n):
  return itertools.islice(it, n) if n else it


def _init_from(path: str, cfg, abstract, shardings):
  """{'params', 'routing'} (stacked, placed on `shardings`) from an HF checkpoint dir or an orbax dsv3
  checkpoint (either layout)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from: {path!r} does not exist; point it at an HF checkpoint dir "
                            f"(config.json + safetensors) or a dsv3 orbax checkpoint dir, or set it to ''")
  if os.path.exists(os.path.join(path, "config.json")):
    loaded_cfg = hf.read_config(path)              # checked before reading any tensor
    diffs = [f for f in hf_config.HF_FIELDS if getattr(loaded_cfg, f) != getattr(cfg, f)]
    if diffs:
      raise ValueError(f"config.init_from: the checkpoint's {diffs[0]}={getattr(loaded_cfg, diffs[0])!r} differs "
                       f"from config.model.{diffs[0]}={getattr(cfg, diffs[0])!r} (differing: {diffs}); "
                       f"make config.model match the checkpoint")
    # Each process reads only its own slices, straight into the state's shardings.
    _, variables = hf.load_checkpoint(path, shardings={"params": shardings["params"],
                                                       "routing": shardings["routing"]})
  else:
    variables = convert.load_orbax_variables(path)
  cast = lambda new, old: jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
  return {k: jax.device_put(cast(variables.get(k, {}), abstract[k]), shardings[k]) for k in ("params", "routing")}


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  # Errors whose message names the cause and the fix end the run with that line, not a traceback.
  cli.run(main, user_errors=(TrainingError, workdir_lib.WorkdirError, ckpt_lib.CheckpointStorageError,
                             ckpt_lib.CheckpointCorruptError))
