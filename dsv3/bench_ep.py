"""Expert-parallel dispatch on simulated CPU devices: traffic with and without node-limited routing,
and an MoE layer's forward+backward time and all-to-all bytes for ep in {1, 2, 4, 8}.

    python -m dsv3.bench_ep            # sets 8 simulated CPU devices itself

CPU numbers show correctness and traffic, not speed: the CPU transport pads every destination to the
worst case and all "devices" share the same cores. What carries over to GPUs is the byte count:
'payload' is what the ragged GPU transport moves between devices (rows to other shards, dispatch +
combine), 'dense' what the padded CPU transport moves.

Node-limited routing (report §3.2.2): with n_group equal to the number of expert shards (nodes) and
topk_group = M, group-limited routing sends each token to at most M shards, and the dispatch sends a
token once per shard, so traffic per token is bounded by M rows each way however large k is.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dsv3 import moe, sharding  # noqa: E402
from dsv3.config import ModelConfig  # noqa: E402
from dsv3.expert_parallel import ExpertParallel, alltoall_bytes  # noqa: E402

_TOKENS = flags.DEFINE_integer("tokens", 1024, "tokens per step (global)")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "hidden size")
_EXPERTS = flags.DEFINE_integer("experts", 32, "routed experts")
_TOPK = flags.DEFINE_integer("topk", 8, "experts per token")
_ITERS = flags.DEFINE_integer("iters", 3, "timed steps per setting")


def _cfg(n_group=1, topk_group=1, **kw) -> ModelConfig:
  return ModelConfig(hidden_size=_HIDDEN.value, moe_intermediate_size=_HIDDEN.value // 2,
                     n_routed_experts=_EXPERTS.value, num_experts_per_tok=_TOPK.value, n_group=n_group,
                     topk_group=topk_group, **kw).validate()


def _inputs(cfg: ModelConfig, seed=0):
  r = jax.random.split(jax.random.key(seed), 5)
  H, E, I = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  x = jax.random.normal(r[0], (_TOKENS.value, H))
  kernel = jax.random.normal(r[1], (H, E)) / np.sqrt(H)
  ws = [jax.random.normal(k, s) * 0.1 for k, s in zip(r[2:], ((E, H, I), (E, H, I), (E, I, H)))]
  return x, kernel, ws


def node_limited_table(ep: int = 8):
  """Bytes per token crossing devices (dispatch + combine, fp32 rows) with and without the limit."""
  rows = []
  settings = [("none (n_group=1)", 1, 1)] + [(f"n_group={ep}, topk_group={m}", ep, m) for m in (4, 2, 1)
                                               if m * (_EXPERTS.value // ep) >= _TOPK.value]
  for name, g, m in settings:
    cfg = _cfg(g, m)
    x, kernel, _ = _inputs(cfg)
    idx, _, _ = moe.route(cfg, x, kernel, jnp.zeros((cfg.n_routed_experts,)))
    b = alltoall_bytes(idx, cfg.n_routed_experts, ep, cfg.hidden_size, 4, token_shards=ep)
    shards = np.asarray(idx) // (cfg.n_routed_experts // ep)
    reach = max(len(set(r)) for r in shards.tolist())
    rows.append((name, reach, b["units"] / len(idx), b["payload"] / len(idx)))
  print(f"\nNode-limited routing: ep={ep} shards, {_EXPERTS.value} experts, k={_TOPK.value}, "
        f"hidden={_HIDDEN.value}, fp32 rows; bytes = dispatch + combine to other shards")
  print(f"{'routing':<26}{'max shards/token':>18}{'rows/token':>12}{'bytes/token':>13}")
  for name, reach, units, bytes_ in rows:
    print(f"{name:<26}{reach:>18}{units:>12.2f}{bytes_:>13.1f}")
  return rows


def ep_table(devices: int = 8):
  """MoE layer forward+backward time and all-to-all bytes for ep in {1, 2, 4, 8}, data = devices / ep."""
  cfg = _cfg(4, 2)
  x, kernel, ws = _inputs(cfg)
  idx, w, _ = moe.route(cfg, x, kernel, jnp.zeros((cfg.n_routed_experts,)))
  rows = []
  for ep in (1, 2, 4, 8):
    if ep > devices or cfg.n_routed_experts % ep:
      continue
    mesh = sharding.make_mesh(dict(data=devices // ep, expert=ep, pipeline=1), jax.devices()[:devices])
    layer = ExpertParallel(mesh)

    def loss(x, w, ws):
      y = layer.routed_experts(cfg, x, idx, w, *ws)[0]
      return jnp.mean(jnp.square(y))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(x, w, ws))                          # compile
    times = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x, w, ws))
      times.append(time.perf_counter() - t0)
    b = alltoall_bytes(idx, cfg.n_routed_experts, ep, cfg.hidden_size, 4, dense=True, token_shards=devices)
    # Backward moves the same rows again (the transpose of each all-to-all), hence ×2 for a train step.
    rows.append((ep, devices // ep, layer.transport(), 1e3 * float(np.median(times)),
                 2 * b["payload"] / 2**20, 2 * b["dense"] / 2**20))
  print(f"\nMoE layer forward+backward on {devices} CPU devices ({_TOKENS.value} tokens, hidden {_HIDDEN.value}, "
        f"{cfg.n_routed_experts} experts, k={cfg.num_experts_per_tok}, n_group=4, topk_group=2). "
        f"CPU: correctness, not speed.")
  print(f"{'ep':>3}{'data':>6}{'transport':>11}{'step ms':>10}{'a2a payload MiB':>17}{'a2a dense MiB':>15}")
  for ep, dp, transport, ms, payload, dense in rows:
    print(f"{ep:>3}{dp:>6}{transport:>11}{ms:>10.1f}{payload:>17.3f}{dense:>15.3f}")
  return rows


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", "highest")
  print(f"backend: {jax.default_backend()}, {jax.device_count()} devices")
  node_limited_table()
  ep_table(min(8, jax.device_count()))


if __name__ == "__main__":
  app.run(main)
