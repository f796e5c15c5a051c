"""Gradient accumulation reduces once per step (issue #12 item 2), with the same numbers as one big batch.

With grad_accum_steps > 1 every device adds up its own micro-batch gradients; the compiled step must hold
no parameter-sized all-reduce or reduce-scatter inside its micro-batch loop, and reduce-scatter the
parameter gradients into their ZeRO-1 shards after it.
"""
import re

import jax
import numpy as np
import pytest

import hlo

from configs import tiny
from dsv3.config import ModelConfig
from dsv3.parallel import sharding
from dsv3.training import steps as steps_lib

MESHES = {"dp8": {"data": 8, "expert": 1}, "dp2_ep4": {"data": 2, "expert": 4}}


def _config(mesh, accum):
  c = tiny.get_config()
  c.model.vocab_size = 512
  c.batch_size, c.seq_len, c.grad_accum_steps = 16, 32, accum
  c.mesh.data, c.mesh.expert, c.mesh.pipeline = mesh["data"], mesh["expert"], 1
  return c


def _grads_and_train(mesh_name, accum):
  """(metrics, grads, loads) of one batch, and the HLO text of the compiled gradient half of the step."""
  c = _config(MESHES[mesh_name], accum)
  cfg = ModelConfig.from_config_dict(c)
  mesh = sharding.make_mesh(c.mesh)
  steps = steps_lib.make(c, cfg, mesh)
  state = jax.jit(steps.init, out_shardings=steps.saved_shardings)(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 512, (16, 33), dtype=np.int32)
  batch = jax.device_put(tokens, steps.batch_sharding)

  compiled = jax.jit(steps.grads).lower(state["params"], state["routing"], batch, 0.3).compile()
  return jax.device_get(compiled(state["params"], state["routing"], batch, 0.3)), compiled.as_text()


@pytest.fixture(scope="module")
def runs():
  return {(m, a): _grads_and_train(m, a) for m in MESHES for a in (1, 2)}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_accumulated_gradients_equal_one_big_batch(runs, mesh_name):
  (m1, g1, l1), _ = runs[mesh_name, 1]
  (m2, g2, l2), _ = runs[mesh_name, 2]
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(l1), jax.tree.leaves(l2)):
    np.testing.assert_array_equal(b, a)               # per-expert token counts: exact
  for k in ("loss", "ce", "balance_loss", "mtp_loss"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5)
  assert m2["ep_dropped"] == m1["ep_dropped"] == 0


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_one_gradient_reduction_per_step(runs, mesh_name):
  _, text = runs[mesh_name, 2]
  comps = hlo.computations(text)
  bodies = set(re.findall(r"while\([^\n]*body=%?([\w.\-]+)", text))
  assert bodies, "the accumulation loop is gone"
  # Everything the loop bodies call (fusions, nested loops) counts as inside the loop.
  inside, todo = set(), list(bodies)
  while todo:
    name = todo.pop()
    if name in inside or name not in comps:
      continue
    inside.add(name)
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", comps[name])
  # Inside the loop only the expert-parallel dispatch's own small reductions may remain (its per-shard
  # counts, dropped assignments, worst load): nothing the size of a parameter.
  in_loop = [(n, r) for n in inside for r in hlo.reductions(comps[n])]
  assert not in_loop, f"a gradient reduction inside the micro-batch loop: {in_loop}"
  # After it: each leaf reduce-scattered into its ZeRO-1 shard (with EP, non-expert leaves are also summed
  # over 'expert').
  assert sum(op == "reduce-scatter" for op, _ in hlo.reductions(text)) >= 10
