"""A small DeepSeek-V3 (0.94B total, 183M activated params per token) for one GPU; BF16, FP8 optional.

  python -m dsv3.train --config=configs/small.py --workdir=/tmp/dsv3_small
  python -m dsv3.train --config=configs/small.py --workdir=/tmp/dsv3_small_fp8 --config.precision=fp8
  python -m dsv3.plan --config=configs/small.py
"""
from dsv3.config import ModelConfig
from dsv3.training.train_config import base_train_config, check_variant


def get_config(arg=None):
  check_variant("configs/small.py", arg)
  model = ModelConfig(
      vocab_size=32768, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
      num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=12,
      q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
      n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
      routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
      rope_scaling=None, remat="paper", dtype="bfloat16")
  c = base_train_config(model)
  c.precision = "bf16"
  c.num_train_steps = 20000
  c.batch_size = 32
  c.seq_len = 1024
  c.learning_rate = 1e-3
  c.warmup_steps = 500
  c.adam_moments_dtype = "bfloat16"
  c.log_every_steps = 20
  c.eval_every_steps = 1000
  c.eval_batches = 16         # 0.5M tokens of the held-out split
  c.checkpoint_every_steps = 1000
  return c
