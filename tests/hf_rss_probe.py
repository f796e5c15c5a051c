"""Peak host memory of the HF import, sharded vs whole, on a generated multi-GB checkpoint (not a test).

  python tests/hf_rss_probe.py /tmp/hf_rss [--hidden 1024 --experts 64 --layers 6]

Writes the checkpoint with dsv3's own export (256 MB shards + index; skipped if DIR/ckpt exists), then runs
tests/hf_load_worker.py: 2 processes x 4 CPU devices loading onto dsv3.parallel.sharding.param_shardings with the
routed experts over an 'expert' axis of 8, one process loading whole, and one process loading nothing
(the Python + JAX baseline). Prints one JSON object: checkpoint bytes and each run's peak RSS (VmHWM).
"""
import argparse
import gc
import json
import os
import sys

import jax
import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from test_hf_sharded import run_workers  # noqa: E402

from dsv3 import hf, model  # noqa: E402
from dsv3.config import ModelConfig  # noqa: E402


def generate(path, hidden, experts, layers):
  cfg = ModelConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden,
                    moe_intermediate_size=hidden // 2, num_hidden_layers=layers, first_k_dense_replace=1,
                    num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=experts, n_shared_experts=1,
                    num_experts_per_tok=8, n_group=8, topk_group=4, num_nextn_predict_layers=0,
                    max_position_embeddings=4096, rope_scaling=None).validate()
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * np.float32(0.02), shapes)
  hf.save_checkpoint(cfg, variables, path, max_shard_bytes=256 << 20)
  del variables
  gc.collect()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("dir")
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--experts", type=int, default=64)
  ap.add_argument("--layers", type=int, default=6)
  args = ap.parse_args()
  path = os.path.join(args.dir, "ckpt")
  if not os.path.exists(os.path.join(path, "config.json")):
    generate(path, args.hidden, args.experts, args.layers)
  files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  out = dict(checkpoint_bytes=sum(os.path.getsize(os.path.join(path, f)) for f in files), files=len(files))
  out["baseline"] = run_workers(path, "baseline", expert=1, processes=1, timeout=600)
  out["sharded_2proc"] = run_workers(path, "sharded", expert=8, timeout=1200)
  out["whole_1proc"] = run_workers(path, "unsharded", expert=1, processes=1, timeout=1200)
  for r in out["sharded_2proc"]:
    r.pop("tensors_read")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
