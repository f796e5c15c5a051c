"""Trains DeepSeek-V3 (any size) from an ml_collections config: one main, big_vision style.

  python -m dsv3.train --config=configs/tiny.py --workdir=/tmp/dsv3_tiny [--config.num_train_steps=50]

Resumes from a checkpoint in --workdir, else from --config.init_from (HF or orbax dir), else from scratch;
the same command after a crash, kill -9 or SIGTERM continues exactly where the last checkpoint left off.
Writes metrics.jsonl, TensorBoard events (tb/), orbax checkpoints (checkpoints/; with keep_best_by also the
best) and, with config.profile, a jax.profiler trace (profile/). A diverged step (dsv3.training.steps.check) raises
TrainingError naming the last good checkpoint and a learning rate to rerun with. README: "Nothing a user
does loses data" and "Large checkpoints, serving, profiling, best checkpoints".
"""
from __future__ import annotations

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

from dsv3 import cli, flops, hf
from dsv3 import data as data_lib
from dsv3.analysis import compile_only
from dsv3.config import ConfigError, ModelConfig
from dsv3.interop import hf_config, slices
from dsv3.parallel import distributed
from dsv3.parallel import sharding
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import ema as ema_lib
from dsv3.training import losses, metrics as metrics_lib, optimizer as opt_lib, resume
from dsv3.training import runner as runner_lib
from dsv3.training import workdir as workdir_lib
from dsv3.training.train_config import validate_train_config


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. a non-finite loss); the message says at which step and why."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (only `python -m dsv3.train` defines them; library callers pass arguments)."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True, **fv)
  flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go; resumed from if non-empty.", **fv)
  flags.DEFINE_enum("compile_only", None, ["cpu", "h100", "h800", "h200"],
                    "Compile one step's programs for this target, write WORKDIR/compiled (memory.json, HLO), "
                    "print per-device memory and exit: dsv3/analysis/compile_only.py.", **fv)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the directory for checkpoints and metrics")
  if FLAGS.compile_only:
    # Before any backend starts: GPU targets set JAX_PLATFORMS.
    compile_only.run(FLAGS.config, FLAGS.workdir, FLAGS.compile_only)
    return
  distributed.maybe_initialize()            # no-op unless launched as several processes
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs training to config.num_train_steps; returns the last logged metrics.

  The config is checked before anything touches the disk; the workdir is then created and locked for the
  run (a second run on it fails at once, naming this one's pid and host).
  """
  validate_train_config(config)
  # The signal handlers first: a Ctrl-C during the setup (data, the first compile, a restore) is then a flag
  # the loop reads before its first step, not a KeyboardInterrupt inside XLA's compile, whose threads
  # crashed the interpreter's exit (a segmentation fault).
  with workdir_lib.lock(workdir), _StopSignals() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config, workdir: str, stop: "_StopSignals") -> dict:
  # ------------------------------------------------------------------------------------------------
  # Setup: the model config, the mesh and the runner (dsv3.training.runner: pipelined or not, the same methods;
  # the state is the runner's, opaque here).
  # ------------------------------------------------------------------------------------------------
  cfg = ModelConfig.from_config_dict(config)
  mesh = sharding.make_mesh(config.mesh)
  runner = runner_lib.make_runner(config, cfg, mesh)
  total_steps = int(config.num_train_steps)

  # ------------------------------------------------------------------------------------------------
  # Data: the rows of each global batch this process reads (runner.batch_share).
  # ------------------------------------------------------------------------------------------------
  datasets = data_lib.make_datasets(config, **runner.batch_share)
  datasets.check_vocab(cfg.vocab_size)

  # ------------------------------------------------------------------------------------------------
  # Checkpoint / resume: a workdir checkpoint > init_from > scratch. The EMA keeps the params' layout in
  # host memory, each process its own shards.
  # ------------------------------------------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps, best_by=config.keep_best_by,
                                       keep_best=config.keep_best)
  flat_config = resume.flatten_config(config)
  ema = ema_lib.HostEMA(config.ema_decay, runner.checkpoint_like["params"]) if config.ema_decay else None
  writer = metrics_lib.MetricWriter(workdir, total_steps)
  if int(config.warmup_steps) > total_steps:
    writer.console(f"note: config.warmup_steps={config.warmup_steps} is longer than the run (num_train_steps="
                   f"{total_steps}), so the learning rate warms up over all {total_steps} steps and never reaches "
                   f"its constant or decay phase; set --config.warmup_steps below {total_steps} for those")
  state = _resume_or_init(config, cfg, runner, checkpointer, datasets, writer, ema, flat_config)

  def save(step, force=False, metrics=None):
    if not (force or checkpointer.should_save(step)):
      return False        # decide first: building the tree waits for the EMA and copies it to host
    tree = {"train": runner.checkpoint(state)}
    if ema is not None:
      tree["ema"] = ema.state_dict()["ema"]   # global host arrays: orbax writes each process's shards
    extras = {"data": datasets.train.get_state(), "config": flat_config, "seed": int(config.seed)}
    return checkpointer.save(step, tree, extras, force=force, metrics=metrics)

  # ------------------------------------------------------------------------------------------------
  # The loop. One host sync per logged, evaluated or saved step: the metrics and the sticky guard, which
  # covers every step so far, so nothing is evaluated or saved past a diverged step.
  # ------------------------------------------------------------------------------------------------
  start_step = runner.step(state)
  peak = metrics_lib.device_peak_flops(dtype={"fp8": "fp8", "bf16": "bf16"}.get(config.precision, "fp32"))
  throughput = metrics_lib.Throughput(total_steps, config.batch_size * config.seq_len, start_step,
                                      flops.flops_per_token(cfg, config.seq_len, include_mtp=True), peak,
                                      jax.device_count())
  profile = _Profile(config.profile, workdir, start_step)
  last, done, started, finished = {}, start_step, time.perf_counter(), False
  run_dropped = None        # MoE assignments dropped since start (a device scalar: no sync per step)
  writer.start(start_step)
  try:
    for step in range(start_step, total_steps):
      if step == start_step and stop.agreed():     # signalled during the setup: nothing new to save
        writer.console(f"stopping on {stop.name()} before step {step + 1}: nothing new to save")
        break
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):   # cheap: a host-side marker
        mtp_weight = opt_lib.piecewise(step, total_steps, config.mtp_weight, config.mtp_weight_final,
                                       config.mtp_weight_switch_frac)
        gamma = opt_lib.piecewise(step, total_steps, config.balance.gamma, config.balance.gamma_final,
                                  config.balance.gamma_switch_frac)
        state, metrics = runner.train(state, runner.place(next(datasets.train)), mtp_weight, gamma)
        done = step + 1
        if "ep_dropped" in metrics:
          run_dropped = metrics["ep_dropped"] + (0 if run_dropped is None else run_dropped)
        if ema is not None:
          ema.update(runner.params(state), done)
      profile.after(done, total_steps, state, throughput, writer)
      log_now = done % config.log_every_steps == 0 or done == total_steps
      eval_now = done % config.eval_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps
      # One process alone stops at its next step; several agree where they sync anyway (stop.agreed).
      if not (log_now or eval_now or save_now or stop.alone()):
        continue
      metrics, guard, dropped_so_far = jax.device_get((metrics, runner.guard(state), run_dropped))
      if guard["step"] >= 0:
        raise TrainingError(_diverged_message(guard, config, checkpointer))
      stopping = stop.agreed()
      if log_now:
        row = ({k: float(v) for k, v in metrics.items()} | throughput.tick(done) | metrics_lib.memory_stats()
               | _dropped(done, dropped_so_far, last))
        writer.write_scalars(done, row)
        last.update(row)
      if eval_now:
        with throughput.paused():
          evals = _evaluate(config, runner, datasets, state)
          if ema is not None:
            evals["val_loss_ema"] = _evaluate(config, runner, datasets, state, ema.value())["val_loss"]
          writer.write_scalars(done, evals)
          writer.console(_eval_line(done, evals))
          last.update(evals)
      if save_now or stopping:
        with throughput.paused():
          save(done, force=stopping or done == total_steps, metrics=evals if eval_now else None)
      if stopping:
        writer.console(f"stopping on {stop.name()}: saved step {done}")
        break
    finished = True
  # ------------------------------------------------------------------------------------------------
  # The end: the trace, the signal handlers, pending saves; a summary of a finished run.
  # ------------------------------------------------------------------------------------------------
  finally:
    profile.close()
    checkpointer.wait()
    if finished:
      _summary(writer, checkpointer, config, start_step, done, time.perf_counter() - started, last)
    checkpointer.close()
    if ema is not None:
      ema.close()
    writer.close()
  return last


# ---------------------------------------------------------------------------------------------------
# The run's pieces: its start, evaluation, profiling, signals and what a log row adds.
# ---------------------------------------------------------------------------------------------------
def _resume_or_init(config, cfg, runner, checkpointer, datasets, writer, ema, flat_config):
  """The run's state: the workdir's latest checkpoint (written by either layout; the data iterator and the
  metrics resume with it), else config.init_from's variables in a fresh state, else a fresh state."""
  latest = checkpointer.latest_step()
  if latest is not None:
    if latest > int(config.num_train_steps):
      raise ConfigError(f"config.num_train_steps: {config.num_train_steps} is below the step of the checkpoint in "
                        f"{checkpointer.directory} ({latest}), so there is nothing to train; raise "
                        f"--config.num_train_steps above {latest} to continue that run, or pass a new --workdir to "
                        f"start a new one")
    # None, or the (name, old, new) fields that may change on resume (e.g. learning_rate) and did.
    changed = resume.check_compatible(checkpointer.read_extras()["config"], flat_config)
    state, restored = runner.restore(checkpointer, ema)
    datasets.train.set_state(restored.extras["data"])
    writer.truncate_after(restored.step)
    writer.console(f"Resumed from {checkpointer.step_dir(restored.step)} at step {restored.step}"
                   + "".join(f"; {n}: {a!r} -> {b!r}" for n, a, b in changed or ()))
    return state
  # A fresh start: whatever an earlier attempt that left no checkpoint logged here is not this run's.
  dropped = writer.truncate_after(0)
  if dropped:
    writer.console(f"{writer.jsonl_path}: dropped {dropped} rows an earlier attempt logged (it left no checkpoint); "
                   f"this run starts at step 0")
  saved = _init_from(config.init_from, cfg) if config.init_from else None
  state = runner.init(jax.random.key(config.seed), saved)
  if ema is not None:
    ema.update(runner.params(state), 0)
  return state


def _evaluate(config, runner, datasets, state, params=None) -> dict:
  """Validation loss and perplexity of the state's params, or of `params` (the EMA's, runner.params'
  layout), and MaxVio_global."""
  total, n, loads = 0.0, 0, None
  batches = datasets.eval_batches()
  for batch in itertools.islice(batches, config.eval_batches) if config.eval_batches else batches:
    ce, l = runner.evaluate(state, runner.place(batch), params)
    total, n = total + float(ce), n + 1
    loads = l if loads is None else loads + l
  out = {"val_loss": total / max(n, 1), "val_perplexity": float(np.exp(total / max(n, 1)))}
  if loads is not None:
    vio = np.asarray(losses.max_violation(loads))
    out.update(maxvio_global_mean=float(vio.mean()), maxvio_global_max=float(vio.max()))
  return out


def _summary(writer, checkpointer, config, start_step: int, done: int, seconds: float, last: dict):
  """The finished run's summary line: its steps, tokens, time, losses, last and best checkpoints."""
  latest = checkpointer.latest_step()
  best = checkpointer.best_step() if config.keep_best_by else None
  writer.summary(
      steps=done - start_step, first_step=start_step, last_step=done,
      tokens=(done - start_step) * config.batch_size * config.seq_len, seconds=seconds, loss=last.get("loss"),
      val_loss=last.get("val_loss"), checkpoint=checkpointer.step_dir(latest) if latest is not None else None,
      best=None if best is None else
      f"{checkpointer.step_dir(best)} ({config.keep_best_by} {checkpointer.metrics(best)[config.keep_best_by]:.4f})")


def _dropped(done: int, dropped_so_far, last: dict) -> dict:
  """The log row's ep_dropped_run (MoE assignments dropped so far), warning the first time any are."""
  if dropped_so_far is None:
    return {}
  if dropped_so_far > 0 and not last.get("ep_dropped_run"):
    logging.warning("step %d: %d MoE (token, expert) assignments dropped so far in this run: an "
                    "expert-parallel buffer overflowed (ep_dropped* in metrics.jsonl); raise "
                    "model.ep_buffer_factor (0 = worst-case buffers, never drops)", done, dropped_so_far)
  return {"ep_dropped_run": float(dropped_so_far)}


class _Profile:
  """config.profile's jax.profiler trace of steps [start_step, start_step + num_steps), numbered as in
  metrics.jsonl; a resumed run traces what is left of them."""

  def __init__(self, profile, workdir: str, start_step: int):
    self.first = int(profile.start_step)
    self.end = self.first + int(profile.num_steps)
    self.dir, self.start_step, self.tracing = os.path.join(workdir, "profile"), start_step, False

  def before(self, step: int):
    if not self.tracing and self.first <= step + 1 < self.end:
      jax.profiler.start_trace(self.dir)
      self.tracing = True

  def after(self, done: int, total_steps: int, state, throughput, writer):
    if self.tracing and done in (self.end - 1, total_steps):
      with throughput.paused():
        jax.block_until_ready(state)    # the traced steps' device work ends inside the trace
        jax.profiler.stop_trace()
      self.tracing = False
      writer.console(f"profile of steps {max(self.first, self.start_step + 1)}..{done} written to {self.dir}")

  def close(self):
    if self.tracing:               # a run that stopped (or failed) inside the profiled steps keeps what it traced
      jax.profiler.stop_trace()
      self.tracing = False


class _StopSignals:
  """SIGTERM / SIGINT finish the step, save and exit 0. Several processes must save the same step, so they
  agree with one tiny all-gather, only at steps where the loop syncs with the device anyway."""

  def __init__(self):
    self.signal = None
    self.multi_process = jax.process_count() > 1
    self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  def _on_signal(self, signum, _):
    self.signal = signum

  def alone(self) -> bool:
    """Signalled, and the only process: stop at this step."""
    return self.signal is not None and not self.multi_process

  def agreed(self) -> bool:
    """Whether any process was signalled."""
    local = self.signal is not None
    if not self.multi_process:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def name(self) -> str:
    return "a signal in another process" if self.signal is None else signal.Signals(self.signal).name

  def close(self):
    for s, h in self.previous.items():
      signal.signal(s, h)

  def __enter__(self) -> "_StopSignals":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
  max_loss, low = float(config.nan_guard.get("max_loss_ratio", 0)), float(guard["loss_low"])
  spiked = math.isfinite(loss) and max_loss > 0 and loss > max_loss * low
  if spiked:
    bad.append(f"loss {loss:.4g} > config.nan_guard.max_loss_ratio={max_loss:g} x {low:.4g} (the lowest EMA of the "
               f"loss in this run): the loss is climbing")
  rule = "spikes in the loss, raise or zero --config.nan_guard.max_loss_ratio" if spiked and len(bad) == 1 else \
      "large updates, raise or zero --config.nan_guard.max_update_ratio"
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
          f"To trip later or never on {rule}.")


