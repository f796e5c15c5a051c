"""hf.load_checkpoint(..., shardings=...): the import straight into sharded arrays, one slice at a time.

The checkpoints are written by dsv3's own export (multi-shard, with an index file; FP8 with partial edge
blocks). Sharded loads must equal the whole load, and each process must read only its own slices: in two
real processes (4 CPU devices each, gloo), each reads exactly its half of the routed experts.
"""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tiny_model

from dsv3 import hf, model
from dsv3.interop import safetensors_io as sio
from dsv3.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hf_load_worker.py")


def tiny(**kw):
  return tiny_model.config(**{"num_hidden_layers": 3, **kw})


def random_variables(cfg, seed):
  """Random host values for every leaf (numpy: no compilation), so nothing is trivially equal."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  cfg = tiny()
  path = str(tmp_path_factory.mktemp("sharded") / "ckpt")
  hf.save_checkpoint(cfg, random_variables(cfg, 0), path, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  return cfg, path


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
  cfg = tiny(**tiny_model.FP8_EDGES)
  path = str(tmp_path_factory.mktemp("fp8") / "ckpt")
  hf.save_checkpoint(cfg, random_variables(cfg, 1), path, max_shard_bytes=200_000, dtype="fp8")
  return cfg, path


def _assert_equal_to_whole(sharded, whole):
  for (path, s), w in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(whole)):
    assert s.dtype == w.dtype and s.shape == w.shape, path
    np.testing.assert_array_equal(np.asarray(s), np.asarray(w), err_msg=str(path))


@pytest.mark.parametrize("data,expert", [(1, 8), (2, 4)])
def test_sharded_load_equals_whole_load(ckpt, data, expert, monkeypatch, make_mesh):
  cfg, path = ckpt
  readers = []

  class Counting(sio.Reader):
    def __init__(self, files):
      super().__init__(files)
      readers.append(self)
  monkeypatch.setattr(sio, "Reader", Counting)
  mesh = make_mesh(data, expert)
  cfg2, sharded = hf.load_checkpoint(path, shardings=lambda a: sharding.param_shardings(mesh, a))
  assert cfg2 == cfg
  # One process holds every device: each tensor is read once, even where devices replicate it (the
  # embedding and head are also read by the check that the MTP's stored copies equal them).
  counts = readers[0].tensors_read
  assert set(counts) == set(readers[0].names())
  assert {n: c for n, c in counts.items() if c != 1} == {"model.embed_tokens.weight": 2, "lm_head.weight": 2}
  experts = sharded["params"]["moe_layers"]["mlp"]["experts_up_proj"]
  assert experts.sharding.spec == P(None, "expert") and len(experts.addressable_shards) == 8
  assert sharded["params"]["embed_tokens"]["embedding"].sharding.is_fully_replicated
  _assert_equal_to_whole(sharded, hf.load_checkpoint(path)[1])


def test_explicit_sharding_tree_and_dtype(ckpt, make_mesh):
  _, path = ckpt
  mesh = make_mesh(data=1, expert=8)
  _, whole = hf.load_checkpoint(path, dtype=np.float16)
  _, sharded = hf.load_checkpoint(path, dtype=np.float16, shardings=sharding.param_shardings(mesh, whole))
  _assert_equal_to_whole(sharded, whole)
  with pytest.raises(ValueError, match=r"no sharding for params/"):
    hf.load_checkpoint(path, shardings={"routing": sharding.param_shardings(mesh, whole)["routing"]})


def test_fp8_checkpoint_loads_sharded(fp8_ckpt, make_mesh):
  _, path = fp8_ckpt
  mesh = make_mesh(data=2, expert=4)
  _, sharded = hf.load_checkpoint(path, shardings=lambda a: sharding.param_shardings(mesh, a))
  _, whole = hf.load_checkpoint(path)
  assert whole["params"]["moe_layers"]["mlp"]["experts_down_proj"].dtype == np.float32
  _assert_equal_to_whole(sharded, whole)


def test_fp8_slice_reads_only_its_rows_and_scale_blocks(fp8_ckpt):
  _, path = fp8_ckpt
  files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
  name = "model.layers.0.mlp.down_proj.weight"           # [136, 200]: 2x2 blocks, both edges partial
  whole = sio.Reader(files).read(name)
  reader = sio.Reader(files)
  part = reader.read(name, (slice(130, 136), slice(5, 140)))
  np.testing.assert_array_equal(part, whole[130:136, 5:140])
  assert reader.bytes_read == 6 * 200 + 1 * 2 * 4         # 6 rows of e4m3, one row of two float32 scales


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV3_", "SLURM_", "OMPI_", "JAX_COORD"))}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_workers(path, mode, expert, processes=2, local_devices=4, timeout=240):
  """tests/hf_load_worker.py in `processes` processes on localhost; their JSON lines."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, path, mode, str(expert)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(DSV3_COORDINATOR=f"localhost:{port}", DSV3_NUM_PROCESSES=processes,
                                     DSV3_PROCESS_ID=i, DSV3_LOCAL_DEVICES=local_devices))
           for i in range(processes)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{err[-4000:]}"
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_processes_read_only_their_own_experts(ckpt):
  cfg, path = ckpt
  results = sorted(run_workers(path, "both", expert=8), key=lambda r: r["process_id"])
  E = cfg.n_routed_experts
  for r in results:
    assert r["num_processes"] == 2 and r["devices"] == 8 and r["equal"], r
    experts = {int(m.group(1)) for n in r["tensors_read"] if (m := re.search(r"\.experts\.(\d+)\.", n))}
    mine = set(range(r["process_id"] * E // 2, (r["process_id"] + 1) * E // 2))
    assert experts == mine, (r["process_id"], sorted(experts))
  total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
  assert all(r["bytes_read"] < total for r in results)
