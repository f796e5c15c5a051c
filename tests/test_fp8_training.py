"""--config.precision=fp8 through the real trainer: the loss stays within the paper's 0.25% of BF16.

The report's claim (§3.3, Appendix B.1) is for long runs; here the same tiny run (same data, same init) is
trained in BF16 and in FP8 (emulated exactly on CPU) and the final losses are compared."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # noqa: E402

from dsv3 import train  # noqa: E402


def run(precision, workdir):
  c = tiny.get_config()
  c.precision = precision
  c.num_train_steps, c.batch_size, c.seq_len, c.warmup_steps = 8, 8, 32, 4
  c.model.vocab_size = 512
  c.data.max_files, c.eval_batches = 30, 2
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 8, 1000
  c.ema_decay = 0.0
  c.mesh.data = 8
  return train.train_and_evaluate(c, workdir)


@pytest.mark.slow
def test_fp8_loss_within_quarter_percent_of_bf16(tmp_path, monkeypatch):
  monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "cache"))
  bf16 = run("bf16", str(tmp_path / "bf16"))
  fp8 = run("fp8", str(tmp_path / "fp8"))
  rel_train = abs(fp8["loss"] - bf16["loss"]) / bf16["loss"]
  rel_val = abs(fp8["val_loss"] - bf16["val_loss"]) / bf16["val_loss"]
  print(f"FP8 vs BF16 relative loss error: train {rel_train:.5f}, validation {rel_val:.5f}")
  assert rel_train < 0.0025 and rel_val < 0.0025
  assert fp8["loss"] != bf16["loss"]                 # the FP8 path really ran


def run_on_mesh(precision, mesh, workdir):
  c = tiny.get_config()
  c.precision = precision
  c.num_train_steps, c.batch_size, c.seq_len = 2, 16, 32
  c.model.vocab_size = 512
  c.data.max_files, c.eval_batches, c.ema_decay = 30, 1, 0.0
  c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 2, 1000
  c.mesh.data, c.mesh.expert, c.mesh.pipeline = mesh.get("data", 1), mesh.get("expert", 1), mesh.get("pipeline", 1)
  if c.mesh.pipeline > 1:
    c.pipeline.schedule, c.pipeline.microbatches = "dualpipe", 4
  return train.train_and_evaluate(c, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"data": 2, "expert": 4}, {"pipeline": 2, "data": 2, "expert": 2}],
                         ids=["ep", "dualpipe_ep"])
def test_fp8_trains_on_every_mesh(tmp_path, monkeypatch, mesh):
  """FP8 custom-VJP GEMMs inside shard_map (expert parallelism), and inside per-stage pipeline programs
  whose experts are split over the stage's devices: on each mesh FP8 tracks BF16 on that mesh (same data,
  same init) within the paper's 0.25%, and differs from it (the FP8 GEMMs ran)."""
  monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "cache"))
  bf16 = run_on_mesh("bf16", mesh, str(tmp_path / "bf16"))
  fp8 = run_on_mesh("fp8", mesh, str(tmp_path / "fp8"))
  for key in ("loss", "val_loss"):
    rel = abs(fp8[key] - bf16[key]) / bf16[key]
    print(f"{mesh}: FP8 {key} {fp8[key]:.5f} vs BF16 {bf16[key]:.5f}, relative {rel:.5f}")
    assert rel < 0.0025, (key, fp8[key], bf16[key])
  assert fp8["loss"] != bf16["loss"]
