"""The two-hop, node-aware expert-parallel dispatch (model.ep_node_size) on 8 simulated CPU devices.

Expert-axis device d is on node d // ep_node_size. Each token crosses to another node once per node it needs
(to the device with its own in-node index there), which forwards it to the node's shards; the combine sums
a node's rows there before the one return. Checked here: values and gradients equal the one-device MoE on
both transports (skewed and balanced routing, worst-case and default buffers); the units each hop sends,
as the shard body counts them, equal `dispatch_traffic`'s accounting; node-limited routing bounds each
token's inter-node units; overflow drops the assignments a numpy model of the two hops predicts, on both
transports alike; the FP8 dispatch payload; the errors for a bad node size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3.bench.ep_traffic import alltoall_bytes, dispatch_traffic, row_bytes, traffic_bytes
from dsv3.config import ConfigError
from dsv3.kernels import fp8
from dsv3.nn import moe
from dsv3.parallel.expert_parallel import ExpertParallel, dispatch_plan
from test_expert_parallel import (E, FAST_COMPILE, H, KCFG, N, TOL, _emulated_ragged_all_to_all, _inputs,
                                  _maxdiff)


def _value_and_grads(fn, cfg, x, idx, w, ws):
  """(y, dropped, grads wrt x, w and the experts, stats or None) of a sin-weighted loss on fn's output."""
  def f(x, w, ws):
    out = fn(cfg, x, idx, w, *ws)
    return jnp.mean(jnp.sin(out[0]) * jnp.arange(H)), (out[0], out[1], out[3] if len(out) > 3 else None)
  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)).lower(x, w, ws).compile(
      compiler_options=FAST_COMPILE)
  (_, (y, dropped, stats)), grads = compiled(x, w, ws)
  return y, int(dropped), grads, stats


def _with_stats(ep):
  return lambda *args: ep.routed_experts(*args, stats=True)


CASES = [("dense", (1, 8), 2, True, 0.0), ("dense", (1, 8), 4, False, KCFG.ep_buffer_factor),
         ("dense", (2, 4), 2, False, KCFG.ep_buffer_factor), ("ragged", (1, 8), 2, False, KCFG.ep_buffer_factor),
         ("ragged", (2, 4), 2, True, 0.0), ("ragged", (1, 8), 4, False, 0.0)]


@pytest.mark.parametrize("impl,mesh_shape,node,skewed,factor", CASES,
                         ids=[f"{i}-data{m[0]}_expert{m[1]}-node{n}-{'skewed' if s else 'balanced'}-f{f}"
                              for i, m, n, s, f in CASES])
def test_node_dispatch_matches_local(monkeypatch, make_mesh, impl, mesh_shape, node, skewed, factor):
  """Values and gradients equal one device; each hop's units equal the accounting (nothing drops here)."""
  if impl == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = KCFG.replace(ep_buffer_factor=factor, ep_node_size=node)
  x, idx, w, ws = _inputs(skewed)
  y0, d0, g0, _ = _value_and_grads(moe.routed_experts_local, cfg, x, idx, w, ws)
  ep = ExpertParallel(make_mesh(*mesh_shape), impl=impl)
  assert len(dispatch_plan(cfg, N // 8, mesh_shape[1], impl)["hops"]) == 2
  y, d, g, stats = _value_and_grads(_with_stats(ep), cfg, x, idx, w, ws)
  assert d == d0 == 0
  assert _maxdiff(y, y0) <= TOL and _maxdiff(g, g0) <= TOL, (_maxdiff(y, y0), _maxdiff(g, g0))
  traffic = dispatch_traffic(idx, E, mesh_shape[1], node, two_hop=True, token_shards=8)
  assert list(np.asarray(stats["hop_units"])) == traffic["hop_units"]
  np.testing.assert_array_equal(stats["token_remote"], traffic["token_inter_node"])
  assert traffic["inter_node"] > 0 and traffic["intra_node"] > 0


def test_node_limited_routing_bounds_inter_node_units(make_mesh):
  """n_group = 4 nodes of 2 devices, topk_group = M = 2: a token's hop-1 units leave its node at most M times,
  minus one if its own node is among its M; without the limit some token exceeds that. Counted on the
  actual dispatch (the shard body's per-token stat) and equal to the accounting."""
  cfg = KCFG.replace(n_group=4, topk_group=2, ep_node_size=2)
  x, _, w, ws = _inputs(skewed=False)
  kernel = jax.random.normal(jax.random.key(5), (H, E))
  ep = ExpertParallel(make_mesh(1, 8), impl="dense")
  run = jax.jit(lambda idx: ep.routed_experts(cfg, x, idx, w, *ws, stats=True)[3])
  own_node = (np.arange(N) // (N // 8)) // 2
  for limited in (True, False):
    idx, _, _ = moe.route(cfg if limited else cfg.replace(n_group=1, topk_group=1), x, kernel, jnp.zeros((E,)))
    nodes = np.asarray(idx) // (E // 4)
    own_in = (nodes == own_node[:, None]).any(1)
    inter = np.asarray(run(idx)["token_remote"])
    np.testing.assert_array_equal(inter, dispatch_traffic(idx, E, 8, 2, two_hop=True)["token_inter_node"])
    assert (inter <= cfg.topk_group - own_in).all() == limited, inter
  assert (inter > 0).any()


def _reference_keep(cfg, idx, data, ep, node):
  """numpy model of the two hops' bounded buffers: which (token, expert) assignments survive.

  Hop 1: source s's units to node q (token order) keep the first block1, landing on forwarder q·L + s % L
  in source-node order. Hop 2: a forwarder's received units to each shard of its node (arrival order) keep
  the first block2, landing in forwarder order. The expansion keeps the first `expand` (unit, expert) rows.
  """
  idx = np.asarray(idx)
  Ntot, k = idx.shape
  n, e_local, L = Ntot // (data * ep), E // ep, node
  plan = dispatch_plan(cfg, n, ep, "dense")
  c1, c2 = plan["hops"][0]["block"], plan["hops"][1]["block"]
  keep = np.zeros(idx.shape, bool)
  for g in range(data):
    arrived1 = {f: [] for f in range(ep)}           # forwarder -> tokens, arrival order
    for q in range(ep // L):                        # source node
      for l in range(L):
        s = q * L + l
        for dq in range(ep // L):
          toks = [t for t in range((g * ep + s) * n, (g * ep + s + 1) * n)
                  if (idx[t] // (e_local * L) == dq).any()]
          arrived1[dq * L + l] += toks[:c1]
    for d in range(ep):
      rows = []                                     # (token, slot) into d's expansion, arrival order
      for l in range(L):
        f = (d // L) * L + l
        units = [t for t in arrived1[f] if (idx[t] // e_local == d).any()]
        rows += [(t, j) for t in units[:c2] for j in range(k) if idx[t, j] // e_local == d]
      for t, j in rows[:plan["expand"]]:
        keep[t, j] = True
  return keep


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_overflow_drops_exactly(monkeypatch, make_mesh, impl):
  """Skewed routing with small buffers drops at hop 1, hop 2 and the expansion: exactly the numpy model's
  assignments, the kept ones equal the one-device MoE on them alone, and both transports agree."""
  if impl == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = KCFG.replace(ep_buffer_factor=1.0, ep_node_size=2)
  x, idx, w, ws = _inputs(skewed=True)
  keep = _reference_keep(cfg, idx, 1, 8, 2)
  ep = ExpertParallel(make_mesh(1, 8), impl=impl)
  y, d, g, _ = _value_and_grads(ep.routed_experts, cfg, x, idx, w, ws)
  assert d == int((~keep).sum()) > 0
  y0, _, g0, _ = _value_and_grads(moe.routed_experts_local, cfg, x, idx, jnp.where(keep, w, 0.0), ws)
  assert _maxdiff(y, y0) <= TOL
  assert _maxdiff((g[0], g[2]), (g0[0], g0[2])) <= TOL          # w's gradient differs where dropped
  assert _maxdiff(jnp.where(keep, g[1], 0), jnp.where(keep, g0[1], 0)) <= TOL


def test_fp8_dispatch(make_mesh):
  """ep_fp8_dispatch: the experts see each token row quantized 1x128 (E4M3), so the result equals one device
  on the quantized rows; the gradient is straight-through (that run's gradient wrt its quantized input),
  and the whole stays within E4M3's error of the unquantized dispatch."""
  cfg = KCFG.replace(ep_node_size=2)
  x, idx, w, ws = _inputs(skewed=False)
  ep = ExpertParallel(make_mesh(2, 4), impl="dense")
  y, d, g, _ = _value_and_grads(ep.routed_experts, cfg.replace(ep_fp8_dispatch=True), x, idx, w, ws)
  xq = fp8.dequantize_tiles(*fp8.quantize_tiles(x))
  assert 0 < _maxdiff(xq, x)
  y0, _, g0, _ = _value_and_grads(moe.routed_experts_local, cfg, xq, idx, w, ws)
  assert d == 0 and _maxdiff(y, y0) <= TOL and _maxdiff(g, g0) <= TOL, (_maxdiff(y, y0), _maxdiff(g, g0))
  y1, _, _, _ = _value_and_grads(ep.routed_experts, cfg, x, idx, w, ws)
  assert _maxdiff(y, y1) <= 0.07 * float(jnp.max(jnp.abs(y1)))     # E4M3: 3 mantissa bits, half-ulp 1/16


def test_bad_node_size(make_mesh):
  with pytest.raises(ConfigError, match="model.ep_node_size"):
    KCFG.replace(ep_node_size=-1).validate()
  x, idx, w, ws = _inputs(skewed=False)
  ep = ExpertParallel(make_mesh(1, 8))
  with pytest.raises(ValueError, match=r"model.ep_node_size=3 does not divide mesh.expert=8"):
    ep.routed_experts(KCFG.replace(ep_node_size=3), x, idx, w, *ws)
  for flat in (0, 1, 8, 16):                                     # one hop over the whole axis
    assert [h["D"] for h in dispatch_plan(KCFG.replace(ep_node_size=flat), 8, 8, "dense")["hops"]] == [8]


def test_traffic_accounting():
  """Flat: every remote unit is one hop's, split by link; two-hop: a row per remote node over the boundary,
  the shard rows inside; row sizes on the wire."""
  _, idx, _, _ = _inputs(skewed=False)
  flat, two = (dispatch_traffic(idx, E, 8, 2, two_hop=t) for t in (False, True))
  assert flat["hop_units"] == [flat["inter_node"] + flat["intra_node"]]
  assert flat["hop_units"] == [alltoall_bytes(idx, E, 8, H)["remote_units"]]
  assert two["hop_units"] == [two["inter_node"], two["intra_node"]] and two["inter_node"] < flat["inter_node"]
  one_node = dispatch_traffic(idx, E, 8, 0, two_hop=True)                 # two-hop on one node: the flat dispatch
  assert one_node["inter_node"] == 0 and one_node["hop_units"] == flat["hop_units"]
  assert (row_bytes(7168, "bf16"), row_bytes(7168, "fp8"), row_bytes(100, "fp32")) == (14336, 7168 + 56 * 4, 400)
  b = traffic_bytes(two, 7168, dispatch="fp8")
  assert b["dispatch_inter"] == two["inter_node"] * 7392 and b["combine_inter"] == two["inter_node"] * 14336
