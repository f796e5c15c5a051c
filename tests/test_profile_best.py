"""Profiling (a jax.profiler trace of chosen steps, peak memory in metrics.jsonl) and best checkpoints
(keep_best_by / keep_best, convert --best): what is written, what is kept, and bad values named."""
import glob
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from dsv3 import convert, train
from dsv3.config import ConfigError
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import metrics as metrics_lib
from dsv3.training import resume
from dsv3.training.train_config import validate_train_config
from test_train import ROOT, cache_dir, small_config  # noqa: F401  (cache_dir: the shared data cache fixture)

MEMORY_FIELDS = ("device_peak_bytes", "host_peak_rss_bytes")


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]


def _traces(workdir):
  """The trace sessions (profile/plugins/profile/<time>/) that hold a trace file."""
  found = set()
  for pattern in ("*.xplane.pb", "*.trace.json.gz"):
    found |= {os.path.dirname(f) for f in glob.glob(os.path.join(workdir, "profile", "**", pattern), recursive=True)
              if os.path.getsize(f) > 0}
  return sorted(found)


@pytest.mark.slow
def test_run_profiles_logs_memory_keeps_best_and_convert_exports_it(tmp_path, cache_dir):
  """One small run (compiling dominates): steps 1..4, evaluations and checkpoints at 2 and 4, step 2 traced."""
  wd, out = str(tmp_path / "wd"), str(tmp_path / "hf")
  train.train_and_evaluate(small_config(num_train_steps=4, keep_best_by="val_loss", keep_best=1, keep_checkpoints=1, eval_every_steps=2,
                                        **{"profile.start_step": 2, "profile.num_steps": 1}), wd)
  assert len(_traces(wd)) == 1, os.listdir(wd)
  rows = [r for r in _rows(wd) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(sum(f in r for f in MEMORY_FIELDS) == 1 and max(r.get(f, 0) for f in MEMORY_FIELDS) > 0
             for r in rows), rows[0]
  val = {r["step"]: r["val_loss"] for r in _rows(wd) if "val_loss" in r}
  assert sorted(val) == [2, 4]
  best = min(val, key=lambda s: (val[s], -s))
  with ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True) as c:
    assert c.all_steps() == sorted({best, 4})       # the best one and the latest
    assert all(c.metrics(s)["val_loss"] == pytest.approx(val[s]) for s in c.all_steps())
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv3.convert", "--to=hf", f"--src={wd}", f"--dst={out}", "--best"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"(step {best}, the best)" in proc.stdout
  assert os.path.exists(os.path.join(out, "config.json"))


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_memory_stats_device_peak_or_host_rss():
  gpu = [_Device({"peak_bytes_in_use": 5 << 20, "bytes_in_use": 1}), _Device({"peak_bytes_in_use": 7 << 20})]
  assert metrics_lib.memory_stats(gpu) == {"device_peak_bytes": float(7 << 20)}
  host = metrics_lib.memory_stats([_Device(None)])          # CPU: memory_stats() is None
  assert list(host) == ["host_peak_rss_bytes"] and host["host_peak_rss_bytes"] > 1 << 20


def test_profile_and_keep_best_fields_may_change_on_resume():
  a = resume.flatten_config(small_config())
  b = resume.flatten_config(small_config(keep_best_by="val_loss", keep_best=2, eval_every_steps=2,
                                           **{"profile.start_step": 3, "profile.num_steps": 2}))
  changed = {name for name, _, _ in resume.check_compatible(a, b)}
  assert changed == {"keep_best_by", "keep_best", "eval_every_steps", "profile.start_step", "profile.num_steps"}


def _save_ranked(directory, losses, keep, keep_best, config=None):
  """Saves one tiny step per (step, val_loss or None) in order; returns the open Checkpointer."""
  c = ckpt_lib.Checkpointer(directory, keep=keep, best_by="val_loss", keep_best=keep_best, async_save=False)
  for step, loss in losses:
    c.save(step, {"w": jnp.full((2,), step, jnp.float32)}, {"config": config or {}},
           force=True, metrics=None if loss is None else {"val_loss": loss})
  return c


def test_keeps_best_n_next_to_latest_k(tmp_path):
  losses = [(1, 5.0), (2, 3.0), (3, 4.0), (4, 1.0), (5, 6.0), (6, 7.0)]
  with _save_ranked(str(tmp_path), losses, keep=1, keep_best=2) as c:
    assert c.all_steps() == [2, 4, 6]         # best two (1.0 at 4, 3.0 at 2) + the latest
    c.save(7, {"w": jnp.zeros(2)}, {}, force=True)        # no evaluation (a SIGTERM save): recency only
    assert c.all_steps() == [2, 4, 7]
    assert c.metrics(4) == {"val_loss": 1.0} and c.metrics(7) is None
  with ckpt_lib.Checkpointer(str(tmp_path), keep=1, best_by="val_loss", keep_best=2) as c:  # reopened
    assert c.best_step() == 4
    c.save(8, {"w": jnp.zeros(2)}, {}, force=True, metrics={"val_loss": 0.5})
    c.wait()
    assert c.all_steps() == [4, 8]
  with ckpt_lib.Checkpointer(str(tmp_path), read_only=True) as c:
    assert c.best_step("val_loss") == 8


def test_recency_only_without_keep_best_by(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
  for step, loss in [(1, 1.0), (2, 5.0), (3, 6.0)]:
    c.save(step, {"w": jnp.zeros(2)}, {}, metrics={"val_loss": loss})
  assert c.all_steps() == [2, 3] and c.metrics(2) is None
  c.close()
  with pytest.raises(ValueError, match="keep_best must be >= 1 with keep_best_by='val_loss'"):
    ckpt_lib.Checkpointer(str(tmp_path), best_by="val_loss", keep_best=0)


def test_convert_best_step_picks_lowest_val_loss_or_says_none(tmp_path):
  _save_ranked(str(tmp_path / "a"), [(2, 3.0), (4, 2.0), (6, 2.5)], keep=1, keep_best=2,
               config={"keep_best_by": "val_loss"}).close()
  assert convert.best_step(str(tmp_path / "a")) == 4
  _save_ranked(str(tmp_path / "b"), [(2, None), (4, None)], keep=3, keep_best=1).close()
  with pytest.raises(ValueError, match=r"no checkpoint in .*b carries a val_loss .*--step"):
    convert.best_step(str(tmp_path / "b"))


@pytest.mark.parametrize("override, pattern", [
    ({"keep_best_by": "foo"}, r"config\.keep_best_by: must be '' .* or one of val_loss, got 'foo'"),
    ({"keep_best_by": "val_loss", "keep_best": 0, "eval_every_steps": 2}, r"config\.keep_best: must be an integer >= 1"),
    ({"keep_best_by": "val_loss"}, r"config\.eval_every_steps: 3 must divide checkpoint_every_steps=2"),
    ({"profile.start_step": 0, "profile.num_steps": 1}, r"config\.profile\.start_step: must be an integer >= 1"),
    ({"profile.num_steps": -1}, r"config\.profile\.num_steps: must be an integer >= 0"),
    ({"profile.start_step": 7, "profile.num_steps": 1}, r"config\.profile\.start_step: 7 is after the last step"),
])
def test_bad_values_name_the_field_and_write_nothing(tmp_path, override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    train.train_and_evaluate(small_config(**override), str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


def test_unknown_profile_field_is_named():
  c = small_config()
  with c.unlocked():
    c.profile.start = 3
  with pytest.raises(ConfigError, match=r"profile\.start: unknown field; did you mean config\.profile\.start_step"):
    validate_train_config(c)
