"""`python -m dsv3.bench gpu --smoke` on CPU: every section runs, GPU-only rows are skipped with a reason,
the JSON holds finite timings, a train row with tokens/s and the evaluated goals."""
import json
import math
import os
import subprocess
import sys

from dsv3.bench import gpu as bench_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_on_cpu_writes_the_tables_and_json(tmp_path):
  out = tmp_path / "gpu_bench.json"
  proc = subprocess.run([sys.executable, "-m", "dsv3.bench", "gpu", "--smoke", "--out", str(out)],   # as README runs it
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = proc.stdout
  r = json.loads(out.read_text())

  assert r["smoke"] and r["device"]["platform"] == "cpu" and r["device"]["jax"] and r["date"]
  for title in ("### Kernel checks", "### Grouped GEMM", "### Dense GEMM", "### Train step", "### Goals"):
    assert title in printed

  checks = {c["name"]: c for c in r["checks"]}
  assert len(checks) == 5
  xla = checks["grouped GEMM bf16, XLA ragged_dot"]        # runs on every backend: a real comparison
  assert xla["status"] == "ok" and set(xla["errors"]) == {"out", "dx", "dw"}
  assert 0 < xla["max_rel_err"] <= xla["tol"]
  for name, c in checks.items():
    if name != xla["name"]:
      assert c["status"] == "skipped" and c["reason"] == "no GPU", c

  rows = r["grouped_gemm"] + r["dense_gemm"]
  timed = [x for x in rows if x["status"] == "ok"]
  assert {(x["impl"], x.get("mode")) for x in timed} == {("XLA ragged_dot", "fwd"), ("XLA ragged_dot", "fwd+bwd"),
                                                         ("jnp.dot", "fwd")}
  for x in timed:
    assert math.isfinite(x["tflops"]) and x["tflops"] > 0 and x["ms"] > 0 and x["pct_bf16_peak"] > 0
  for x in rows:
    if x not in timed:
      assert x["status"] == "skipped" and x["reason"] == "no GPU", x
  assert all(q["ratio"] is None for q in r["fp8_vs_bf16"])  # no FP8 kernel timed without a GPU

  train = {t["precision"]: t for t in r["train"]}
  assert set(train) == {"bf16", "fp8"}
  for t in train.values():
    assert t["status"] == "ok", t
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["peak_bytes"] > 0 and t["attention"] == "dense"
    # the step-time estimate beside the measurement needs the GPU's figures: on CPU it says why there is none
    assert "estimate_s" not in t and "no step-time figures for device 'cpu'" in t["estimate_note"], t

  goals = {g["goal"].split(" >=")[0]: g for g in r["goals"]}
  assert len(goals) == 3
  assert goals["grouped GEMM"]["met"] in (True, False) and goals["grouped GEMM"]["value"] > 0
  assert goals["small config BF16 train step"]["met"] == (train["bf16"]["mfu"] >= bench_gpu.GOAL_MFU)
  fp8_goal = goals["FP8"]
  assert fp8_goal["met"] is None and fp8_goal["value"] is None and "GPU" in fp8_goal["detail"]
