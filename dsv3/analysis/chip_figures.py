"""What one device of a target chip sustains: the figures dsv3.analysis.hlo_cost costs a program with.

GPUs: datasheet or published numbers (`FIGURES`: HBM and link bandwidths; peak FLOP/s from
dsv3.training.metrics.PEAK_FLOPS). 'cpu': measured on this machine (`measure_cpu`), which is how the cost model is
calibrated against real steps (python -m dsv3.bench --what=estimate).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict

import jax
import jax.numpy as jnp

from dsv3.training import metrics

FIGURES_FILE = "dsv3/analysis/chip_figures.py (FIGURES) and dsv3/training/metrics.py (PEAK_FLOPS)"


@dataclasses.dataclass(frozen=True)
class Figures:
  """What one device of a target sustains. flops: peak FLOP/s by GEMM operand dtype ('fp8', 'bf16', 'fp32');
  hbm: bytes/s; nvlink / ib: bytes/s one GPU sends to the peers inside its node / across nodes; latencies
  in seconds; launch: fixed seconds per kernel; gpus_per_node; sources: where each figure comes from."""
  target: str
  flops: Dict[str, float]
  hbm: float
  nvlink: float
  ib: float
  launch: float
  nvlink_latency: float
  ib_latency: float
  gpus_per_node: int
  sources: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# HBM: datasheets (H100/H800 SXM 3.35 TB/s, H200 4.8 TB/s). Links, one direction per GPU: H100/H200 NVLink 4
# 900 GB/s both ways; H800: the DeepSeek-V3 report's achieved NVLink 160 GB/s and InfiniBand 50 GB/s (400 Gb/s
# NICs, one per GPU, as on the H100 clusters). Launch: a kernel's fixed cost without CUDA graphs.
FIGURES = {
    "h100": dict(device_kind="h100", hbm=3.35e12, nvlink=450e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H100 SXM datasheet (989 TF BF16, 1979 TF FP8 dense, 3.35 TB/s HBM3, NVLink 900 GB/s "
                         "both ways), 400 Gb/s InfiniBand per GPU"),
    "h800": dict(device_kind="h800", hbm=3.35e12, nvlink=160e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H800 SXM: H100 compute and HBM; NVLink 160 GB/s and InfiniBand 50 GB/s as the "
                         "DeepSeek-V3 report (section 3.2.2) gives them"),
    "h200": dict(device_kind="h200", hbm=4.8e12, nvlink=450e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H200 SXM datasheet (H100 compute, 4.8 TB/s HBM3e, NVLink 900 GB/s both ways), "
                         "400 Gb/s InfiniBand per GPU"),
}


class UnknownTargetError(ValueError):
  """No figures for the asked target; the message names the file to add them to."""


def figures(target: str) -> Figures:
  """The figures of a GPU `target` (a FIGURES key). 'cpu' has none on record: `measure_cpu` measures them.
  Raises UnknownTargetError naming the target and the file to add it to."""
  row = FIGURES.get(target)
  peaks = dict(metrics.PEAK_FLOPS)
  if row is None or row["device_kind"] not in peaks:
    known = ", ".join(sorted(FIGURES))
    hint = " ('cpu' is measured: measure_cpu())" if target == "cpu" else ""
    raise UnknownTargetError(
        f"no step-time figures for target {target!r}{hint}; known: {known}. Add its peak FLOP/s, HBM and "
        f"NVLink / InfiniBand bandwidths to {FIGURES_FILE}")
  row = dict(row)
  kind = row.pop("device_kind")
  return Figures(target=target, flops=dict(peaks[kind]), **row)


def for_device(device_kind: str) -> Figures:
  """The figures of the GPU whose jax device_kind is `device_kind` (e.g. 'NVIDIA H100 80GB HBM3');
  UnknownTargetError for one with none on record."""
  kind = device_kind.lower()
  for target, row in FIGURES.items():
    if row["device_kind"] in kind:
      return figures(target)
  raise UnknownTargetError(f"no step-time figures for device {device_kind!r}; known: {', '.join(sorted(FIGURES))}. "
                           f"Add its peak FLOP/s, HBM and NVLink / InfiniBand bandwidths to {FIGURES_FILE}")


def measure_cpu(devices: int = 1, size: int = 1024, mib: int = 256) -> Figures:
  """This CPU's figures, measured now (each call measures again): an f32 GEMM's FLOP/s (every dtype: XLA:CPU
  computes narrower GEMMs through f32), the bandwidth of a large elementwise kernel into a new buffer, and a
  kernel's fixed cost (a chain of small dependent ops that do not fuse). `devices` simulated devices share the
  machine: each gets its 1/devices share of the FLOP/s and bandwidth. Its 'links' are memory."""

  gemm = metrics.measure_matmul_flops(jax.devices("cpu")[0], jnp.float32, size)
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  # Into a fresh result, as XLA:CPU's kernels write theirs each call (its first touch of the pages included).
  add = jax.jit(lambda a: a * 1.0001 + 1.0)
  add(x).block_until_ready()
  hbm = 2 * n * 4 / min(_timed(lambda: add(x).block_until_ready()) for _ in range(5))   # one read, one write
  chain = 64

  def ops(a):                                    # `chain` kernels: each sort depends on the last
    for _ in range(chain):
      a = jnp.sort(a)[::-1] + 1.0
    return a
  f = jax.jit(ops)
  small = jnp.arange(8, dtype=jnp.float32)
  f(small).block_until_ready()
  launch = min(_timed(lambda: f(small).block_until_ready()) for _ in range(5)) / (2 * chain)
  gemm, hbm = gemm / devices, hbm / devices
  return Figures(target="cpu", flops={"fp8": gemm, "bf16": gemm, "fp32": gemm}, hbm=hbm, nvlink=hbm, ib=hbm,
                 launch=launch, nvlink_latency=launch, ib_latency=launch, gpus_per_node=1 << 30,
                 sources=f"measured on this CPU: {size}x{size} f32 GEMM, a {mib} MiB elementwise kernel into a "
                         f"new buffer, {2 * chain} small dependent kernels; shared by {devices} device(s)")


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0
