"""The released checkpoint and a resume across layouts go straight into the pipelined stage layout
(issue 29 item 5): a DualPipe PP4 x EP2 run on the 8 simulated devices reads an HF dir (FP8 blocks included)
and a stacked (unpipelined) checkpoint with its EMA leaf by leaf into every rank's own shardings; nothing is
whole, or replicated over 'pipeline', at any point; each distinct block is read once. A checkpoint whose
shapes do not fit the config is refused with one line naming the tensor and both shapes; a step folder
without its state falls back like every other damaged step (issue 31 BAD 3)."""
import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest

import hlo
import tiny_model
from dsv3 import hf, layout, model as model_lib
from dsv3.analysis import compile_only
from dsv3.config import ModelConfig
from dsv3.interop import slices
from dsv3.parallel import sharding
from dsv3.training import checkpoint as ckpt_lib
from dsv3.training import ema as ema_lib
from dsv3.training import runner as runner_lib


_config = tiny_model.pipelined_train_config


def _random(tree, seed):
  """Random host values for every leaf of an abstract tree (numpy: nothing compiled, nothing equal by chance)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(0, 0.2, a.shape) if np.issubdtype(a.dtype, np.floating)
                                 else rng.integers(0, 9, a.shape)).astype(a.dtype), tree)


@pytest.fixture(scope="module")
def dualpipe():
  config = _config(4, "dualpipe", expert=2)
  cfg = ModelConfig.from_config_dict(config)
  runner = runner_lib.make_runner(config, cfg, sharding.make_mesh(config.mesh, devices=jax.devices()))
  assert runner.pipelined and len(runner.ps.ranks) == 4
  return cfg, runner


def _assert_on_rank_shardings(runner, ranks, keys=None):
  """Every leaf of every rank is on exactly that rank's sharding, inside its own sub-mesh (2 of 8 devices)."""
  ps = runner.ps
  for r in ps.ranks:
    mine = set(ps.layout.meshes[r].devices.flat)
    want = ps.rank_shardings[r] if keys is None else {k: ps.rank_shardings[r][k] for k in keys}
    def check(path, x, s):
      assert x.sharding == s, (r, jax.tree_util.keystr(path), x.sharding, s)
      assert set(x.sharding.device_set) <= mine and len(mine) < len(jax.devices()), (r, path)
    jax.tree_util.tree_map_with_path(check, ranks[r], want)


def _assert_rank_values(cfg, runner, ranks, stacked):
  """Each rank holds its units of the stacked tree `stacked` (numpy), exactly."""
  per_layer = layout.map_state(lambda t: layout.unstack(cfg, t), stacked)
  for r in runner.ps.ranks:
    want = runner.ps.layout.restrict(per_layer, r)
    jax.tree.map(lambda x, w: np.testing.assert_array_equal(np.asarray(x), np.asarray(w, x.dtype)),
                 ranks[r], want)


def test_hf_fp8_init_from_reads_each_rank_straight_into_its_shardings(tmp_path, dualpipe):
  cfg, runner = dualpipe
  variables = _random(jax.eval_shape(lambda: model_lib.init(cfg, jax.random.key(0))), 1)
  path = str(tmp_path / "hf")
  hf.save_checkpoint(cfg, variables, path, dtype="fp8")
  _, whole = hf.load_checkpoint(path)                           # the reference: every leaf whole, once
  _, source = hf.open_checkpoint(path)
  saved = slices.Saved(source, (), "hf")
  assert not saved.per_layer
  ranks = runner.load(saved, runner_lib.VARIABLES)
  _assert_on_rank_shardings(runner, ranks, runner_lib.VARIABLES)
  _assert_rank_values(cfg, runner, ranks, {k: jax.tree.map(np.asarray, whole[k]) for k in runner_lib.VARIABLES})
  # DualPipe holds every unit on two ranks, and EP2 shards the experts: each distinct block is read once.
  targets = [None if t is None else {k: t[k] for k in runner_lib.VARIABLES} for t in runner.targets()]
  route = slices.Route({k: runner.steps.abstract[k] for k in runner_lib.VARIABLES},
                       lambda t: layout.map_state(lambda v: layout.unstack(cfg, v), t), True, False)
  once = slices.planned_bytes(targets, route, source.dtypes)[0]
  held = sum(x.addressable_data(0).nbytes * len(x.sharding.device_set) for t in ranks if t is not None
             for x in jax.tree.leaves(t))
  assert once < held / 2          # every unit on two ranks (x2); the replicas inside a rank are read once


