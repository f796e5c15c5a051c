"""Misuse and faults a new user meets (issue 31): every user error is one line naming the field or file and the
fix, whatever exception carries it; no input is silently reinterpreted; no file the trainer appends to keeps
rows of a run that did not happen; a refused run leaves nothing behind; a full disk names the step that failed.

Fast checks call the functions directly; the trainer runs in-process a few times on one shared workdir (each
run compiles), and the command lines run as subprocesses only where the command line is the point.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from test_train import OVERRIDES, ROOT, cache_dir, losses, small_config  # noqa: F401  (cache_dir: fixture)

from dsv3 import cli, convert, generate, model, train  # noqa: E402
from dsv3.config import ConfigError, ModelConfig  # noqa: E402
from dsv3.data import corpus  # noqa: E402
from dsv3.training import checkpoint as ckpt_lib, metrics, resume, steps, workdir as workdir_lib  # noqa: E402
from dsv3.training.train_config import validate_train_config  # noqa: E402


def _cli(module, *args, env=None, timeout=300):
  """(exit status, stderr lines without JAX's platform notice) of `python -m module args`."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
  proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and "xla_bridge" not in l]
  return proc.returncode, lines, proc.stdout


# ------------------------------------------------------------------------------------------------
# BAD 1: binary files in data.source are refused, naming the file.

def test_binary_files_in_a_text_source_are_refused_naming_the_file(tmp_path):
  (tmp_path / "ok.txt").write_text("def f():\n  return 1\n")
  (tmp_path / "noise.dat").write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(corpus.DataError, match=r"data\.source: .*noise\.dat is not UTF-8 text .*remove it from "
                                              r"data\.source"):
    list(corpus.iter_documents(corpus.resolve_corpus(str(tmp_path))))
  os.remove(tmp_path / "noise.dat")
  with open(sys.executable, "rb") as f:             # an executable: NUL bytes, valid UTF-8 or not
    (tmp_path / "python-copy").write_bytes(f.read(1 << 16))
  with pytest.raises(corpus.DataError, match=r"python-copy (is not UTF-8 text|holds a NUL byte)"):
    list(corpus.iter_documents(corpus.resolve_corpus(str(tmp_path))))
  bad = tmp_path / "j" / "a.jsonl"
  bad.parent.mkdir()
  bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(corpus.DataError, match=r"a\.jsonl is not UTF-8 text \(byte 0xe9 at offset 30\)"):
    list(corpus.iter_documents(corpus.resolve_corpus(str(bad))))


# ------------------------------------------------------------------------------------------------
# One line for every user error, whatever its type (dsv3.cli.run).

def _raise_in_dsv3(exc):
  raise exc


def test_a_raise_in_dsv3_is_a_user_error_and_a_library_failure_is_not():
  for err in (ValueError("config.x: bad; fix it"), FileNotFoundError("f: missing"), ckpt_lib.CheckpointCorruptError("c")):
    try:
      _raise_in_dsv3(err)              # raised in a test file: not dsv3's code
    except Exception as e:  # noqa: BLE001
      assert not cli.raised_by_a_check(e)
  with pytest.raises(Exception) as info:
    resume.check_compatible({"model.hidden_size": 128}, {"model.hidden_size": 64})
  assert cli.raised_by_a_check(info.value)
  assert "\n" not in cli.one_line(info.value) and "model.hidden_size: checkpoint has 128" in cli.one_line(info.value)
  with pytest.raises(AttributeError) as info:
    steps.init(None, None)             # an implicit failure inside dsv3 (a bug): keeps its traceback
  assert not cli.raised_by_a_check(info.value)


# ------------------------------------------------------------------------------------------------
# Leftovers: a refused run leaves the workdir as it found it.

def test_a_failed_run_removes_only_what_it_created(tmp_path):
  new = tmp_path / "a" / "b"
  with pytest.raises(ValueError):
    with workdir_lib.lock(str(new)):
      os.makedirs(new / "checkpoints")            # created, still empty
      raise ValueError("refused")
  assert not (tmp_path / "a").exists()
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  with pytest.raises(ValueError):
    with workdir_lib.lock(str(kept)):
      os.makedirs(kept / "checkpoints")
      (kept / "metrics.jsonl").write_text('{"step": 1}\n')     # the run wrote a file: all of it stays
      raise ValueError("diverged")
  assert sorted(os.listdir(kept)) == [".dsv3.lock", "checkpoints", "metrics.jsonl", "notes.txt"]
  (kept / "metrics.jsonl").unlink()
  (kept / "checkpoints").rmdir()
  (kept / ".dsv3.lock").unlink()
  with pytest.raises(ValueError):
    with workdir_lib.lock(str(kept)):
      raise ValueError("refused")
  assert os.listdir(kept) == ["notes.txt"]
  with workdir_lib.lock(str(tmp_path / "ok")):   # a run that ends normally keeps its workdir
    pass
  assert os.listdir(tmp_path / "ok") == [".dsv3.lock"]


