"""The one owner of "which platform": 'gpu', 'cpu' or 'tpu', for choosing kernels and transports.

JAX names GPUs 'gpu', 'cuda' or 'rocm' depending on where it looks; every caller asks here instead of
comparing names. For the program being traced the context mesh decides (jax.set_mesh, shard_map, or a
deviceless compile's mesh, whose devices are GPUs while jax.default_backend() stays 'cpu'); without one,
the default backend.
"""
from __future__ import annotations

import jax

GPU_NAMES = ("gpu", "cuda", "rocm")


def normalize(platform: str) -> str:
  """'gpu' for any of JAX's GPU platform names, else the name itself ('cpu', 'tpu')."""
  return "gpu" if platform in GPU_NAMES else platform


def mesh_platform(mesh) -> str:
  """The platform of a (concrete) mesh's devices: 'gpu', 'cpu' or 'tpu'."""
  return normalize(mesh.devices.flat[0].platform)


def target_platform() -> str:
  """The platform of the program being traced: the context mesh's, else the default backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return normalize(device.platform if device is not None else jax.default_backend())
