"""HostEMA: host residency, the closed form over several updates, asynchrony, sharding (replicas held
once, global arrays out and in), state through orbax."""
import os
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3.training import ema as ema_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # noqa: E402

DECAY = 0.9


def _params(seed, sharding=None):
  rng = np.random.default_rng(seed)
  tree = {"w": rng.normal(size=(8, 4)).astype(np.float32),
          "sub": {"b": rng.normal(size=(4,)).astype(np.float32),
                  "h": rng.normal(size=(16, 2)).astype(jnp.bfloat16)}}
  if sharding is None:
    return jax.tree.map(jnp.asarray, tree)
  return jax.tree.map(lambda x: jax.device_put(x, sharding(x)), tree)


def _closed_form(ps, d):
  """ema_n = d^n p_0 + (1 - d) sum_{k=1..n} d^(n-k) p_k, in float64."""
  n = len(ps) - 1
  def leaf(*xs):
    xs = [np.asarray(x, np.float64) for x in xs]
    return d ** n * xs[0] + (1 - d) * sum(d ** (n - k) * xs[k] for k in range(1, n + 1))
  return jax.tree.map(leaf, *ps)


def _is_host(x):
  if isinstance(x, np.ndarray):
    return True
  return isinstance(x, jax.Array) and x.sharding.memory_kind in ema_lib.HOST_MEMORY_KINDS


@pytest.mark.parametrize("transfer", ["auto", "memory_kind", "copy"])
def test_closed_form_and_host_residency(transfer):
  ps = [_params(i) for i in range(5)]
  ema = ema_lib.HostEMA(DECAY, ps[0], transfer=transfer)
  assert ema.backend in ("memory_kind", "copy")
  for step, p in enumerate(ps[1:], start=1):
    ema.update(p, step)
  value = ema.value()
  assert all(x.sharding == p.sharding for x, p in zip(jax.tree.leaves(value), jax.tree.leaves(ps[0])))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(value))  # bf16 leaves stored in f32
  assert all(_is_host(x) for x in jax.tree.leaves(ema.state_dict()["ema"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               value, _closed_form(ps, DECAY))
  assert ema.step == 4
  ema.close()


def test_abstract_init_then_step0_initialises():
  ps = [_params(i) for i in range(3)]
  ema = ema_lib.HostEMA(DECAY, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ps[0]))
  with pytest.raises(ValueError, match="empty"):
    ema.value()
  for step, p in enumerate(ps):
    ema.update(p, step)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ema.value(), _closed_form(ps, DECAY))
  ema.close()


def test_update_returns_before_host_work_finishes(monkeypatch):
  """A blocked worker must not block update(): the future stays pending until we release it."""
  p0, p1 = _params(0), _params(1)
  ema = ema_lib.HostEMA(DECAY, p0)
  ema.wait()
  release, entered = threading.Event(), threading.Event()
  real_apply = ema._apply

  def slow_apply(*args):
    entered.set()
    assert release.wait(timeout=30), "test never released the worker"
    return real_apply(*args)
  monkeypatch.setattr(ema, "_apply", slow_apply)
  fut = ema.update(p1, 1)
  assert entered.wait(timeout=30)
  assert not fut.done() and ema.pending() == 1   # update() came back while the worker is busy
  release.set()
  ema.wait()
  assert fut.done() and ema.pending() == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ema.value(), _closed_form([p0, p1], DECAY))
  ema.close()


def test_donated_params_after_update_are_safe():
  """The next step may donate the params while the EMA's host copy is still pending."""
  p0 = _params(0)
  ema = ema_lib.HostEMA(DECAY, p0)
  p1 = _params(1)
  expected = _closed_form([p0, p1], DECAY)
  step = jax.jit(lambda t: jax.tree.map(lambda x: x * 0, t), donate_argnums=0)
  ema.update(p1, 1)
  step(p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ema.value(), expected)
  ema.close()


@pytest.mark.parametrize("transfer", ["memory_kind", "copy"])
def test_sharded_params_keep_local_shards(transfer):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  spec = lambda x: NamedSharding(mesh, P("data") if x.shape[0] % 8 == 0 else P())
  ps = [_params(i, sharding=spec) for i in range(4)]
  ema = ema_lib.HostEMA(DECAY, ps[0], transfer=transfer)
  for step, p in enumerate(ps[1:], start=1):
    ema.update(p, step)
  ema.wait()
  # "w" (8 rows) is split over 8 devices: 8 distinct one-row shards; "b" (replicated) is stored once.
  w_idx, b_idx = 2, 0  # flatten order: sub/b, sub/h, w
  assert len(ema._ema[w_idx]) == 8 and all(v.shape == (1, 4) for v in ema._ema[w_idx].values())
  assert len(ema._ema[b_idx]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ema.value(), _closed_form(ps, DECAY))
  ema.close()