def test_refused_runs_on_the_command_line_are_one_line_and_leave_nothing(tmp_path, cache_dir):
  """A mesh that is not the device count (ValueError) and a data.source of binary files (DataError): one line
  each, no traceback, and no workdir left holding only its lock."""
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "blob.bin.txt").write_bytes(b"\x00\x01\xff" * 1000)
  base = [f"--config={ROOT}/configs/tiny.py", *OVERRIDES]
  env = {"DSV3_CACHE": cache_dir}
  rc, lines, _ = _cli("dsv3.train", *base, f"--workdir={tmp_path / 'w1'}", "--config.mesh.data=2", env=env)
  assert rc == 1 and len(lines) == 1 and re.match(r"dsv3\.train: ValueError: .*mesh", lines[0]), lines
  rc, lines, _ = _cli("dsv3.train", *base, f"--workdir={tmp_path / 'w2'}", f"--config.data.source={tmp_path}/data",
                      env=env)
  assert rc == 2 and len(lines) == 1 and re.match(r"dsv3\.train: data\.source: .*blob\.bin\.txt (is not UTF-8 text|"
                                                  r"holds a NUL byte)", lines[0]), lines
  rc, lines, _ = _cli("dsv3.convert", "--to=orbax", f"--src={tmp_path / 'data'}", f"--dst={tmp_path / 'out'}")
  assert rc == 1 and len(lines) == 1 and "config.json" in lines[0], lines
  assert sorted(os.listdir(tmp_path)) == ["data"]


# ------------------------------------------------------------------------------------------------
# metrics.jsonl: invalid UTF-8 in a torn last line; rows of an attempt that left no checkpoint.

def test_truncate_after_drops_a_torn_line_that_is_not_utf8(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress=False)
  for s in (1, 2, 3):
    w.write_scalars(s, {"loss": float(s)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 4, "loss": "\xe2\x82')                # a crash mid-character
  assert w.truncate_after(2) == 2
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2]
  assert w.truncate_after(0) == 2 and os.path.getsize(tmp_path / "metrics.jsonl") == 0


# ------------------------------------------------------------------------------------------------
# The trainer on one workdir: a diverged attempt, a rerun, a resume with a larger batch, a shorter run.

def test_a_rerun_drops_stale_rows_says_its_warmup_and_refuses_fewer_steps(tmp_path, cache_dir, capsys):
  wd = str(tmp_path)
  # What an attempt that diverged before its first checkpoint logged (test_train_guard makes one for real).
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 11.0}\n{"step": 2, "loss": 99.0}\n')
  # The rerun in the same workdir (as the divergence message advises) logs each step once and says what it
  # dropped, and that its warmup (5 steps) is longer than the run (2).
  train.train_and_evaluate(small_config(num_train_steps=2, warmup_steps=5, eval_every_steps=100), wd)
  out = capsys.readouterr().out
  assert "dropped 2 rows an earlier attempt logged" in out and "note: config.warmup_steps=5 is longer" in out, out
  rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] != 99.0, rows
  # Fewer steps than the checkpoint's: refused before restoring, naming the field and the fix.
  with pytest.raises(ConfigError, match=r"config\.num_train_steps: 1 is below the step of the checkpoint .* \(2\), "
                                        r"so there is nothing to train; raise --config\.num_train_steps above 2"):
    train.train_and_evaluate(small_config(num_train_steps=1), wd)


@pytest.mark.slow
def test_resume_with_a_larger_batch_continues_the_data(tmp_path, cache_dir, capsys):
  """The trainer end to end: 2 steps of 8, then 1 of 16 from the checkpoint; a torn, non-UTF-8 last line of
  metrics.jsonl does not block the resume."""
  wd = str(tmp_path)
  train.train_and_evaluate(small_config(num_train_steps=2, eval_every_steps=100), wd)
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 3, "lo\xff')
  train.train_and_evaluate(small_config(num_train_steps=3, batch_size=16, eval_every_steps=100), wd)
  assert "batch_size: 8 -> 16" in capsys.readouterr().out
  with ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), read_only=True) as ckpt:
    assert ckpt.read_extras(3)["data"]["examples"] == 2 * 8 + 16
  assert sorted(losses(wd)) == [1, 2, 3]


