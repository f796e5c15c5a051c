"""One command for a lent GPU: every GPU kernel checked against its CPU reference, grouped GEMM TFLOP/s at
DeepSeek-V3's expert shapes, and the small config's train step, printed as markdown tables and written as JSON.

  python -m dsv3.bench gpu [--out=gpu_bench.json]    # one H100/H200, <= 8 minutes
  python -m dsv3.bench gpu --smoke                   # tiny shapes and configs/tiny.py; a CPU in < 1 minute

Contract: never needs a GPU. Each row is 'ok', 'FAIL' (an exception or an error over tolerance, with the
message) or 'skipped' (with why: no GPU, out of memory for the XLA baseline, time budget), and one failing
row never stops the rest. Sections:
  checks    forward and both gradients (jax.vjp, one random cotangent) of each GPU kernel on the default
            device against its reference on the host CPU backend, on the same inputs: max |err| / max |ref|
            per output. tokamax BF16 grouped GEMM vs f32 jax.lax.ragged_dot (HIGHEST); FP8 grouped GEMM and
            FP8 dense linear (impl='triton') vs the exact emulation (impl='emulate', same quantization);
            cuDNN attention vs dense f32 attention; XLA's BF16 ragged_dot (runs everywhere) vs f32.
  grouped   TFLOP/s of x [tokens*top_k, 7168] (rows sorted by expert, skewed multinomial group sizes) @ w
            [256, 7168, 2048], forward and forward+backward (3 GEMMs; FLOPs = 3 x 2MKN): XLA ragged_dot BF16
            (baseline, smallest shape only: XLA:GPU pads it to a dense dot over all experts), tokamax BF16,
            FP8 triton (its 1x128 / 128x128 quantization included, as a training step pays it); and one
            dense [16384, 7168] @ [7168, 2048] GEMM, BF16 jnp.dot vs FP8 triton forward.
  train     the train step of configs/small.py (tokens/s, MFU, peak memory), BF16 and FP8, attention on cuDNN
            where it takes the shapes; each in a child process, so that its peak memory is its own.
Goals (from issue 14), evaluated into the JSON: the best BF16 grouped GEMM forward+backward >= 60% of the
chip's dense BF16 peak at the largest token count; FP8 >= 1.3x the best BF16 on those grouped GEMMs and the
dense one; the small config's BF16 train step >= 40% MFU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import attention, bench, fp8, grouped_gemm, metrics, moe
from dsv3.config import ModelConfig
from dsv3.studies.common import load_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULT = "BENCH_GPU_TRAIN_RESULT "          # prefix of the child's one JSON line on stdout
HIGHEST = jax.lax.Precision.HIGHEST

# DeepSeek-V3's routed experts (hidden, moe_intermediate, experts, top-k) and the token counts timed.
FULL = dict(hidden=7168, inter=2048, experts=256, top_k=8, tokens=(4096, 16384), dense_m=16384,
            config="small", batch=16, seq=1024, steps=5, iters=10)
SMOKE = dict(hidden=256, inter=128, experts=8, top_k=2, tokens=(128,), dense_m=256,
             config="tiny", layers=2, batch=2, seq=64, steps=2, iters=2)   # 1 dense + 1 MoE layer: quick compile
GOAL_GROUPED_PCT, GOAL_FP8_RATIO, GOAL_MFU = 0.60, 1.3, 0.40


def tokamax_ragged_dot(x, w, group_sizes):
  """The BF16 grouped GEMM under test (dsv3.grouped_gemm's tokamax path)."""
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


def _on_gpu() -> bool:
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
    if gpu_only and not _on_gpu():
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
  on_gpu = _on_gpu()
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
        if gpu_only and not on_gpu:
          row.update(status="skipped", reason="no GPU")
        elif f is tokamax_fp8_forward and mode != "fwd":
          row.update(status="skipped", reason="forward only (no scaled weight-gradient kernel in tokamax)")
        elif name.startswith("XLA") and on_gpu and i > 0:
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
    if gpu_only and not on_gpu:
      row.update(status="skipped", reason="no GPU")
    else:
      _time_row(row, jax.jit(f), (x, wd), 2.0 * M * H * I, s["iters"], peaks, deadline)
    print(f"  dense {name}: {_cell(row)}", flush=True)
  return grouped, dense


def _ratios(grouped, dense):
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


# ---------------------------------------------------------------------------------------------------
# Train step (in a child process per precision).
# ---------------------------------------------------------------------------------------------------
def train_row(name, precision, batch, seq, steps, layers=None) -> dict:
  """bench.train_throughput of configs/<name>.py at `precision` (`layers` deep if given), attention on
  cuDNN where it takes the shapes, plus this process's peak memory."""
  c = bench.short_run_config(name, steps, batch, seq, load_config(name).model.vocab_size, 0, 0)
  c.precision = precision
  c.model.num_hidden_layers = layers or c.model.num_hidden_layers
  cfg = ModelConfig.from_config_dict(c)
  sd = lambda d: jax.ShapeDtypeStruct((1, seq, cfg.num_attention_heads, d), jnp.dtype(cfg.dtype))
  qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  why_not = attention.cudnn_unsupported(sd(qk), sd(qk), sd(cfg.v_head_dim)) if _on_gpu() else "no GPU"
  # 'cudnn' rather than 'auto' where it should work, so that a cuDNN failure shows instead of a fallback.
  c.model.attention = "auto" if why_not else "cudnn"
  attn = "cudnn" if not why_not else ("dense" if seq <= attention.DENSE_MAX_LEN else "blockwise")
  r = bench.train_throughput(c, batch, seq, steps)
  mem = metrics.memory_stats()
  return dict(r, config=name, layers=cfg.num_hidden_layers, precision=precision, attention=attn,
              attention_note=why_not, grouped_gemm=moe.grouped_gemm_impl(cfg), status="ok", reason="",
              mfu_bf16_peak=metrics.mfu(r["tokens_per_s"], r["flops_per_token"],
                                        metrics.device_peak_flops(dtype="bf16")),
              peak_bytes=next(iter(mem.values())), peak_bytes_kind=next(iter(mem)))


def _train_child(args):
  s = SMOKE if args.smoke else FULL
  print(_RESULT + json.dumps(train_row(s["config"], args.train_child, args.train_batch or s["batch"],
                                       args.train_seq or s["seq"], args.train_steps or s["steps"],
                                       s.get("layers"))), flush=True)


def _collect(proc, row, timeout):
  """Fills `row` from a train child's result line, or marks it FAIL with the child's last error line."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    row.update(status="FAIL", reason=f"timed out after {timeout:.0f} s")
    return
  line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(_RESULT)), None)
  if proc.returncode or line is None:
    err = [ln for ln in err.strip().splitlines() if ln.strip()]
    row.update(status="FAIL", reason=f"child exited {proc.returncode}: {err[-1][:300] if err else ''}")
  else:
    row.update(json.loads(line[len(_RESULT):]))


def run_train(s, args, deadline):
  """BF16 and FP8 train rows, each from its own child process, one after the other (each wants the memory)."""
  batch, seq, steps = args.train_batch or s["batch"], args.train_seq or s["seq"], args.train_steps or s["steps"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
  rows = []
  for precision in ("bf16", "fp8"):
    row = dict(config=s["config"], precision=precision, batch=batch, seq_len=seq, status="ok", reason="")
    rows.append(row)
    if deadline - time.monotonic() < 20:
      row.update(status="skipped", reason="time budget spent")
      continue
    cmd = [sys.executable, "-m", "dsv3.bench_gpu", "--train_child", precision, "--train_batch", str(batch),
           "--train_seq", str(seq), "--train_steps", str(steps)] + (["--smoke"] if args.smoke else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=_ROOT)
    _collect(proc, row, timeout=min(deadline - time.monotonic(), 200))   # leaves the GEMMs their time
    print(f"  train {row['config']} {row['precision']}: {row['status']} "
          f"{row.get('tokens_per_s', 0):,.0f} tok/s {row['reason']}", flush=True)
  return rows


# ---------------------------------------------------------------------------------------------------
# Goals, tables, main.
# ---------------------------------------------------------------------------------------------------
def _goal(goal, threshold, value, detail, why_none=""):
  met = None if value is None or not math.isfinite(value) else bool(value >= threshold)
  return dict(goal=goal, threshold=threshold, value=value, met=met, detail=detail if met is not None else why_none)


def evaluate_goals(grouped, ratios, train):
  last = max(r["tokens"] for r in grouped)
  bf = [r for r in grouped if r["tokens"] == last and r["dtype"] == "bf16" and r.get("tflops")]
  best = {m: max((r for r in bf if r["mode"] == m), key=lambda r: r["tflops"], default=None)
          for m in ("fwd", "fwd+bwd")}
  b = best["fwd+bwd"]
  fwd = best["fwd"]
  g1 = _goal("grouped GEMM >= 60% of dense BF16 peak", GOAL_GROUPED_PCT, b and b["pct_bf16_peak"],
             b and (f"{b['impl']} fwd+bwd at {last} tokens: {b['pct_bf16_peak']:.1%}"
                    + (f" (fwd {fwd['impl']}: {fwd['pct_bf16_peak']:.1%})" if fwd else "")),
             "no BF16 grouped GEMM measured")
  large = [r for r in ratios if r["gemm"] == "dense" or r["tokens"] == last]
  have = [r for r in large if r["ratio"] is not None]
  g2 = _goal("FP8 >= 1.3x BF16 on the large GEMMs", GOAL_FP8_RATIO,
             min(r["ratio"] for r in have) if have and len(have) == len(large) else None,
             "; ".join(f"{r['gemm']} {r['mode']}: {r['ratio']:.2f}x" for r in have),
             "FP8 or BF16 GEMMs not measured (FP8 kernels need a GPU)")
  t = next((r for r in train if r["precision"] == "bf16" and r["status"] == "ok"), None)
  g3 = _goal("small config BF16 train step >= 40% MFU", GOAL_MFU, t and t["mfu"],
             t and f"{t['config']} {t['batch']}x{t['seq_len']}: {t['mfu']:.1%} MFU, {t['tokens_per_s']:,.0f} tok/s",
             "BF16 train step not measured")
  return [g1, g2, g3]


def _md(header, rows) -> str:
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _cell(row):
  if row["status"] != "ok":
    return f"{row['status']}: {row['reason']}" if row["reason"] else row["status"]
  return f"{row['tflops']:.1f} TFLOP/s ({row['pct_bf16_peak']:.0%} of BF16 peak), {row['ms']:.2f} ms"


def tables(result) -> str:
  f = lambda v, spec: "" if v is None else format(v, spec)
  out = [f"## dsv3 GPU bench: {result['device']['kind']} ({result['device']['platform']}), jax "
         f"{result['device']['jax']}, {result['date']}" + (" (--smoke)" if result["smoke"] else ""), "",
         "### Kernel checks (max |err| / max |ref|, kernel on the device vs reference on CPU)", "",
         _md(["kernel", "shape", "status", "out", "grads", "tol", "note"],
             [[r["name"], r["shape"], r["status"], f(r["errors"].get("out"), ".1e"),
               " ".join(f"{k}={v:.1e}" for k, v in r["errors"].items() if k != "out"), r["tol"], r["reason"]]
              for r in result["checks"]]), "",
         "### Grouped GEMM (x [tokens*top_k, K] sorted by expert @ w [experts, K, N])", "",
         _md(["impl", "dtype", "mode", "tokens", "M x K x N", "experts", "ms", "TFLOP/s", "% BF16 peak", "note"],
             [[r["impl"], r["dtype"], r["mode"], r["tokens"], f"{r['M']}x{r['K']}x{r['N']}", r["experts"],
               f(r.get("ms"), ".2f"), f(r.get("tflops"), ".1f"), f(r.get("pct_bf16_peak"), ".1%"),
               r["reason"]] for r in result["grouped_gemm"]]), "",
         "### Dense GEMM", "",
         _md(["impl", "dtype", "M x K x N", "ms", "TFLOP/s", "% BF16 peak", "note"],
             [[r["impl"], r["dtype"], f"{r['M']}x{r['K']}x{r['N']}", f(r.get("ms"), ".2f"),
               f(r.get("tflops"), ".1f"), f(r.get("pct_bf16_peak"), ".1%"), r["reason"]]
              for r in result["dense_gemm"]]), "",
         "FP8 / best BF16: " + ", ".join(
             f"{r['gemm']} {r['mode']}" + (f" {r['tokens']} tok" if r["gemm"] == "grouped" else "")
             + f" {f(r['ratio'], '.2f') or 'n/a'}" for r in result["fp8_vs_bf16"]), "",
         "### Train step", "",
         _md(["config", "precision", "attention", "batch", "compile+1st s", "step ms", "tokens/s", "MFU",
              "MFU vs BF16 peak", "peak memory GiB", "note"],
             [[r["config"] + (f", {r['layers']} layers" if "layers" in r else ""), r["precision"],
               r.get("attention", ""), f"{r['batch']}x{r['seq_len']}",
               f(r.get("first_step_s"), ".1f"), f(r.get("step_s") and r["step_s"] * 1e3, ".0f"),
               f(r.get("tokens_per_s"), ",.0f"), f(r.get("mfu"), ".1%"), f(r.get("mfu_bf16_peak"), ".1%"),
               f(r.get("peak_bytes") and r["peak_bytes"] / 2**30, ".2f")
               + (" (host RSS)" if r.get("peak_bytes_kind") == "host_peak_rss_bytes" else ""),
               r["reason"] or r.get("attention_note", "")] for r in result["train"]]), "",
         "### Goals", "",
         _md(["goal", "value", "met", "detail"],
             [[g["goal"], f(g["value"], ".3g"), {True: "met", False: "NOT met", None: "n/a"}[g["met"]], g["detail"]]
              for g in result["goals"]])]
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m dsv3.bench gpu", description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="gpu_bench.json", help="where the JSON goes (default ./gpu_bench.json)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes and configs/tiny.py (CPU, < 1 min)")
  parser.add_argument("--budget_s", type=float, default=450, help="skip what would start after this many s")
  parser.add_argument("--iters", type=int, default=None, help="timed calls per GEMM (default 10, smoke 2)")
  parser.add_argument("--train_batch", type=int, default=None, help="train batch (default 16, smoke 2)")
  parser.add_argument("--train_seq", type=int, default=None, help="train seq_len (default 1024, smoke 64)")
  parser.add_argument("--train_steps", type=int, default=None, help="timed train steps (default 5, smoke 2)")
  parser.add_argument("--train_child", default=None, help=argparse.SUPPRESS)   # bf16 | fp8: one train row
  args = parser.parse_args(argv)
  if args.train_child:
    return _train_child(args)
  t0 = time.monotonic()
  deadline = t0 + args.budget_s
  # The train children run first and each wants the GPU's memory: this process takes memory as it needs it
  # instead of XLA's 75% up front (read when the backend starts, so it must be set before the first use).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if not _on_gpu() and not args.smoke:
    print(f"no GPU (backend {jax.default_backend()}): running the --smoke sizes", flush=True)
    args.smoke = True
  s = dict(SMOKE if args.smoke else FULL)
  s["iters"] = args.iters or s["iters"]
  dev = jax.devices()[0]
  peaks = {d: metrics.device_peak_flops(dev, d) for d in ("bf16", "fp8")}
  print(f"== dsv3 GPU bench on {dev.device_kind} ({jax.default_backend()})", flush=True)
  section_s = {}
  print("train step (child processes) ...", flush=True)
  train = run_train(s, args, deadline)
  section_s["train"] = time.monotonic() - t0
  print("kernel checks ...", flush=True)
  checks = run_checks()
  for r in checks:
    print(f"  {r['name']}: {r['status']} {r['reason']}", flush=True)
  section_s["checks"] = time.monotonic() - t0 - section_s["train"]
  print("GEMM timings ...", flush=True)
  grouped, dense = run_gemms(s, peaks, deadline)
  section_s["gemms"] = time.monotonic() - t0 - section_s["train"] - section_s["checks"]
  ratios = _ratios(grouped, dense)
  result = dict(
      device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count(), jax=jax.__version__,
                  python=platform.python_version(), cpu_cores=os.cpu_count()),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), smoke=args.smoke,
      shapes={k: s[k] for k in ("hidden", "inter", "experts", "top_k", "tokens", "dense_m")},
      peak_flops=peaks, checks=checks, grouped_gemm=grouped, dense_gemm=dense, fp8_vs_bf16=ratios, train=train,
      goals=evaluate_goals(grouped, ratios, train))
  result.update(wall_s=time.monotonic() - t0, section_s=section_s)
  print("\n" + tables(result) + f"\n\n({result['wall_s']:.0f} s; JSON: {args.out})", flush=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1, default=float)
  return result


if __name__ == "__main__":
  main()