def test_stacked_checkpoint_and_ema_restore_into_dualpipe_ranks(tmp_path, dualpipe):
  """A resume across layouts: an unpipelined (stacked) checkpoint with its EMA restores into DualPipe PP4,
  each rank's state and the EMA's pieces read straight into their shardings."""
  cfg, runner = dualpipe
  stacked = _random(runner.steps.abstract, 2)
  ema_values = _random(runner.steps.abstract["params"], 3)
  with ckpt_lib.Checkpointer(str(tmp_path / "one"), async_save=False) as ck:
    ck.save(5, {"train": stacked, "ema": ema_values}, {"note": "one"})
  ema = ema_lib.HostEMA(0.5, runner.checkpoint_like["params"])
  with ckpt_lib.Checkpointer(str(tmp_path / "one"), read_only=True) as ck:
    state, restored = runner.restore(ck, ema)
  assert restored.step == 5 and runner.step(state) == int(stacked["step"])
  _assert_on_rank_shardings(runner, state["ranks"])
  _assert_rank_values(cfg, runner, state["ranks"], stacked)
  # The EMA: its pieces on the per-unit view's shardings (each unit over its holders), equal to the saved one.
  got = ema.state_dict()["ema"]
  jax.tree.map(lambda x, like: (x.sharding.spec == like.sharding.spec
                                and set(x.sharding.device_set) <= set(like.sharding.device_set)) or pytest.fail(
                                    str(x.sharding)), got, runner.checkpoint_like["params"])
  jax.tree.map(lambda x, w: np.testing.assert_array_equal(np.asarray(x), w),
               got, layout.unstack(cfg, ema_values))


def test_mismatched_shapes_name_the_tensor_and_both_shapes(tmp_path, dualpipe):
  cfg, runner = dualpipe
  wrong = runner_lib.make_runner(_config(1, "1f1b", expert=2), cfg.replace(moe_intermediate_size=24),
                                 sharding.make_mesh(dict(pipeline=1, data=4, expert=2)))
  with ckpt_lib.Checkpointer(str(tmp_path / "w"), async_save=False) as ck:
    ck.save(1, {"train": _random(wrong.steps.abstract, 4)}, {"note": "wrong"})
  with ckpt_lib.Checkpointer(str(tmp_path / "w"), read_only=True) as ck:
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
      runner.restore(ck)
  line = str(e.value)
  shape = lambda r: tuple(r.steps.abstract["params"]["moe_layers"]["mlp"]["experts_down_proj"].shape)
  assert "\n" not in line and line.startswith(f"checkpoint {tmp_path / 'w' / '1'}: tensor train/params/"), line
  assert f"has shape {shape(wrong)} in the checkpoint, the config gives {shape(runner)}" in line, line


def test_a_step_without_its_state_falls_back_for_every_reader(tmp_path, dualpipe, caplog):
  """An interrupted copy leaves a step folder without its `state` item: saved_abstract, saved, read_extras
  and the runner's restore all read the step before it (issue 31 BAD 3: a TypeError before)."""
  cfg, runner = dualpipe
  stacked = _random(runner.steps.abstract, 5)
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ck:
    ck.save(1, {"train": stacked}, {"n": 1})
    ck.save(2, {"train": stacked}, {"n": 2})
  shutil.rmtree(tmp_path / "2" / "state")
  with ckpt_lib.Checkpointer(str(tmp_path), read_only=True) as ck:
    assert ck.saved_abstract()["train"]["params"].keys() == stacked["params"].keys()
    assert ck.saved().step == 1
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=os.path.join(str(tmp_path), "2")):
      ck.saved(2)
    state, restored = runner.restore(ck)
  assert restored.step == 1 and "no readable state item" in caplog.text


@pytest.mark.skipif(not hlo.gpu_toolchain(), reason="needs a deviceless 2048-GPU topology: the compile-only GPU "
                                                     "toolchain (JAX 0.10.2 has no deviceless topology)")
