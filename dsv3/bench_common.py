"""What the benchmarks share: the timer, random tokens, the standalone train step, table printing."""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv3 import losses, model
from dsv3.config import ModelConfig


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


def make_train_step(cfg: ModelConfig, tx, mtp: bool = True, donate: bool = True):
  """The trainer's step without the loop: loss (MTP + balance when `mtp`), grads, optimizer update.

  Returns (jitted step(params, routing, opt_state, tokens) -> (params, opt_state, loss), main_params_only).
  With mtp=False only the main model's next-token loss is trained (what HF's model computes), and the
  caller must pass params without the MTP modules. donate=False keeps the inputs (to call it repeatedly on
  the same arrays, as a profile does).
  """
  def loss_fn(params, routing, tokens):
    variables = {"params": params, "routing": routing}
    if mtp:
      out = model.forward_train(cfg, variables, tokens[:, :-1])
      return losses.objective(cfg, out, tokens[:, 1:], 0.3, 1e-4)[0]
    logits = model.Transformer(cfg).apply(variables, tokens[:, :-1])["logits"]
    return losses.cross_entropy(logits, tokens[:, 1:])

  def step(params, routing, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, routing, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 2) if donate else ())


def main_params(params):
  return {k: v for k, v in params.items() if not k.startswith("mtp")}


def fmt_table(header, rows) -> str:
  cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(header)]
  widths = [max(len(x) for x in c) for c in cols]
  line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line([str(x) for x in r]) for r in rows])


def device_line() -> str:
  d = jax.devices()[0]
  return f"backend {jax.default_backend()}, {jax.device_count()} x {d.device_kind}, {os.cpu_count()} CPU cores"
