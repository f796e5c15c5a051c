"""The trainer end to end: the CLI entry for two steps, exact resume after kill -9, SIGTERM, NaN, incompatible
workdirs, and the config errors a researcher hits first. Runs that need a clean process (signals, one device)
are subprocesses; the rest run in-process on the 8 simulated devices with mesh.data=8."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import tiny  # noqa: E402

from dsv3 import train  # noqa: E402
from dsv3.config import ConfigError  # noqa: E402
from dsv3.training.train_config import validate_train_config  # noqa: E402

# Small enough to compile in seconds; the data cache is shared by every run of the session.
OVERRIDES = ["--config.num_train_steps=6", "--config.batch_size=8", "--config.seq_len=32",
             "--config.model.vocab_size=512", "--config.data.max_files=30",
             "--config.log_every_steps=1", "--config.eval_every_steps=3", "--config.eval_batches=1",
             "--config.checkpoint_every_steps=2", "--config.warmup_steps=2", "--config.ema_decay=0.9"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dsv3cache"))
  os.environ["DSV3_CACHE"] = path
  return path


def small_config(**kw):
  c = tiny.get_config()
  for flag in OVERRIDES:
    key, value = flag[len("--config."):].split("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  c.mesh.data = 8                       # the test process has 8 simulated devices
  for key, value in kw.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run_cli(workdir, cache_dir, *extra, devices=8, wait=True, mesh=("--config.mesh.data=8",)):
  env = dict(os.environ, PYTHONPATH=ROOT, DSV3_CACHE=cache_dir, JAX_PLATFORMS="cpu",
             JAX_DEFAULT_MATMUL_PRECISION="highest",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
         *OVERRIDES, *mesh, *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_entry_cli_two_steps(tmp_path, cache_dir):
  rc, out = run_cli(tmp_path, cache_dir, "--config.num_train_steps=2")
  assert rc == 0, out[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(r["loss"] > 0 for r in rows if "loss" in r)
  assert os.listdir(tmp_path / "tb")
  assert "2" in os.listdir(tmp_path / "checkpoints")


def test_slurm_script_passes_the_readme_flags_to_the_trainer(tmp_path, cache_dir):
  """launch/slurm.sbatch run as the README shows it, with a stand-in srun that runs its command once (one
  task, so no jax.distributed): the flags after the script name reach dsv3.train, which trains."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  line = next(l for l in readme.splitlines() if "sbatch" in l and "launch/slurm.sbatch" in l)
  example = line[line.index("launch/slurm.sbatch"):].split("`")[0].split()[1:]
  assert example and all(a.startswith("--") and "=" in a for a in example), f"README's SLURM example: {line}"
  assert {a.split("=")[0] for a in example} >= {"--config", "--workdir"}, line
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
  os.chmod(bin_dir / "srun", 0o755)
  # The README's flags with this machine's config, workdir and mesh in place of the cluster's.
  local = {"--config": f"--config={ROOT}/configs/tiny.py", "--workdir": f"--workdir={tmp_path / 'run'}"}
  args = [local.get(a.split("=")[0], a) for a in example if not a.startswith("--config.mesh.")]
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, REPO=ROOT,
             DSV3_CACHE=cache_dir, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env.pop("SLURM_NTASKS", None)
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), *args, *OVERRIDES,
                         "--config.mesh.data=8", "--config.num_train_steps=2"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert "2" in os.listdir(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path, cache_dir):
  ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
  rc, out = run_cli(ref_dir, cache_dir)
  assert rc == 0, out[-3000:]
  proc = run_cli(dir_, cache_dir, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(dir_ / "checkpoints" / "4"):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  rc, out = run_cli(dir_, cache_dir)
  assert rc == 0, out[-3000:]
  assert "Resumed from" in out
  ref, got = losses(ref_dir), losses(dir_)
  assert sorted(got) == list(range(1, 7))
  assert got == ref, (got, ref)


def test_sigterm_saves_and_exits_zero(tmp_path, cache_dir):
  proc = run_cli(tmp_path, cache_dir, "--config.num_train_steps=500", "--config.checkpoint_every_steps=1000",
                 wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(tmp_path / "metrics.jsonl")
                                        and len(losses(tmp_path)) >= 2):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert steps and max(steps) >= 2 and max(steps) < 500


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
  c = small_config(learning_rate=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every_steps=1, ema_decay=0.0)
  with pytest.raises(train.TrainingError, match=r"step 1: training diverged: .*non-finite"):
    train.train_and_evaluate(c, str(tmp_path))      # step 1's update overflows: caught at once
  # A run that wrote nothing leaves no checkpoints/ (workdir.lock removes what it created).
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) \
      if os.path.isdir(tmp_path / "checkpoints") else []
  rows = losses(tmp_path) if os.path.exists(tmp_path / "metrics.jsonl") else {}
  assert all(rows[s] == rows[s] for s in steps)      # every checkpointed step had a finite loss
  assert steps == sorted(s for s in rows if rows[s] < float("inf"))[: len(steps)]


def test_incompatible_workdir_names_fields(tmp_path, cache_dir):
  train.train_and_evaluate(small_config(num_train_steps=2), str(tmp_path))
  with pytest.raises(ValueError, match=r"model\.hidden_size"):
    train.train_and_evaluate(small_config(num_train_steps=4, **{"model.hidden_size": 64}), str(tmp_path))


