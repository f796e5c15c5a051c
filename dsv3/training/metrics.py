"""Training metrics: a CLU-style writer (JSONL + TensorBoard + console), peak FLOP/s, MFU, throughput.

`MetricWriter` sends every logged step to three sinks, in the spirit of clu.metric_writers:
- `workdir/metrics.jsonl`: one JSON object per `write_scalars` call, `{"step": int, **scalars}` with
  float values. It is the machine-readable record (plots, tests, regressions) and survives without any
  TensorBoard install. It is opened in append mode so a resumed run continues the same file;
  `truncate_after(step)` first drops the lines a crashed run wrote after its last checkpoint, which the
  resumed run is about to write again (step 0 on a fresh start: an earlier attempt without a checkpoint).
- TensorBoard event files under `workdir/tb` (tensorboardX), with `purge_step` after a truncation so
  TensorBoard hides the stale tail too.
- the console: a tqdm progress bar with loss, tokens/s, MFU and ETA (`start` opens it, so that its rate
  and ETA count from the first step), `console` lines above it (evaluations, resume), and `summary`.
Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`): every process computes the
same globally reduced metrics, and several writers would interleave lines in the same files.

`memory_stats()` gives the peak memory the trainer adds to each logged row: `device_peak_bytes` (the
backend's 'peak_bytes_in_use', GPU/TPU, max over this process's devices) or, where the backend has none
(CPU), `host_peak_rss_bytes` (the process's peak resident set size).

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of the hardware. The peak comes
from a table of dense (non-sparse) tensor-core figures for known accelerators; on CPU, which has no
published figure, it is measured once per process with a float32 matmul, so MFU stays meaningful in
tests and Colab runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm

# Dense peak FLOP/s by device_kind substring (lower case), checked in order: the more specific first.
# Values are NVIDIA/Google datasheet figures without 2:4 sparsity. 'fp32' means what an f32 matmul
# runs as by default on the device: TF32 tensor cores on Ampere and later GPUs. Devices without FP8
# units list their BF16 figure under 'fp8', since FP8 GEMMs there run at BF16 speed at best.
PEAK_FLOPS = (
    ("h100 pcie", {"bf16": 756e12, "fp8": 1513e12, "fp32": 378e12}),
    ("h100", {"bf16": 989e12, "fp8": 1979e12, "fp32": 494.5e12}),   # SXM / HBM3
    ("h200", {"bf16": 989e12, "fp8": 1979e12, "fp32": 494.5e12}),
    ("gh200", {"bf16": 989e12, "fp8": 1979e12, "fp32": 494.5e12}),
    ("h800", {"bf16": 989e12, "fp8": 1979e12, "fp32": 494.5e12}),   # H100 compute, less NVLink
    ("b200", {"bf16": 2250e12, "fp8": 4500e12, "fp32": 1100e12}),
    ("a100", {"bf16": 312e12, "fp8": 312e12, "fp32": 156e12}),
    ("a800", {"bf16": 312e12, "fp8": 312e12, "fp32": 156e12}),
    ("tpu v4", {"bf16": 275e12, "fp8": 275e12, "fp32": 275e12}),
    ("tpu v5 lite", {"bf16": 197e12, "fp8": 197e12, "fp32": 197e12}),
    ("tpu v5", {"bf16": 459e12, "fp8": 459e12, "fp32": 459e12}),
    ("tpu v6 lite", {"bf16": 918e12, "fp8": 918e12, "fp32": 918e12}),
)
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8", "e4m3": "fp8",
                  "fp32": "fp32", "float32": "fp32", "f32": "fp32"}
_measured: dict = {}  # (platform, device_kind, dtype) -> measured FLOP/s, once per process


def measure_matmul_flops(device, dtype, n: int, repeats: int = 3) -> float:
  """Best-of-`repeats` FLOP/s of a jitted n x n matmul on `device` (after one compile/warm-up run)."""
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def device_peak_flops(device=None, dtype: str = "bf16") -> float:
  """Peak FLOP/s of one device for matmuls in `dtype` ('bf16' | 'fp8' | 'fp32', aliases accepted).

  Known accelerators: the datasheet table above. CPU: a 1024 x 1024 float32 matmul measured once per
  process (XLA:CPU computes bf16 matmuls through f32, so f32 is the honest peak for every dtype).
  Unknown accelerators: a measured 4096 x 4096 bf16 matmul, with a warning that MFU is approximate.
  """
  device = device or jax.local_devices()[0]
  key = _DTYPE_ALIASES.get(str(dtype).lower())
  if key is None:
    raise ValueError(f"dtype must be one of {sorted(_DTYPE_ALIASES)}, got {dtype!r}")
  kind = device.device_kind.lower()
  for name, peaks in PEAK_FLOPS:
    if name in kind:
      return peaks[key]
  cache_key = (device.platform, kind, key if device.platform != "cpu" else "fp32")
  if cache_key not in _measured:
    if device.platform == "cpu":
      _measured[cache_key] = measure_matmul_flops(device, jnp.float32, 1024)
    else:
      logging.warning("No peak FLOP/s on record for %r; measuring a bf16 matmul instead, so MFU is "
                      "relative to that measurement.", device.device_kind)
      _measured[cache_key] = measure_matmul_flops(device, jnp.bfloat16, 4096)
  return _measured[cache_key]


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, num_devices: int = 1) -> float:
  """Model FLOPs utilisation: tokens/s x model FLOPs per token / (peak FLOP/s per device x devices)."""
  return float(tokens_per_s) * float(flops_per_token) / (float(peak) * num_devices)


def memory_stats(devices=None) -> dict:
  """Peak memory so far, for the metrics rows: {'device_peak_bytes': max over `devices` (default: this
  process's) of memory_stats()['peak_bytes_in_use']} where the backend reports it (GPU, TPU); else (CPU)
  {'host_peak_rss_bytes': this process's peak resident set size}."""
  peaks = []
  for d in devices if devices is not None else jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without the query: fall back to the host figure
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return {"device_peak_bytes": float(max(peaks))}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
  return {"host_peak_rss_bytes": float(rss if sys.platform == "darwin" else rss * 1024)}


class Throughput:
  """Steps/s, tokens/s, ETA (and MFU when FLOP figures are given) between successive `tick`s.

  Each tick measures the interval since the previous one (or since construction), so the first
  interval includes compilation; time spent inside `with throughput.paused():` (evaluation,
  checkpointing) is left out, so the rates describe training alone.
  """

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0,
               flops_per_token: Optional[float] = None, peak_flops: Optional[float] = None,
               num_devices: int = 1):
    self.total_steps = int(total_steps)
    self.tokens_per_step = int(tokens_per_step)
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self._last_step = int(start_step)
    self._last_time = time.perf_counter()
    self._paused_s = 0.0

  @contextlib.contextmanager
  def paused(self):
    """Excludes the time spent in the `with` block from the next interval."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused_s += time.perf_counter() - t0

  def tick(self, step: int) -> dict:
    """Returns {'steps_per_s', 'tokens_per_s', 'eta_s'[, 'mfu']} for the steps since the last tick."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time - self._paused_s, 1e-9)
    steps = int(step) - self._last_step
    self._last_step, self._last_time, self._paused_s = int(step), now, 0.0
    steps_per_s = steps / elapsed
    out = {"steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * self.tokens_per_step,
           "eta_s": (self.total_steps - int(step)) / steps_per_s if steps_per_s > 0 else float("inf")}
    if self.flops_per_token and self.peak_flops:
      out["mfu"] = mfu(out["tokens_per_s"], self.flops_per_token, self.peak_flops, self.num_devices)
    return out


# Progress-bar fields: label -> metric name, matched exactly or as the last part of 'group/name'.
_PROGRESS_FIELDS = (("loss", "loss", "{:.4f}"), ("tok/s", "tokens_per_s", "{:,.0f}"),
                    ("MFU", "mfu", "{:.1%}"))


def _to_float(name: str, value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
  return float(arr.reshape(()))


class MetricWriter:
  """Writes scalars to metrics.jsonl, TensorBoard and a console progress bar (process 0 only).

  Args:
    workdir: the run directory; files go to workdir/metrics.jsonl and workdir/tb.
    total_steps: the run's last step, for the progress bar and its ETA.
    enabled: whether this process writes; defaults to `jax.process_index() == 0`.
    progress: a tqdm bar (True) or one plain line per `write_scalars` on stdout (False, for logs).
  """

  def __init__(self, workdir: str, total_steps: int, enabled: Optional[bool] = None,
               progress: bool = True):
    self.workdir = os.fspath(workdir)
    self.total_steps = int(total_steps)
    self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
    self.progress = progress
    self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(self.workdir, "tb")
    self._jsonl = None
    self._tb = None
    self._purge_step: Optional[int] = None
    self._bar = None
    self._initial_step = 0
    if self.enabled:
      os.makedirs(self.workdir, exist_ok=True)

  # Sinks open lazily so that `truncate_after` can run first on resume.
  def _files(self):
    if self._jsonl is None:
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    if self._tb is None:
      self._tb = tensorboardX.SummaryWriter(self.tb_dir, purge_step=self._purge_step, flush_secs=30)
      self._purge_step = None
    return self._jsonl, self._tb

  def truncate_after(self, step: int) -> int:
    """Drops metrics.jsonl lines with step > `step` and hides later TensorBoard events: on resume, what a
    crashed run logged after its checkpoint; on a fresh start (step 0), everything an earlier attempt that
    left no checkpoint logged. Lines that do not read back (cut short, not UTF-8) are dropped too. Returns
    how many rows were dropped."""
    if not self.enabled:
      return 0
    dropped = 0
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if os.path.exists(self.jsonl_path):
      kept = []
      with open(self.jsonl_path, "rb") as f:      # bytes: a line a crash cut inside a character still reads
        for line in f:
          try:
            if int(json.loads(line.decode("utf-8"))["step"]) <= step:
              kept.append(line if line.endswith(b"\n") else line + b"\n")
              continue
          except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a crash: drop it, it would break readers of the file
          dropped += bool(line.strip())
      tmp = self.jsonl_path + ".tmp"
      with open(tmp, "wb") as f:
        f.writelines(kept)
      os.replace(tmp, self.jsonl_path)  # atomic: a crash here leaves the old or the new file
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._purge_step = int(step) + 1
    self._initial_step = int(step)
    return dropped

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records `scalars` (name -> scalar) at `step` in every sink."""
    if not self.enabled:
      return
    values = {k: _to_float(k, v) for k, v in scalars.items()}
    jsonl, tb = self._files()
    jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    jsonl.flush()  # one small write per logged step; a crash then loses nothing already logged
    for k, v in values.items():
      tb.add_scalar(k, v, int(step))
    self._show(int(step), values)

  def start(self, step: int) -> None:
    """Opens the progress bar at `step` (the first step this run trains), so tqdm's ETA counts from now."""
    self._initial_step = int(step)
    if self.enabled and self.progress and self._bar is None:
      self._open_bar()

  def console(self, line: str) -> None:
    """Prints one line on the console (above the progress bar), process 0 only."""
    if self.enabled:
      self._print(line)

  def summary(self, steps: int, first_step: int, last_step: int, tokens: int, seconds: float,
              loss: Optional[float], val_loss: Optional[float], checkpoint: Optional[str],
              best: Optional[str] = None) -> None:
    """Closes the bar and prints what the run did and where its outputs are (process 0 only)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    print(f"done: {steps} steps ({first_step} -> {last_step} of {self.total_steps}), {tokens:,} tokens in "
          f"{seconds:.1f} s; final loss {fmt(loss)}, val_loss {fmt(val_loss)}", flush=True)
    print(f"  checkpoint: {checkpoint or 'none written'}", flush=True)
    if best:
      print(f"  best:       {best}", flush=True)
    print(f"  metrics:    {self.jsonl_path} (TensorBoard: {self.tb_dir})", flush=True)

  def write_text(self, step: int, name: str, text: str) -> None:
    """Records a text (e.g. a sample generation or the config) in TensorBoard and on the console."""
    if not self.enabled:
      return
    self._files()[1].add_text(name, text, int(step))
    self._print(f"[step {step}] {name}: {text}")

  def _fields(self, values: Mapping[str, float]) -> dict:
    out = {}
    for label, metric, fmt in _PROGRESS_FIELDS:
      for k, v in values.items():
        if k == metric or k.endswith("/" + metric):
          out[label] = fmt.format(v)
          break
    return out

  def _show(self, step: int, values: Mapping[str, float]) -> None:
    fields = self._fields(values)
    if not self.progress:
      print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in fields.items()),
            flush=True)
      return
    if self._bar is None:
      self._open_bar()
    if fields:          # e.g. an evaluation's scalars have none: keep the training ones on show
      self._bar.set_postfix(fields, refresh=False)
    self._bar.update(max(0, step - self._bar.n))     # one redraw per logged step

  def _open_bar(self) -> None:
    # total= gives tqdm's ETA ('elapsed<remaining'); the postfix adds loss, tokens/s and MFU.
    self._bar = tqdm.tqdm(total=self.total_steps, initial=self._initial_step, unit="step",
                          dynamic_ncols=True, file=sys.stderr)

  def _print(self, line: str) -> None:
    if self._bar is not None:
      self._bar.write(line)  # keeps the bar intact below the printed line
    else:
      print(line, flush=True)

  def flush(self) -> None:
    """Pushes buffered events to disk."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes every sink (the writer can be used again: sinks reopen lazily)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