def test_state_round_trip():
  ps = [_params(i) for i in range(3)]
  ema = ema_lib.HostEMA(DECAY, ps[0])
  ema.update(ps[1], 1)
  state = ema.state_dict()
  assert state["step"] == 1 and state["decay"] == DECAY
  # A fresh EMA (as on resume) restores from the state, here given back as jax arrays like orbax does.
  other = ema_lib.HostEMA(DECAY, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ps[0]))
  other.load_state_dict({**state, "ema": jax.tree.map(jnp.asarray, state["ema"])})
  assert other.step == 1
  ema.update(ps[2], 2)
  other.update(ps[2], 2)
  jax.tree.map(np.testing.assert_array_equal, ema.value(), other.value())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               other.value(), _closed_form(ps, DECAY))
  ema.close()
  other.close()


def test_worker_error_surfaces_in_wait():
  ema = ema_lib.HostEMA(DECAY, _params(0))
  bad = jax.tree.map(lambda x: jnp.zeros((3,) + x.shape[1:], x.dtype), _params(1))
  ema.update(bad, 1)
  with pytest.raises(ValueError, match="shape"):
    ema.wait()
  ema.close()


def _ep_mesh():
  return jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _ep_params(seed, mesh):
  """Expert weights split 4 ways over 'expert' (2 replicas over 'data'), a replicated dense weight, and
  one split over both axes."""
  rng = np.random.default_rng(seed)
  specs = {"experts": ((8, 16, 32), P("expert")), "dense": ((64, 32), P()), "both": ((16, 32), P("data", "expert"))}
  return {k: jax.device_put(rng.normal(size=shape).astype(np.float32), NamedSharding(mesh, spec))
          for k, (shape, spec) in specs.items()}


def test_replicas_are_held_once():
  """mesh data=2 x expert=4: the host EMA and each step's host copy hold every distinct shard once."""
  mesh = _ep_mesh()
  ps = [_ep_params(i, mesh) for i in range(3)]
  ema = ema_lib.HostEMA(DECAY, ps[0])
  for step, p in enumerate(ps[1:], start=1):
    ema.update(p, step)
  ema.wait()
  held = jax.tree.unflatten(ema._treedef, [len(leaf) for leaf in ema._ema])
  assert held == {"experts": 4, "dense": 1, "both": 8}
  naive = sum(s.data.nbytes for x in jax.tree.leaves(ps[0]) for s in x.addressable_shards)
  distinct = sum(x.nbytes for x in jax.tree.leaves(ps[0]))   # one process holds every shard here
  assert ema.host_nbytes() == distinct
  print(f"host EMA bytes: {ema.host_nbytes()} (naive per-device copy: {naive}, {naive / distinct:.2f}x)")
  snap = ema._to_host(jax.tree.leaves(ps[0]))   # the per-step host copy: one replica per distinct shard
  assert [len(x.sharding.device_set) for x in snap] == [8, 1, 4]   # flatten order: both, dense, experts
  value = ema.value()   # global arrays with the params' shardings, in device memory
  for got, p, want in zip(jax.tree.leaves(value), jax.tree.leaves(ps[0]), jax.tree.leaves(_closed_form(ps, DECAY))):
    assert got.sharding == p.sharding
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  saved = ema.state_dict()["ema"]   # for orbax: one device per distinct shard, in host memory
  assert {k: len(v.sharding.device_set) for k, v in saved.items()} == {"experts": 4, "dense": 1, "both": 8}
  assert all(_is_host(x) for x in jax.tree.leaves(saved))
  jax.tree.map(np.testing.assert_array_equal, saved, value)
  ema.close()


def test_checkpoint_sharding_keeps_one_device_per_process():
  """Replica axes shrink to one device per process and distinct shard; used axes and indices stay."""
  mesh = _ep_mesh()
  devs = mesh.devices   # (data=2, expert=4)
  one = lambda d: 0
  cut = ema_lib.checkpoint_sharding(NamedSharding(mesh, P("expert")), one)
  assert cut.mesh.devices.tolist() == devs[:1].tolist()
  assert ema_lib.checkpoint_sharding(NamedSharding(mesh, P()), one).mesh.devices.tolist() == devs[:1, :1].tolist()
  full = NamedSharding(mesh, P("data", "expert"))
  assert ema_lib.checkpoint_sharding(full, one) == full
  # Two processes split along 'data' (rows): both rows stay for a leaf replicated over 'data'.
  by_row = lambda d: int(d in devs[1])
  assert ema_lib.checkpoint_sharding(NamedSharding(mesh, P("expert")), by_row).mesh.devices.tolist() == devs.tolist()
  # Two processes split along 'expert' (columns 0-1 vs 2-3): a replicated leaf keeps one device in each.
  by_col = lambda d: int(d in devs[:, 2:])
  kept = ema_lib.checkpoint_sharding(NamedSharding(mesh, P()), by_col).mesh.devices
  assert kept.tolist() == [[devs[0, 0], devs[0, 2]]]
  shape = (8, 4)
  for spec in (P("expert"), P(None, "data"), P()):
    s = NamedSharding(mesh, spec)
    sub = ema_lib.checkpoint_sharding(s, by_col)
    want = s.devices_indices_map(shape)
    assert all(want[d] == i for d, i in sub.devices_indices_map(shape).items())


