"""Real multi-process runs on one machine: 2 processes × 4 CPU devices, gloo collectives.

- Expert parallelism: both processes run tests/mp_worker.py through dsv3.parallel.distributed.maybe_initialize (the
  DSV3_* variables that launch/local.sh sets), build the (data=2, expert=4) mesh over all 8 devices, and must
  print the same loss, gradient norm and logits checksum as one process holding all 8 devices.
- Preemption: SIGTERM to ONE process of a 2-process training run; both save the same step and exit 0, and
  the run resumes from that checkpoint.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mp_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV3_", "SLURM_", "OMPI_", "JAX_COORD"))}
  # conftest's --xla_force_host_platform_device_count=8 would fight DSV3_LOCAL_DEVICES in the children.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run(envs):
  """Start one worker per env, wait for all (killing every one on timeout), return their JSON lines."""
  procs = [subprocess.Popen([sys.executable, WORKER], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for env in envs]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    for p in procs:
      p.communicate()
    pytest.fail(f"multi-process workers did not finish within {TIMEOUT_S}s")
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{err[-4000:]}"
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_two_processes_match_one():
  port = _free_port()
  multi = _run([_env(DSV3_COORDINATOR=f"localhost:{port}", DSV3_NUM_PROCESSES=2, DSV3_PROCESS_ID=i,
                     DSV3_LOCAL_DEVICES=4) for i in range(2)])
  (single,) = _run([_env(DSV3_LOCAL_DEVICES=8)])
  print("single:", single, "\nmulti:", multi)
  assert single["num_processes"] == 1 and single["devices"] == 8
  assert sorted(m["process_id"] for m in multi) == [0, 1]
  for m in multi:
    assert m["num_processes"] == 2 and m["devices"] == 8 and m["local_devices"] == 4
    for key in ("loss", "grad_norm", "logits_checksum"):
      assert abs(m[key] - single[key]) <= 1e-5 * max(1.0, abs(single[key])), (key, m[key], single[key])


TRAIN_FLAGS = ["--config.batch_size=8", "--config.seq_len=32", "--config.model.vocab_size=512",
               "--config.data.max_files=30", "--config.mesh.data=8",
               "--config.log_every_steps=2", "--config.eval_every_steps=1000", "--config.checkpoint_every_steps=1000",
               "--config.ema_decay=0.9"]


def _start_training(workdir, cache, steps):
  """Two dsv3.train processes (4 CPU devices each) on one run; output goes to workdir/../out<i>.txt."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(DSV3_COORDINATOR=f"localhost:{port}", DSV3_NUM_PROCESSES=2, DSV3_PROCESS_ID=i,
               DSV3_LOCAL_DEVICES=4, DSV3_CACHE=cache, JAX_DEFAULT_MATMUL_PRECISION="highest")
    out = open(os.path.join(os.path.dirname(workdir), f"out{i}.txt"), "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "dsv3.train", f"--config={ROOT}/configs/tiny.py",
                                   f"--workdir={workdir}", *TRAIN_FLAGS, f"--config.num_train_steps={steps}"],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, workdir):
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [open(os.path.join(os.path.dirname(workdir), f"out{i}.txt")).read() for i in range(2)]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, f"process exited {p.returncode}:\n{out[-4000:]}"
  return outs


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l)["step"] for l in open(path) if l.strip().endswith("}") and '"loss"' in l]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_everywhere(tmp_path):
  """Process 1 (not the one that logs) gets SIGTERM; the processes agree on the stop at their next
  common sync point (a logging step: every 2nd), both save that step and exit 0; the run resumes there."""
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
  procs = _start_training(workdir, cache, 500)
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline and len(_logged_steps(workdir)) < 2 and all(p.poll() is None for p in procs):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = _wait(procs, workdir)
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 4 <= steps[0] < 500 and steps[0] % 2 == 0, (steps, outs[0][-2000:])
  saved = steps[0]
  assert f"saved step {saved}" in outs[0], outs[0][-2000:]
  assert max(_logged_steps(workdir)) == saved
  outs = _wait(_start_training(workdir, cache, saved + 2), workdir)
  assert f"Resumed from {workdir}/checkpoints/{saved} at step {saved}" in outs[0], outs[0][-2000:]
  assert _logged_steps(workdir)[-2:] == [saved, saved + 2]
