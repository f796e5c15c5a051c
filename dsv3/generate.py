"""Text generation against the latent KV cache: sampling, and self-speculative decoding with the MTP modules.

`generate` prefills the prompt, then runs the whole decode loop on device in one jit (lax.while_loop):
greedy at temperature 0, else temperature sampling within the top-p nucleus; with `eos_id` a row stops at
eos. `speculative_generate` drafts with the model's own MTP modules and verifies with the main model, so
its output is exactly greedy `generate`'s (`_speculative` says why).

  python -m dsv3.generate --checkpoint=HF_DIR_OR_WORKDIR --tokenizer=TOK --prompt="..."
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from dsv3 import cli, convert, hf, model
from dsv3.config import ModelConfig, require_model_config
from dsv3.data import tokenizer as tok_lib
from dsv3.interop import hf_config


# ---------------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------------
def sample_token(logits, key, temperature, top_p):
  """logits [B, V] f32 -> [B] int32 from softmax(logits / temperature) restricted to the top-p nucleus."""
  scaled = logits / jnp.maximum(temperature, 1e-6)
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # A token is in the nucleus when the mass strictly before it is below top_p, so the top one always is.
  in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def _pick(logits, key, temperature, top_p, sample: bool):
  if not sample:  # static: the greedy program never sorts the vocabulary
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_token(logits, key, temperature, top_p)


# ---------------------------------------------------------------------------------------------------
# Plain decoding.
# ---------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache_dtype", "sample"))
def _generate(variables, prompt, rng, temperature, top_p, eos_id, *, cfg, max_new_tokens, cache_dtype, sample):
  B, T = prompt.shape
  N = max_new_tokens
  cache = model.init_cache(cfg, B, T + N, jnp.dtype(cache_dtype))
  cache["mtp"] = []                       # plain decoding never runs the MTP modules
  logits, _, cache = model.decode(cfg, variables, prompt, cache, 0)
  stops = eos_id >= 0
  # Rows that finish early are padded with eos; without an eos the loop always runs to the end.
  tokens = jnp.concatenate([prompt, jnp.full((B, N), jnp.maximum(eos_id, 0), jnp.int32)], axis=1)

  def emit(tokens, done, logits, i):
    tok = _pick(logits, jax.random.fold_in(rng, i), temperature, top_p, sample)
    tok = jnp.where(done, eos_id, tok)
    done = done | (stops & (tok == eos_id))
    return jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], T + i, axis=1), done

  tokens, done = emit(tokens, jnp.zeros((B,), bool), logits[:, -1], 0)

  def cond(state):
    i, _, _, done = state
    return (i < N) & ~jnp.all(done)

  def body(state):
    i, tokens, cache, done = state
    last = jax.lax.dynamic_slice_in_dim(tokens, T + i - 1, 1, axis=1)
    logits, _, cache = model.decode(cfg, variables, last, cache, T + i - 1)
    tokens, done = emit(tokens, done, logits[:, 0], i)
    return i + 1, tokens, cache, done

  return jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, done))[1]


def _prepare(config, params, prompt_ids, max_new_tokens, where: str):
  cfg = require_model_config(config, where)
  prompt = np.asarray(prompt_ids)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt_ids: expected integer ids of shape [T] or [B, T] with T >= 1, got "
                     f"{prompt.dtype} {prompt.shape}; prompts in a batch must have one length")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt_ids: ids must be in [0, vocab_size={cfg.vocab_size}), got "
                     f"[{prompt.min()}, {prompt.max()}]")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
  T, limit = prompt.shape[-1], cfg.max_position_embeddings
  if T > limit:
    raise ValueError(f"prompt_ids: the prompt has {T} tokens, more than the model's max_position_embeddings="
                     f"{limit}; shorten the prompt to at most {limit} tokens (fewer, to leave room for "
                     f"max_new_tokens)")
  if T + max_new_tokens > limit:
    raise ValueError(f"max_new_tokens: the prompt length {T} + max_new_tokens {max_new_tokens} = "
                     f"{T + max_new_tokens} exceeds the model's max_position_embeddings={limit}; set "
                     f"max_new_tokens <= {max(limit - T, 0)} or shorten the prompt")
  return cfg, model.as_variables(cfg, params), jnp.asarray(np.atleast_2d(prompt), jnp.int32), prompt.ndim


def generate(config: ModelConfig, params, prompt_ids, max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None, rng: Optional[jax.Array] = None,
             cache_dtype=jnp.float32) -> jax.Array:
  """Prompt ids [B, T] (or [T]) -> int32 [B, T + max_new_tokens] (or [T + max_new_tokens]).

  temperature 0 is greedy; otherwise samples with `rng` (default key 0) from the top-p nucleus. With
  `eos_id`, rows that emitted it are padded with it and the loop ends once all rows have. `cache_dtype`
  float32 keeps decoding bit-close to `model.forward`; bfloat16 halves the latent cache.
  """
  cfg, variables, prompt, ndim = _prepare(config, params, prompt_ids, max_new_tokens, "generate.generate")
  if temperature < 0:
    raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
  if max_new_tokens == 0:
    out = prompt
  else:
    rng = jax.random.key(0) if rng is None else rng
    out = _generate(variables, prompt, rng, jnp.float32(temperature), jnp.float32(top_p),
                    jnp.int32(-1 if eos_id is None else eos_id), cfg=cfg, max_new_tokens=int(max_new_tokens),
                    cache_dtype=jnp.dtype(cache_dtype).name, sample=temperature > 0)
  return out if ndim == 2 else out[0]


# ---------------------------------------------------------------------------------------------------
# Self-speculative decoding.
# ---------------------------------------------------------------------------------------------------
def _draft(cfg, variables, hid, tokens, mtp_cache, start, width: int, last):
  """Runs depths 1..D over positions [start, start+width) and writes the D drafts after position last+1.

  hid [B, S, H] holds main-model hidden states by position, tokens [B, S] the committed tokens (and the
  drafts, which later depths read). Depth k at position i reads token i+k and predicts token i+k+1, so the
  draft of depth k (read at position `last`) lands at position last+k+1.
  """
  B = tokens.shape[0]
  positions = jnp.broadcast_to(start + jnp.arange(width), (B, width))
  h = jax.lax.dynamic_slice_in_dim(hid, start, width, axis=1)
  new_cache = []
  for depth, cache in enumerate(mtp_cache):
    inputs = jax.lax.dynamic_slice_in_dim(tokens, start + depth + 1, width, axis=1)
    h, logits, cache = model.Transformer(cfg).apply(
        variables, h, inputs, positions, cache, start, depth=depth, method=model.Transformer.mtp_depth)
    new_cache.append(cache)
    draft = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, last - start, axis=1, keepdims=False), -1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, draft[:, None].astype(jnp.int32),
                                                 last + depth + 2, axis=1)
  return tokens, new_cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache_dtype"))
def _speculative(variables, prompt, eos_id, *, cfg, max_new_tokens, cache_dtype):
  """The self-speculative decode loop (the report, §2.2: the MTP modules can serve as the draft model).

  With L tokens known, the main model has cached positions < L-1 and its hidden state h_{L-2}. Depth 1 at
  position L-2 reads h_{L-2} and token L-1 and predicts token L (draft d_1); depth k reads depth k-1's output
  and d_{k-1} and predicts d_k. One main-model decode call over [t_{L-1}, d_1..d_D] then gives the greedy token
  at each of those D+1 positions; the longest prefix of drafts that equals them is accepted plus the main
  model's next token, so every step commits 1..D+1 tokens and the output is exactly what greedy `generate`
  writes. In a batch all rows share one cache index, so the step accepts the minimum prefix over rows: a row
  that agreed further just re-drafts those tokens next step, and every committed token is still the main model's
  greedy choice, so exactness holds for each row.

  Rollback needs no copying: cache entries written for rejected drafts sit past the committed length, where the
  causal mask (by position) hides them, and the next verify call overwrites them. The MTP caches hold each
  depth's past too (depth k at position i attends to its own outputs at positions <= i), and an entry is only
  right once every token it read is committed: depth k at position i reads tokens up to i+k. Drafting at
  length L writes positions up to L-2; if the step then accepts n drafts (new length L' = L+n+1), the entries
  that read a rejected draft sit at positions >= L'-D, and positions L-1 .. L'-2 were never computed. So each
  drafting pass recomputes, for every depth, the last D+1 positions (L'-2-D .. L'-2), which covers both.
  Exactness assumes dropless MoE routing (capacity_factor 0, DeepSeek-V3's setting): with token dropping, a
  token's output would depend on which other tokens share its call.
  """
  B, T = prompt.shape
  N, D = max_new_tokens, cfg.num_nextn_predict_layers
  W = D + 1                               # the drafting window (see the docstring)
  # Room for the verify call and for the window's token reads past the last commit (dynamic_slice would
  # clamp, not fail, at the edge, so the buffers must never be too short).
  S = T + N + 2 * D + 1
  cache = model.init_cache(cfg, B, S, jnp.dtype(cache_dtype))
  mtp_cache, cache["mtp"] = cache["mtp"], []
  logits, hidden, cache = model.decode(cfg, variables, prompt, cache, 0)
  tokens = jnp.zeros((B, S), jnp.int32).at[:, :T].set(prompt)
  tokens = tokens.at[:, T].set(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))
  hid = jnp.zeros((B, S, hidden.shape[-1]), hidden.dtype).at[:, :T].set(hidden)
  # MTP prefill over the whole prompt; it also yields the first drafts (read at position T-1).
  tokens, mtp_cache = _draft(cfg, variables, hid, tokens, mtp_cache, 0, T, T - 1)
  stops = eos_id >= 0
  pos = jnp.arange(S)

  def finished(tokens, length):
    emitted = (pos >= T) & (pos < length)
    return jnp.all(jnp.any(emitted & (tokens == eos_id), axis=1)) & stops

  def cond(state):
    length, tokens = state[0], state[1]
    return (length < T + N) & ~finished(tokens, length)

  def body(state):
    length, tokens, hid, cache, mtp_cache, stats = state
    # Verify [t_{L-1}, d_1..d_D] at positions L-1..L-1+D in one main-model call.
    window = jax.lax.dynamic_slice_in_dim(tokens, length - 1, D + 1, axis=1)
    logits, hidden, cache = model.decode(cfg, variables, window, cache, length - 1)
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)                      # [B, D+1]
    agree = jnp.sum(jnp.cumprod(window[:, 1:] == greedy[:, :D], axis=1), axis=1)   # per row
    n = jnp.min(agree)
    # Commit greedy[:, :n+1] at L..L+n; the rest lands past the new length and is overwritten by drafts.
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, greedy, length, axis=1)
    hid = jax.lax.dynamic_update_slice_in_dim(hid, hidden.astype(hid.dtype), length - 1, axis=1)
    length = length + n + 1
    start = jnp.maximum(length - 1 - W, 0)
    tokens, mtp_cache = _draft(cfg, variables, hid, tokens, mtp_cache, start, W, length - 2)
    stats = stats + jnp.stack([1, jnp.sum(agree), B * n]).astype(jnp.int32)
    return length, tokens, hid, cache, mtp_cache, stats

  state = (jnp.int32(T + 1), tokens, hid, cache, mtp_cache, jnp.zeros((3,), jnp.int32))
  length, tokens, _, _, mtp_cache, stats = jax.lax.while_loop(cond, body, state)
  # Rows pad with eos after their first eos, as `generate` does; positions never committed are past it.
  is_eos = (pos >= T) & (tokens == eos_id)
  after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
  tokens = jnp.where((stops & after_eos) | (pos >= length), jnp.maximum(eos_id, 0), tokens)
  return tokens[:, :T + N], length, stats, mtp_cache     # the MTP caches only for tests of their invariant


def speculative_generate(config: ModelConfig, params, prompt_ids, max_new_tokens: int = 16,
                         eos_id: Optional[int] = None, cache_dtype=jnp.float32):
  """Greedy generation drafted by the MTP modules and verified by the main model: -> (ids, stats).

  ids equal `generate(..., temperature=0.0, eos_id=eos_id)`. stats: `acceptance_rate` (drafts the main
  model agreed with, per row, over drafts made: the report's MTP acceptance), `batch_acceptance_rate`
  (drafts committed after taking the minimum over rows), `steps` (verify calls), `tokens_per_step`.
  """
  cfg, variables, prompt, ndim = _prepare(config, params, prompt_ids, max_new_tokens,
                                          "generate.speculative_generate")
  if cfg.num_nextn_predict_layers < 1:
    raise ValueError("model.num_nextn_predict_layers: speculative decoding drafts with the MTP modules, but "
                     "this model has none; use generate() instead")
  if max_new_tokens == 0:
    return (prompt if ndim == 2 else prompt[0]), {"acceptance_rate": 0.0, "batch_acceptance_rate": 0.0,
                                                  "steps": 0, "tokens_per_step": 0.0}
  ids, length, stats, _ = _speculative(variables, prompt, jnp.int32(-1 if eos_id is None else eos_id), cfg=cfg,
                                       max_new_tokens=int(max_new_tokens),
                                       cache_dtype=jnp.dtype(cache_dtype).name)
  steps, agreed, committed = (int(x) for x in stats)
  B, T, D = prompt.shape[0], prompt.shape[1], cfg.num_nextn_predict_layers
  drafted = max(steps * D * B, 1)
  new_tokens = min(int(length), T + max_new_tokens) - T - 1      # the first token comes from the prefill
  return (ids if ndim == 2 else ids[0]), {
      "acceptance_rate": agreed / drafted, "batch_acceptance_rate": committed / drafted, "steps": steps,
      "tokens_per_step": new_tokens / max(steps, 1)}


# ---------------------------------------------------------------------------------------------------
# Command line: python -m dsv3.generate --checkpoint=DIR --tokenizer=tokenizer.json --prompt="..."
# ---------------------------------------------------------------------------------------------------
def _check_checkpoint_dir(checkpoint: str) -> None:
  if not os.path.isdir(checkpoint):
    what = "is a file, not a directory" if os.path.exists(checkpoint) else "does not exist"
    raise ValueError(f"--checkpoint: {checkpoint!r} {what}; give an HF-format dir (config.json + safetensors), "
                     f"a training --workdir (or its checkpoints/) or a convert --to=orbax export")


def _load(checkpoint: str, config):
  """(ModelConfig, variables) from an HF-format dir, a training workdir (or its checkpoints/: the latest step),
  a convert --to=orbax export, or random init (no checkpoint). The checkpoint carries its model config (HF's
  config.json, the training run's saved config); a --config given too must agree with it."""
  if not checkpoint:
    if config is None:
      raise ValueError("--checkpoint: give a checkpoint dir, or --config to run randomly initialised weights")
    cfg = ModelConfig.from_config_dict(config)
    return cfg, jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  _check_checkpoint_dir(checkpoint)
  if os.path.exists(os.path.join(checkpoint, "config.json")) and not convert.is_orbax_export(checkpoint):
    cfg, variables = hf.load_checkpoint(checkpoint)
  else:                          # the readers convert and init_from use: one fallback, one layout
    cfg = convert.config_of(checkpoint)
    variables = convert.load_orbax_variables(checkpoint)
  if config is not None:
    given = ModelConfig.from_config_dict(config)
    diffs = [f for f in hf_config.HF_FIELDS if getattr(given, f) != getattr(cfg, f)]
    if diffs:
      raise ValueError(f"--config: its model.{diffs[0]}={getattr(given, diffs[0])!r} differs from the "
                       f"checkpoint's {getattr(cfg, diffs[0])!r} in {checkpoint!r} (differing: {diffs}); drop "
                       f"--config (the checkpoint carries its model config) or give the config it was trained with")
  return cfg, variables


def main(argv):
  del argv
  F = flags.FLAGS
  if F.temperature < 0:
    raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {F.temperature}")
  if not 0 < F.top_p <= 1:
    raise ValueError(f"--top_p: must be in (0, 1] (1 = no nucleus cut), got {F.top_p}")
  if F.max_new_tokens < 0:
    raise ValueError(f"--max_new_tokens: must be >= 0, got {F.max_new_tokens}")
  if F.checkpoint:
    _check_checkpoint_dir(F.checkpoint)
  if F.prompt and not F.tokenizer:
    raise ValueError("--prompt: text prompts need --tokenizer (a tokenizer.json); or pass --prompt_ids=1,2,3")
  if F.prompt and F.prompt_ids:
    raise ValueError("--prompt_ids: give either --prompt or --prompt_ids, not both")
  tok = None
  if F.tokenizer:
    if not os.path.exists(os.path.expanduser(F.tokenizer)):
      raise ValueError(f"--tokenizer: {F.tokenizer!r} does not exist; give a tokenizer.json (or a dir holding "
                       f"one), e.g. the one next to an HF checkpoint, or use --prompt_ids=1,2,3")
    tok = tok_lib.load(F.tokenizer)
  if F.prompt:
    ids = tok.encode(F.prompt, bos=True)
  elif F.prompt_ids:
    try:
      ids = [int(x) for x in F.prompt_ids.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"--prompt_ids: expected comma-separated integers, got {F.prompt_ids!r}") from None
  else:
    raise ValueError("--prompt: give a text --prompt (with --tokenizer) or --prompt_ids=1,2,3")
  cfg, variables = _load(F.checkpoint, F.config)
  eos = F.eos_id if F.eos_id >= 0 else (tok.eos_id if tok is not None else cfg.eos_token_id)
  kw = dict(max_new_tokens=F.max_new_tokens, eos_id=eos, cache_dtype=F.cache_dtype)
  if F.speculative:
    if F.temperature > 0:
      raise ValueError("--temperature: --speculative decodes greedily (its output equals greedy decoding)")
    out, stats = speculative_generate(cfg, variables, [ids], **kw)
    print(f"acceptance rate {stats['acceptance_rate']:.3f}, {stats['tokens_per_step']:.2f} tokens per "
          f"main-model step over {stats['steps']} steps")
  else:
    out = generate(cfg, variables, [ids], temperature=F.temperature, top_p=F.top_p,
                   rng=jax.random.key(F.seed), **kw)
  new = [int(x) for x in np.asarray(out[0, len(ids):])]
  if eos is not None and eos in new:
    new = new[:new.index(eos) + 1]
  print(tok.decode(ids + new) if tok is not None else ",".join(str(i) for i in ids + new))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.generate` (importing the module defines none)."""
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections); not needed for "
                                  "HF checkpoints, which carry config.json.", lock_config=False, **fv)
  flags.DEFINE_string("checkpoint", "", "HF-format dir (config.json + safetensors), a training --workdir (or its "
                      "checkpoints/; the latest step) or a convert --to=orbax export; empty with --config: random "
                      "weights.", **fv)
  flags.DEFINE_string("tokenizer", "", "tokenizer.json (or a dir holding one) for --prompt and for decoding.",
                      **fv)
  flags.DEFINE_string("prompt", "", "Prompt text (needs --tokenizer).", **fv)
  flags.DEFINE_string("prompt_ids", "", "Prompt as comma-separated token ids, e.g. 1,2,3.", **fv)
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.", **fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.", **fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", **fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", **fv)
  flags.DEFINE_integer("eos_id", -1, "Stop token; -1: the tokenizer's eos, else the model config's eos_token_id.",
                       **fv)
  flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32"], "Latent KV cache dtype.", **fv)
  flags.DEFINE_bool("speculative", False, "Self-speculative decoding with the MTP modules (greedy).", **fv)


if __name__ == "__main__":
  define_flags()
  cli.run(main)          # every check above names its flag: one line, no traceback (dsv3.cli.run)
