"""Bounded expert-parallel buffers (cfg.ep_buffer_factor) on 8 simulated CPU devices.

A forced imbalance (a router bias sending every token to the same experts) must drop exactly the
assignments a numpy model of the buffers predicts, and the kept ones must equal the one-device MoE run on
them alone, on both transports; balanced routing must drop nothing; and the routed-experts program's
temporary memory must stay flat as mesh.expert grows at fixed tokens per device (worst-case sizing grows).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3.nn import moe
from dsv3.parallel.expert_parallel import ExpertParallel, buffer_rows, shard_hit_probability
from test_expert_parallel import FAST_COMPILE, TOL, _emulated_ragged_all_to_all, _maxdiff
import tiny_model

H, I, E, K = 16, 8, 16, 4
# One MoE layer of the tiny model, with more experts per token and no shared expert: only routing matters here.
CFG = tiny_model.config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                        n_shared_experts=0, num_hidden_layers=1, first_k_dense_replace=0, remat="none")


def _routed(N, hot_bias, seed=0):
  """x, routing from dsv3.nn.moe.route (node-limited) with `hot_bias` added to experts 0 and 1, weights."""
  r = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(r[0], (N, H))
  bias = jnp.zeros((E,)).at[:2].set(hot_bias)
  idx, w, _ = moe.route(CFG, x, jax.random.normal(r[1], (H, E)), bias)
  ws = [jax.random.normal(r[i], s) * 0.3 for i, s in zip((2, 3, 4), ((E, H, I), (E, H, I), (E, I, H)))]
  return x, idx, w, ws


def _reference_keep(cfg, idx, data, ep):
  """numpy model of the buffers: which (token, expert) assignments survive, by the documented rules."""
  idx = np.asarray(idx)
  N, k = idx.shape
  n, e_local = N // (data * ep), E // ep
  rows = buffer_rows(cfg, n, ep, "dense")
  keep = np.zeros(idx.shape, bool)
  for g in range(data):
    for d in range(ep):
      arrived = []                                   # (token, slot) in arrival order: source-major
      for s in range(ep):
        toks = [t for t in range((g * ep + s) * n, (g * ep + s + 1) * n) if (idx[t] // e_local == d).any()]
        for t in toks[:rows["block"]]:
          arrived += [(t, j) for j in range(k) if idx[t, j] // e_local == d]
      for t, j in arrived[:rows["expand"]]:
        keep[t, j] = True
  return keep


def _run(fn, cfg, *args):
  return jax.jit(fn, static_argnums=0).lower(cfg, *args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_forced_imbalance_drops_exactly(monkeypatch, make_mesh, impl):
  if impl == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = CFG.replace(ep_buffer_factor=1.5)
  x, idx, w, ws = _routed(256, hot_bias=10.0)
  assert (np.asarray(idx)[:, :2] < 2).all(), "the bias should send every token to experts 0 and 1"
  keep = _reference_keep(cfg, idx, 2, 4)
  y, dropped, ratio = _run(ExpertParallel(make_mesh(2, 4), impl=impl).routed_experts, cfg, x, idx, w, *ws)
  assert int(dropped) == int((~keep).sum()) > 0
  assert float(ratio) > cfg.ep_buffer_factor
  y0, _ = _run(moe.routed_experts_local, cfg, x, idx, jnp.where(keep, w, 0.0), *ws)
  assert _maxdiff(y, y0) <= TOL


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_balanced_routing_does_not_drop(make_mesh, mesh_shape):
  x, idx, w, ws = _routed(512, hot_bias=0.0, seed=1)
  y, dropped, ratio = _run(ExpertParallel(make_mesh(*mesh_shape), impl="dense").routed_experts, CFG, x, idx, w, *ws)
  y0, _ = _run(moe.routed_experts_local, CFG, x, idx, w, *ws)
  assert int(dropped) == 0 and 0 < float(ratio) <= CFG.ep_buffer_factor
  assert _maxdiff(y, y0) <= TOL


def test_buffer_rows():
  """Balanced sizes and the worst case; node-limited routing lowers the chance a shard is needed."""
  cfg = CFG.replace(n_group=1, topk_group=1)
  assert shard_hit_probability(cfg, 4) == pytest.approx(1 - 495 / 1820)      # 1 - C(12,4) / C(16,4)
  assert shard_hit_probability(CFG, 4) == pytest.approx(0.5 - 0.5 / 70)      # 2 of 4 groups = shards
  assert buffer_rows(CFG.replace(ep_buffer_factor=0), 64, 8, "dense") == dict(
      block=64, send=512, recv=512, expand=512 * 2, balanced_block=pytest.approx(64 * shard_hit_probability(CFG, 8)),
      balanced_expand=256.0)
  rows = buffer_rows(CFG.replace(ep_buffer_factor=2.0), 64, 4, "ragged")
  assert rows["block"] == 64 and rows["expand"] == 2 * 64 * K and rows["send"] == 64 * K


def _temp_bytes(factor, ep, n=128, hidden=64, experts=32):
  cfg = CFG.replace(hidden_size=hidden, n_routed_experts=experts, n_group=1, topk_group=1,
                    ep_buffer_factor=factor)
  N = 8 * n
  sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  args = (sd(N, hidden), jax.ShapeDtypeStruct((N, K), jnp.int32), sd(N, K), sd(experts, hidden, I),
          sd(experts, hidden, I), sd(experts, I, hidden))
  ep_fn = ExpertParallel(tiny_model.mesh(8 // ep, ep), impl="dense").routed_experts
  compiled = jax.jit(ep_fn, static_argnums=0).lower(cfg, *args).compile(compiler_options=FAST_COMPILE)
  return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_flat_in_expert_parallelism():
  bounded = [_temp_bytes(2.0, ep) for ep in (2, 8)]
  worst = [_temp_bytes(0.0, ep) for ep in (2, 8)]
  print("temp bytes, ep=2 -> 8: bounded", bounded, "worst case", worst)
  assert bounded[1] / bounded[0] < 1.5
  assert worst[1] / worst[0] > 2.0