def test_671b_restore_reads_each_process_slices_into_rank_shardings():
  """The paper's layout (configs/deepseek_v3.py: pipeline 16 DualPipe x expert 64 x data 2, 256 hosts of 8 GPUs),
  on abstract arrays: every rank's target is its own sharding on its 128-device sub-mesh ('pipeline' of 1),
  and each process reads only its own devices' blocks of a stacked checkpoint (a resume across layouts) and
  of the EMA, far less than the whole (the old placement read the whole model per process)."""
  config = _load_config("configs/deepseek_v3.py")
  cfg = ModelConfig.from_config_dict(config)
  count = int(config.mesh.pipeline * config.mesh.expert * config.mesh.data)
  mesh = sharding.make_mesh(config.mesh, devices=compile_only.target_devices("h800", count))
  runner = runner_lib.make_runner(config, cfg, mesh)
  ps, ranks = runner.ps, int(config.mesh.pipeline)
  targets = ps.rank_targets(range(ranks))
  for r, tree in enumerate(targets):
    mine = set(ps.layout.meshes[r].devices.flat)
    def check(path, x, s):
      assert x.sharding == s and x.sharding.mesh.shape.get("pipeline", 1) == 1, (r, jax.tree_util.keystr(path))
      assert set(x.sharding.device_set) <= mine, (r, jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(check, tree, ps.rank_shardings[r])
  nbytes = lambda tree: sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
  dtypes = lambda tree, prefix: {prefix + k: np.dtype(a.dtype) for k, a in
                                 [(ckpt_lib.leaf_key(p), a) for p, a in jax.tree_util.tree_leaves_with_path(tree)]}
  unstack = lambda t: layout.map_state(lambda v: layout.unstack(cfg, v), t)
  state = slices.planned_bytes(targets, slices.Route(runner.steps.abstract, unstack, True, False, ("train",)),
                               dtypes(runner.steps.abstract, ("train",)))
  params = runner.steps.abstract["params"]
  ema = slices.planned_bytes([runner.checkpoint_like["params"]],
                             slices.Route(params, lambda t: layout.unstack(cfg, t), True, False, ("ema",)),
                             dtypes(params, ("ema",)))
  whole = nbytes(runner.steps.abstract)
  print(f"671B restore: {len(state)} processes; whole train state {whole / 1e9:.0f} GB; per process "
        f"{min(state.values()) / 1e9:.1f}..{max(state.values()) / 1e9:.1f} GB; EMA ({nbytes(params) / 1e9:.0f} GB) "
        f"per process {min(ema.values()) / 1e9:.1f}..{max(ema.values()) / 1e9:.1f} GB")
  assert len(state) == len(ema) == count // 8
  # A process's devices are in one rank, which holds 2 of the 2P stages: at most 1/P of the model and its
  # optimizer state (less: the routed experts are split over the rank's hosts).
  assert max(state.values()) <= whole / ranks and max(ema.values()) <= nbytes(params) / ranks


def _load_config(path):
  spec = importlib.util.spec_from_file_location("dsv3_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


_RSS_MODEL = {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "num_hidden_layers": 8,
              "n_routed_experts": 32}       # configs/tiny.py:dualpipe grown to 98M parameters (+ 6M MTP)


@pytest.mark.slow
def test_init_from_costs_at_most_half_the_checkpoint_in_host_memory(tmp_path):
  """A DualPipe PP4 x EP2 run of a ~100M-parameter model on 8 CPU devices: its peak RSS with init_from (the
  slices read straight into each rank) stays within the same run from scratch + 0.5 x the checkpoint's bytes."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model = [f"--config.model.{k}={v}" for k, v in _RSS_MODEL.items()]
  cfg = ModelConfig.from_config_dict(_config(4, "dualpipe", expert=2)).replace(**_RSS_MODEL)
  hf_dir = str(tmp_path / "hf")
  hf.save_checkpoint(cfg, model_lib.init(cfg, jax.random.key(0)), hf_dir)
  ckpt_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  assert ckpt_bytes > 350e6            # ~100M float32 parameters

  def peak(*extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.train", "--config=configs/tiny.py:dualpipe", *model,
                             "--config.num_train_steps=2", *extra],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, out[-3000:]
    return usage.ru_maxrss * 1024       # KiB on Linux
  scratch = peak(f"--workdir={tmp_path / 'scratch'}")
  loaded = peak(f"--workdir={tmp_path / 'loaded'}", f"--config.init_from={hf_dir}")
  print(f"peak RSS: scratch {scratch / 1e9:.2f} GB, init_from {loaded / 1e9:.2f} GB "
        f"(+{(loaded - scratch) / 1e6:.0f} MB); checkpoint {ckpt_bytes / 1e6:.0f} MB")
  assert loaded <= scratch + 0.5 * ckpt_bytes
