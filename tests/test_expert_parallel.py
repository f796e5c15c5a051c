"""Expert parallelism on 8 simulated CPU devices equals the one-device model.

The core check: for every (data, expert) split of 8 devices, the training forward (logits, MTP logits),
a loss, its gradients wrt every parameter and the per-expert load match the model run without
expert parallelism, in fp32, with the default bounded buffers (nothing drops) and with worst-case ones
(ep_buffer_factor=0). Then the dispatch itself at the `routed_experts` level: the dense (CPU)
transport under skewed routing (every token to one expert: the worst-case buffers), the ragged
transport's offset bookkeeping (with `ragged_all_to_all` emulated, since XLA:CPU has none), the
capacity factor, and the clear errors. Overflowing bounded buffers: tests/test_ep_buffers.py.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_model

from dsv3 import model
from dsv3.bench.ep_traffic import alltoall_bytes, dispatch_units
from dsv3.nn import moe
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# Every layer MoE; 16 experts, 4 per token, so each expert rank of every mesh below holds several experts.
CFG = tiny_model.even_config(first_k_dense_replace=0, n_routed_experts=16, num_experts_per_tok=4, remat="none")
B, T = 8, 16
TOL = 1e-5
# XLA:CPU's LLVM optimisations triple the compile time of these small programs; results are unaffected.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def _jit_run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _variables(cfg):
  """Model init, with a sharper router and a random correction bias so routing is clearly uneven."""
  variables = model.init(cfg, jax.random.key(0))
  def sharpen(path, leaf):
    name = sharding.path_str(path)
    key = jax.random.fold_in(jax.random.key(1), zlib.crc32(name.encode()))
    if name.endswith("/gate"):
      return jax.random.normal(key, leaf.shape) * 0.5
    if name.endswith("e_score_correction_bias"):
      return jax.random.normal(key, leaf.shape) * 0.1
    return leaf
  return jax.tree_util.tree_map_with_path(sharpen, variables)


def _loss(cfg, ep, params, routing, tokens):
  out = model.forward_train(cfg, {"params": params, "routing": routing}, tokens, expert_parallel=ep)
  ce = lambda logits, targets: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  loss = ce(out["logits"][:, :-1], tokens[:, 1:]) + 0.3 * ce(out["mtp_logits"][0][:, :-2], tokens[:, 2:])
  balance = jnp.sum(out["aux"]["balance_loss"]) + sum(jnp.sum(a["balance_loss"]) for a in out["mtp_aux"])
  load = jnp.concatenate([out["aux"]["load"], *[a["load"][None] for a in out["mtp_aux"]]])
  dropped = jnp.sum(out["aux"]["dropped"]) + sum(a["dropped"] for a in out["mtp_aux"])
  return loss + 1e-4 * balance, (out["logits"], out["mtp_logits"], load, dropped)


@functools.lru_cache(maxsize=None)
def _run(mesh_shape, factor=CFG.ep_buffer_factor, node_size=0):
  """(loss, logits, mtp_logits, load, grads, dropped) on one device (None) or on a (data, expert) mesh."""
  cfg = CFG.replace(ep_buffer_factor=factor, ep_node_size=node_size)
  variables = _variables(CFG)
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, CFG.vocab_size, jnp.int32)
  ep = None
  if mesh_shape is not None:
    mesh = tiny_model.mesh(*mesh_shape)
    ep = ExpertParallel(mesh)
    variables = jax.device_put(variables, sharding.param_shardings(mesh, variables))
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  fn = jax.value_and_grad(functools.partial(_loss, cfg, ep), has_aux=True)
  (loss, (logits, mtp_logits, load, dropped)), grads = _jit_run(fn, variables["params"], variables["routing"],
                                                                tokens)
  return jax.device_get((loss, logits, mtp_logits, load, grads, dropped))


def _maxdiff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The two-hop, node-aware dispatch (model.ep_node_size: devices per node) too; tests/test_node_dispatch.py
# checks it at the routed-experts level.
SETTINGS = ([(m, CFG.ep_buffer_factor, 0) for m in MESHES] + [((2, 4), 0.0, 0)]
            + [((2, 4), CFG.ep_buffer_factor, 2), ((1, 8), CFG.ep_buffer_factor, 4)])


@pytest.mark.parametrize("mesh_shape,factor,node_size", SETTINGS,
                         ids=[f"data{d}_expert{e}" for d, e in MESHES]
                         + ["data2_expert4_worst_case", "data2_expert4_node2", "data1_expert8_node4"])
def test_model_matches_one_device(mesh_shape, factor, node_size):
  ref, got = _run(None), _run(mesh_shape, factor, node_size)
  assert int(got[5]) == 0, "nothing may drop for the one-device equivalence"
  diffs = dict(loss=_maxdiff(ref[0], got[0]), logits=_maxdiff(ref[1], got[1]), mtp_logits=_maxdiff(ref[2], got[2]),
               load=_maxdiff(ref[3], got[3]), grads=_maxdiff(ref[4], got[4]))
  print(mesh_shape, node_size, diffs)
  assert np.asarray(ref[3]).std() > 0, "the routing should be uneven for this check to mean anything"
  for name, d in diffs.items():
    assert d <= TOL, f"{name} differs by {d} on mesh (data, expert) = {mesh_shape}, ep_node_size={node_size}"
  assert jax.tree.structure(ref[4]) == jax.tree.structure(got[4])


# ---------------------------------------------------------------------------------------------------
# The dispatch itself.
# ---------------------------------------------------------------------------------------------------
N, H, E, I, K = 64, 16, 16, 8, 4
KCFG = CFG.replace(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)


def _inputs(skewed):
  r = jax.random.split(jax.random.key(3), 6)
  x = jax.random.normal(r[0], (N, H))
  ws = [jax.random.normal(r[i], s) * 0.3 for i, s in zip((1, 2, 3), ((E, H, I), (E, H, I), (E, I, H)))]
  if skewed:    # every token's first choice is expert 0, the rest on the last shard: worst-case buffers
    idx = jnp.concatenate([jnp.zeros((N, 1), jnp.int32),
                           jnp.broadcast_to(jnp.arange(E - K + 1, E, dtype=jnp.int32), (N, K - 1))], 1)
  else:
    idx = jax.vmap(lambda key: jax.random.permutation(key, E)[:K])(jax.random.split(r[4], N)).astype(jnp.int32)
  return x, idx, jax.random.uniform(r[5], (N, K)), ws


def _value_and_grads(fn, cfg, x, idx, w, ws):
  def f(x, w, ws):
    y, dropped = fn(cfg, x, idx, w, *ws)[:2]
    return jnp.mean(jnp.sin(y) * jnp.arange(H)), (y, dropped)
  (_, (y, dropped)), grads = _jit_run(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True), x, w, ws)
  return y, int(dropped), grads


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, axis_index_groups=None):
  """ragged_all_to_all's documented semantics from all_gather + gathers (XLA:CPU has no ragged a2a)."""
  del recv_sizes, axis_index_groups
  me = jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)                            # [src, rows, ...]
  in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)[:, me] for a in
                            (input_offsets, send_sizes, output_offsets))  # per source, for me
  r = jnp.arange(output.shape[0])
  inside = (r[None] >= out_off[:, None]) & (r[None] < (out_off + sizes)[:, None])
  rows = jnp.clip(in_off[:, None] + r[None] - out_off[:, None], 0, operand.shape[0] - 1)
  vals = ops[jnp.arange(ops.shape[0])[:, None], rows]
  mask = inside.reshape(inside.shape + (1,) * (operand.ndim - 1))
  return jnp.where(mask.any(0), jnp.sum(jnp.where(mask, vals, 0), 0), output)


