"""MetricWriter sinks, resume truncation, process gating, peak FLOP/s, MFU and Throughput."""
import glob
import json
import os
import types

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from dsv3.training import metrics


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("progress", [True, False])
def test_jsonl_and_tensorboard(tmp_path, progress):
  w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress=progress)
  w.write_scalars(1, {"loss": jnp.float32(2.5), "perf/tokens_per_s": np.float64(1000.0), "mfu": 0.25})
  w.write_scalars(2, {"loss": 2.0, "lr": np.array([1e-3])})
  w.write_text(2, "sample", "hello")
  w.flush()
  w.close()
  rows = _lines(tmp_path)
  assert rows == [{"step": 1, "loss": 2.5, "perf/tokens_per_s": 1000.0, "mfu": 0.25},
                  {"step": 2, "loss": 2.0, "lr": 1e-3}]
  assert all(isinstance(r["step"], int) and all(isinstance(v, float) for k, v in r.items() if k != "step")
             for r in rows)
  events = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_non_scalar_rejected(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress=False)
  with pytest.raises(ValueError, match="'hist'"):
    w.write_scalars(1, {"hist": np.zeros(3)})
  w.close()


def test_truncate_after_resume_appends(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress=False)
  for s in range(1, 7):
    w.write_scalars(s, {"loss": float(s)})
  w.close()
  with open(os.path.join(tmp_path, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "lo')  # a line cut short by a crash
  # Resume from a checkpoint at step 4: steps 5, 6 (and the torn line) are dropped, then rewritten.
  w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress=False)
  w.truncate_after(4)
  for s in range(5, 7):
    w.write_scalars(s, {"loss": 10.0 * s})
  w.close()
  rows = _lines(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0]


def test_disabled_process_writes_nothing(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setattr(jax, "process_index", lambda: 1)  # as on a non-zero process
  w = metrics.MetricWriter(str(workdir), total_steps=10)
  assert not w.enabled
  w.truncate_after(0)
  w.write_scalars(1, {"loss": 1.0})
  w.write_text(1, "t", "x")
  w.flush()
  w.close()
  assert not workdir.exists()


def test_peak_flops_table():
  fake = lambda kind: types.SimpleNamespace(device_kind=kind, platform="gpu")
  assert metrics.device_peak_flops(fake("NVIDIA H100 80GB HBM3"), "bf16") == 989e12
  assert metrics.device_peak_flops(fake("NVIDIA H100 80GB HBM3"), "fp8") == 1979e12
  assert metrics.device_peak_flops(fake("NVIDIA H200"), "bfloat16") == 989e12
  assert metrics.device_peak_flops(fake("NVIDIA H800"), "fp8") == 1979e12
  assert metrics.device_peak_flops(fake("NVIDIA A100-SXM4-80GB")) == 312e12
  assert metrics.device_peak_flops(fake("NVIDIA H100 PCIe")) == 756e12
  with pytest.raises(ValueError, match="dtype"):
    metrics.device_peak_flops(fake("NVIDIA H100"), "int4")


def test_cpu_peak_measured_once():
  peak = metrics.device_peak_flops(jax.devices()[0], "bf16")
  assert peak > 1e8
  assert metrics.device_peak_flops(jax.devices()[0], "fp32") == peak  # cached per process


def test_mfu_and_throughput(monkeypatch):
  assert metrics.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
  assert metrics.mfu(1000.0, 6e9, 1e13, num_devices=2) == pytest.approx(0.3)
  clock = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  t = metrics.Throughput(total_steps=100, tokens_per_step=512, start_step=10,
                         flops_per_token=1e6, peak_flops=1e9)
  clock[0] += 2.0
  with t.paused():  # e.g. a checkpoint save: not counted as training time
    clock[0] += 5.0
  out = t.tick(20)
  assert out["steps_per_s"] == pytest.approx(5.0)
  assert out["tokens_per_s"] == pytest.approx(2560.0)
  assert out["eta_s"] == pytest.approx(16.0)
  assert out["mfu"] == pytest.approx(2560.0 * 1e6 / 1e9)
