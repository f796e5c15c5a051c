"""Real multi-process expert parallelism on one machine: 2 processes × 4 CPU devices, gloo collectives.

Both processes run tests/mp_worker.py through dsv3.distributed.maybe_initialize (the DSV3_* variables
that launch/local.sh sets), build the (data=2, expert=4) mesh over all 8 devices, and must print the
same loss, gradient norm and logits checksum as one process holding all 8 devices.
"""
import json
import os
import socket
import subprocess
import sys

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
