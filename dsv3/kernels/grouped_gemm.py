"""The MoE grouped GEMM on GPU: tokamax's ragged_dot (Mosaic GPU on sm90, else Triton), forward and both
gradients, in BF16. FP8 expert GEMMs are dsv3.kernels.fp8 (its Triton kernels); the CPU paths are
dsv3.kernels.tiled_gemm.

tokamax is an optional GPU dependency (pyproject.toml's `gpu` extra, pinned per Python), imported on first use.
`deviceless(target_devices)` lets a compile-only run (dsv3.analysis.compile_only) lower these kernels for a GPU that
is not there.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv3.kernels import fp8

# tokamax tries these in order and runs the first whose kernel supports the call's shapes and chip.
IMPLEMENTATIONS = ("mosaic_gpu", "triton")
INSTALL_HINT = ("pip install -e \".[gpu]\" (tokamax), or set model.grouped_gemm="
                "'ragged_dot' (XLA: a dense dot over the device's experts)")


def tokamax():
  """The tokamax module, or a ValueError that names the setting and the fix."""
  try:
    import tokamax as lib      # optional: GPU only
  except ImportError as e:
    raise ValueError(f"model.grouped_gemm='tokamax' (what 'auto' picks on GPU) needs tokamax: {INSTALL_HINT}") from e
  return lib


_DW_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _kernel(lhs, rhs, group_sizes, dims=None):
  lib = tokamax()
  if dims is None:
    return lib.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype, implementation=IMPLEMENTATIONS)
  return lib.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=lhs.dtype,
                                implementation=IMPLEMENTATIONS)


@jax.custom_vjp
def _ragged_dot(x, w, group_sizes):
  return fp8.vary_like(_kernel(x, w, group_sizes), x)


def _ragged_dot_fwd(x, w, group_sizes):
  return _ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _ragged_dot_bwd(res, dy):
  # Both gradients in tokamax's kernels: dx = dy @ w_g^T per group, dw_g = x_g^T @ dy_g (ragged contraction).
  x, w, group_sizes = res
  dy = dy.astype(x.dtype)
  dx = _kernel(dy, jnp.swapaxes(w, 1, 2), group_sizes)
  dw = _kernel(x, dy, group_sizes, _DW_DIMS)
  return (fp8.vary_like(dx, x), fp8.vary_like(dw.astype(w.dtype), w),
          np.zeros(group_sizes.shape, jax.dtypes.float0))


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def ragged_dot(x, w, group_sizes):
  """jax.lax.ragged_dot(x [M, K], w [G, K, N], group_sizes) in tokamax's kernels; x.dtype out (f32 accumulate)."""
  # Inside shard_map (expert parallelism) both operands must vary alike: the weight gradient then sums over
  # the token axes (the transpose of the cast), as in dsv3.kernels.fp8.
  x, w = fp8.match_varying(x, w)
  return _ragged_dot(x, w, jnp.asarray(group_sizes, jnp.int32))


@contextlib.contextmanager
def deviceless(devices):
  """Lowering GPU kernels for `devices` (a deviceless topology's) on a machine without them.

  tokamax and Pallas read the chip from the context mesh (set by the caller), but tokamax's sm90 check
  reads the concrete default device (a CPU here), so it is told the target's compute capability; Triton
  kernels are assembled by the ptxas on PATH, which must know XLA's PTX version (CUDA 13's, from
  the `aot` extra's nvidia-cuda-nvcc).
  """
  capability = float(getattr(devices[0], "compute_capability", 9.0) or 9.0)
  path = os.environ.get("PATH", "")
  spec = importlib.util.find_spec("nvidia.cu13")
  if spec is not None and spec.submodule_search_locations:
    os.environ["PATH"] = os.path.join(list(spec.submodule_search_locations)[0], "bin") + os.pathsep + path
  with contextlib.ExitStack() as stack:
    if importlib.util.find_spec("tokamax") is not None:
      from tokamax._src import gpu_utils   # no public hook for the target's compute capability
      lib = tokamax()
      stack.enter_context(lib.config.cross_compile(True))
      probe = gpu_utils._compute_capability
      gpu_utils._compute_capability = lambda device=None: capability
      stack.callback(setattr, gpu_utils, "_compute_capability", probe)
    try:
      yield
    finally:
      os.environ["PATH"] = path
