"""Expert-parallel dispatch on simulated CPU devices: traffic with and without node-limited routing,
and an MoE layer's forward+backward time and all-to-all bytes for ep in {1, 2, 4, 8}.

    python -m dsv3.bench.ep            # 8 simulated CPU devices (common.use_cpu_devices)

CPU numbers show correctness and traffic, not speed: the CPU transport pads every destination to the
worst case and all "devices" share the same cores. What carries over to GPUs is the byte count:
'payload' is what the ragged GPU transport moves between devices (rows to other shards, dispatch +
combine), 'dense' what the padded CPU transport moves.

Node-limited routing (report §3.2.2): with n_group equal to the number of expert shards (nodes) and
topk_group = M, group-limited routing sends each token to at most M shards, and the dispatch sends a
token once per shard, so traffic per token is bounded by M rows each way however large k is.

Inter-node traffic at DeepSeek-V3's shapes (`node_traffic_table`, accounting in numpy from dsv3.nn.moe.route on
random inputs, no devices needed): EP 8-64 over nodes of --node_size GPUs, with and without node-limited
routing, the flat dispatch (a row per shard) against the two-hop one (model.ep_node_size: a row per node
over the inter-node link, then a row per shard inside the node), BF16 or FP8 dispatch rows (the combine is
BF16). The report's bound: at most topk_group = 4 nodes a token, so at most 4 inter-node rows each way.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dsv3.bench import common
from dsv3.bench.ep_traffic import alltoall_bytes, dispatch_traffic, traffic_bytes
from dsv3.config import ModelConfig, deepseek_v3_671b
from dsv3.nn import moe
from dsv3.parallel import sharding
from dsv3.parallel.expert_parallel import ExpertParallel


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.bench.ep`."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("tokens", 1024, "tokens per step (global)", **fv)
  flags.DEFINE_integer("hidden", 64, "hidden size", **fv)
  flags.DEFINE_integer("experts", 32, "routed experts", **fv)
  flags.DEFINE_integer("topk", 8, "experts per token", **fv)
  flags.DEFINE_integer("iters", 3, "timed steps per setting", **fv)
  flags.DEFINE_integer("node_size", 8, "GPUs per node for the inter-node traffic table (H800 nodes: 8)", **fv)
  flags.DEFINE_list("node_eps", ["8", "16", "32", "64"], "expert-parallel sizes for the inter-node table", **fv)
  flags.DEFINE_integer("node_tokens", 4096, "routed tokens (global) sampled for the inter-node table", **fv)


def _cfg(args, n_group=1, topk_group=1, **kw) -> ModelConfig:
  return ModelConfig(hidden_size=args.hidden, moe_intermediate_size=args.hidden // 2,
                     n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=n_group,
                     topk_group=topk_group, **kw).validate()


def _inputs(args, cfg: ModelConfig, seed=0):
  r = jax.random.split(jax.random.key(seed), 5)
  H, E, I = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
  x = jax.random.normal(r[0], (args.tokens, H))
  kernel = jax.random.normal(r[1], (H, E)) / np.sqrt(H)
  ws = [jax.random.normal(k, s) * 0.1 for k, s in zip(r[2:], ((E, H, I), (E, H, I), (E, I, H)))]
  return x, kernel, ws


def node_limited_table(args, ep: int = 8):
  """Bytes per token crossing devices (dispatch + combine, fp32 rows) with and without the limit. args: the
  command line's values (define_flags' names, e.g. from common.flag_args)."""
  rows = []
  settings = [("none (n_group=1)", 1, 1)] + [(f"n_group={ep}, topk_group={m}", ep, m) for m in (4, 2, 1)
                                               if m * (args.experts // ep) >= args.topk]
  for name, g, m in settings:
    cfg = _cfg(args, g, m)
    x, kernel, _ = _inputs(args, cfg)
    idx, _, _ = moe.route(cfg, x, kernel, jnp.zeros((cfg.n_routed_experts,)))
    b = alltoall_bytes(idx, cfg.n_routed_experts, ep, cfg.hidden_size, 4, token_shards=ep)
    shards = np.asarray(idx) // (cfg.n_routed_experts // ep)
    reach = max(len(set(r)) for r in shards.tolist())
    rows.append((name, reach, b["units"] / len(idx), b["payload"] / len(idx)))
  print(f"\nNode-limited routing: ep={ep} shards, {args.experts} experts, k={args.topk}, "
        f"hidden={args.hidden}, fp32 rows; bytes = dispatch + combine to other shards")
  print(f"{'routing':<26}{'max shards/token':>18}{'rows/token':>12}{'bytes/token':>13}")
  for name, reach, units, bytes_ in rows:
    print(f"{name:<26}{reach:>18}{units:>12.2f}{bytes_:>13.1f}")
  return rows


def node_traffic_table(args):
  """Per token, rows and KiB crossing nodes and moving inside nodes, DeepSeek-V3 shapes, one markdown table."""
  base = deepseek_v3_671b()
  H, E, L, N = base.hidden_size, base.n_routed_experts, args.node_size, args.node_tokens
  r = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(r[0], (N, H))
  kernel = jax.random.normal(r[1], (H, E)) / np.sqrt(H)
  routings = [(f"n_group={base.n_group}, topk_group={base.topk_group}", base),
              ("no limit (n_group=1)", base.replace(n_group=1, topk_group=1))]
  routes = {name: np.asarray(moe.route(cfg, x, kernel, jnp.zeros((E,)))[0]) for name, cfg in routings}
  kib = lambda b: b / N / 1024
  print(f"\nInter- and intra-node traffic per token (CPU accounting, dsv3.nn.moe.route on {N} random tokens): "
        f"hidden {H}, {E} experts, top-{base.num_experts_per_tok}, {L} GPUs per node; KiB per token; dispatch "
        f"rows BF16 or FP8 (E4M3 + a 4-byte scale per 128), combine BF16; bound = report §3.2.2 (<= "
        f"topk_group nodes a token)\n")
  print("| EP | nodes | routing | dispatch | inter-node rows/token (max) | inter-node dispatch BF16 | FP8 | "
        "inter-node combine | intra-node dispatch BF16 | FP8 | intra-node combine | bound (rows) |")
  print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
  rows = []
  for ep in map(int, args.node_eps):
    for name, cfg in routings:
      for two_hop in ((False, True) if ep > L else (False,)):       # one node: two-hop is the flat dispatch
        t = dispatch_traffic(routes[name], E, ep, L, two_hop=two_hop)
        bf16, fp8 = (traffic_bytes(t, H, dispatch=p) for p in ("bf16", "fp8"))
        bound = cfg.topk_group if cfg.n_group > 1 else None
        worst = int(t["token_inter_node"].max())
        if two_hop and bound is not None:
          assert worst <= bound, f"a token crossed {worst} times; node-limited routing allows {bound}"
        rows.append((ep, ep // L, name, "two-hop" if two_hop else "flat", t, bf16, fp8))
        print(f"| {ep} | {max(1, ep // L)} | {name} | {'two-hop' if two_hop else 'flat'} | "
              f"{t['inter_node'] / N:.2f} ({worst}) | {kib(bf16['dispatch_inter']):.1f} | "
              f"{kib(fp8['dispatch_inter']):.1f} | {kib(bf16['combine_inter']):.1f} | "
              f"{kib(bf16['dispatch_intra']):.1f} | {kib(fp8['dispatch_intra']):.1f} | "
              f"{kib(bf16['combine_intra']):.1f} | {'<= %d' % bound if bound else '-'} |")
  return rows


def ep_table(args, devices: int = 8):
  """MoE layer forward+backward time and all-to-all bytes for ep in {1, 2, 4, 8}, data = devices / ep."""
  cfg = _cfg(args, 4, 2)
  x, kernel, ws = _inputs(args, cfg)
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
    for _ in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x, w, ws))
      times.append(time.perf_counter() - t0)
    b = alltoall_bytes(idx, cfg.n_routed_experts, ep, cfg.hidden_size, 4, dense=True, token_shards=devices)
    # Backward moves the same rows again (the transpose of each all-to-all), hence ×2 for a train step.
    rows.append((ep, devices // ep, layer.transport(), 1e3 * float(np.median(times)),
                 2 * b["payload"] / 2**20, 2 * b["dense"] / 2**20))
  print(f"\nMoE layer forward+backward on {devices} CPU devices ({args.tokens} tokens, hidden {args.hidden}, "
        f"{cfg.n_routed_experts} experts, k={cfg.num_experts_per_tok}, n_group=4, topk_group=2). "
        f"CPU: correctness, not speed.")
  print(f"{'ep':>3}{'data':>6}{'transport':>11}{'step ms':>10}{'a2a payload MiB':>17}{'a2a dense MiB':>15}")
  for ep, dp, transport, ms, payload, dense in rows:
    print(f"{ep:>3}{dp:>6}{transport:>11}{ms:>10.1f}{payload:>17.3f}{dense:>15.3f}")
  return rows


def main(argv):
  del argv
  common.use_cpu_devices(8)
  jax.config.update("jax_default_matmul_precision", "highest")
  print(f"backend: {jax.default_backend()}, {jax.device_count()} devices")
  args = common.flag_args(define_flags)
  node_limited_table(args)
  node_traffic_table(args)
  ep_table(args, min(8, jax.device_count()))


if __name__ == "__main__":
  define_flags()
  common.run(main)
