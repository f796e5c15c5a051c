"""dsv3.bench.step_profile: traced op times joined with the compiled HLO, grouped by kind and phase."""
import jax
import jax.numpy as jnp
import numpy as np

from dsv3.bench import step_profile


def test_profile_classifies_ops_and_counts_gemm_flops():
  m, k, n = 256, 128, 192
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, m, 4096), jnp.int32)

  def loss(w, x):
    return jnp.sum(jnp.tanh(x[idx] @ w))
  fn = jax.jit(jax.value_and_grad(loss))
  prof = step_profile.profile(fn, w, x, calls=3)
  assert prof.step_ms > 0 and 0 < prof.op_ms
  kinds = {op.kind for op in prof.ops}
  assert "gemm" in kinds and "gather" in kinds
  # Forward x[idx] @ w and backward dW = x[idx]^T @ dy (XLA may fold dx away): exact FLOPs from the shapes.
  gemm = sum(op.flops for op in prof.ops if op.kind == "gemm")
  assert gemm >= 2 * 2 * 4096 * k * n and gemm % (2 * 4096 * k * n) == 0
  phases = {op.phase for op in prof.ops if op.kind == "gemm"}
  assert {"forward", "backward"} <= phases
  rows = prof.table("kind")
  assert abs(sum(float(r[2].rstrip("%")) for r in rows) - 100) < 0.5
  assert [r[0] for r in prof.top_ops(2)] == [op.name for op in sorted(prof.ops, key=lambda o: -o.ms)[:2]]
