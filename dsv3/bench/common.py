"""What the benchmarks share: their command-line runner, simulated CPU devices, configs by name, the timer,
random tokens, the trainer's step (dsv3.training.steps) on one device, table printing."""
from __future__ import annotations

import os
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from dsv3 import cli
from dsv3.config import ModelConfig
from dsv3.parallel import sharding
from dsv3.training import steps



def run(main, argv=None, user_errors: tuple = ()) -> None:
  """dsv3.cli.run(main) for a bench command; library INFO logs (absl, jax) stay off unless -v / --verbosity
  is given, as in the trainer."""
  def quiet(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)
  cli.run(quiet, argv=argv, user_errors=user_errors)


def use_cpu_devices(count: int = 8) -> None:
  """Runs JAX on `count` simulated CPU devices (a mesh on one machine), unless the caller chose its own:
  JAX_PLATFORMS, or a device count in XLA_FLAGS or JAX_NUM_CPU_DEVICES, win. JAX reads both settings when
  its backends start, so call this before the first JAX operation (a device count set later raises)."""
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
  if ("xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
      and jax.config.jax_num_cpu_devices < 0):
    jax.config.update("jax_num_cpu_devices", count)


def flag_args(define_flags, flag_values: flags.FlagValues = flags.FLAGS) -> types.SimpleNamespace:
  """The parsed values of the flags a command's `define_flags` defines, as attributes named after them:
  what a bench's functions take, so that a notebook or a test can call them without parsing a command line."""
  defined = flags.FlagValues()
  define_flags(defined)
  return types.SimpleNamespace(**{name: flag_values[name].value for name in defined})


def short_run_config(name: str, steps: int, batch_size: int, seq_len: int, vocab: int, max_files: int,
                     eval_batches: int, log_every: int = 1):
  """configs/<name>.py shrunk for a quick run (the colabs' recipe): `steps` steps with 10% warm-up, one
  evaluation and one checkpoint at the end, no EMA, data parallel over every local device. max_files
  caps the default corpus (0: all of it); vocab sets both the model's and the tokenizer's vocabulary."""
  c = cli.load_config(name)
  c.num_train_steps, c.warmup_steps = steps, max(1, steps // 10)
  c.batch_size, c.seq_len = batch_size, seq_len
  c.model.vocab_size = vocab
  c.data.max_files, c.eval_batches = max_files, eval_batches
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = log_every, steps, steps
  c.ema_decay = 0.0
  c.mesh.data = jax.device_count()
  return c


def timeit(fn, steps: int, warmup: int = 1) -> float:
  """Median seconds per call of `fn` (which must block until its result is ready), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(2, cfg.vocab_size, (batch, seq_len + 1)), jnp.int32)


def one_device_steps(config, cfg: ModelConfig) -> steps.Steps:
  """The trainer's steps (dsv3.training.steps.make) of `config` with model `cfg`, on a one-device mesh."""
  return steps.make(config, cfg, sharding.make_mesh(dict(data=1, expert=1, pipeline=1), jax.devices()[:1]))


def train_args(config, steps_: steps.Steps, tokens):
  """(state, batch, mtp_weight, gamma): steps_.train's arguments as the trainer passes them at step 0, the
  state initialised from config.seed; all abstract (to lower without allocating) when tokens is a
  jax.ShapeDtypeStruct."""
  if isinstance(tokens, jax.ShapeDtypeStruct):
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return dict(steps_.abstract, guard=jax.eval_shape(lambda: steps.CLEAN_GUARD)), tokens, scalar, scalar
  state = dict(jax.jit(steps_.init)(jax.random.key(config.seed)), guard=jax.device_put(steps.CLEAN_GUARD))
  return state, tokens, jnp.float32(config.mtp_weight), jnp.float32(config.balance.gamma)


def fmt_table(header, rows) -> str:
  cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(header)]
  widths = [max(len(x) for x in c) for c in cols]
  line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line([str(x) for x in r]) for r in rows])


def device_line() -> str:
  d = jax.devices()[0]
  return f"backend {jax.default_backend()}, {jax.device_count()} x {d.device_kind}, {os.cpu_count()} CPU cores"
