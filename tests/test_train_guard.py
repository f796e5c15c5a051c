"""The divergence guard and the console: a diverging run stops at the first bad step (even between logging
points) before any later checkpoint, names that step, the good checkpoint and a learning rate that works from
it; a 20-step run prints a short console (progress bar with ETA, one line per evaluation, a summary)."""
import os
import re
import subprocess
import sys

import pytest

from test_train import OVERRIDES, ROOT, cache_dir, losses, small_config  # noqa: F401  (cache_dir: fixture)

from dsv3 import train  # noqa: E402
from dsv3.training import checkpoint as ckpt_lib  # noqa: E402


def checkpoint_steps(workdir):
  """The workdir's checkpoint steps; none when a run that wrote nothing left no checkpoints/ (workdir.lock)."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


@pytest.mark.slow
def test_diverging_learning_rate_stops_and_resumes_lower(tmp_path, cache_dir):
  """lr=1e6: step 1 is good (the warmup's lr is 0), step 2's update is ~1e7 x the parameters."""
  c = small_config(learning_rate=1e6, num_train_steps=4, checkpoint_every_steps=1, eval_every_steps=100)
  with pytest.raises(train.TrainingError) as err:
    train.train_and_evaluate(c, str(tmp_path))
  msg = str(err.value)
  assert re.match(r"step 2: training diverged: update/param norm ratio \S+ > config\.nan_guard\.max_update_ratio",
                  msg), msg
  assert f"step 1 ({tmp_path / 'checkpoints' / '1'})" in msg, msg
  assert checkpoint_steps(tmp_path) == [1]
  assert sorted(losses(tmp_path)) == [1]            # nothing logged past the bad step
  # The checkpoint it names restores ...
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
    assert ckpt.restore().step == 1
  # ... and the advised command (the same config with the advised learning rate) resumes from it.
  lr = float(re.search(r"--config\.learning_rate=(\S+) ", msg).group(1))
  assert 0 < lr < 1e-1, msg
  last = train.train_and_evaluate(small_config(learning_rate=lr, num_train_steps=4, checkpoint_every_steps=1,
                                               eval_every_steps=100), str(tmp_path))
  rows = losses(tmp_path)
  assert sorted(rows) == [1, 2, 3, 4] and all(v < 20 for v in rows.values()), rows
  assert last["update_ratio"] < c.nan_guard.max_update_ratio


def test_bad_step_between_logging_points_is_caught_before_saving(tmp_path, cache_dir):
  """lr=1e30, no logging before step 6, a checkpoint at step 3: step 2 overflows, the sticky on-device
  record keeps it, and the sync before the save at step 3 stops the run with nothing saved."""
  c = small_config(learning_rate=1e30, num_train_steps=6, log_every_steps=100, checkpoint_every_steps=3,
                   eval_every_steps=100, ema_decay=0.0)
  with pytest.raises(train.TrainingError, match=r"^step 2: training diverged: .*non-finite") as err:
    train.train_and_evaluate(c, str(tmp_path))
  assert "No checkpoint was written" in str(err.value) and "--config.learning_rate=0.0003" in str(err.value)
  assert checkpoint_steps(tmp_path) == []


def count_lines(text):
  """(lines ending in '\\n', segments split on '\\n' and '\\r'): a tqdm bar redraws with '\\r', so the
  first counts what stays in a terminal, the second every redraw of the bar as a line of its own."""
  return text.count("\n") + (not text.endswith("\n")), len([s for s in re.split(r"[\r\n]", text) if s.strip()])


def test_console_is_short_and_says_where_outputs_are(tmp_path, cache_dir):
  env = dict(os.environ, PYTHONPATH=ROOT, DSV3_CACHE=cache_dir, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  overrides = [f for f in OVERRIDES if not f.startswith(("--config.log_every", "--config.eval_every",
                                                         "--config.checkpoint_every", "--config.num_train"))]
  proc = subprocess.run([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py",
                         f"--workdir={tmp_path}", *overrides, "--config.num_train_steps=20",
                         "--config.log_every_steps=10", "--config.eval_every_steps=10",
                         "--config.checkpoint_every_steps=10"],
                        cwd=ROOT, env=env, capture_output=True, timeout=600)
  out = (proc.stdout + proc.stderr).decode()
  assert proc.returncode == 0, out[-3000:]
  lines, segments = count_lines(out)
  assert lines <= 12 and segments <= 25, (lines, segments, out)
  assert not re.search(r"^[IW]\d{4} ", out, re.M), out          # no absl/orbax INFO lines
  assert re.search(r"20/20 \[\d\d:\d\d<00:00, .*loss=\d+\.\d+, tok/s=[\d,]+, MFU=", out), out  # bar: ETA, fields
  assert re.search(r"10/20 \[\d\d:\d\d<\d\d:\d\d", out), out    # the ETA while running
  assert len(re.findall(r"^step (10|20): val_loss \d+\.\d+ ppl \d+\.\d+ val_loss_ema \d+\.\d+ maxvio \d",
                        out, re.M)) == 2, out
  assert re.search(r"done: 20 steps .* 5,120 tokens .* final loss \d+\.\d+, val_loss \d+\.\d+", out), out
  assert str(tmp_path / "checkpoints" / "20") in out and str(tmp_path / "metrics.jsonl") in out, out