BAD = [
    ({"batch_size": 0}, r"config\.batch_size"),
    ({"batch_size": 12}, r"config\.batch_size.*divisible"),
    ({"seq_len": -1}, r"config\.seq_len"),
    ({"num_train_steps": 0}, r"config\.num_train_steps"),
    ({"learning_rate": 0.0}, r"config\.learning_rate"),
    ({"precision": "fp16"}, r"config\.precision"),
    ({"lr_schedule": "linear"}, r"config\.lr_schedule"),
    ({"balance.mode": "loss"}, r"config\.balance\.mode"),
    ({"ema_decay": 1.5}, r"config\.ema_decay"),
    ({"pipeline.schedule": "interleaved"}, r"config\.pipeline\.schedule"),
    ({"mesh.pipeline": 2}, r"config\.pipeline\.schedule.*dualpipe"),
    ({"mesh.expert": 0}, r"config\.mesh\.expert"),
    ({"adam_moments_dtype": "float16"}, r"config\.adam_moments_dtype"),
    ({"model.n_group": 3}, r"model\.n_group.*divisible"),
    ({"model.topk_group": 9}, r"model\.topk_group"),
    ({"model.qk_rope_head_dim": 15}, r"model\.qk_rope_head_dim.*even"),
    ({"model.kv_lora_rank": None}, r"model\.kv_lora_rank"),
    ({"model.num_experts_per_tok": 40}, r"model\.num_experts_per_tok"),
    ({"model.remat": "some"}, r"model\.remat"),
]


@pytest.mark.parametrize("override,pattern", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_config_names_the_field(override, pattern):
  with pytest.raises(ConfigError, match=pattern):
    validate_train_config(small_config(**override))


def test_unknown_model_field_is_named():
  c = small_config()
  with c.unlocked():
    c.model.hidden = 3
  with pytest.raises(ConfigError, match=r"model\.hidden: unknown field"):
    validate_train_config(c)


def test_mesh_that_does_not_match_devices(tmp_path, cache_dir):
  with pytest.raises(ValueError, match=r"mesh"):
    train.train_and_evaluate(small_config(**{"mesh.data": 2}), str(tmp_path))


def test_missing_data_path_names_field(tmp_path, cache_dir):
  with pytest.raises(ValueError, match=r"data\.source"):
    train.train_and_evaluate(small_config(**{"data.source": str(tmp_path / "nope" / "*.txt")}), str(tmp_path))


def test_missing_init_from_names_field(tmp_path, cache_dir):
  with pytest.raises(FileNotFoundError, match=r"config\.init_from"):
    train.train_and_evaluate(small_config(init_from=str(tmp_path / "missing")), str(tmp_path / "w"))


def test_cli_requires_workdir(cache_dir):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "workdir" in proc.stderr


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path, cache_dir):
  """Mean of per-micro-batch gradients == full-batch gradient, so the loss curve is unchanged."""
  runs = {}
  for accum in (1, 2):
    c = small_config(num_train_steps=3, batch_size=16, grad_accum_steps=accum, ema_decay=0.0,
                     checkpoint_every_steps=100, eval_every_steps=100)
    train.train_and_evaluate(c, str(tmp_path / f"a{accum}"))
    runs[accum] = losses(tmp_path / f"a{accum}")
  assert sorted(runs[2]) == [1, 2, 3]
  for step in runs[1]:
    assert abs(runs[1][step] - runs[2][step]) <= 1e-5 * abs(runs[1][step]), (runs[1], runs[2])


def test_init_from_hf_reads_each_shard_into_the_state_shardings(tmp_path, cache_dir):
  """init_from an HF export: the variables arrive with the state's shardings (experts split over 'expert',
  read slice by slice) and equal the exported ones; a run from it trains."""
  import jax
  import numpy as np
  from dsv3 import hf, model
  from dsv3.parallel import sharding
  from dsv3.config import ModelConfig
  from dsv3.training import runner as runner_lib
  c = small_config(**{"mesh.data": 2, "mesh.expert": 4}, num_train_steps=1, ema_decay=0.0, eval_every_steps=100)
  cfg = ModelConfig.from_config_dict(c)
  exported = model.init(cfg, jax.random.key(7))
  hf.save_checkpoint(cfg, exported, str(tmp_path / "hf"))
  mesh = sharding.make_mesh(c.mesh)
  shardings = {k: sharding.param_shardings(mesh, v) for k, v in exported.items()}
  loaded = runner_lib.make_runner(c, cfg, mesh).load(train._init_from(str(tmp_path / "hf"), cfg),
                                                     runner_lib.VARIABLES)[0]
  for key in ("params", "routing"):
    jax.tree.map(lambda a, b, s: (np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                                  (a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding} != {s}"))),
                 loaded[key], exported[key], shardings[key])
  train.train_and_evaluate(dict_config(c, init_from=str(tmp_path / "hf")), str(tmp_path / "w"))
  assert losses(tmp_path / "w").keys() == {1}


def dict_config(c, **kw):
  c = c.copy_and_resolve_references()
  for k, v in kw.items():
    c[k] = v
  return c
