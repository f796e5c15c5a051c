"""One process of tests/test_multiprocess.py: an expert-parallel training forward/backward, as JSON.

Run by the test as N processes (DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID set, gloo
collectives) or as one process; either way the mesh is (data=2, expert=4) over 8 CPU devices and the
printed loss, gradient norm and logits checksum must agree. Arrays are built from the same host values
on every process (`make_array_from_callback`), as a multi-host trainer does with its data shards.
"""
import json
import sys

from dsv3.parallel import distributed

info = distributed.maybe_initialize()   # before any other JAX call

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import tiny_model  # noqa: E402  (tests/, this script's directory)

from dsv3 import model  # noqa: E402
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
CFG = tiny_model.even_config(remat="none")


def global_array(value, sharding_):
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def main():
  data, expert = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (2, 4)
  mesh = tiny_model.mesh(data, expert)
  ep = ExpertParallel(mesh)
  # Host values, identical on every process (initialised on the CPU of this process only).
  with jax.default_device(jax.local_devices()[0]):
    variables = jax.device_get(model.init(CFG, jax.random.key(0)))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size, jnp.int32))
  variables = jax.tree.map(global_array, variables, sharding.param_shardings(mesh, variables))
  tokens = global_array(tokens, sharding.batch_sharding(mesh))

  def loss_fn(params, routing, tokens):
    out = model.forward_train(CFG, {"params": params, "routing": routing}, tokens, expert_parallel=ep)
    logp = jax.nn.log_softmax(out["logits"][:, :-1])
    loss = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return loss + 1e-4 * jnp.sum(out["aux"]["balance_loss"]), out["logits"]

  def step(params, routing, tokens):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, routing, tokens)
    return loss, optax_global_norm(grads), jnp.sum(logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape)))

  rep = NamedSharding(mesh, P())
  fn = jax.jit(step, out_shardings=(rep, rep, rep))
  compiled = fn.lower(variables["params"], variables["routing"], tokens).compile(
      compiler_options=dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True))
  loss, gnorm, checksum = compiled(variables["params"], variables["routing"], tokens)
  print(json.dumps(dict(process_id=info.process_id, num_processes=jax.process_count(),
                        devices=jax.device_count(), local_devices=jax.local_device_count(),
                        loss=float(loss), grad_norm=float(gnorm), logits_checksum=float(checksum))), flush=True)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


if __name__ == "__main__":
  main()