def _init_from(path: str, cfg) -> slices.Saved:
  """config.init_from's variables, read later by slices straight into the runner's shardings (runner.init):
  an HF checkpoint dir (its config.json checked against config.model first), a dsv3 --to=orbax export, or a
  training checkpoints dir (its latest readable step), written by either layout."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from: {path!r} does not exist; point it at an HF checkpoint dir "
                            f"(config.json + safetensors) or a dsv3 orbax checkpoint dir, or set it to ''")
  what = f"config.init_from {path}"
  if os.path.exists(os.path.join(path, "config.json")):
    loaded_cfg = hf.read_config(path)              # checked before reading any tensor
    diffs = [f for f in hf_config.HF_FIELDS if getattr(loaded_cfg, f) != getattr(cfg, f)]
    if diffs:
      raise ValueError(f"config.init_from: the checkpoint's {diffs[0]}={getattr(loaded_cfg, diffs[0])!r} differs "
                       f"from config.model.{diffs[0]}={getattr(cfg, diffs[0])!r} (differing: {diffs}); "
                       f"make config.model match the checkpoint")
    return slices.Saved(hf.open_checkpoint(path)[1], (), what)
  if os.path.isdir(os.path.join(path, "variables")):        # a --to=orbax export
    return slices.Saved(ckpt_lib.SavedStep(None, os.path.join(os.path.abspath(path), "variables")), (), what)
  ckpts = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  with ckpt_lib.Checkpointer(ckpts, read_only=True) as checkpointer:
    return slices.Saved(checkpointer.saved(), ("train",), what)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  # Errors whose message names the cause and the fix end the run with that line, not a traceback.
  cli.run(main, user_errors=(TrainingError, workdir_lib.WorkdirError, ckpt_lib.CheckpointStorageError,
                             ckpt_lib.CheckpointCorruptError, ckpt_lib.CheckpointMismatchError, hf.CheckpointError))
