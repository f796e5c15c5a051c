"""Grouped GEMMs: the CPU tiled paths, the tile schedule, the FP8 Triton kernels (jnp re-trace, Triton interpreter),
and on a GPU the tokamax and FP8 kernels against the CPU reference."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3.config import ModelConfig
from dsv3.kernels import fp8, fp8_triton, grouped_gemm, tiled_gemm
from dsv3.nn import moe

M = 130
G = 5
# Ragged sizes: empty groups first / middle / last, everything in one group, sums below M (tail rows),
# sizes that are exact multiples of the tile, and nothing at all.
SIZES = [[37, 0, 70, 5, 0], [0, 0, 130, 0, 0], [32, 32, 32, 32, 2], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1],
         [0, 64, 0, 0, 33]]


def _data(seed=0, dtype=jnp.float32, k=200, n=72):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((M, k)), dtype)
  w = jnp.asarray(rng.standard_normal((G, k, n)) * k ** -0.5, dtype)
  return x, w


def test_gpu_kernels_need_their_library_on_cpu():
  """Without tokamax (Python 3.11, or not installed) the GPU grouped GEMM says which setting to change."""
  if importlib.util.find_spec("tokamax") is not None:
    pytest.skip("tokamax is installed here")
  x, w = _data()
  with pytest.raises(ValueError, match=r"model.grouped_gemm.*\[gpu\]"):
    grouped_gemm.ragged_dot(x, w, jnp.asarray(SIZES[0], jnp.int32))


def test_tokamax_path_gradients_equal_ragged_dot(monkeypatch):
  """dsv3's VJP around tokamax (dx = dy @ w^T per group, dw by ragged contraction), run through tokamax's own
  XLA implementation on CPU: the values and both gradients of jax.lax.ragged_dot. GPU kernels: the GPU test."""
  pytest.importorskip("tokamax")
  monkeypatch.setattr(grouped_gemm, "IMPLEMENTATIONS", ("xla",))
  x, w = _data(5, k=48, n=40)
  f = lambda impl: lambda a, b: jnp.sum(jnp.sin(impl(a, b, gs)))
  with jax.default_matmul_precision("highest"):
    for sizes in SIZES[:3]:
      gs = jnp.asarray(sizes, jnp.int32)
      np.testing.assert_allclose(grouped_gemm.ragged_dot(x, w, gs), jax.lax.ragged_dot(x, w, gs), atol=1e-5)
      got = jax.grad(f(grouped_gemm.ragged_dot), (0, 1))(x, w)
      want = jax.grad(f(jax.lax.ragged_dot), (0, 1))(x, w)
      for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_auto_is_tiled_on_cpu_and_tokamax_on_gpu_meshes():
  cfg = ModelConfig(grouped_gemm="auto")
  assert moe.grouped_gemm_impl(cfg) == "tiled"
  with pytest.raises(ValueError, match="'tokamax'"):
    ModelConfig(grouped_gemm="triton").validate()


@pytest.mark.parametrize("block_m", [16, 32, 128])
def test_tile_schedule_partitions_rows_by_group(block_m):
  sched = jax.jit(tiled_gemm.tile_schedule, static_argnums=(1, 2))
  for sizes in SIZES + [[0, 0, 0, 0, 200]]:
    m = max(M, sum(sizes))
    grp, start, end = (np.asarray(a) for a in sched(jnp.asarray(sizes, jnp.int32), m, block_m))
    assert grp.shape == (tiled_gemm.num_tiles(m, G, block_m),)
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    owner = np.full(m, -1)
    for t in range(len(grp)):
      if start[t] == end[t]:
        continue
      assert 0 < end[t] - start[t] <= block_m
      assert np.all(owner[start[t]:end[t]] == -1), "rows covered twice"
      owner[start[t]:end[t]] = grp[t]
      if grp[t] < G:     # a tile never leaves its expert's rows
        assert starts[grp[t]] <= start[t] and end[t] <= ends[grp[t]]
    expect = np.searchsorted(ends, np.arange(m), side="right")   # G for rows past the groups
    np.testing.assert_array_equal(owner, expect)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("block_m", [16, 32])
def test_fp8_kernel_emulation_matches_fp8_ragged_dot(pow2, block_m):
  """fp8_triton's first kernel, re-traced in jnp (same schedule, K steps, scale indexing) = the FP8 reference."""
  x, w = _data(3, k=300, n=136)       # partial K tile and partial 128-column weight block
  xq, xs = fp8.quantize_tiles(x, pow2_scale=pow2)
  wq, ws = fp8.quantize_blocks(w, pow2_scale=pow2)
  emu = jax.jit(fp8_triton.emulate_scaled_matmul, static_argnames=("sb_col", "block_m"))
  ref_fn = jax.jit(lambda a, b, g: fp8.ragged_dot(a, b, g, pow2_scale=pow2, impl="emulate"))
  for sizes in SIZES:
    gs = jnp.asarray(sizes, jnp.int32)
    out = np.asarray(emu(xq, xs, wq, ws, gs, block_m=block_m))
    ref = np.asarray(ref_fn(x, w, gs))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from dsv3.kernels import fp8, fp8_triton
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((130, 300)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 300, 136)) * 0.06, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((130, 136)), jnp.float32)
    xq, xs = fp8.quantize_tiles(x)
    wq, ws = fp8.quantize_blocks(w)
    xq_t, xs_t = fp8.quantize_tiles(x, axis=0)
    dq_t, ds_t = fp8.quantize_tiles(dy, axis=0)
    for sizes in ([37, 0, 70, 5, 0], [0, 64, 0, 0, 33], [0, 0, 0, 0, 0], [130, 0, 0, 0, 0]):
      gs = jnp.asarray(sizes, jnp.int32)
      out = fp8_triton.interpret("scaled_matmul", xq, xs, wq, ws, gs, block=32)
      np.testing.assert_allclose(out, np.asarray(fp8.ragged_dot(x, w, gs, impl="emulate")), rtol=1e-5, atol=1e-5)
      out = fp8_triton.interpret("scaled_matmul", xq, xs, wq, fp8._block_to_col_scales(ws, 136), gs, sb_col=1,
                                 block=16)
      np.testing.assert_allclose(out, np.asarray(fp8.ragged_dot(x, w, gs, impl="emulate")), rtol=1e-5, atol=1e-5)
      dw = fp8_triton.interpret("scaled_ragged_dw", xq_t, xs_t, dq_t, ds_t, gs, block=32)
      ref = fp8._ragged_dw(xq_t, xs_t, dq_t, ds_t, gs, 5, "emulate")
      np.testing.assert_allclose(dw, np.asarray(ref), rtol=1e-5, atol=1e-4)
    print("interpreted kernels ok")
