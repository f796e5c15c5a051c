"""Selective recomputation (report §3.2.3): under remat='paper' the backward pass keeps no RMSNorm output and
no MLA up-projection output (q_b_proj, kv_b_proj) — they are recomputed — and gradients are unchanged.

Dimensions are chosen so that each of those activations has a trailing size nothing else has:
q_b out 4*(8+4)=48, kv_b out 4*(8+6)=56, kv latent (normed) 17, q_a 22 (its norm output is 22 too, so we
count: one 22-wide residual per layer under 'paper' — q_a itself — and more without remat).
"""
import functools

import jax
import numpy as np
import pytest

import residuals
import tiny_model

from dsv3 import model
from dsv3.training import losses

# The widths above; three layers (a dense stack and a two-layer MoE stack), no MTP block outside the stacks.
BASE = tiny_model.config(intermediate_size=40, q_lora_rank=22, kv_lora_rank=17, num_hidden_layers=3,
                         num_nextn_predict_layers=0)


@functools.cache
def _data():
  return jax.random.randint(jax.random.key(1), (2, 7), 0, 97), model.init(BASE, jax.random.key(0))


def loss_fn(cfg):
  tokens, variables = _data()

  def f(params):
    out = model.forward_train(cfg, {"params": params, "routing": variables["routing"]}, tokens)
    return losses.objective(cfg, out, tokens, 0.3, 1e-4)[0]
  return f


def layer_residuals(remat):
  """Activation residuals saved inside the scanned layer stacks: shapes [L, B, T, ...]; the parameters the
  backward keeps are not activations."""
  params = _data()[1]["params"]
  param_shapes = {p.shape for p in jax.tree.leaves(params)}
  return [a.shape for a in residuals.saved(loss_fn(BASE.replace(remat=remat)), params)
          if len(a.shape) >= 4 and a.shape not in param_shapes]


# The up-projections reshaped per head: q [.., 4, 8+4], k_nope [.., 4, 8], v [.., 4, 6], kv_b out [.., 4, 14].
PER_HEAD = {(4, 12), (4, 8), (4, 6), (4, 14)}


@pytest.mark.parametrize("remat", ["paper", "full"])
def test_recomputed_tensors_are_not_saved(remat):
  shapes = layer_residuals(remat)
  assert not [s for s in shapes if tuple(s[-2:]) in PER_HEAD], f"per-head q/k/v saved under remat={remat}"
  widths = [s[-1] for s in shapes if len(s) == 4]
  for w, what in ((48, "q_b_proj output"), (56, "kv_b_proj output"), (17, "kv_a_layernorm output")):
    assert w not in widths, f"{what} is saved under remat={remat}"
  assert widths.count(22) <= 2                        # q_a only (one per stack), not its norm output


def test_without_remat_they_are_saved():
  shapes = layer_residuals("none")
  assert [s for s in shapes if tuple(s[-2:]) in PER_HEAD]
  widths = [s[-1] for s in shapes if len(s) == 4]
  assert 17 in widths and widths.count(22) > 2


def test_gradients_equal_with_and_without_remat():
  params = _data()[1]["params"]
  grads = {r: jax.grad(loss_fn(BASE.replace(remat=r)))(params) for r in ("none", "paper", "full")}
  for r in ("paper", "full"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads["none"], grads[r])
