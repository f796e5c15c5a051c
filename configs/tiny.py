"""A tiny DeepSeek-V3 (MLA + DeepSeekMoE + MTP; 2.6M params + 0.5M MTP) that trains on a CPU in minutes.

  python -m dsv3.train --config=configs/tiny.py --workdir=/tmp/dsv3_tiny

On 8 simulated CPU devices with expert parallelism (or a pipeline):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m dsv3.train --config=configs/tiny.py \
      --workdir=/tmp/dsv3_tiny_ep --config.mesh.data=2 --config.mesh.expert=4
"""
from dsv3.config import ModelConfig
from dsv3.train_config import base_train_config


def get_config(arg=None):
  del arg
  model = ModelConfig(
      vocab_size=4096, hidden_size=128, intermediate_size=320, moe_intermediate_size=64,
      num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
      q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
      routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=512,
      rope_scaling=None, remat="none", dtype="float32",
      scan_layers=False)   # 4 layers: unrolled is as quick to compile, and runs ~1.5x faster on CPU
  c = base_train_config(model)
  c.precision = "fp32"
  c.num_train_steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 3e-3
  c.warmup_steps = 30
  c.log_every_steps = 10
  c.eval_every_steps = 100
  # The validation sample: 32 global batches (512 windows, 66K tokens) shuffled from across the ~278K-token
  # held-out split (data.validation_fraction=0.1); c.eval_batches alone sets its size.
  c.eval_batches = 32
  c.data.eval_batches = 0
  c.checkpoint_every_steps = 100
  c.data.vocab_size = 4096
  c.ema_decay = 0.99
  return c