""")


def test_fp8_kernel_bodies_in_triton_interpreter():
  """Both FP8 kernels' bodies (forward/input-gradient and weight-gradient) = the FP8 reference on CPU."""
  # TRITON_INTERPRET must be set before triton is imported anywhere, hence a fresh process.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "interpreted kernels ok" in proc.stdout


@pytest.mark.gpu
def test_gpu_kernels_match_the_cpu_reference():
  """tokamax BF16 and the FP8 Triton kernels, values and both gradients, against the CPU references."""
  rng = np.random.default_rng(4)
  m, k, n, g = 1000, 512, 384, 8
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((g, k, n)) * k ** -0.5, jnp.bfloat16)
  gs = jnp.asarray([100, 0, 250, 3, 128, 0, 300, 119], jnp.int32)     # sum 900 < m
  cpu = jax.devices("cpu")[0]
  cases = {"tokamax": (grouped_gemm.ragged_dot,
                       lambda a, b, s: jax.lax.ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), s)),
           "fp8": (lambda a, b, s: fp8.ragged_dot(a, b, s, impl="triton"),
                   lambda a, b, s: fp8.ragged_dot(a, b, s, impl="emulate"))}
  for name, (gpu_fn, ref_fn) in cases.items():
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b, gs).astype(jnp.float32)))
    got = jax.jit(jax.value_and_grad(loss(gpu_fn), (0, 1)))(x, w)
    with jax.default_device(cpu):
      want = jax.jit(jax.value_and_grad(loss(ref_fn), (0, 1)))(jax.device_put(x, cpu), jax.device_put(w, cpu))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(a - b).max() <= 2e-2 * max(np.abs(b).max(), 1.0), name


