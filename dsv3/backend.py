"""Which platform the program being traced will run on, for choosing GPU kernels.

The context mesh decides (jax.set_mesh, shard_map, or a deviceless compile's mesh, whose devices are GPUs
while jax.default_backend() stays 'cpu': GPU_AOT.md); without one, the default backend.
"""
from __future__ import annotations

import jax


def target_platform() -> str:
  """'gpu', 'cpu' or 'tpu'."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform
