"""TFLOP/s of the MoE grouped GEMM: XLA ragged_dot (BF16) vs the Triton kernel (BF16 and FP8).

  python -m dsv3.bench_grouped_gemm                # GPU: the expert-shape grid; CPU: a tiny smoke list
  python -m dsv3.bench_grouped_gemm --iters=20 --full

Shapes follow one EP rank of DeepSeek-V3-style MoE layers: `tokens` routed rows (already sorted by expert)
times [hidden -> moe_intermediate] for `experts` local experts, rows spread over experts with a skewed
multinomial draw (real routing is never uniform). FLOPs = 2 * tokens * hidden * intermediate. The FP8
column includes the on-the-fly 1x128 / 128x128 quantization of both operands, as a training step pays it.
"""
from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import fp8 as fp8_lib
from dsv3 import grouped_gemm

GPU_SHAPES = list(itertools.product((4096, 8192, 32768), (2048, 7168), (1408, 2048), (8, 64)))
CPU_SHAPES = [(256, 256, 128, 4), (512, 512, 256, 8)]


def _group_sizes(tokens, experts, rng):
  p = rng.dirichlet(np.full(experts, 2.0))
  return jnp.asarray(rng.multinomial(tokens, p), jnp.int32)


def _time(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)      # compile + warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--full", action="store_true", help="the GPU shape grid even on CPU (slow)")
  args = parser.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  shapes = GPU_SHAPES if on_gpu or args.full else CPU_SHAPES
  if on_gpu:
    impls = {
        "ragged_dot bf16": jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g)),
        "kernel bf16": jax.jit(lambda x, w, g: grouped_gemm.triton_ragged_dot(x, w, g)),
        "kernel fp8": jax.jit(lambda x, w, g: grouped_gemm.triton_ragged_dot(x, w, g, fp8=True)),
    }
  else:
    print(f"backend: {jax.default_backend()} (no GPU: Triton kernels skipped; timing XLA ragged_dot "
          "and the FP8 emulation on tiny shapes, which says nothing about GPU speed)")
    impls = {
        "ragged_dot bf16": jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g)),
        "fp8 emulated": jax.jit(lambda x, w, g: fp8_lib.ragged_dot(x, w, g)),
    }
  print(f"device: {jax.devices()[0].device_kind}")
  header = f"{'tokens':>7} {'hidden':>6} {'inter':>6} {'experts':>7} | " + " | ".join(
      f"{name:>15}" for name in impls)
  print(header + "   (TFLOP/s)")
  print("-" * len(header))
  rng = np.random.default_rng(0)
  for tokens, hidden, inter, experts in shapes:
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((experts, hidden, inter)) * hidden ** -0.5, jnp.bfloat16)
    g = _group_sizes(tokens, experts, rng)
    flops = 2.0 * tokens * hidden * inter
    cells = []
    for fn in impls.values():
      cells.append(f"{flops / _time(fn, (x, w, g), args.iters) / 1e12:15.3f}")
    print(f"{tokens:>7} {hidden:>6} {inter:>6} {experts:>7} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