def test_tiled_ragged_dot_equals_ragged_dot_with_gradients():
  """The CPU default: expert-homogeneous row tiles, one batched matmul, same values and gradients."""
  rng = np.random.default_rng(0)
  for sizes, block in (([5, 0, 17, 3], None), ([0, 0, 40, 0], 8), ([1, 2, 3, 4], 16), ([10, 7, 0, 0], None)):
    m, k, n = 48, 24, 20                               # sum(sizes) < m: the tail rows must come out 0
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    f_ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST)))
    f_til = lambda x, w: jnp.sum(jnp.sin(tiled_gemm.tiled_ragged_dot(x, w, gs, block_m=block)))
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(tiled_gemm.tiled_ragged_dot(x, w, gs, block_m=block),
                                 jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST), atol=1e-4)
      for a, b in zip(jax.grad(f_til, (0, 1))(x, w), jax.grad(f_ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scan_ragged_dot_equals_ragged_dot_with_gradients():
  """The tile loop (grouped_gemm='scan'): one tile's GEMM per step, same values and gradients as ragged_dot;
  rows past sum(group_sizes) are 0 and their gradient too; integer group sizes get no gradient."""
  rng = np.random.default_rng(1)
  for sizes in ([5, 0, 17, 3], [0, 0, 40, 0], [1, 2, 3, 4], [10, 7, 0, 0], [0, 0, 0, 0], [100, 20, 3, 77]):
    m, k, n = max(48, sum(sizes) + 3), 24, 20
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    f_ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST)))
    f_scan = lambda x, w: jnp.sum(jnp.sin(tiled_gemm.scan_ragged_dot(x, w, gs)))
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(jax.jit(tiled_gemm.scan_ragged_dot)(x, w, gs),
                                 jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST), atol=1e-4)
      for a, b in zip(jax.jit(jax.grad(f_scan, (0, 1)))(x, w), jax.grad(f_ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scan_ragged_dot_holds_no_expert_sized_buffer():
  """Compiled (CPU) temporaries of the scan GEMM's forward + backward stay near the size of x, w and the
  output, where the tiled path gathers a weight per tile and ragged_dot's dense lowering is [G, M, N]."""
  m, k, n, g = 4096, 256, 512, 16
  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  w = jax.ShapeDtypeStruct((g, k, n), jnp.float32)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)
  loss = lambda f: jax.jit(jax.grad(lambda x, w, gs: jnp.sum(f(x, w, gs)), (0, 1)))
  temp = lambda f: loss(f).lower(x, w, gs).compile().memory_analysis().temp_size_in_bytes
  io = 4 * (m * k + g * k * n + m * n)
  scan = temp(tiled_gemm.scan_ragged_dot)
  tiled = temp(lambda x, w, gs: tiled_gemm.tiled_ragged_dot(x, w, gs))
  assert scan < 2 * io < tiled, (scan, io, tiled)


def test_tiled_expert_ffn_equals_grouped_gemms_and_combine():
  """The fused tile-space SwiGLU + combine (CPU default) = three ragged_dots and a weighted scatter-add,
  values and gradients, with empty experts, zero weights (capacity drops) and several tile sizes."""
  rng = np.random.default_rng(1)
  n_tok, k, h, inter, e = 40, 3, 24, 16, 6
  idx = np.stack([rng.choice([0, 2, 3, 5], k, replace=False) for _ in range(n_tok)])   # experts 1, 4 empty
  flat = jnp.asarray(idx.reshape(-1), jnp.int32)
  order = jnp.argsort(flat, stable=True)
  token_of, gs = order // k, jnp.bincount(flat, length=e).astype(jnp.int32)
  weight = jnp.asarray(rng.random(n_tok * k) * (rng.random(n_tok * k) > 0.2), jnp.float32)[order]
  x = jnp.asarray(rng.normal(size=(n_tok, h)), jnp.float32)
  ws = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, h, inter), (e, h, inter), (e, inter, h)))

  def reference(x, ws):
    rd = lambda a, w: jax.lax.ragged_dot(a, w, gs, precision=jax.lax.Precision.HIGHEST)
    xs = x[token_of]
    out = rd(jax.nn.silu(rd(xs, ws[0])) * rd(xs, ws[1]), ws[2]) * weight[:, None]
    return jnp.zeros_like(x).at[token_of].add(out)

  loss = lambda f: lambda x, ws: jnp.sum(jnp.sin(f(x, ws)))
  with jax.default_matmul_precision("highest"):
    want, want_g = reference(x, ws), jax.grad(loss(reference), (0, 1))(x, ws)
    for block in (None, 4, 16, 64):
      fused = lambda x, ws: tiled_gemm.tiled_expert_ffn(x, token_of, weight, gs, *ws, block_m=block)
      np.testing.assert_allclose(fused(x, ws), want, atol=1e-5)
      for a, b in zip(jax.tree.leaves(jax.grad(loss(fused), (0, 1))(x, ws)), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_scan_ragged_dot_inside_shard_map_with_varying_inputs():
  """Expert parallelism runs the grouped GEMM in shard_map, whose inputs vary over 'expert': the loops'
  carries must vary alike (checked by shard_map's type rules), and the values and both gradients equal the
  unsharded ragged_dot's."""
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:4]), ("expert",))
  x, w = _data(k=32, n=16)
  x, w = x[:128], jnp.concatenate([w, w[:3]])                        # 32 rows and 2 experts per device
  gs = jnp.asarray([[10, 22], [32, 0], [0, 0], [5, 5]], jnp.int32)
  f = jax.shard_map(lambda x, w, gs: tiled_gemm.scan_ragged_dot(x, w, gs[0]), mesh=mesh,
                    in_specs=(P("expert"), P("expert"), P("expert")), out_specs=P("expert"))
  # The unsharded reference: each device's rows through its own two experts, side by side.
  ref = lambda x, w: jnp.concatenate([jax.lax.ragged_dot(x[32 * i:32 * (i + 1)], w[2 * i:2 * i + 2], gs[i],
                                                         precision=jax.lax.Precision.HIGHEST) for i in range(4)])
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(jax.jit(f)(x, w, gs), ref(x, w), atol=1e-4)
    got = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w, gs) ** 2), (0, 1)))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
  for name, a, b in zip(("dx", "dw"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.abs(b).max()), err_msg=name)
