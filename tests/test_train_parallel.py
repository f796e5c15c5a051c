"""The trainer under expert parallelism: same losses and routing biases as one device, across processes too.

- the train CLI for 5 steps on 1 device vs --config.mesh.data=2 --config.mesh.expert=4 on 8 devices;
- launch/local.sh: 2 processes x 4 CPU devices (gloo) vs 1 process x 8 devices, same mesh;
- the 2-process checkpoint restores (and training continues) in 1 process;
- DualPipe as PP2 x DP2 x EP2 in one process, and as PP4 x EP2 with its ranks split over 2 processes.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--config.num_train_steps=5", "--config.batch_size=8", "--config.seq_len=32",
         "--config.model.vocab_size=512", "--config.data.max_files=30",
         "--config.log_every_steps=1", "--config.eval_every_steps=1000", "--config.checkpoint_every_steps=5",
         "--config.ema_decay=0.0", "--config.balance.gamma=0.01"]
EP = ["--config.mesh.data=2", "--config.mesh.expert=4"]


def env(cache, devices=None):
  e = dict(os.environ, PYTHONPATH=ROOT, DSV3_CACHE=cache, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
  return e


def train(workdir, cache, devices, *extra):
  proc = subprocess.run([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py",
                         f"--workdir={workdir}", *STEPS, *extra], cwd=ROOT, env=env(cache, devices),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return losses(workdir)


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return np.array([r["loss"] for r in rows if "loss" in r])


def routing(workdir):
  from dsv3 import convert
  return convert.load_orbax_variables(str(workdir))["routing"]


def assert_resumes_like_reference(workdir, ref_dir, cache, steps, common=(), devices=1, mesh=()):
  """Resumes `workdir`'s checkpoint to `steps` (on `devices`, with the `mesh` flags) and a copy of the
  1-device reference's checkpoint to `steps` on one device, both with the `common` flags: the steps
  after the restore must log the same losses, so parameters, optimizer state, routing biases and the
  data position all came back whatever topology wrote the checkpoint."""
  ref_copy = shutil.copytree(ref_dir, f"{workdir}_reference")
  done = len(losses(workdir))
  got = train(workdir, cache, devices, *common, *mesh, f"--config.num_train_steps={steps}")
  ref = train(ref_copy, cache, 1, *common, f"--config.num_train_steps={steps}")
  assert len(got) == len(ref) == steps > done
  np.testing.assert_allclose(got[done:], ref[done:], rtol=2e-5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("one")
  return workdir, train(workdir, cache, 1)


@pytest.mark.slow
def test_cli_expert_parallel_matches_one_device(tmp_path, cache, one_device):
  ref_dir, ref = one_device
  got = train(tmp_path, cache, 8, *EP)
  assert len(got) == 5
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
               routing(tmp_path), routing(ref_dir))
  assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(routing(tmp_path)))  # biases moved


@pytest.mark.slow
def test_two_processes_match_one_and_restore_in_one(tmp_path, cache, one_device):
  _, ref = one_device
  e = env(cache)
  e["DSV3_LOCAL_DEVICES"] = "4"
  e["PYTHON"] = sys.executable
  proc = subprocess.run(["bash", f"{ROOT}/launch/local.sh", "2", f"--config={ROOT}/configs/tiny.py",
                         f"--workdir={tmp_path}", *STEPS, *EP], cwd=ROOT, env=e, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  np.testing.assert_allclose(losses(tmp_path), ref, rtol=2e-5)
  # The checkpoint the two processes wrote together restores in one process and training continues
  # exactly as the 1-device run continues from its own checkpoint.
  assert_resumes_like_reference(tmp_path, one_device[0], cache, 6, devices=8, mesh=EP)


PIPELINE_BATCH = ["--config.batch_size=16", "--config.num_train_steps=3", "--config.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def one_device_pipeline_batch(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("one_b16")
  return workdir, train(workdir, cache, 1, *PIPELINE_BATCH)


def assert_same_variables(workdir, ref_dir, atol=1e-5, max_outliers=1e-4):
  """Parameters and routing biases after the run (two real AdamW updates: the first step's lr is 0).

  Adam normalises each element's update, so an element whose gradient is at fp32 round-off level may move
  by up to the step's learning rate either way (here at most 3e-4 per run); a few such elements per leaf
  (at most `max_outliers` of it) may differ by up to 1e-3, every other element by `atol`. A missing or
  doubled gradient moves whole rows and fails both bounds.
  """
  from dsv3 import convert
  import jax
  got, ref = convert.load_orbax_variables(str(workdir)), convert.load_orbax_variables(str(ref_dir))

  def check(path, a, b):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    name = jax.tree_util.keystr(path)
    assert diff.max() <= 1e-3, (name, float(diff.max()))
    assert np.mean(diff > atol) <= max_outliers, (name, int(np.sum(diff > atol)), diff.size)
  jax.tree_util.tree_map_with_path(check, got, ref)


PP2_DP2_EP2 = ["--config.mesh.pipeline=2", "--config.mesh.data=2", "--config.mesh.expert=2",
               "--config.pipeline.microbatches=4"]


@pytest.mark.slow
def test_cli_pipeline_matches_one_device(tmp_path, cache, one_device_pipeline_batch):
  """DualPipe on 8 devices as PP2 x DP2 x EP2 (experts split inside each stage) logs the 1-device losses
  and ends with the same parameters. Every schedule's step is checked against value_and_grad in
  test_pipeline_executor; the trainer passes the schedule through, so one schedule covers its wiring."""
  ref_dir, ref = one_device_pipeline_batch
  got = train(tmp_path, cache, 8, *PIPELINE_BATCH, *PP2_DP2_EP2, "--config.pipeline.schedule=dualpipe")
  assert len(got) == 3
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  assert_same_variables(tmp_path, ref_dir)


@pytest.mark.slow
def test_pipeline_stages_across_two_processes(tmp_path, cache, one_device_pipeline_batch):
  """DualPipe PP4 x EP2 with ranks 0-1 in one process and 2-3 in the other (activations and gradients
  cross processes through the collective transfer programs; each stage splits its experts over 2
  devices) logs the 1-device losses; its checkpoint resumes on one device, unpipelined."""
  e = env(cache)
  e["DSV3_LOCAL_DEVICES"] = "4"
  e["PYTHON"] = sys.executable
  mesh = ["--config.mesh.pipeline=4", "--config.mesh.expert=2", "--config.pipeline.microbatches=8",
          "--config.pipeline.schedule=dualpipe"]
  args = [f"--config={ROOT}/configs/tiny.py", f"--workdir={tmp_path}", *STEPS, *PIPELINE_BATCH, *mesh]
  proc = subprocess.run(["bash", f"{ROOT}/launch/local.sh", "2", *args], cwd=ROOT, env=e, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  ref_dir, ref = one_device_pipeline_batch
  np.testing.assert_allclose(losses(tmp_path), ref, rtol=2e-5)
  assert_same_variables(tmp_path, ref_dir)
  assert_resumes_like_reference(tmp_path, ref_dir, cache, 4, common=PIPELINE_BATCH)
