"""Training FLOPs per token of the model, read off its variables (dsv3.abstract_model): MFU's numerator.

flops_per_token = 6 * activated matmul params + 3 * h * (d_qk + d_v) * seq_len * layers (causal attention:
seq_len/2 keys on average, backward 2x forward); the MTP modules' FLOPs include their pass through the shared
head. The trainer's throughput and the planner (dsv3.plan) both count with these.
"""
from __future__ import annotations

from dsv3.abstract_model import leaves
from dsv3.config import ModelConfig, require_model_config


def active_fraction(cfg: ModelConfig) -> float:
  """The share of routed experts a token activates (k of E)."""
  return cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0


def count(cfg: ModelConfig, pred, activated: bool = False) -> float:
  """Trainable parameters whose leaf satisfies `pred`; `activated`: routed experts weighted by k of E."""
  frac = active_fraction(cfg)
  total = 0.0
  for leaf in leaves(cfg):
    if leaf.trainable and pred(leaf):
      total += leaf.total * (frac if activated and leaf.routed else 1.0)
  return total


def attention_flops(cfg: ModelConfig, seq_len: int, layers: int) -> float:
  """Training FLOPs per token of `layers` layers' causal attention over a seq_len sequence."""
  # Forward 2*h*(d_qk + d_v) per visible key; causal: seq_len/2 keys on average; x3 for fwd + bwd.
  return 3.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len * layers


def _head_params(cfg: ModelConfig) -> float:
  # The head's GEMM; with tied embeddings its kernel is the embedding, which is no matmul leaf of its own.
  if cfg.tie_word_embeddings:
    return count(cfg, lambda l: l.group == "embed")
  return count(cfg, lambda l: l.group == "head" and l.matmul)


def flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = False) -> float:
  """Training FLOPs (forward + backward) per token of a seq_len sequence; MFU's numerator."""
  require_model_config(cfg, "flops_per_token")
  matmul = count(cfg, lambda l: l.group != "mtp" and l.matmul, activated=True)
  if cfg.tie_word_embeddings:
    matmul += _head_params(cfg)
  flops = 6.0 * matmul + attention_flops(cfg, seq_len, cfg.num_hidden_layers)
  return flops + (mtp_flops_per_token(cfg, seq_len) if include_mtp else 0.0)


def mtp_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the MTP modules, including their pass through the shared head."""
  require_model_config(cfg, "mtp_flops_per_token")
  depths = cfg.num_nextn_predict_layers
  matmul = count(cfg, lambda l: l.group == "mtp" and l.matmul, activated=True) + depths * _head_params(cfg)
  return 6.0 * matmul + attention_flops(cfg, seq_len, depths)