def test_resume_after_a_batch_size_change_reads_the_next_example(tmp_path):
  from test_data import _config, _make, _take
  path = tmp_path / "ids.npy"
  np.save(path, np.arange(40_000, dtype=np.uint16))
  a = _make(_config(path, seq_len=15, batch_size=4, validation_fraction=0)).train
  rows = np.concatenate(_take(a, 7))                       # 28 examples in order
  b = _make(_config(path, seq_len=15, batch_size=8, validation_fraction=0)).train
  b.set_state(a.get_state() | {"examples": 4})             # as saved after one batch of 4
  np.testing.assert_array_equal(np.concatenate(_take(b, 3)), rows[4:28])
  assert b.get_state()["examples"] == 28
  assert resume.check_compatible({"batch_size": 4}, {"batch_size": 8}) == [("batch_size", 4, 8)]   # allowed


# ------------------------------------------------------------------------------------------------
# The divergence guard's loss-spike rule.

def _ctx(ratio=1.5, warmup=5):
  return steps.StepContext(cfg=None, mesh=None, tx=None, lr_schedule=None, expert_parallel=None, alpha=0.0,
                           grad_accum=1, max_update_ratio=0.0, max_loss_ratio=ratio, loss_warmup=warmup, aux_free=False)


def _first_spike(losses_, **kw):
  guard = {k: np.asarray(v) for k, v in steps.CLEAN_GUARD.items()}
  for i, loss in enumerate(losses_, 1):
    running, spiked = steps.loss_spike(_ctx(**kw), guard, np.float32(loss))
    if spiked:
      return i
    guard.update(running)
  return None


def test_loss_spike_rule_trips_on_a_climb_not_on_noise():
  noisy_fall = [10.9, 10.8, 9.5, 10.2, 8.7, 9.4, 8.0, 8.9, 7.1, 8.0, 6.5, 7.6, 6.0, 9.0, 5.8]
  assert _first_spike(noisy_fall) is None
  probe = [10.85, 10.83, 10.58, 10.49, 13.38, 18.52, 16.74, 13.63]     # T at learning_rate=1.0 (issue 31)
  assert _first_spike(probe) == 6
  assert _first_spike(probe, ratio=0.0) is None
  assert _first_spike([8.2, 8.1, 14.1, 21.0, 58.5, 75.8], warmup=1) == 3


def test_loss_spike_rule_is_validated():
  for value, pattern in [(0.5, r"nan_guard\.max_loss_ratio: must be 0 .* or > 1"),
                         (-1.0, r"nan_guard\.max_loss_ratio: must be >= 0"),
                         (2, None)]:
    c = small_config(**{"nan_guard.max_loss_ratio": value})
    if pattern is None:
      validate_train_config(c)
    else:
      with pytest.raises(ConfigError, match=pattern):
        validate_train_config(c)
  with pytest.raises(ConfigError, match=r"nan_guard\.loss_warmup_steps: must be an integer >= 0"):
    validate_train_config(small_config(**{"nan_guard.loss_warmup_steps": -1}))
  c = small_config()
  with c.unlocked():
    c.nan_guard.max_loss = 2.0
  with pytest.raises(ConfigError, match=r"nan_guard\.max_loss: unknown field; did you mean "
                                        r"config\.nan_guard\.max_loss_ratio\?"):
    validate_train_config(c)


def test_learning_rate_one_stops_on_the_loss_spike(tmp_path, cache_dir):
  """lr=1.0 with the update-ratio rule off: the loss climbs from ~8.2 to over 14 by step 3 (then 21, 58, ...), and
  the loss rule (armed after 2 steps here) stops the run, naming the rule and a lower learning rate."""
  c = small_config(learning_rate=1.0, num_train_steps=6, checkpoint_every_steps=100, eval_every_steps=100,
                   ema_decay=0.0, **{"nan_guard.max_update_ratio": 0.0, "nan_guard.loss_warmup_steps": 2})
  with pytest.raises(train.TrainingError) as err:
    train.train_and_evaluate(c, str(tmp_path))
  msg = str(err.value)
  assert re.match(r"step [3-6]: training diverged: loss \S+ > config\.nan_guard\.max_loss_ratio=1\.5 x \S+ \(the "
                  r"lowest EMA", msg), msg
  assert "--config.learning_rate=0.0003" in msg and "raise or zero --config.nan_guard.max_loss_ratio" in msg, msg


