"""Stage-sharded pipeline state (dsv3/pipeline/rank_state.py, dsv3/pipeline/pipelined.py): which rank holds
which unit per schedule, each rank's state is its stages' units and no more, the per-unit view is the
unpipelined state, and a checkpoint restores across layouts (pipelined <-> unpipelined, another degree)."""
import jax
import numpy as np
import pytest

import tiny_model
from dsv3 import layout, model as model_lib
from dsv3.config import ModelConfig
from dsv3.parallel import sharding
from dsv3.pipeline import dispatch, executor, pipelined
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import ema as ema_lib
from dsv3.training import runner as runner_lib


_config = tiny_model.pipelined_train_config


def _layout(schedule, ranks, layers=8):
  cfg = ModelConfig.from_config_dict(_config(ranks, schedule, layers=layers))
  plan = executor.get_plan(cfg, schedule, ranks, 8, devices=jax.devices()[:ranks])
  return cfg, plan.layout


def _layer_unit(l):
  return layout.unit_of(layout.LAYERS, layout.layer_key(l))


def test_holders_per_schedule():
  # 1F1B on 4 ranks, 8 layers: two layers per rank; the embedding on the first and the last rank (the
  # MTP module embeds too); the head, the final norm and the MTP module on the last.
  _, lay = _layout("1f1b", 4)
  assert [lay.holders(_layer_unit(l)) for l in range(8)] == [(0,), (0,), (1,), (1,), (2,), (2,), (3,), (3,)]
  assert lay.holders("embed_tokens") == (0, 3)
  assert lay.holders("lm_head") == lay.holders("norm") == lay.holders("mtp_0") == (3,)
  # DualPipe: stage s runs on ranks s and P-1-s (its mirror), so every unit has exactly those two holders.
  _, lay = _layout("dualpipe", 4)
  assert [lay.holders(_layer_unit(l)) for l in range(8)] == [(0, 3), (0, 3), (1, 2), (1, 2), (1, 2), (1, 2),
                                                             (0, 3), (0, 3)]
  assert lay.holders("embed_tokens") == lay.holders("lm_head") == (0, 3)
  # DualPipeV: 2P stages in a V, the first and the last on rank 0: every unit on one rank.
  _, lay = _layout("dualpipev", 4)
  assert [lay.holders(_layer_unit(l)) for l in range(8)] == [(0,), (1,), (2,), (3,), (3,), (2,), (1,), (0,)]
  assert lay.holders("embed_tokens") == lay.holders("lm_head") == (0,)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_each_rank_holds_its_stages_units_only(schedule):
  """Summed over ranks, the per-rank parameters are each unit times its holders: nothing else is held."""
  cfg, lay = _layout(schedule, 4)
  params = jax.eval_shape(lambda: layout.unstack(cfg, model_lib.init(cfg, jax.random.key(0))["params"]))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  units = {u: size(layout.select(params, {u})) for u in layout.units(params)}
  per_rank = [size(lay.restrict(params, r)) for r in range(4)]
  assert sum(per_rank) == sum(n * len(lay.holders(u)) for u, n in units.items())
  whole = size(params)
  for r, n in enumerate(per_rank):
    assert n == sum(units[u] for u in units if r in lay.holders(u)) < whole
  if schedule == "dualpipe":    # the paper's 2x: the ranks hold every unit twice
    assert sum(per_rank) == 2 * whole


@pytest.fixture(scope="module")
def dualpipe_pp2():
  config = _config(2, "dualpipe", data=2, expert=2, layers=4)
  cfg = ModelConfig.from_config_dict(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices())
  ps = pipelined.PipelinedSteps(config, cfg, mesh)
  return config, cfg, mesh, ps, ps.init(jax.random.key(3))


def test_view_is_the_unpipelined_state_and_splits_back(dualpipe_pp2):
  config, cfg, mesh, ps, ranks = dualpipe_pp2
  for r in ps.ranks:      # each rank's state on its own sub-mesh, laid out as rank_shardings says
    devices = set(ps.layout.meshes[r].devices.flat)
    jax.tree.map(lambda x, s: (x.sharding == s and set(x.sharding.device_set) <= devices) or pytest.fail(str(s)),
                 ranks[r], ps.rank_shardings[r])
  view = ps.view(ranks)
  unpipelined = jax.jit(ps.steps.init)(jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               layout.map_state(lambda t: layout.stack(cfg, jax.tree.map(np.asarray, t)), view), unpipelined)
  back = ps.split(view)
  for r in ps.ranks:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back[r], ranks[r])


