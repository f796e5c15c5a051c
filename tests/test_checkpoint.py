"""Checkpointer: round trip, keep-K, topology change, atomicity, corruption fallback, read-only readers,
storage errors, config checks."""
import errno
import gc
import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import resume
from disk import snapshot


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                      devices=jax.devices()[:n])


def _state(mesh):
  row = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  put = jax.device_put
  return {"params": {"w": put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), row),
                     "e": put((jnp.arange(32, dtype=jnp.float32) / 7).astype(jnp.bfloat16).reshape(8, 4),
                              row)},
          "opt": {"count": put(jnp.array(7, jnp.int32), rep),
                  "mu": [put(jnp.full((16, 4), 0.5, jnp.bfloat16), row)]}}


def _abstract(state, mesh, spec_of=lambda x: P("data") if x.ndim else P()):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=NamedSharding(mesh, spec_of(x))), state)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


EXTRAS = {"data": {"epoch": 1, "index": 123}, "rng": [0, 42], "config": {"model.hidden_size": 64}}


def test_round_trip_keep_and_schedule(tmp_path):
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, save_every=2) as ck:
    assert ck.latest_step() is None and ck.restore() is None
    saved = [s for s in range(1, 8) if ck.save(s, state, {**EXTRAS, "step": s})]
    assert saved == [2, 4, 6]
    assert ck.save(7, state, {**EXTRAS, "step": 7}, force=True)  # off schedule, e.g. on SIGTERM
    assert not ck.save(7, state, EXTRAS, force=True)  # already saved: not written twice
    ck.wait()
    assert ck.all_steps() == [6, 7] and ck.latest_step() == 7
    r = ck.restore(abstract_state=_abstract(state, mesh))
  assert r.step == 7 and r.extras == {**EXTRAS, "step": 7}
  _assert_tree_equal(r.state, state)
  assert r.state["params"]["w"].sharding == NamedSharding(mesh, P("data"))
  # A new Checkpointer (as after a restart) finds the same steps; an explicit step restores it.
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, save_every=2) as ck:
    assert ck.latest_step() == 7
    assert ck.read_extras(6)["step"] == 6
    assert ck.restore(6, abstract_state=_abstract(state, mesh)).extras["step"] == 6


def test_extras_must_be_json(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(TypeError, match="'key'"):
      ck.save(1, {"x": jnp.ones(2)}, {"key": jax.random.key(0)})


@pytest.mark.parametrize("n_save,n_restore", [(8, 1), (1, 8)])
def test_restore_on_other_topology(tmp_path, n_save, n_restore):
  src_mesh, dst_mesh = _mesh(n_save), _mesh(n_restore)
  state = _state(src_mesh)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ck:
    ck.save(1, state, EXTRAS)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    r = ck.restore(abstract_state=_abstract(state, dst_mesh))
  _assert_tree_equal(r.state, state)
  w = r.state["params"]["w"]
  assert w.sharding.mesh.devices.size == n_restore
  assert len(w.addressable_shards) == n_restore and w.addressable_shards[0].data.shape[0] == 16 // n_restore


def test_half_written_checkpoint_is_never_latest(tmp_path):
  state = _state(_mesh(1))
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, EXTRAS)
  # What a save killed half-way leaves behind: orbax writes into a temporary name, renamed when done.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "_METADATA").write_text("{")
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    assert ck.latest_step() == 1
    assert ck.restore(abstract_state=_abstract(state, _mesh(1))).step == 1


def _damage(step_dir, how):
  """Damages a finished checkpoint as a disk error, a bad copy or a stray `rm` would."""
  if how == "truncate":  # every stored data file of the array item cut short
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(1)
  elif how == "delete_manifest":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  elif how == "state_metadata":  # the array tree's metadata file cut short
    with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as fh:
      fh.truncate(5)
  elif how == "delete_extras":
    os.remove(os.path.join(step_dir, "extras", "metadata"))
  elif how == "delete_extras_dir":
    shutil.rmtree(os.path.join(step_dir, "extras"))
  elif how == "truncate_extras":
    with open(os.path.join(step_dir, "extras", "metadata"), "r+b") as fh:
      fh.truncate(5)
  else:
    assert how == "extras_not_object"  # valid JSON, but not the dict that was saved
    with open(os.path.join(step_dir, "extras", "metadata"), "w") as fh:
      fh.write("null")


