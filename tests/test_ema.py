"""HostEMA: host residency, the closed form over several updates, asynchrony, sharding, state."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import ema as ema_lib

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
  assert all(_is_host(x) for x in jax.tree.leaves(value))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(value))  # bf16 leaves stored in f32
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


@pytest.mark.parametrize("memory_kind", [None, "pinned_host"])
def test_state_through_checkpointer(tmp_path, memory_kind):
  """The EMA goes into an orbax checkpoint and back, optionally restored straight into host memory."""
  from dsv3 import checkpoint as ckpt_lib
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("data"))
  p0 = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding)}
  ema = ema_lib.HostEMA(DECAY, p0)
  ema.update(jax.tree.map(lambda x: x + 1, p0), 1)
  state = ema.state_dict()
  with ckpt_lib.Checkpointer(str(tmp_path)) as ck:
    ck.save(1, {"ema": state["ema"]}, {"ema_step": state["step"]})
    ck.wait()
    target = sharding if memory_kind is None else sharding.with_memory_kind(memory_kind)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=target), p0)
    restored = ck.restore(abstract_state={"ema": abstract})
  assert restored.state["ema"]["w"].sharding.memory_kind == (memory_kind or "device")
  other = ema_lib.HostEMA(DECAY, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), p0))
  other.load_state_dict({"ema": restored.state["ema"], "step": restored.extras["ema_step"]})
  assert other.step == 1
  np.testing.assert_array_equal(other.value()["w"], ema.value()["w"])
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
