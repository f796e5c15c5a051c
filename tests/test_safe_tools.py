"""Nothing a user does loses data: the workdir lock, export destinations (hf.save_checkpoint, dsv3.convert)
and HF loading errors. Every bad input checks the message and that no file on disk changed."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from dsv3 import convert, hf, model
from dsv3.interop import safetensors_io
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import workdir
from disk import snapshot
import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")


# --------------------------------------------------------------------------------------------------
# The workdir lock.
def _holder(path):
  """A subprocess that holds the lock of `path` until killed."""
  code = ("import sys, time; from dsv3.training import workdir; workdir.acquire(sys.argv[1], process_index=0); "
          "print('locked', flush=True); time.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_trainer_fails_naming_the_owner_then_takes_over_a_dead_ones_lock(tmp_path, caplog):
  wd = tmp_path / "run"
  proc = _holder(wd)
  try:
    (wd / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(wd)
    with pytest.raises(workdir.WorkdirLockedError,
                       match=rf"--workdir {wd} is in use by another run \(pid {proc.pid} on host "
                             rf"{socket.gethostname()}"):
      workdir.acquire(str(wd), process_index=0)
    assert snapshot(wd) == before
  finally:
    proc.kill()  # dies holding the lock: the kernel releases it, the file still names the dead pid
    proc.wait()
  with caplog.at_level(logging.WARNING, logger=workdir.__name__):
    with workdir.lock(str(wd), process_index=0) as held:
      assert held.held and f"pid={os.getpid()}" in (wd / workdir.LOCK_NAME).read_text()
  assert "stale lock" in caplog.text and f"pid {proc.pid}" in caplog.text
  assert (wd / "metrics.jsonl").read_text() == '{"step": 1}\n'
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=workdir.__name__):  # released cleanly: no takeover
    workdir.acquire(str(wd), process_index=0).release()
  assert not caplog.text


def test_second_trainer_on_the_command_line_fails_at_once_and_touches_nothing(tmp_path):
  wd = tmp_path / "run"
  proc = _holder(wd)
  try:
    (wd / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(wd)
    out = subprocess.run([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={wd}"],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"is in use by another run (pid {proc.pid} on host {socket.gethostname()}" in lines[0]
    assert snapshot(wd) == before
  finally:
    proc.kill()
    proc.wait()


def test_lock_in_the_same_process_is_exclusive_and_other_processes_do_not_lock(tmp_path):
  with workdir.lock(str(tmp_path), process_index=0):
    with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir.acquire(str(tmp_path), process_index=0)
    assert not workdir.acquire(str(tmp_path / "other"), process_index=1).held
  assert not (tmp_path / "other" / workdir.LOCK_NAME).exists()


def test_workdir_that_is_a_file_or_under_a_file(tmp_path):
  sentinel = tmp_path / "notes.txt"
  sentinel.write_text("keep me")
  with pytest.raises(workdir.WorkdirError, match=f"--workdir {sentinel} is an existing file, not a directory"):
    workdir.acquire(str(sentinel), process_index=0)
  with pytest.raises(workdir.WorkdirError,
                     match=f"--workdir {sentinel}/run cannot be created: a part of the path is a file"):
    workdir.acquire(str(sentinel / "run"), process_index=0)
  assert sentinel.read_text() == "keep me" and os.listdir(tmp_path) == ["notes.txt"]


def test_unwritable_workdir_names_the_cause(tmp_path, monkeypatch):
  def refuse(*a, **k):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(workdir.os, "open", refuse)
  with pytest.raises(workdir.WorkdirError, match=f"--workdir {tmp_path} is not writable \\(read-only file system"):
    workdir.acquire(str(tmp_path), process_index=0)


# --------------------------------------------------------------------------------------------------
# Export destinations.
CFG = tiny_model.config()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """(variables, an HF export dir); tests copy the dir before changing anything."""
  variables = model.init(CFG, jax.random.key(3))
  path = str(tmp_path_factory.mktemp("export") / "hf")
  hf.save_checkpoint(CFG, variables, path)
  return variables, path


def _workdir(path):
  """What a training run leaves: checkpoints, metrics, the lock file."""
  ckpt_lib_dir = os.path.join(path, "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_lib_dir, async_save=False) as ck:
    ck.save(1, {"w": np.ones(3, np.float32)}, {"step": 1})
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1, "loss": 3.0}\n')
  return path


def _protected(tmp_path, kind):
  d = tmp_path / kind
  d.mkdir()
  if kind == "workdir":
    _workdir(str(d))
  elif kind == "lock_only":
    workdir.acquire(str(d), process_index=0).release()
  elif kind == "checkpoints":  # a training run's checkpoints/ dir itself
    with ckpt_lib.Checkpointer(str(d), async_save=False) as ck:
      ck.save(1, {"w": np.ones(3, np.float32)}, {"step": 1})
  else:  # a --to=orbax export
    convert.save_orbax_variables(CFG, {"params": {"w": np.ones(3, np.float32)}}, str(d))
  (d / "notes.txt").write_text("mine")
  return d


@pytest.mark.parametrize("kind", ["workdir", "lock_only", "checkpoints", "orbax_export"])
def test_export_never_writes_into_a_workdir_or_orbax_checkpoint(tmp_path, export, kind):
  variables, _ = export
  d = _protected(tmp_path, kind)
  before = snapshot(tmp_path)
  what = "training workdir" if kind in ("workdir", "lock_only") else "orbax checkpoint"
  with pytest.raises(workdir.WorkdirError, match=f"{d} holds a(n)? (dsv3 )?{what}.*even with --overwrite"):
    hf.save_checkpoint(CFG, variables, str(d), overwrite=True)
  with pytest.raises(workdir.WorkdirError, match=f"{d} holds a(n)? (dsv3 )?{what}"):
    convert.save_orbax_variables(CFG, variables, str(d), overwrite=True)
  assert snapshot(tmp_path) == before  # nothing written, moved or deleted; no staging dir left


def test_export_into_a_non_empty_dir_needs_overwrite_and_only_replaces_an_export(tmp_path, export):
  variables, src = export
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  previous = tmp_path / "previous"
  shutil.copytree(src, previous)
  mixed = tmp_path / "mixed"
  shutil.copytree(src, mixed)
  (mixed / "README.md").write_text("model card")
  a_file = tmp_path / "file.bin"
  a_file.write_bytes(b"data")
  before = snapshot(tmp_path)
  for d in (other, previous, mixed):
    with pytest.raises(workdir.WorkdirError, match=f"{d} is not empty .*pass --overwrite"):
      hf.save_checkpoint(CFG, variables, str(d))
  for d, names in ((other, "notes.txt"), (mixed, "README.md")):
    with pytest.raises(workdir.WorkdirError, match=f"{d} is not a previous HF export .*{names}.*choose an empty"):
      hf.save_checkpoint(CFG, variables, str(d), overwrite=True)
  with pytest.raises(workdir.WorkdirError, match=f"{a_file} is an existing file"):
    hf.save_checkpoint(CFG, variables, str(a_file), overwrite=True)
  assert snapshot(tmp_path) == before
  bumped = jax.tree.map(lambda a: a + 1.0, variables)
  hf.save_checkpoint(CFG, bumped, str(previous), overwrite=True)  # a previous export is replaced
  _, loaded = hf.load_checkpoint(str(previous))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), bumped, loaded)
  assert sorted(os.listdir(tmp_path)) == ["file.bin", "mixed", "other", "previous"]  # no .tmp/.old left


def test_export_into_an_empty_dir_and_a_failed_export_leaves_the_old_one(tmp_path, export, monkeypatch):
  variables, src = export
  empty = tmp_path / "empty"
  empty.mkdir()
  hf.save_checkpoint(CFG, variables, str(empty))
  assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
  before = snapshot(tmp_path)

  def disk_full(*a, **k):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(safetensors_io, "write_file", disk_full)
  with pytest.raises(OSError, match="No space left"):
    hf.save_checkpoint(CFG, variables, str(empty), overwrite=True)
  assert snapshot(tmp_path) == before and os.listdir(tmp_path) == ["empty"]  # staging dir removed


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "dsv3.convert", *args], env=ENV, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_convert_refuses_a_workdir_even_with_overwrite_and_a_non_empty_dst_without(tmp_path, export):
  _, src = export
  wd = _workdir(str(tmp_path / "run"))
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  before = snapshot(tmp_path)
  proc = _convert("--to=hf", f"--src={wd}", f"--dst={wd}", "--overwrite")
  assert proc.returncode != 0 and f"--dst {wd} holds a dsv3 training workdir" in proc.stderr, proc.stderr[-2000:]
  proc = _convert("--to=orbax", f"--src={src}", f"--dst={other}")
  assert proc.returncode != 0 and "pass --overwrite" in proc.stderr and "choose an empty --dst" in proc.stderr
  assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# HF loading errors name the file.
def _copy(export, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(export[1], dst)
  return dst


@pytest.mark.parametrize("content,match", [("{\"hidden_size\": 16,", "is not valid JSON"),
                                           ("[1, 2]", "holds a JSON list, not an object")])
def test_bad_config_json_names_the_file(tmp_path, export, content, match):
  d = _copy(export, tmp_path)
  (d / "config.json").write_text(content)
  before = snapshot(tmp_path)
  with pytest.raises(hf.CheckpointError, match=f"{d}/config.json {match}"):
    hf.load_checkpoint(str(d))
  assert snapshot(tmp_path) == before


def test_missing_config_json(tmp_path, export):
  d = _copy(export, tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(hf.CheckpointError, match=f"{d}: config.json not found"):
    hf.load_checkpoint(str(d))
  assert sorted(os.listdir(d)) == ["model.safetensors"]


@pytest.mark.parametrize("how", ["truncate_data", "truncate_header", "garbage_header"])
def test_damaged_safetensors_names_the_file(tmp_path, export, how):
  d = _copy(export, tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  n = int.from_bytes(data[:8], "little")
  if how == "truncate_data":  # a download cut short
    f.write_bytes(data[: len(data) // 2])
  elif how == "truncate_header":
    f.write_bytes(data[: 8 + n // 2])
  else:
    f.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
  before = snapshot(tmp_path)
  with pytest.raises(hf.CheckpointError, match=f"{f} is not a valid safetensors file .*re-download or re-export"):
    hf.load_checkpoint(str(d))
  assert snapshot(tmp_path) == before


def test_missing_tensor_names_the_tensor_and_the_file(tmp_path, export):
  d = _copy(export, tmp_path)
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=f"missing tensor 'model.norm.weight': not in {d}/model.safetensors"):
    hf.load_checkpoint(str(d))
  # Sharded: the index says which file should have held it.
  shutil.rmtree(d)
  variables = export[0]
  hf.save_checkpoint(CFG, variables, str(d), max_shard_bytes=20_000)
  index = json.loads((d / "model.safetensors.index.json").read_text())
  shard = index["weight_map"]["model.norm.weight"]
  tensors = safetensors.numpy.load_file(str(d / shard))
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, str(d / shard))
  with pytest.raises(hf.CheckpointError, match=f"missing tensor 'model.norm.weight': not in {d}/{shard} \\(where"):
    hf.load_checkpoint(str(d))
  (d / "model.safetensors.index.json").write_text("{\"weight_map\": ")
  with pytest.raises(hf.CheckpointError, match=f"{d}/model.safetensors.index.json is not valid JSON"):
    hf.load_checkpoint(str(d))
