"""python -m dsv3.convert in both directions: HF -> orbax -> HF gives the same tensors and the same logits."""
import os
import subprocess
import sys

import jax
import numpy as np

from dsv3 import hf, model
from dsv3.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_roundtrip_through_orbax(tmp_path):
  cfg = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
                    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=8,
                    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4, num_experts_per_tok=2,
                    n_group=2, topk_group=1, num_nextn_predict_layers=1, rope_scaling=None)
  variables = model.init(cfg, jax.random.key(3))
  hf.save_checkpoint(cfg, variables, str(tmp_path / "hf"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  for to, src, dst in (("orbax", "hf", "orbax"), ("hf", "orbax", "hf2")):
    proc = subprocess.run([sys.executable, "-m", "dsv3.convert", f"--to={to}", f"--src={tmp_path / src}",
                           f"--dst={tmp_path / dst}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
  cfg2, v2 = hf.load_checkpoint(str(tmp_path / "hf2"))
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, v2)


def test_missing_source_is_reported(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv3.convert", "--to=orbax", f"--src={tmp_path / 'nope'}",
                         f"--dst={tmp_path / 'out'}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "--src" in proc.stderr
