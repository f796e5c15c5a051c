"""The kernel half of `python -m dsv3.bench gpu` (dsv3/bench/gpu.py): each GPU kernel checked against its CPU
reference, and the grouped and dense GEMMs timed. Rows are dicts with status 'ok', 'FAIL' (with the error)
or 'skipped' (with why); one failing row never stops the rest."""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3.kernels import fp8, grouped_gemm
from dsv3.nn import attention

HIGHEST = jax.lax.Precision.HIGHEST


def tokamax_ragged_dot(x, w, group_sizes):
  """The BF16 grouped GEMM under test (dsv3.kernels.grouped_gemm's tokamax path)."""
  return grouped_gemm.ragged_dot(x, w, group_sizes)


def tokamax_fp8_forward(x, w, group_sizes):
  """The library alternative to fp8_triton's forward kernel: tokamax's Triton ragged_dot on qwix QArrays with
  the same 1x128 / 128x128 E4M3 scales (its post-scale path promotes every K step, like ours). Forward only:
  tokamax has no scaled weight-gradient kernel. Timed side by side so a GPU run decides which forward stays."""
  import qwix   # with tokamax: GPU only
  xq, xs = fp8.quantize_tiles(x)
  wq, ws = fp8.quantize_blocks(w)
  q = lambda v, sc: qwix.QArray(v, sc, qtype=jnp.float8_e4m3fn)
  return grouped_gemm.tokamax().ragged_dot(q(xq, xs), q(wq, ws), group_sizes, preferred_element_type=x.dtype,
                                           implementation="triton")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _error(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _is_oom(e: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


# ---------------------------------------------------------------------------------------------------
# Kernel checks.
# ---------------------------------------------------------------------------------------------------
def _value_and_grads(f, device, args, aux, ct):
  """(f(*args, *aux), d/d args) on `device`, pulled back with cotangent ct; numpy float32 results."""
  def run(args, aux, ct):
    out, vjp = jax.vjp(lambda *a: f(*a, *aux), *args)
    return (out, *vjp(ct.astype(out.dtype)))
  put = lambda t: jax.device_put(t, device)   # committed inputs: the jit runs where they are
  res = jax.jit(run)(put(args), put(aux), put(ct))
  return [np.asarray(r, np.float32) for r in jax.device_get(res)]


def _rel_err(got, ref) -> float:
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return float(np.max(np.abs(got.astype(np.float64) - ref))) / (scale or 1.0) if ref.size else 0.0


def _check(name, kernel, k_args, reference, r_args, aux, tol, gpu_only, out_names):
  """One row: `kernel` on the default device vs `reference` on the CPU (its args r_args: the same values,
  perhaps in float32), forward and the gradient of each arg, one shared cotangent."""
  row = dict(name=name, tol=tol, status="ok", reason="", errors={})
  try:
    out = jax.eval_shape(lambda *a: reference(*a, *aux), *r_args)
    # A bf16-representable cotangent, so both sides pull back exactly the same values.
    ct = np.random.default_rng(1).standard_normal(out.shape).astype(jnp.bfloat16).astype(np.float32)
    ref = _value_and_grads(reference, jax.devices("cpu")[0], r_args, aux, ct)   # on CPU even without a GPU
    if gpu_only and not on_gpu():
      row.update(status="skipped", reason="no GPU")
      return row
    got = _value_and_grads(kernel, jax.devices()[0], k_args, aux, ct)
    row["errors"] = {n: _rel_err(g, r) for n, g, r in zip(out_names, got, ref)}
    bad = [n for n, e in row["errors"].items() if not e <= tol]          # NaN fails too
    if bad:
      row.update(status="FAIL", reason=f"{', '.join(bad)} over tolerance")
  except Exception as e:  # noqa: BLE001 - a kernel that raises is a FAIL row; the command goes on
    row.update(status="FAIL", reason=_error(e))
  row["max_rel_err"] = max(row["errors"].values()) if row["errors"] else None
  return row


def _check_group_sizes(rng, m, g, tail):
  """Skewed sizes over g groups summing to m - tail (the last `tail` rows belong to none: output 0),
  with group 2 empty."""
  sizes = rng.multinomial(m - tail, rng.dirichlet(np.full(g, 2.0)))
  sizes[3] += sizes[2]
  sizes[2] = 0
  return sizes.astype(np.int32)


def run_checks():
  rng = np.random.default_rng(0)
  bf16, f32 = jnp.bfloat16, np.float32
  m, k, n, g = 768, 384, 256, 8
  x = rng.standard_normal((m, k)).astype(bf16)
  w = (rng.standard_normal((g, k, n)) * k ** -0.5).astype(bf16)
  gs = _check_group_sizes(rng, m, g, tail=64)
  wd = (rng.standard_normal((k, n)) * k ** -0.5).astype(bf16)
  ref_ragged = lambda a, b, s: jax.lax.ragged_dot(a, b, s, precision=HIGHEST, preferred_element_type=f32)
  B, T, H, dqk, dv = 2, 256, 4, 192, 128          # MLA's head dims (qk_nope 128 + rope 64, v 128)
  q, kk = (rng.standard_normal((B, T, H, dqk)).astype(bf16) for _ in range(2))
  v = rng.standard_normal((B, T, H, dv)).astype(bf16)
  scale = dqk ** -0.5
  rows = [
      _check("grouped GEMM bf16, XLA ragged_dot", lambda a, b, s: jax.lax.ragged_dot(a, b, s),
             (x, w), ref_ragged, (x.astype(f32), w.astype(f32)), (gs,), 2e-2, False, ("out", "dx", "dw")),
      _check("grouped GEMM bf16, tokamax", tokamax_ragged_dot, (x, w), ref_ragged,
             (x.astype(f32), w.astype(f32)), (gs,), 2e-2, True, ("out", "dx", "dw")),
      _check("grouped GEMM fp8, triton vs emulate", lambda a, b, s: fp8.ragged_dot(a, b, s, impl="triton"),
             (x, w), lambda a, b, s: fp8.ragged_dot(a, b, s, impl="emulate"), (x, w), (gs,), 1e-2, True,
             ("out", "dx", "dw")),
      _check("dense linear fp8, triton vs emulate", lambda a, b: fp8.dot(a, b, impl="triton"), (x, wd),
             lambda a, b: fp8.dot(a, b, impl="emulate"), (x, wd), (), 1e-2, True, ("out", "dx", "dw")),
      _check("attention, cuDNN vs dense f32",
             lambda a, b, c: attention.attention(a, b, c, scale, implementation="cudnn"), (q, kk, v),
             lambda a, b, c: attention.dense_attention(a, b, c, scale),
             (q.astype(f32), kk.astype(f32), v.astype(f32)), (), 2e-2, True, ("out", "dq", "dk", "dv")),
  ]
  for r in rows:
    r["shape"] = (f"B{B} T{T} H{H} dqk{dqk} dv{dv}" if r["name"].startswith("attention")
                  else f"M{m} K{k} N{n}" + (f" G{g}, {int(gs.sum())} rows in groups" if "grouped" in r["name"]
                                            else ""))
  return rows


# ---------------------------------------------------------------------------------------------------
# GEMM timings.
# ---------------------------------------------------------------------------------------------------
def _time(fn, args, iters, budget_s):
  """Median seconds per call after one compile + warm-up call; stops early past budget_s of timed calls."""
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < iters and sum(times) < budget_s:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _fwd_bwd(f):
  """jit of forward + both gradients (the 3 GEMMs of a training step) with a given cotangent."""
  def run(x, w, *rest):
    *aux, ct = rest
    out, vjp = jax.vjp(lambda a, b: f(a, b, *aux), x, w)
    return (out, *vjp(ct))
  return jax.jit(run)


def _time_row(row, fn, args, flops, iters, peaks, deadline, oom_skips=False):
  """Fills row's ms / TFLOP/s / % of peak, or its FAIL / skipped status."""
  row.update(status="ok", reason="")
  if time.monotonic() > deadline:
    row.update(status="skipped", reason="time budget spent")
    return
  try:
    sec = _time(fn, args, iters, budget_s=5.0)
  except Exception as e:  # noqa: BLE001 - a failing kernel is a row, not the end of the command
    row.update(status="skipped" if oom_skips and _is_oom(e) else "FAIL",
               reason=("out of memory: " if _is_oom(e) else "") + _error(e))
    return
  row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, pct_bf16_peak=flops / sec / peaks["bf16"])
  if row["dtype"] == "fp8":
    row["pct_fp8_peak"] = flops / sec / peaks["fp8"]


def run_gemms(s, peaks, deadline):
  H, I, E, top_k = s["hidden"], s["inter"], s["experts"], s["top_k"]
  rng = np.random.default_rng(0)
  randn = jax.jit(lambda key, shape, scale: (jax.random.normal(key, shape, jnp.float32) * scale)
                  .astype(jnp.bfloat16), static_argnums=1)   # made on the device: 7.5 GB of w in numpy is slow
  keys = jax.random.split(jax.random.key(0), 6)
  gpu = on_gpu()
  impls = [("XLA ragged_dot", "bf16", lambda a, b, g: jax.lax.ragged_dot(a, b, g), False),
           ("tokamax", "bf16", tokamax_ragged_dot, True),
           ("fp8 triton", "fp8", lambda a, b, g: fp8.ragged_dot(a, b, g, impl="triton"), True),
           ("tokamax+qwix fp8", "fp8", tokamax_fp8_forward, True)]
  grouped = []
  w = randn(keys[0], (E, H, I), H ** -0.5)
  for i, tokens in enumerate(s["tokens"]):
    M = tokens * top_k
    gs = jnp.asarray(rng.multinomial(M, rng.dirichlet(np.full(E, 2.0))), jnp.int32)  # skewed, like routing
    x, ct = randn(keys[1], (M, H), 1.0), randn(keys[2], (M, I), 1.0)
    for name, dtype, f, gpu_only in impls:
      for mode in ("fwd", "fwd+bwd"):
        row = dict(impl=name, dtype=dtype, mode=mode, tokens=tokens, M=M, K=H, N=I, experts=E)
        grouped.append(row)
        if gpu_only and not gpu:
          row.update(status="skipped", reason="no GPU")
        elif f is tokamax_fp8_forward and mode != "fwd":
          row.update(status="skipped", reason="forward only (no scaled weight-gradient kernel in tokamax)")
        elif name.startswith("XLA") and gpu and i > 0:
          row.update(status="skipped", reason="XLA baseline timed at the smallest shape only")
        else:
          fn, args = (jax.jit(f), (x, w, gs)) if mode == "fwd" else (_fwd_bwd(f), (x, w, gs, ct))
          _time_row(row, fn, args, (1 if mode == "fwd" else 3) * 2.0 * M * H * I, s["iters"], peaks,
                    deadline, oom_skips=name.startswith("XLA"))
        print(f"  grouped {name} {mode} tokens={tokens}: {_cell(row)}", flush=True)
    del x, ct
  del w
  M = s["dense_m"]
  x, wd = randn(keys[3], (M, H), 1.0), randn(keys[4], (H, I), H ** -0.5)
  dense = []
  for name, dtype, f, gpu_only in (("jnp.dot", "bf16", jnp.dot, False),
                                   ("fp8 triton", "fp8", lambda a, b: fp8.dot(a, b, impl="triton"), True)):
    row = dict(impl=name, dtype=dtype, mode="fwd", M=M, K=H, N=I)
    dense.append(row)
    if gpu_only and not gpu:
      row.update(status="skipped", reason="no GPU")
    else:
      _time_row(row, jax.jit(f), (x, wd), 2.0 * M * H * I, s["iters"], peaks, deadline)
    print(f"  dense {name}: {_cell(row)}", flush=True)
  return grouped, dense


def ratios(grouped, dense):
  """FP8 / best-BF16 TFLOP/s for each grouped shape and mode, and for the dense GEMM."""
  out = []
  for tokens in sorted({r["tokens"] for r in grouped}):
    for mode in ("fwd", "fwd+bwd"):
      same = [r for r in grouped if r["tokens"] == tokens and r["mode"] == mode and r.get("tflops")]
      bf = max((r for r in same if r["dtype"] == "bf16"), key=lambda r: r["tflops"], default=None)
      f8 = next((r for r in same if r["dtype"] == "fp8"), None)
      out.append(dict(gemm="grouped", tokens=tokens, mode=mode, bf16_impl=bf and bf["impl"],
                      ratio=f8["tflops"] / bf["tflops"] if bf and f8 else None))
  bf = next((r for r in dense if r["dtype"] == "bf16" and r.get("tflops")), None)
  f8 = next((r for r in dense if r["dtype"] == "fp8" and r.get("tflops")), None)
  out.append(dict(gemm="dense", tokens=dense[0]["M"], mode="fwd", bf16_impl="jnp.dot",
                  ratio=f8["tflops"] / bf["tflops"] if bf and f8 else None))
  return out


def _cell(row):
  if row["status"] != "ok":
    return f"{row['status']}: {row['reason']}" if row["reason"] else row["status"]
  return f"{row['tflops']:.1f} TFLOP/s ({row['pct_bf16_peak']:.0%} of BF16 peak), {row['ms']:.2f} ms"
