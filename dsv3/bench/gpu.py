"""One command for a lent GPU: every GPU kernel checked against its CPU reference, grouped GEMM TFLOP/s at
DeepSeek-V3's expert shapes, and the small config's train step, printed as markdown tables and written as JSON.

  python -m dsv3.bench gpu [--out=gpu_bench.json]    # one H100/H200, <= 8 minutes
  python -m dsv3.bench gpu --smoke                   # tiny shapes and configs/tiny.py; a CPU in < 1 minute

Kernel checks and GEMM timings: dsv3/bench/gpu_kernels.py; the train rows, goals and tables: here.

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

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from dsv3 import cli
from dsv3.analysis import chip_figures
from dsv3.bench import common, gpu_kernels, step
from dsv3.config import ModelConfig
from dsv3.nn import attention, moe
from dsv3.training import metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RESULT = "BENCH_GPU_TRAIN_RESULT "          # prefix of the child's one JSON line on stdout

# DeepSeek-V3's routed experts (hidden, moe_intermediate, experts, top-k) and the token counts timed.
FULL = dict(hidden=7168, inter=2048, experts=256, top_k=8, tokens=(4096, 16384), dense_m=16384,
            config="small", batch=16, seq=1024, steps=5, iters=10)
SMOKE = dict(hidden=256, inter=128, experts=8, top_k=2, tokens=(128,), dense_m=256,
             config="tiny", layers=2, batch=2, seq=64, steps=2, iters=2)   # 1 dense + 1 MoE layer: quick compile
GOAL_GROUPED_PCT, GOAL_FP8_RATIO, GOAL_MFU = 0.60, 1.3, 0.40


# ---------------------------------------------------------------------------------------------------
# Train step (in a child process per precision).
# ---------------------------------------------------------------------------------------------------
def train_row(name, precision, batch, seq, steps, layers=None) -> dict:
  """step.train_throughput of configs/<name>.py at `precision` (`layers` deep if given), attention on
  cuDNN where it takes the shapes, plus this process's peak memory."""
  c = common.short_run_config(name, steps, batch, seq, cli.load_config(name).model.vocab_size, 0, 0)
  c.precision = precision
  c.model.num_hidden_layers = layers or c.model.num_hidden_layers
  cfg = ModelConfig.from_config_dict(c)
  sd = lambda d: jax.ShapeDtypeStruct((1, seq, cfg.num_attention_heads, d), jnp.dtype(cfg.dtype))
  qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  why_not = attention.cudnn_unsupported(sd(qk), sd(qk), sd(cfg.v_head_dim)) if gpu_kernels.on_gpu() else "no GPU"
  # 'cudnn' rather than 'auto' where it should work, so that a cuDNN failure shows instead of a fallback.
  c.model.attention = "auto" if why_not else "cudnn"
  attn = "cudnn" if not why_not else ("dense" if seq <= attention.DENSE_MAX_LEN else "blockwise")
  try:
    figures, estimate_note = chip_figures.for_device(jax.devices()[0].device_kind), ""
  except chip_figures.UnknownTargetError as e:
    figures, estimate_note = None, str(e)
  r = step.train_throughput(c, batch, seq, steps, figures)
  mem = metrics.memory_stats()
  return dict(r, config=name, layers=cfg.num_hidden_layers, precision=precision, attention=attn,
              attention_note=why_not, estimate_note=estimate_note, grouped_gemm=moe.grouped_gemm_impl(cfg), status="ok", reason="",
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
    cmd = [sys.executable, "-m", "dsv3.bench.gpu", "--train_child", precision, "--train_batch", str(batch),
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
         _md(["config", "precision", "attention", "batch", "compile+1st s", "step ms", "estimated ms", "tokens/s", "MFU",
              "MFU vs BF16 peak", "peak memory GiB", "note"],
             [[r["config"] + (f", {r['layers']} layers" if "layers" in r else ""), r["precision"],
               r.get("attention", ""), f"{r['batch']}x{r['seq_len']}",
               f(r.get("first_step_s"), ".1f"), f(r.get("step_s") and r["step_s"] * 1e3, ".0f"),
               f(r.get("estimate_s") and r["estimate_s"] * 1e3, ".0f"),
               f(r.get("tokens_per_s"), ",.0f"), f(r.get("mfu"), ".1%"), f(r.get("mfu_bf16_peak"), ".1%"),
               f(r.get("peak_bytes") and r["peak_bytes"] / 2**30, ".2f")
               + (" (host RSS)" if r.get("peak_bytes_kind") == "host_peak_rss_bytes" else ""),
               r["reason"] or "; ".join(n for n in (r.get("attention_note"), r.get("estimate_note")) if n)]
              for r in result["train"]]), "",
         "### Goals", "",
         _md(["goal", "value", "met", "detail"],
             [[g["goal"], f(g["value"], ".3g"), {True: "met", False: "NOT met", None: "n/a"}[g["met"]], g["detail"]]
              for g in result["goals"]])]
  return "\n".join(out)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined only by `python -m dsv3.bench gpu` (dsv3/bench/__main__.py) and
  by this module's main block (its train children)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out", "gpu_bench.json", "Where the JSON goes (default ./gpu_bench.json).", **fv)
  flags.DEFINE_bool("smoke", False, "Tiny shapes and configs/tiny.py (CPU, < 1 min).", **fv)
  flags.DEFINE_float("budget_s", 450, "Skip what would start after this many s.", **fv)
  flags.DEFINE_integer("iters", None, "Timed calls per GEMM (default 10, smoke 2).", **fv)
  flags.DEFINE_integer("train_batch", None, "Train batch (default 16, smoke 2).", **fv)
  flags.DEFINE_integer("train_seq", None, "Train seq_len (default 1024, smoke 64).", **fv)
  flags.DEFINE_integer("train_steps", None, "Timed train steps (default 5, smoke 2).", **fv)
  flags.DEFINE_enum("train_child", None, ["bf16", "fp8"], "Internal: run one train row (a child).", **fv)


def main(argv):
  if argv[1:]:
    raise cli.UsageError(f"unexpected argument(s) {argv[1:]}")
  args = common.flag_args(define_flags)
  if args.train_child:
    _train_child(args)
  else:
    run(args)                # its result is in args.out; returning it would make it absl's exit status


def run(args):
  """The whole command (args: the flags' values); returns the result it writes to args.out."""
  t0 = time.monotonic()
  deadline = t0 + args.budget_s
  # The train children run first and each wants the GPU's memory: this process takes memory as it needs it
  # instead of XLA's 75% up front (read when the backend starts, so it must be set before the first use).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if not gpu_kernels.on_gpu() and not args.smoke:
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
  checks = gpu_kernels.run_checks()
  for r in checks:
    print(f"  {r['name']}: {r['status']} {r['reason']}", flush=True)
  section_s["checks"] = time.monotonic() - t0 - section_s["train"]
  print("GEMM timings ...", flush=True)
  grouped, dense = gpu_kernels.run_gemms(s, peaks, deadline)
  section_s["gemms"] = time.monotonic() - t0 - section_s["train"] - section_s["checks"]
  ratios = gpu_kernels.ratios(grouped, dense)
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


if __name__ == "__main__":       # the train children; people run `python -m dsv3.bench gpu`
  define_flags()
  common.run(main)
