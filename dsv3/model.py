"""DeepSeek-V3 in functional Flax (linen): embedding -> dense blocks -> MoE blocks -> norm -> head, + MTP.

Read top to bottom: `Block` is one pre-norm Transformer layer (MLA attention, then a dense SwiGLU or a
DeepSeekMoE feed-forward). Identical layers are stacked with `nn.scan`, so compile time does not grow with
depth and every parameter of a stack has a leading layer axis. `MTPModule` is one multi-token-prediction
depth (report §2.2). The public functions at the bottom are pure: variables in, arrays out.

Variables are a plain pytree {'params': ..., 'routing': ...}: 'routing' holds the MoE correction biases,
which are state updated by the load balancer, never trained.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3.config import ModelConfig, require_model_config
from dsv3.nn.layers import MLP, Linear, RMSNorm, compute_dtype, remat_policy, rope_cos_sin, rows_matmul
from dsv3.nn.mla import MLA, init_layer_cache
from dsv3.nn.moe import MoE


class Block(nn.Module):
  """x + MLA(norm(x)), then + FFN(norm(x)); FFN is MoE when `moe`. Scanned: (x, cache) -> (x, (aux, cache))."""
  cfg: ModelConfig
  moe: bool
  expert_parallel: Optional[Any] = None

  @nn.compact
  def __call__(self, x, cache, cos, sin, cache_index):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
    attn, cache = MLA(cfg, name="self_attn")(h, cos, sin, cache, cache_index)
    x = x + attn
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
    if self.moe:
      ffn, aux = MoE(cfg, self.expert_parallel, name="mlp")(h)
    else:
      ffn, aux = MLP(cfg.intermediate_size, cfg, name="mlp")(h), {}
    return x + ffn, (aux, cache)


def layer_stack(cfg: ModelConfig, moe: bool, length: int, expert_parallel=None, name=None):
  """`length` Blocks under one nn.scan (params stacked [length, ...]), optionally rematerialised with the
  configured policy. cfg.scan_layers=False unrolls the scan: the same params, straight-line code."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=remat_policy(cfg.remat), prevent_cse=False)
  scanned = nn.scan(block, variable_axes={"params": 0, "routing": 0}, split_rngs={"params": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=length,
                    unroll=1 if cfg.scan_layers else True)
  return scanned(cfg, moe, expert_parallel, name=name)


class MTPModule(nn.Module):
  """One MTP depth: h_k = Block(eh_proj([norm(Emb(t_{i+k})); norm(h_{k-1})])); logits via the shared head."""
  cfg: ModelConfig
  expert_parallel: Optional[Any] = None

  @nn.compact
  def __call__(self, h_prev, emb_next, cache, cos, sin, cache_index):
    cfg, dtype = self.cfg, compute_dtype(self.cfg)
    e = RMSNorm(cfg.rms_norm_eps, dtype, name="enorm")(emb_next)
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="hnorm")(h_prev)
    x = Linear(2 * cfg.hidden_size, cfg.hidden_size, cfg, name="eh_proj")(jnp.concatenate([e, h], -1))
    # DeepSeek-V3's MTP block sits after all main layers, so it is an MoE block when the model has any.
    x, (aux, cache) = Block(cfg, cfg.num_moe_layers > 0, self.expert_parallel, name="block")(
        x, cache, cos, sin, cache_index)
    return x, RMSNorm(cfg.rms_norm_eps, dtype, name="shared_head_norm")(x), aux, cache


class Transformer(nn.Module):
  cfg: ModelConfig
  expert_parallel: Optional[Any] = None

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.initializer_range)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                                 param_dtype=jnp.dtype(cfg.param_dtype))
    if cfg.num_dense_layers:
      self.dense_layers = layer_stack(cfg, False, cfg.num_dense_layers, self.expert_parallel)
    if cfg.num_moe_layers:
      self.moe_layers = layer_stack(cfg, True, cfg.num_moe_layers, self.expert_parallel)
    self.norm = RMSNorm(cfg.rms_norm_eps, compute_dtype(cfg))
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", init, (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
    self.mtp = [MTPModule(cfg, self.expert_parallel) for _ in range(cfg.num_nextn_predict_layers)]

  def embed(self, tokens):
    return self.embed_tokens(tokens).astype(compute_dtype(self.cfg))

  def head(self, x):
    """Output head in the compute dtype with f32 accumulation (never FP8, per the report)."""
    kernel = self.embed_tokens.embedding.T if self.cfg.tie_word_embeddings else self.lm_head
    dtype = compute_dtype(self.cfg)
    return rows_matmul(x.astype(dtype), kernel.astype(dtype))

  def __call__(self, tokens, positions=None, cache=None, cache_index=0, with_mtp=False):
    """tokens [B, T] int32. Returns dict(logits [B,T,V] f32, hidden [B,T,H], aux, cache, mtp_logits?)."""
    cfg = self.cfg
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
    cos, sin = rope_cos_sin(cfg, positions)
    x = self.embed(tokens)
    cache = cache or {}
    new_cache, aux = {}, {}
    if cfg.num_dense_layers:
      x, (_, new_cache["dense"]) = self.dense_layers(x, cache.get("dense"), cos, sin, cache_index)
    if cfg.num_moe_layers:
      x, (aux, new_cache["moe"]) = self.moe_layers(x, cache.get("moe"), cos, sin, cache_index)
    out = {"hidden": x, "logits": self.head(self.norm(x)), "aux": aux,
           "cache": new_cache if cache else None}
    if with_mtp and self.mtp:
      out["mtp_logits"], out["mtp_aux"] = self.mtp_train(x, tokens, cos, sin)
    return out

  def mtp_train(self, hidden, tokens, cos, sin):
    """All MTP depths over a training sequence. Depth k at position i sees token i+k and predicts i+k+1;
    the last k positions have no such token (their embedding input is token 0) and must be masked in the loss."""
    logits, auxes = [], []
    h = hidden
    for k, module in enumerate(self.mtp, start=1):
      shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
      h, normed, aux, _ = module(h, self.embed(shifted), None, cos, sin, 0)
      logits.append(self.head(normed))
      auxes.append(aux)
    return jnp.stack(logits), auxes

  def mtp_depth(self, hidden, tokens, positions, cache, cache_index, *, depth: int):
    """One MTP depth with its latent cache (speculative drafting): depth `depth` (0-based) at position i
    takes hidden[i] (main model for depth 0, else the previous depth's output) and the token at i+depth+1.
    Returns (its output hidden, logits, cache). Depths are chained by the caller, which supplies each
    depth's tokens (committed ones or the previous depth's drafts)."""
    cos, sin = rope_cos_sin(self.cfg, positions)
    h, normed, _, cache = self.mtp[depth](hidden, self.embed(tokens), cache, cos, sin, cache_index)
    return h, self.head(normed), cache


