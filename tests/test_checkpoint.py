"""Checkpointer: round trip, keep-K, topology change, atomicity, corruption fallback, config checks."""
import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import checkpoint as ckpt_lib


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
  else:
    os.remove(os.path.join(step_dir, "extras", "metadata"))


# tensorstore may leave an asyncio callback behind when a read fails; it is harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
DAMAGE = ["truncate", "delete_manifest", "delete_extras"]


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
           "mesh.data": 8, "workdir": "/a", "seq_len": 32, "shape": (1, 2)}
  new = {"model": {"hidden_size": 128, "num_layers": 2}, "num_train_steps": 500, "mesh": {"data": 1},
         "workdir": "/b", "seq_len": 32, "shape": [1, 2], "precision": "fp8"}
  with pytest.raises(ValueError) as e:
    ckpt_lib.check_compatible(saved, new)
  msg = str(e.value)
  assert "model.hidden_size: checkpoint has 64, current config has 128" in msg
  assert "precision" in msg and "new --workdir" in msg and "--config.model.hidden_size=64" in msg
  assert "precision: checkpoint has no value, current config has 'fp8'" in msg
  named = [line.split(":")[0].strip() for line in msg.splitlines() if line.startswith("  ")]
  assert named == ["model.hidden_size", "precision"]  # allowed or equal fields are not reported
  ckpt_lib.check_compatible(saved, new, ignore=ckpt_lib.DEFAULT_IGNORE + ("model.*", "precision"))
