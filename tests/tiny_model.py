"""The tiny models and meshes the tests share: one base config, named variants, per-test overrides on top.

Tests get them through conftest.py's fixtures, or import this module where a value is needed at module
level (parametrize lists, module constants) or in a worker script run as a subprocess (tests/ is then
sys.path[0]).
"""
from dsv3.config import ModelConfig
from dsv3.parallel import sharding

# MLA (q LoRA) + DeepSeekMoE (grouped routing, a shared expert) + one MTP depth, fp32, compiled in seconds.
# Fields not named keep ModelConfig's defaults (remat='paper'), as a config read back from HF files has.
# The head dims differ (nope 8, rope 4, v 6) so a transposed or mis-split weight changes shapes or numbers.
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=64, rope_scaling=None)
# For sharded runs on the 8 simulated devices: vocab, heads and head dims divide the mesh axes.
EVEN = dict(vocab_size=64, num_attention_heads=2, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8)
# Dims just over one 128 x 128 FP8 scale block, so quantised weights have partial edge blocks.
FP8_EDGES = dict(hidden_size=136, intermediate_size=200, moe_intermediate_size=144, q_lora_rank=130)


def config(**overrides) -> ModelConfig:
  """The base tiny model with `overrides` (ModelConfig field names), validated."""
  return ModelConfig(**{**BASE, **overrides}).validate()


def even_config(**overrides) -> ModelConfig:
  """The tiny model with mesh-divisible sizes (EVEN), then `overrides`."""
  return config(**{**EVEN, **overrides})


def yarn(original_max_position_embeddings=8):
  """YaRN rope scaling (factor 4) over a short original context, so the tiny sequences go past it."""
  return dict(type="yarn", factor=4.0, original_max_position_embeddings=original_max_position_embeddings,
              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def mesh(data=1, expert=1, pipeline=1):
  """dsv3.parallel.sharding's ('pipeline', 'data', 'expert') mesh over all devices (their count is the product)."""
  return sharding.make_mesh(dict(data=data, expert=expert, pipeline=pipeline))


def pipelined_train_config(pipeline, schedule, data=1, expert=1, layers=8):
  """configs/tiny.py's training config as a pipelined run: `layers` layers, 8 micro-batches, the mesh given."""
  from configs import tiny     # here: worker scripts import this module without the repository on sys.path
  c = tiny.get_config()
  c.model.num_hidden_layers = layers
  c.mesh.pipeline, c.mesh.data, c.mesh.expert = pipeline, data, expert
  c.pipeline.schedule, c.pipeline.microbatches = schedule, 8
  return c