# ------------------------------------------------------------------------------------------------
# A full disk: the step whose save failed, in one line, without the save threads' tracebacks.

FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np, jax
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    from dsv3.training import checkpoint as ckpt_lib
    rng = np.random.default_rng(0)                   # random: OCDBT compresses nothing away
    state = {f"a{i}": jax.numpy.asarray(rng.random((64, 1024), np.float32)) for i in range(16)}   # 4 MB
    c = ckpt_lib.Checkpointer(sys.argv[1], keep=3)
    try:
      c.save(1, state, {"x": 1})                     # asynchronous: fails in orbax's threads
      c.save(2, state, {"x": 1})                     # waits for step 1 first
    except ckpt_lib.CheckpointStorageError as e:
      print("ERROR", e)
    finally:
      c.close()
""")


def test_a_full_disk_names_the_step_that_failed_and_nothing_else(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "ckpt")], env=env, capture_output=True,
                        text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert re.search(r"^ERROR checkpoint step 1 could not be written to .*: file too large", out, re.M), out[-3000:]
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  assert len([l for l in out.splitlines() if l.strip() and "xla_bridge" not in l]) == 1, out[-3000:]


# ------------------------------------------------------------------------------------------------
# generate reads what convert and init_from read: a training workdir, its checkpoints/, an export.

def test_generate_reads_a_training_workdir_as_convert_does(tmp_path):
  from test_bad_settings import _config as tiny_config
  small = {"model.vocab_size": 512, "model.num_hidden_layers": 2}
  config = tiny_config(**small)
  cfg = ModelConfig.from_config_dict(config)
  variables = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(3))
  with ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False) as ckpt:
    ckpt.save(7, {"train": {"step": np.int32(7), **variables}}, {"config": resume.flatten_config(config)})
  for path in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
    got_cfg, got = generate._load(str(path), None)          # no --config: the run's saved config
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, variables)
  assert generate._load(str(tmp_path / "run"), config)[0] == cfg                  # the same config: fine
  with pytest.raises(ValueError, match=r"--config: its model\.hidden_size=64 differs from the checkpoint's 128"):
    generate._load(str(tmp_path / "run"), tiny_config(**small, **{"model.hidden_size": 64}))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty holds no checkpoint .*; give an HF checkpoint dir"):
    generate._load(str(tmp_path / "empty"), None)
  assert convert.load_orbax_step(str(tmp_path / "run"))[0] == 7
  # convert on the same workdir says which step it exported, without the libraries' INFO lines.
  rc, lines, out = _cli("dsv3.convert", "--to=hf", f"--src={tmp_path / 'run'}", f"--dst={tmp_path / 'hf'}")
  assert rc == 0 and f"wrote {tmp_path / 'hf'} (step 7) from {tmp_path / 'run'}" in out, (out, lines)
  assert not [l for l in lines if re.match(r"^[IW]\d{4} ", l)], lines


def test_generate_says_to_shorten_a_prompt_longer_than_the_positions():
  cfg = ModelConfig.from_config_dict(small_config())
  with pytest.raises(ValueError, match=r"^prompt_ids: the prompt has 600 tokens, more than the model's "
                                       r"max_position_embeddings=512; shorten the prompt to at most 512") as err:
    generate.generate(cfg, None, [1] * 600, max_new_tokens=0)
  assert "max_new_tokens <=" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Ctrl-C during the setup's first compile: a flag the loop reads, not a KeyboardInterrupt inside XLA.

def test_ctrl_c_during_the_first_compile_stops_cleanly(tmp_path, cache_dir):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="", DSV3_CACHE=cache_dir,
             JAX_LOG_COMPILES="1")
  proc = subprocess.Popen([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py",
                           f"--workdir={tmp_path}", *OVERRIDES], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:                     # the state's init program is the first one compiled
    lines.append(line)
    if "jit(init)" in line:
      proc.send_signal(signal.SIGINT)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "stopping on SIGINT before step 1: nothing new to save" in out and "Segmentation fault" not in out, out[-3000:]