# tensorstore may leave an asyncio callback behind when a read fails; it is harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
EXTRAS_DAMAGE = ["delete_extras", "delete_extras_dir", "truncate_extras", "extras_not_object"]
DAMAGE = ["truncate", "delete_manifest", "state_metadata"] + EXTRAS_DAMAGE


def _two_checkpoints(tmp_path, how="truncate"):
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {**EXTRAS, "step": 1})
    ck.save(2, state, {**EXTRAS, "step": 2})
  _damage(os.path.join(tmp_path, "2"), how)
  return state, mesh


@pytest.mark.parametrize("how", DAMAGE)
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, how):
  state, mesh = _two_checkpoints(tmp_path, how)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    with caplog.at_level(logging.WARNING, logger=ckpt_lib.__name__):
      r = ck.restore(abstract_state=_abstract(state, mesh))
    assert r.step == 1 and r.extras["step"] == 1
    _assert_tree_equal(r.state, state)
    assert os.path.join(str(tmp_path), "2") in caplog.text and "falling back to step 1" in caplog.text
    assert "Traceback" not in caplog.text
    # The damaged directory is moved aside, so the re-run of step 2 can save there again.
    assert ck.all_steps() == [1] and glob.glob(os.path.join(tmp_path, "2.corrupt-*"))
    assert ck.save(2, state, {**EXTRAS, "step": 2}, force=True)
    ck.wait()
    assert ck.restore(abstract_state=_abstract(state, mesh)).step == 2


def test_corrupt_latest_raises_without_fallback(tmp_path):
  state, mesh = _two_checkpoints(tmp_path)
  with ckpt_lib.Checkpointer(str(tmp_path), fallback=False) as ck:
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=os.path.join(str(tmp_path), "2")):
      ck.restore(abstract_state=_abstract(state, mesh))
    assert ck.latest_step() == 2  # nothing was moved
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=os.path.join(str(tmp_path), "2")):
      ck.restore(2, abstract_state=_abstract(state, mesh))  # an explicit step never falls back
    with pytest.raises(FileNotFoundError, match=r"\[1, 2\]"):
      ck.restore(5, abstract_state=_abstract(state, mesh))


def test_restore_without_target_and_mismatched_target_move_nothing(tmp_path):
  """No target: every array comes back whole on one local device, whatever mesh wrote it. A target
  that matches no step (a changed config) fails on every step and must not quarantine any of them."""
  mesh = _mesh(8)
  state = _state(mesh)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, EXTRAS)
    ck.save(2, state, EXTRAS)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    r = ck.restore()
    assert r.step == 2
    _assert_tree_equal(r.state, state)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(r.state))
    wrong = _abstract(state, mesh)
    wrong["params"]["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match="Nothing was moved or deleted"):
      ck.restore(abstract_state=wrong)
    assert ck.all_steps() == [1, 2] and not glob.glob(os.path.join(tmp_path, "*.corrupt-*"))


def test_check_compatible():
  saved = {"model.hidden_size": 64, "model.num_layers": 2, "num_train_steps": 100,
           "mesh.data": 8, "workdir": "/a", "seq_len": 32, "shape": (1, 2), "learning_rate": 1e-6}
  new = {"model": {"hidden_size": 128, "num_layers": 2}, "num_train_steps": 500, "mesh": {"data": 1},
         "workdir": "/b", "seq_len": 32, "shape": [1, 2], "precision": "fp8", "learning_rate": 1e-3}
  with pytest.raises(ValueError) as e:
    resume.check_compatible(saved, new)
  msg = str(e.value)
  assert "model.hidden_size: checkpoint has 64, current config has 128" in msg
  assert "precision" in msg and "new --workdir" in msg and "--config.model.hidden_size=64" in msg
  assert "precision: checkpoint has no value, current config has 'fp8'" in msg
  named = [line.split(":")[0].strip() for line in msg.splitlines() if line.startswith("  ")]
  assert named == ["model.hidden_size", "precision"]  # allowed or equal fields are not reported
  changes = resume.check_compatible(saved, new, ignore=resume.DEFAULT_IGNORE + ("model.*", "precision"))
  assert ("learning_rate", 1e-6, 1e-3) in changes and ("precision", None, "fp8") in changes
  assert "learning_rate 1e-06 -> 0.001" in resume.format_changes(changes)


def test_schedule_and_optimizer_fields_may_change_on_resume():
  saved = {"learning_rate": 1e-6, "min_lr_ratio": 0.1, "lr_schedule": "deepseek", "warmup_steps": 20,
           "decay_start_frac": 0.5, "decay_end_frac": 0.9, "grad_clip": 1.0, "weight_decay": 0.1, "b1": 0.9,
           "b2": 0.95, "mtp_weight": 0.3, "mtp_weight_final": 0.1, "balance": {"gamma": 1e-3, "gamma_final": 0.0},
           "eval_every_steps": 100, "eval_batches": 4, "data": {"eval_batches": 2, "seq_len": 32},
           "model": {"hidden_size": 64}}
  new = {"learning_rate": 1e-3, "min_lr_ratio": 0.0, "lr_schedule": "cosine", "warmup_steps": 0,
         "decay_start_frac": 0.2, "decay_end_frac": 1.0, "grad_clip": 0.5, "weight_decay": 0.0, "b1": 0.8,
         "b2": 0.99, "mtp_weight": 0.1, "mtp_weight_final": 0.0, "balance": {"gamma": 0.0, "gamma_final": 0.0},
         "eval_every_steps": 10, "eval_batches": 1, "data": {"eval_batches": 1, "seq_len": 32},
         "model": {"hidden_size": 64}, "nan_guard": {"max_bad_steps": 3}, "profile": {"steps": 2}}
  changes = {n: (a, b) for n, a, b in resume.check_compatible(saved, new)}
  assert changes["learning_rate"] == (1e-6, 1e-3) and changes["nan_guard.max_bad_steps"] == (None, 3)
  assert len(changes) == 18 and "balance.gamma_final" not in changes  # unchanged fields are not reported
  with pytest.raises(ValueError, match="data.seq_len: checkpoint has 32, current config has 64"):
    resume.check_compatible(saved, {**new, "data": {"eval_batches": 1, "seq_len": 64}})


# --------------------------------------------------------------------------------------------------
# Bad inputs: every case checks the message and that nothing on disk was lost.
SMALL = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int32)}


