"""python -m dsv3.convert in both directions: HF -> orbax -> HF gives the same tensors and the same logits;
a training checkpoint is only read."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from dsv3 import convert, hf, model
from dsv3.training import checkpoint as ckpt_lib
from disk import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roundtrip_through_orbax(tmp_path, tiny_cfg):
  cfg = tiny_cfg.replace(q_lora_rank=None)  # a full-rank q_proj: the other query layout on export
  variables = model.init(cfg, jax.random.key(3))
  hf.save_checkpoint(cfg, variables, str(tmp_path / "hf"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  (tmp_path / "hf2").mkdir()  # an empty destination is fine
  for to, src, dst, *extra in (("orbax", "hf", "orbax"), ("hf", "orbax", "hf2"), ("hf", "orbax", "hf2", "--overwrite")):
    proc = subprocess.run([sys.executable, "-m", "dsv3.convert", f"--to={to}", f"--src={tmp_path / src}",
                           f"--dst={tmp_path / dst}", *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["hf", "hf2", "orbax"]  # the overwrite left no .tmp / .old behind
  cfg2, v2 = hf.load_checkpoint(str(tmp_path / "hf2"))
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, v2)
  # --fp8: DeepSeek's serving format, read back dequantised (E4M3 keeps ~2 significant digits).
  proc = subprocess.run([sys.executable, "-m", "dsv3.convert", "--to=hf", f"--src={tmp_path / 'orbax'}",
                         f"--dst={tmp_path / 'fp8'}", "--fp8"], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "fp8" / "config.json") as f:
    assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
  _, v8 = hf.load_checkpoint(str(tmp_path / "fp8"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.07, atol=1e-3),
               variables, v8)


def test_missing_source_is_reported(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv3.convert", "--to=orbax", f"--src={tmp_path / 'nope'}",
                         f"--dst={tmp_path / 'out'}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--src" in proc.stderr


def test_reading_a_training_checkpoint_leaves_it_untouched(tmp_path):
  """A trainer may be saving while we convert: its half-written step and damaged steps stay as they are."""
  ckpts = tmp_path / "checkpoints"
  state = {"train": {"params": {"w": np.arange(6, dtype=np.float32)}, "routing": {"b": np.zeros(2, np.float32)}}}
  with ckpt_lib.Checkpointer(str(ckpts), async_save=False) as ck:
    ck.save(1, state, {"step": 1})
  live = ckpts / "2.orbax-checkpoint-tmp-1700000000"
  (live / "state").mkdir(parents=True)
  (live / "state" / "_METADATA").write_text("{")

  before = snapshot(tmp_path)
  variables = convert.load_orbax_variables(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), state["train"]["params"]["w"])
  assert snapshot(tmp_path) == before and live.is_dir()
