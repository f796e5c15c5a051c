"""model.scan_layers: the unrolled layer stacks are the scanned ones, in params, values and gradients."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model

from dsv3 import model
from dsv3.config import ConfigError
from dsv3.training import losses

CFG = tiny_model.config(num_hidden_layers=4)  # a three-layer MoE stack to scan or unroll; remat="paper"


def _loss_and_grads(cfg, variables, tokens):
  def loss(params):
    out = model.forward_train(cfg, {**variables, "params": params}, tokens[:, :-1])
    return losses.objective(cfg, out, tokens[:, 1:], 0.3, 1e-3)[0]
  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_unrolled_layers_equal_scanned():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 17)), jnp.int32)
  variables = model.init(CFG, jax.random.key(0))
  unrolled = CFG.replace(scan_layers=False)
  same_tree = jax.tree.map(lambda a, b: a.shape == b.shape, variables, model.init(unrolled, jax.random.key(0)))
  assert all(jax.tree.leaves(same_tree))
  (l0, g0), (l1, g1) = _loss_and_grads(CFG, variables, tokens), _loss_and_grads(unrolled, variables, tokens)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Unrolled: no loop over layers in the compiled program (the loops left are integer binary searches).
  def float_loops(cfg):
    hlo = jax.jit(lambda p: model.forward_train(cfg, {**variables, "params": p}, tokens[:, :-1])["logits"]
                  ).lower(variables["params"]).compile().as_text()
    return [l for l in hlo.splitlines() if re.search(r" while\(", l) and "f32[" in l.split(" while(")[0]]
  assert float_loops(CFG) and not float_loops(unrolled)


def test_scan_layers_must_be_a_bool():
  with pytest.raises(ConfigError, match=r"model.scan_layers: must be True or False, got 'no'"):
    CFG.replace(scan_layers="no").validate()