def _small_checkpoints(directory, steps=(1, 2)):
  with ckpt_lib.Checkpointer(str(directory), async_save=False) as ck:
    for s in steps:
      ck.save(s, SMALL, {**EXTRAS, "step": s})


@pytest.mark.parametrize("how", EXTRAS_DAMAGE)
def test_read_extras_falls_back_past_damaged_extras(tmp_path, caplog, how):
  _small_checkpoints(tmp_path)
  _damage(os.path.join(tmp_path, "2"), how)
  before = snapshot(tmp_path)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    with caplog.at_level(logging.WARNING):
      assert ck.read_extras()["step"] == 1
    assert os.path.join(str(tmp_path), "2") in caplog.text and "reading step 1 instead" in caplog.text
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=os.path.join(str(tmp_path), "2") + " extras"):
      ck.read_extras(2)  # an explicit step never falls back
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match="extras cannot be read"):
      ck.read_extras(fallback=False)
  assert snapshot(tmp_path) == before  # reading moves nothing


@pytest.mark.parametrize("how", ["delete", "garble"])
def test_damaged_step_metadata_file_still_restores_that_step(tmp_path, caplog, capfd, how):
  """The step's _CHECKPOINT_METADATA only describes it; the data is intact, so nothing falls back."""
  _small_checkpoints(tmp_path)
  meta = os.path.join(tmp_path, "2", "_CHECKPOINT_METADATA")
  if how == "delete":
    os.remove(meta)
  else:
    with open(meta, "w") as fh:
      fh.write("{garbled")
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck, caplog.at_level(logging.WARNING):
    assert ck.read_extras()["step"] == 2
    r = ck.restore()
  assert r.step == 2 and r.extras["step"] == 2 and ck.all_steps() == [1, 2]
  np.testing.assert_array_equal(np.asarray(r.state["w"]), SMALL["w"])
  assert not caplog.records and "Traceback" not in capfd.readouterr().err