# ---------------------------------------------------------------------------------------------------
# Pure functional API.
# ---------------------------------------------------------------------------------------------------
def init(config: ModelConfig, rng: jax.Array, batch: int = 1, seq_len: int = 4) -> dict:
  """Fresh variables {'params', 'routing'} (MTP included). Use jax.eval_shape(init, ...) for shapes only."""
  return _init(require_model_config(config, "model.init"), rng, batch, seq_len)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(cfg, rng, batch, seq_len):
  # Jitted: op-by-op initialisation of a scanned model is several times slower.
  return Transformer(cfg).init(rng, jnp.zeros((batch, seq_len), jnp.int32), with_mtp=True)


def as_variables(cfg: ModelConfig, params) -> dict:
  """Accept {'params':..., 'routing':...}; a bare params tree only when the model has no MoE layer."""
  if isinstance(params, dict) and "params" in params:
    if cfg.num_moe_layers and "routing" not in params:
      raise ValueError("params: missing the 'routing' collection (MoE correction biases); pass the full "
                       "variables dict returned by model.init or hf.load_checkpoint")
    return params
  if cfg.num_moe_layers:
    raise ValueError("params: expected {'params': ..., 'routing': ...} as returned by model.init or "
                     "hf.load_checkpoint")
  return {"params": params}


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, variables, tokens):
  return Transformer(cfg).apply(variables, tokens)["logits"]


def forward(config: ModelConfig, params, tokens) -> jax.Array:
  """Main-model logits: int32 [B, T] -> float32 [B, T, vocab] (the MTP modules are not run)."""
  cfg = require_model_config(config, "model.forward")
  return _forward(cfg, as_variables(cfg, params), jnp.asarray(tokens, jnp.int32))


def forward_train(cfg: ModelConfig, variables, tokens, expert_parallel=None) -> dict:
  """Everything training needs: logits, MTP logits [D, B, T, V], and MoE aux (load, balance loss, drops)."""
  return Transformer(cfg, expert_parallel).apply(variables, tokens, with_mtp=True)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
  """The latent KV cache: per layer [B, max_len, kv_lora_rank] + [B, max_len, qk_rope_head_dim]."""
  cfg = require_model_config(config, "model.init_cache")
  stacked = lambda n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)),
                                   init_layer_cache(cfg, batch, max_len, dtype))
  cache = {}
  if cfg.num_dense_layers:
    cache["dense"] = stacked(cfg.num_dense_layers)
  if cfg.num_moe_layers:
    cache["moe"] = stacked(cfg.num_moe_layers)
  cache["mtp"] = [init_layer_cache(cfg, batch, max_len, dtype) for _ in range(cfg.num_nextn_predict_layers)]
  return cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode(cfg, variables, tokens, cache, cache_index):
  main = {k: v for k, v in cache.items() if k != "mtp"}
  out = Transformer(cfg).apply(variables, tokens, cache=main, cache_index=cache_index)
  return out["logits"], out["hidden"], {**out["cache"], "mtp": cache["mtp"]}


def decode(config: ModelConfig, params, tokens, cache, cache_index):
  """Prefill (T > 1) or one decode step against the latent cache, absorbed-MLA form.

  Returns (logits [B, T, V] f32, final hidden [B, T, H] (pre-norm, the MTP input), updated cache).
  """
  cfg = require_model_config(config, "model.decode")
  return _decode(cfg, as_variables(cfg, params), jnp.asarray(tokens, jnp.int32), cache,
                 jnp.asarray(cache_index, jnp.int32))