@pytest.mark.parametrize("impl,mesh_shape,skewed", [("dense", (1, 8), True), ("dense", (2, 4), False),
                                                    ("ragged", (2, 4), True), ("ragged", (1, 8), False)])
def test_dispatch_matches_local(monkeypatch, impl, mesh_shape, skewed):
  """Skewed routing needs the worst-case buffers (ep_buffer_factor=0); random routing fits the default."""
  if impl == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  cfg = KCFG.replace(ep_buffer_factor=0.0) if skewed else KCFG
  x, idx, w, ws = _inputs(skewed)
  y0, d0, g0 = _value_and_grads(moe.routed_experts_local, cfg, x, idx, w, ws)
  mesh = tiny_model.mesh(*mesh_shape)
  ep = ExpertParallel(mesh, impl=impl)
  assert ep.transport() == impl
  y, d, g = _value_and_grads(ep.routed_experts, cfg, x, idx, w, ws)
  assert d == d0 == 0
  assert _maxdiff(y, y0) <= TOL and _maxdiff(g, g0) <= TOL, (_maxdiff(y, y0), _maxdiff(g, g0))


def test_capacity_factor_drops_like_local():
  """data=1, worst-case buffers: one group holds every token, so capacity and token-order dropping equal
  the local path."""
  cfg = KCFG.replace(capacity_factor=1.0, ep_buffer_factor=0.0)
  x, idx, w, ws = _inputs(skewed=True)
  y0, d0, _ = _value_and_grads(moe.routed_experts_local, cfg, x, idx, w, ws)
  ep = ExpertParallel(tiny_model.mesh(data=1, expert=8), impl="dense")
  y, d, _ = _value_and_grads(ep.routed_experts, cfg, x, idx, w, ws)
  capacity = N * K // E                               # 16 per expert; expert 0 gets all N = 64 tokens, ...
  assert d0 == d == 4 * (N - capacity)                # ... and so do experts 13, 14, 15
  assert _maxdiff(y, y0) <= TOL


def test_token_count_must_divide():
  x, idx, w, ws = _inputs(skewed=False)
  ep = ExpertParallel(tiny_model.mesh(data=2, expert=4))
  with pytest.raises(ValueError, match="multiple of mesh.data × mesh.expert = 8"):
    ep.routed_experts(KCFG, x[:60], idx[:60], w[:60], *ws)
  with pytest.raises(ValueError, match="impl"):
    ExpertParallel(ep.mesh, impl="nccl")


def test_node_limited_routing_bounds_traffic():
  """n_group = 4 shards, topk_group = 1: each token reaches one shard, so one row per token each way."""
  cfg = KCFG.replace(n_group=4, topk_group=1).validate()
  x, _, _, _ = _inputs(skewed=False)
  kernel = jax.random.normal(jax.random.key(5), (H, E))
  idx, _, _ = moe.route(cfg, x, kernel, jnp.zeros((E,)))
  assert dispatch_units(idx, E, 4) == N
  free, _, _ = moe.route(cfg.replace(n_group=1, topk_group=1), x, kernel, jnp.zeros((E,)))
  assert dispatch_units(free, E, 4) > N
  limited, unlimited = (alltoall_bytes(i, E, 4, H, dense=True) for i in (idx, free))
  assert limited["payload"] <= 2 * N * H * 4 < limited["dense"]
  assert limited["payload"] < unlimited["payload"]