def test_fallback_prints_one_line_per_skipped_step(tmp_path, caplog, capfd):
  _small_checkpoints(tmp_path, steps=(1, 2, 3))
  _damage(os.path.join(tmp_path, "3"), "truncate_extras")
  _damage(os.path.join(tmp_path, "2"), "delete_manifest")
  gc.collect()  # another test's leftovers must not log inside this one
  caplog.clear()
  capfd.readouterr()
  with caplog.at_level(logging.DEBUG):
    with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
      r = ck.restore()
  assert r.step == 1
  warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
  assert len(warnings) == 3, [w.getMessage() for w in warnings]  # step 3, step 2, "restored step 1"
  assert all("\n" not in w.getMessage() for w in warnings)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Traceback" not in caplog.text and len(err.splitlines()) < 5, err
  assert sorted(glob.glob(os.path.join(tmp_path, "*.corrupt-*")))  # moved aside, not deleted


def test_read_only_leaves_a_live_save_and_damage_alone(tmp_path):
  _small_checkpoints(tmp_path)
  live = tmp_path / "3.orbax-checkpoint-tmp-1700000000"  # a trainer's save in progress
  (live / "state").mkdir(parents=True)
  (live / "state" / "_METADATA").write_text("{")
  _damage(os.path.join(tmp_path, "2"), "truncate_extras")
  before = snapshot(tmp_path)
  with ckpt_lib.Checkpointer(str(tmp_path), read_only=True) as ck:
    assert ck.read_extras()["step"] == 1
    r = ck.restore()
    assert r.step == 1 and ck.read_extras(1)["step"] == 1
    with pytest.raises(PermissionError, match="read_only=True"):
      ck.save(4, SMALL, EXTRAS, force=True)
  assert snapshot(tmp_path) == before  # the live save's directory and the damaged step 2 are untouched
  assert live.is_dir() and (tmp_path / "2").is_dir()
  with pytest.raises(FileNotFoundError, match="nope"):
    ckpt_lib.Checkpointer(str(tmp_path / "nope"), read_only=True)
  assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_must_be_positive(tmp_path, keep):
  with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
    ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=keep)
  assert not (tmp_path / "ck").exists()


def test_checkpoint_dir_under_a_file_or_a_file_fails_at_once(tmp_path):
  sentinel = tmp_path / "notes.txt"
  sentinel.write_text("keep me")
  with pytest.raises(ckpt_lib.CheckpointStorageError,
                     match=f"{sentinel}/checkpoints is not writable: a part of the path is a file"):
    ckpt_lib.Checkpointer(str(sentinel / "checkpoints"))
  with pytest.raises(ckpt_lib.CheckpointStorageError, match=f"{sentinel} is not writable: .*not a directory"):
    ckpt_lib.Checkpointer(str(sentinel))
  assert sentinel.read_text() == "keep me" and os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("err,cause", [(PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
                                       (OSError(errno.EROFS, "Read-only file system"), "read-only file system")])
def test_unwritable_checkpoint_dir_fails_at_once(tmp_path, monkeypatch, err, cause):
  _small_checkpoints(tmp_path)
  before = snapshot(tmp_path)

  def refuse(path, *a, **k):
    raise err
  monkeypatch.setattr(ckpt_lib, "open", refuse, raising=False)  # the write probe's open
  with pytest.raises(ckpt_lib.CheckpointStorageError, match=f"{tmp_path} is not writable: {cause}"):
    ckpt_lib.Checkpointer(str(tmp_path))
  monkeypatch.undo()
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["save", "wait"])
def test_disk_full_names_directory_step_free_space_and_intact_step(tmp_path, where):
  _small_checkpoints(tmp_path)
  before = snapshot(tmp_path)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    real = getattr(ck._mgr, "save" if where == "save" else "wait_until_finished")
    calls = []

    def full(*a, **k):
      if where == "wait" and not calls:  # the background write of step 3 fails, as tensorstore reports it
        calls.append(1)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/1\": [OS error 28]")
      if where == "save":
        raise OSError(errno.ENOSPC, "No space left on device")
      return real(*a, **k)
    if where == "save":
      ck._mgr.save = full
      with pytest.raises(ckpt_lib.CheckpointStorageError) as e:
        ck.save(3, SMALL, EXTRAS)
    else:
      ck._mgr.wait_until_finished = full
      ck._pending_step = 3
      with pytest.raises(ckpt_lib.CheckpointStorageError) as e:
        ck.wait()
  msg = str(e.value)
  assert f"step 3 could not be written to {tmp_path}: no space left on device" in msg
  assert "bytes free" in msg and f"previous checkpoint (step 2, {tmp_path}/2) is intact" in msg
  assert snapshot(tmp_path) == before