def test_checkpoint_restores_across_layouts(tmp_path, dualpipe_pp2):
  """A DualPipe PP2 checkpoint (per-layer, each unit once) with its EMA restores as 1F1B on 4 ranks and as
  the unpipelined stacked state; the unpipelined checkpoint restores back into DualPipe PP2."""
  config, cfg, mesh, ps, ranks = dualpipe_pp2
  params_like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             ps.abstract["params"], ps.view_shardings["params"])
  ema = ema_lib.HostEMA(0.5, params_like)
  ema.update(ps.params_view(ranks), 0)
  view = ps.view(ranks)
  with ckpt_lib.Checkpointer(str(tmp_path / "pp2"), async_save=False) as ck:
    ck.save(3, {"train": view, "ema": ema.state_dict()["ema"]}, {"note": "pp2"})
  host = lambda t: jax.tree.map(np.asarray, t)
  stacked = layout.map_state(lambda t: layout.stack(cfg, host(t)), view)
  equal = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)

  configs = {"pp4": _config(4, "1f1b", data=2, layers=4), "one": _config(1, "1f1b", data=4, expert=2, layers=4)}
  runners = {k: runner_lib.make_runner(c, cfg, sharding.make_mesh(c.mesh, devices=jax.devices()))
             for k, c in configs.items()}
  pp4, one = runners["pp4"], runners["one"]
  assert pp4.pipelined and not one.pipelined
  ema4 = ema_lib.HostEMA(0.5, pp4.checkpoint_like["params"])
  with ckpt_lib.Checkpointer(str(tmp_path / "pp2"), read_only=True) as ck:
    got, restored = pp4.restore(ck, ema4)
  assert restored.step == 3 and int(jax.device_get(pp4.guard(got)["step"])) < 0     # a clean guard
  equal(pp4.checkpoint(got), view)
  equal(ema4.state_dict()["ema"], ema.state_dict()["ema"])

  ema1 = ema_lib.HostEMA(0.5, one.checkpoint_like["params"])
  with ckpt_lib.Checkpointer(str(tmp_path / "pp2"), read_only=True) as ck:
    state, _ = one.restore(ck, ema1)
  state = one.checkpoint(state)
  equal(state, stacked)
  equal(ema1.state_dict()["ema"], layout.stack(cfg, host(ema.state_dict()["ema"])))
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)), state,
               one.steps.saved_shardings)

  with ckpt_lib.Checkpointer(str(tmp_path / "one"), async_save=False) as ck:
    ck.save(3, {"train": state}, {"note": "one"})
  back_runner = runner_lib.make_runner(config, cfg, mesh)
  with ckpt_lib.Checkpointer(str(tmp_path / "one"), read_only=True) as ck:
    back, _ = back_runner.restore(ck)
  equal(back_runner.checkpoint(back), view)


def test_master_is_zero_sharded_and_the_step_leaves_it_in_place(dualpipe_pp2):
  """Each rank keeps its params, the FP32 master, ZeRO-1 sharded like their optimizer state (never whole on a
  device); a step gathers per-device working copies from them and leaves them untouched."""
  config, cfg, mesh, ps, ranks = dualpipe_pp2
  for r in ps.ranks:
    want = sharding.zero1_shardings(ps.plan.meshes[r], ranks[r]["params"])
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), ranks[r]["params"], want)
    big = [a for a in jax.tree.leaves(ranks[r]["params"]) if a.size >= 64]
    assert big and all(a.addressable_shards[0].data.size * 4 == a.size for a in big)    # 4 devices a rank
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (32, 17), dtype=np.int32)
  variables = [{k: jax.tree.map(lambda x: x.copy(), s[k]) for k in ("params", "routing")} for s in ranks]
  before = jax.tree.map(np.asarray, variables)
  executor.run(ps.plan, variables, tokens, 0.3, 1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, before)


def test_dry_run_records_the_calls_a_step_makes(dualpipe_pp2):
  """The dry run cannot drift from the step: executor.run walked on abstract state (dispatch.Record, what
  runner.programs and --compile_only use) records the same program calls, in the same order, as a real
  step makes."""
  config, cfg, mesh, ps, ranks = dualpipe_pp2

  class Logged(dispatch.Execute):
    calls = []

    def call(self, call, fn, *args):
      self.calls.append((call.rank, call.kind, call.name))
      return fn(*args)

  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (32, 17), dtype=np.int32)
  variables = [{k: s[k] for k in ("params", "routing")} for s in ranks]
  executor.run(ps.plan, variables, tokens, 0.3, 1e-3, exe=Logged())
  recorded = []

  def record(call, fn, args):
    recorded.append((call.rank, call.kind, call.name))
    with jax.set_mesh(call.mesh):
      return fn.trace(*args).out_info
  abstract = [{k: s[k] for k in ("params", "routing")} for s in ps.abstract_state()["ranks"]]
  executor.run(ps.plan, abstract, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype), 0.3, 1e-3,
               exe=dispatch.Record(record))
  assert recorded == Logged.calls
  kinds = {k for _, k, _ in recorded}
  assert {"F", "sums"} <= kinds and kinds & {"FB", "FBstar"}       # DualPipe fuses F&B cells
