"""The training objective and the auxiliary-loss-free load balancer.

Loss (report §2.1.2, §2.2):
  L = CE(main) + lambda/D * sum_k CE(MTP depth k) + alpha * sum_layers sum_i f_i P_i
where the last term is the complementary sequence-wise balance loss (alpha = 1e-4 in 'aux_free' mode; the
ablation modes use alpha = aux_loss_alpha ('aux_loss') or 0 ('none')).

Balancer: after each step, from the per-expert load counted over the WHOLE global batch,
  b_i += gamma * sign(mean_load - load_i).
The bias is state in the 'routing' collection: no gradient reaches it and the optimizer never sees it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3 import layout
from dsv3.config import ModelConfig


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
  """Mean token cross-entropy (float32) over positions where mask is true."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  nll = logz - picked
  if mask is None:
    return nll.mean()
  mask = mask.astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mtp_losses(mtp_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[D] cross-entropies: depth k (1-based) at position i predicts labels[i + k]; the last k positions have
  no target and are masked out."""
  D, B, T, _ = mtp_logits.shape
  out = []
  for k in range(1, D + 1):
    shifted = jnp.pad(labels[:, k:], ((0, 0), (0, k)))
    mask = jnp.arange(T)[None, :] < T - k
    out.append(cross_entropy(mtp_logits[k - 1], shifted, jnp.broadcast_to(mask, (B, T))))
  return jnp.stack(out)


def balance_alpha(balance_cfg) -> float:
  return {"aux_free": balance_cfg.sequence_alpha, "aux_loss": balance_cfg.aux_loss_alpha,
          "none": 0.0}[balance_cfg.mode]


def objective(cfg: ModelConfig, outputs: dict, labels: jax.Array, mtp_weight, alpha):
  """(total loss, metrics) from model.forward_train outputs. mtp_weight/alpha may be traced scalars."""
  ce = cross_entropy(outputs["logits"], labels)
  metrics = {"ce": ce}
  total = ce
  if "mtp_logits" in outputs:
    per_depth = mtp_losses(outputs["mtp_logits"], labels)
    metrics["mtp_loss"] = per_depth.mean()
    total = total + mtp_weight * per_depth.mean()
  bal = balance_terms(outputs)
  if bal is not None:
    metrics["balance_loss"] = bal
    total = total + alpha * bal
  metrics["loss"] = total
  return total, metrics


def dropped_metrics(cfg: ModelConfig, outputs: dict) -> dict:
  """From model.forward_train outputs, the MoE assignments dropped this (micro-)batch: ep_dropped (all
  layers), ep_dropped_layer{i} (model layer i), ep_dropped_mtp{d}; with expert parallelism also
  ep_load_ratio, the worst buffer load over its balanced value (max over layers: nothing drops while it
  stays <= cfg.ep_buffer_factor). {} without MoE."""
  main = outputs["aux"]
  mtp = [a for a in outputs.get("mtp_aux", []) if a]
  out = {}
  if main:
    out.update({f"ep_dropped_layer{cfg.num_dense_layers + j}": v.astype(jnp.float32)
                for j, v in enumerate(main["dropped"])})
  out.update({f"ep_dropped_mtp{d}": a["dropped"].astype(jnp.float32) for d, a in enumerate(mtp)})
  if not out:
    return {}
  out["ep_dropped"] = sum(out.values())
  auxes = ([main] if main else []) + mtp
  if "ep_load_ratio" in auxes[0]:
    out["ep_load_ratio"] = jnp.max(jnp.stack([jnp.max(a["ep_load_ratio"]) for a in auxes]))
  return out


def balance_terms(outputs: dict):
  """Sum over MoE layers (main and MTP) of the sequence-wise balance statistic, or None without MoE."""
  terms = []
  if outputs["aux"]:
    terms.append(outputs["aux"]["balance_loss"].sum())
  for aux in outputs.get("mtp_aux", []):
    if aux:
      terms.append(aux["balance_loss"])
  return sum(terms) if terms else None


def load_tree(outputs: dict) -> dict:
  """Per-expert loads shaped like the 'routing' collection, so the bias update is one tree.map."""
  return layout.load_tree(outputs["aux"]["load"] if outputs["aux"] else None,
                          [aux["load"] if aux else None for aux in outputs.get("mtp_aux", [])])


def update_bias(routing: dict, loads: dict, gamma) -> dict:
  """b_i += gamma * sign(mean load - load_i), per MoE layer. `loads` must be summed over the global batch."""
  def step(b, load):
    return b + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)
  return jax.tree.map(step, routing, loads)


def max_violation(load: jax.Array) -> jax.Array:
  """MaxVio = (max_i load_i - mean load) / mean load, per layer (last axis = experts)."""
  mean = load.mean(-1)
  return (load.max(-1) - mean) / jnp.maximum(mean, 1e-9)