@pytest.mark.parametrize("target", ["checkpoint", "params"])
def test_state_through_checkpointer(tmp_path, target):
  """The EMA goes into an orbax checkpoint and back, restored on its checkpoint target (host memory, one
  replica) or on the params' shardings; either way the EMA continues bitwise like the original."""
  from dsv3.training import checkpoint as ckpt_lib
  mesh = _ep_mesh()
  ps = [_ep_params(i, mesh) for i in range(3)]
  ema = ema_lib.HostEMA(DECAY, ps[0])
  ema.update(ps[1], 1)
  state = ema.state_dict()
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ps[0])
  other = ema_lib.HostEMA(DECAY, like)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, {"ema": state["ema"]}, {"ema_step": state["step"]})
    ck.wait()
    abstract = other.checkpoint_target() if target == "checkpoint" else like
    restored = ck.restore(abstract_state={"ema": abstract})
  jax.tree.map(lambda r, a: (r.sharding == a.sharding) or pytest.fail(f"{r.sharding} != {a.sharding}"),
               restored.state["ema"], abstract)
  other.load_state_dict({"ema": restored.state["ema"], "step": restored.extras["ema_step"]})
  assert other.step == 1 and other.host_nbytes() == ema.host_nbytes()
  ema.update(ps[2], 2)
  other.update(ps[2], 2)
  jax.tree.map(np.testing.assert_array_equal, other.value(), ema.value())
  ema.close()
  other.close()


def test_unsharded_params_like_with_sharded_params():
  """params_like without shardings still works in one process: shards are joined on the host."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  ps = [_params(i, sharding=lambda x: NamedSharding(mesh, P("data") if x.shape[0] % 8 == 0 else P()))
        for i in range(3)]
  for transfer in ("memory_kind", "copy"):
    ema = ema_lib.HostEMA(DECAY, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ps[0]),
                          transfer=transfer)
    for step, p in enumerate(ps):
      ema.update(p, step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 ema.value(), _closed_form(ps, DECAY))
    ema.close()


def test_value_is_a_snapshot():
  """value() must not alias the state the worker keeps updating in place."""
  ps = [_params(i) for i in range(2)]
  ema = ema_lib.HostEMA(DECAY, ps[0])
  before = ema.value()
  kept = jax.tree.map(np.copy, before)
  ema.update(ps[1], 1)
  ema.wait()
  jax.tree.map(np.testing.assert_array_equal, before, kept)
  ema.close()


def _train_config(**kw):
  """configs/tiny.py shrunk like tests/test_train.py, with the EMA on, on mesh data=2 x expert=4."""
  c = tiny.get_config()
  c.update(num_train_steps=4, batch_size=8, seq_len=32, log_every_steps=1, eval_every_steps=2, eval_batches=1,
           checkpoint_every_steps=2, warmup_steps=2, ema_decay=0.9)
  c.model.vocab_size = 512
  c.data.max_files = 30
  c.mesh.data, c.mesh.expert = 2, 4
  c.update(kw)
  return c


@pytest.mark.slow
def test_trainer_resume_keeps_the_ema(tmp_path, monkeypatch):
  """8 devices, data=2 x expert=4: a run resumed from its step-2 checkpoint ends (step 4) with the same EMA,
  bitwise, as the uninterrupted run; the EMA checkpoint is sharded like the params, one replica each."""
  from dsv3.training import checkpoint as ckpt_lib
  from dsv3 import train
  monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "cache"))
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  evals = train.train_and_evaluate(_train_config(), str(full))
  assert "val_loss_ema" in evals
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")     # as if stopped after the step-2 checkpoint
  train.train_and_evaluate(_train_config(), str(resumed))

  def ema_at_4(workdir):
    with ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True) as ck:
      return ck.restore(4).state["ema"]
  want, got = ema_at_4(full), ema_at_4(resumed)
  assert jax.tree.leaves(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  with ckpt_lib.Checkpointer(str(full / "checkpoints"), read_only=True) as ck:
    params = ck.restore(4).state["train"]["params"]
  assert any(not np.array_equal(e, p) for e, p in zip(jax.tree.leaves(want), jax.tree.leaves(params)))
