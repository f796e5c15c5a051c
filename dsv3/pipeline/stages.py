"""Pipeline stages: how the model is cut, and the per-stage programs F, B, B* and W.

A stage is a contiguous run of layers; stage 0 also holds the embedding, the last stage the final norm, head,
MTP modules and loss (and a copy of the embedding, which the MTP modules read). F runs `jax.vjp` piece by
piece (embedding, each layer, head) and returns one VJP per piece; B* walks them for the input gradient only
and W applies them later for the weight gradients: the zero-bubble split, which needs one VJP per layer, so
the layers are unrolled. Where a stage runs (per device or globally) is dsv3.pipeline.per_device's.
README.md, "Pipeline stages and the executor", gives the design.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3 import layout
from dsv3.config import ModelConfig
from dsv3.model import Block, Transformer
from dsv3.nn.layers import compute_dtype, remat_policy, rope_cos_sin
from dsv3.training import losses


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """What one stage computes; hashable, so it is a static argument of the stage programs.

  `layers` holds global layer indices; the programs only depend on `moe` (their kinds), so stages of the
  same shape share one trace and compile once per sub-mesh.
  """
  index: int
  num_stages: int
  layers: Tuple[int, ...]
  moe: Tuple[bool, ...]

  @property
  def first(self) -> bool:
    return self.index == 0

  @property
  def last(self) -> bool:
    return self.index == self.num_stages - 1

  @property
  def program_key(self):
    return (self.first, self.last, self.moe)


def split_layers(cfg: ModelConfig, num_stages: int) -> List[StageSpec]:
  """Contiguous, as-even-as-possible layer ranges; earlier stages take the remainder, because the last
  stage already carries the head, MTP and loss."""
  num_layers = cfg.num_hidden_layers
  base, extra = divmod(num_layers, num_stages)
  specs, start = [], 0
  for s in range(num_stages):
    n = base + (s < extra)
    layers = tuple(range(start, start + n))
    specs.append(StageSpec(s, num_stages, layers, tuple(layout.is_moe(cfg, l) for l in layers)))
    start += n
  return specs


def stage_variables(params, routing, spec: StageSpec):
  """(params, routing) of one stage in the stage layout {'embed', 'layers': [...], 'head'}, from a rank's
  variables in the per-layer form (dsv3.layout; every unit the stage needs, rank_state.needs)."""
  key = lambda l: layout.layer_key(l)
  p = {"layers": [params[layout.LAYERS][key(l)] for l in spec.layers]}
  r = {"layers": [routing.get(layout.LAYERS, {}).get(key(l), {}) for l in spec.layers]}
  if spec.first:
    p["embed"] = {"embed_tokens": params["embed_tokens"]}
  if spec.last:
    p["head"] = {k: v for k, v in params.items() if k != layout.LAYERS}
    r["head"] = {k: v for k, v in routing.items() if k != layout.LAYERS}
  return p, r


def stage_units(spec: StageSpec, tree) -> List[Tuple[str, object]]:
  """A stage-layout tree (its gradients) as (unit id, subtree) pairs of the per-layer form (dsv3.layout)."""
  out = [(layout.unit_of(layout.LAYERS, layout.layer_key(l)), g) for l, g in zip(spec.layers, tree["layers"])]
  for part in ("embed", "head"):
    out += list(tree.get(part, {}).items())
  return out


# ---------------------------------------------------------------------------------------------------
# Pieces. Each maps (piece params, input) -> (output, loss share) with aux (metrics, load); the embedding
# takes tokens (no input gradient) and the head returns only its loss share.
# ---------------------------------------------------------------------------------------------------
def _embed(cfg: ModelConfig, p, tokens):
  emb = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.dtype(cfg.param_dtype))
  return emb.apply({"params": p["embed_tokens"]}, tokens).astype(compute_dtype(cfg))


def _rope(cfg: ModelConfig, x):
  """RoPE's cos and sin for x's [rows, T] positions (every row starts at 0). Each piece makes its own, inside
  its checkpointed function: closed over by a piece's VJP they would be residuals, f32 [rows, T, d/2] twice per
  layer and micro-batch in flight."""
  return rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))


def _layer(cfg: ModelConfig, moe: bool, ep, routing, alpha, p, x):
  variables = {"params": p, "routing": routing} if moe else {"params": p}
  cos, sin = _rope(cfg, x)
  y, (aux, _) = Block(cfg, moe, ep).apply(variables, x, None, cos, sin, 0)
  if not moe:
    return (y, jnp.zeros((), jnp.float32)), {}
  return (y, alpha * aux["balance_loss"]), {"balance": aux["balance_loss"], "load": aux["load"]}


def _head(cfg: ModelConfig, ep, routing, tokens, labels, coefs, p, x):
  cos, sin = _rope(cfg, x)

  def run(m, x):
    out = {"logits": m.head(m.norm(x)), "aux": {}}
    if m.mtp:
      out["mtp_logits"], out["mtp_aux"] = m.mtp_train(x, tokens, cos, sin)
    return out
  out = Transformer(cfg, ep).apply({"params": p, "routing": routing}, x, method=run)
  loss, metrics = losses.objective(cfg, out, labels, coefs[0], coefs[1])
  aux = {"ce": metrics["ce"], "mtp_loss": metrics.get("mtp_loss"), "balance": metrics.get("balance_loss"),
         "load": losses.load_tree(out)}
  return loss, aux


def _layer_fn(cfg: ModelConfig, moe: bool, ep, routing, alpha, local=lambda p: p):
  fn = lambda p, x: _layer(cfg, moe, ep, routing, alpha, local(p), x)
  if cfg.remat != "none":
    # The same memory policy as the unpipelined model: the VJP keeps only what the policy saves.
    fn = jax.checkpoint(fn, policy=remat_policy(cfg.remat), prevent_cse=False)
  return fn


def _embed_piece(cfg: ModelConfig, devices, inputs):
  """p -> the embedded micro-batch."""
  fn = lambda p, inputs: (_embed(cfg, devices.local(p), inputs), {})
  return lambda p: devices.run(fn, p, (inputs,))[0]


def _layer_piece(cfg: ModelConfig, moe: bool, devices, routing, alpha):
  """(p, x) -> ((y, loss share), {'balance', 'load'} for an MoE layer)."""
  def fn(p, x, routing, alpha):
    (y, part), aux = _layer_fn(cfg, moe, devices.expert_parallel, routing, alpha, devices.local)(p, x)
    return y, dict(aux, part=part)

  def piece(p, x):
    y, stats = devices.run(fn, p, (x,), (routing, alpha))
    part = stats.pop("part")
    return (y, part), stats
  return piece


def _head_piece(cfg: ModelConfig, devices, routing, inputs, labels, coefs):
  """(p, x) -> (loss share, {'ce', 'mtp_loss', 'balance', 'load'})."""
  head = lambda routing, inputs, labels, coefs, p, x: _head(
      cfg, devices.expert_parallel, routing, inputs, labels, coefs, devices.local(p), x)
  if cfg.remat != "none":
    # The VJP keeps the head's input, not its float32 logits (heads x rows x vocab): a pipeline rank holds
    # one VJP per micro-batch in flight, and the logits are recomputed in the backward.
    head = jax.checkpoint(head, policy=remat_policy(cfg.remat), prevent_cse=False)

  def fn(p, x, inputs, labels, routing, coefs):
    loss, aux = head(routing, inputs, labels, coefs, p, x)
    return None, dict({k: v for k, v in aux.items() if v is not None}, part=loss)

  def piece(p, x):
    _, stats = devices.run(fn, p, (x, inputs, labels), (routing, coefs))
    return stats.pop("part"), stats
  return piece


# ---------------------------------------------------------------------------------------------------
# The stage programs. `coefs` = [mtp_weight, alpha, 1/M] (f32 [3], an argument so that changing the loss
# weights never recompiles).
# ---------------------------------------------------------------------------------------------------
def forward(cfg: ModelConfig, key, params, routing, x, tokens, coefs, devices):
  """F: returns (activation or None on the last stage, per-piece VJPs, aux).

  devices: where the stage runs (static): its sub-mesh, per device or in the global view, and its routed
  experts split over the sub-mesh's 'expert' axis or not; the VJPs carry it to B and W. `params` are
  `devices.copies(...)` of the stage's variables.

  aux = {'loss': this stage's share, 'balance': raw balance statistic summed over its MoE layers,
  'loads': [E] per MoE layer, and on the last stage 'ce', 'mtp_loss', 'mtp_loads'}.
  """
  return _run(_forward_pieces(cfg, key, params, routing, x, tokens, coefs, devices))


def _run(steps):
  """Runs a piece-by-piece generator (`_forward_pieces`, `_backward_pieces`) to its end; returns its value."""
  try:
    carry = next(steps)
    while True:
      carry = steps.send(carry)
  except StopIteration as done:
    return done.value


def _forward_pieces(cfg: ModelConfig, key, params, routing, x, tokens, coefs, devices):
  """`forward` one piece at a time: yields the activation between two pieces and goes on with what it is
  sent back (forward_backward ties it to the other chunk's); returns forward's result."""
  first, last, kinds = key
  inputs = tokens[:, :-1] if tokens is not None else None
  vjps, share, balance, loads, aux = [], jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), [], {}
  if first:
    x, vjp = jax.vjp(_embed_piece(cfg, devices, inputs), params["embed"])
    vjps.append(vjp)
  for moe, p, r in zip(kinds, params["layers"], routing["layers"]):
    if vjps:
      x = yield x
    (x, part), vjp, layer_aux = jax.vjp(_layer_piece(cfg, moe, devices, r, coefs[1]), p, x, has_aux=True)
    vjps.append(vjp)
    share = share + part
    if moe:
      balance = balance + layer_aux["balance"]
      loads.append(layer_aux["load"])
  if last:
    x = yield x        # a stage has at least one layer, so a piece ran before the head
    head = _head_piece(cfg, devices, routing["head"], inputs, tokens[:, 1:], coefs)
    part, vjp, head_aux = jax.vjp(head, params["head"], x, has_aux=True)
    vjps.append(vjp)
    share = share + part
    if head_aux.get("balance") is not None:
      balance = balance + head_aux["balance"]
    aux = {"ce": head_aux["ce"], "mtp_loss": head_aux.get("mtp_loss"), "mtp_loads": head_aux["load"]}
    x = None
  aux.update(loss=share, balance=balance, loads=loads)
  return x, _without_params(vjps, params), aux


def evaluate(cfg: ModelConfig, key, params, routing, x, tokens, coefs, devices):
  """F without the residuals (evaluation): (activation or None on the last stage, aux)."""
  y, _, aux = forward(cfg, key, params, routing, x, tokens, coefs, devices)
  return y, aux


@jax.tree_util.register_pytree_node_class
class ParamRef:
  """Stands in a stage's VJPs for a residual that is one of the stage's parameter copies (leaf `index` of
  its params): F does not output its parameters once per micro-batch in flight, B, B* and W put them back.
  A pytree node with no leaves, so it crosses jit boundaries for free."""

  def __init__(self, index: int):
    self.index = index

  def tree_flatten(self):
    return (), self.index

  @classmethod
  def tree_unflatten(cls, index, _):
    return cls(index)


def _without_params(vjps, params):
  index = {id(a): i for i, a in enumerate(jax.tree.leaves(params))}
  return jax.tree.map(lambda a: ParamRef(index[id(a)]) if id(a) in index else a, vjps)


def _with_params(vjps, params):
  flat = jax.tree.leaves(params)
  return jax.tree.map(lambda r: flat[r.index] if isinstance(r, ParamRef) else r, vjps,
                      is_leaf=lambda r: isinstance(r, ParamRef))


def _backward(key, vjps, g, coefs, want_params: bool, acc=None):
  """Walks the pieces backwards. Returns (input cotangent, per-piece param grads, per-piece cotangents).

  Every piece's VJP yields both halves; whatever the caller does not return (the parameter half in B*)
  is dead code that jit removes, so B* costs only the input-gradient chain. With `acc` (per-piece
  accumulators), each piece's gradient is added to its accumulator as soon as it exists, so the stage's
  gradients are never all live at once; the sums come back in place of the gradients.
  """
  return _run(_backward_pieces(key, vjps, g, coefs, want_params, acc))


def _backward_pieces(key, vjps, g, coefs, want_params: bool, acc=None):
  """`_backward` one piece at a time: yields the cotangent between two pieces (see `_forward_pieces`)."""
  first, last, _ = key
  seed = coefs[2]
  n = len(vjps)
  grads, cts = [None] * n, [None] * n
  for i in reversed(range(n)):
    is_head, is_embed = last and i == n - 1, first and i == 0
    if i < n - 1:
      g = yield g
    ct = seed if is_head else (g if is_embed else (g, seed))
    cts[i] = ct
    if is_embed:
      if want_params:
        grads[i], = vjps[i](ct)
    else:
      grads[i], g = vjps[i](ct)
    if acc is not None and grads[i] is not None:
      grads[i] = _add(acc[i], grads[i])
  return g, grads, cts


def _as_tree(key, grads):
  first, last, kinds = key
  tree = {"layers": grads[first:first + len(kinds)]}
  if first:
    tree["embed"] = grads[0]
  if last:
    tree["head"] = grads[-1]
  return tree


def _as_list(key, tree):
  """The inverse of _as_tree: a stage-layout tree as per-piece entries."""
  first, last, _ = key
  return ([tree["embed"]] if first else []) + list(tree["layers"]) + ([tree["head"]] if last else [])


def _add(acc, tree):
  return jax.tree.map(jnp.add, acc, tree)


def backward(key, vjps, g, coefs, acc, params):
  """B: full backward. Returns (input gradient or None on stage 0, acc + this micro-batch's grads).
  params: the stage's parameter copies that F took (its VJPs refer to them)."""
  dx, sums, _ = _backward(key, _with_params(vjps, params), g, coefs, want_params=True, acc=_as_list(key, acc))
  return (None if key[0] else dx), _as_tree(key, sums)


def backward_input(key, vjps, g, coefs, params):
  """B*: input gradient only, plus the per-piece output cotangents that the deferred W needs."""
  dx, _, cts = _backward(key, _with_params(vjps, params), g, coefs, want_params=False)
  return (None if key[0] else dx), cts


def backward_weights(key, vjps, cts, acc, params):
  """W: every piece's weight gradient from its saved cotangent; pieces are independent, nothing reruns."""
  acc = _as_list(key, acc)
  return _as_tree(key, [_add(a, vjp(ct)[0]) for a, vjp, ct in zip(acc, _with_params(vjps, params), cts)])


# XLA:GPU options of the stage programs on GPUs (the executor's Plan adds them). Without the latency-hiding
# scheduler an F&B program's all-to-alls are synchronous; with it, collectives started as early as their inputs
# allow and two in flight at once, the other chunk's GEMMs run inside more of their windows (measured by
# python -m dsv3.bench.overlap). pipeline.collectives_in_flight sets the last (gpu_overlap_options).
IN_FLIGHT_OPTION = "xla_gpu_experimental_parallel_collective_overlap_limit"
GPU_OVERLAP_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": True,
                       "xla_gpu_experimental_collective_start_as_early_as_possible": True,
                       IN_FLIGHT_OPTION: 2}


def gpu_overlap_options(collectives_in_flight: int) -> dict:
  """GPU_OVERLAP_OPTIONS with at most `collectives_in_flight` asynchronous collectives in flight at once."""
  return {**GPU_OVERLAP_OPTIONS, IN_FLIGHT_OPTION: int(collectives_in_flight)}


# Name scopes that tag every op of an F&B program with its chunk (dsv3.analysis.overlap reads them from the HLO).
FORWARD_SCOPE, BACKWARD_SCOPE = "fb_forward", "fb_backward"


def forward_backward(cfg: ModelConfig, fkey, bkey, input_only: bool, devices, params, routing, x, tokens,
                     coefs, vjps, g, acc, b_params, barriers: bool = True):
  """F&B: F of one micro-batch (`forward`'s arguments) and the backward of another (B, or B* if input_only;
  `backward`'s arguments) as ONE program. The two chunks share no data, so XLA's scheduler may run one
  chunk's expert all-to-all while the other chunk's GEMMs compute; the numbers are F's and B's exactly.
  barriers: the chunks advance piece by piece side by side, and an optimization barrier between steps ties
  what each carries, so F's k-th piece and B's k-th piece (B walks its pieces backwards) are scheduled
  between the same two barriers, as DeepSeek's F&B pairs them. Without, XLA orders the two chunks freely.
  Returns (F's (y, vjps, aux), B's (dx, acc) or B*'s (dx, cts))."""
  f_steps = _forward_pieces(cfg, fkey, params, routing, x, tokens, coefs, devices)
  b_steps = _backward_pieces(bkey, _with_params(vjps, b_params), g, coefs, want_params=not input_only,
                             acc=None if input_only else _as_list(bkey, acc))
  f_out, (dx, sums, cts) = _side_by_side(((f_steps, FORWARD_SCOPE), (b_steps, BACKWARD_SCOPE)), barriers)
  return f_out, ((None if bkey[0] else dx), cts if input_only else _as_tree(bkey, sums))


def _side_by_side(chunks, barriers: bool):
  """Runs piece-by-piece generators (`_forward_pieces`, `_backward_pieces`) in lockstep, each under its name
  scope, tying what they carry between steps with one optimization barrier if `barriers`; returns their values."""
  live, carry, out = dict(enumerate(chunks)), {}, [None] * len(chunks)
  def step(i, value=None):
    steps, scope = live[i]
    with jax.named_scope(scope):
      try:
        carry[i] = steps.send(value)
      except StopIteration as done:
        out[i] = done.value
        del live[i]
  for i in list(live):
    step(i)
  while live:
    if barriers and len(live) > 1:
      ids = sorted(live)
      carry.update(zip(ids, jax.lax.optimization_barrier(tuple(carry[i] for i in ids))))
    for i in list(live):
      step(i, carry[i])
  return out


def accumulators(copies, params):
  """Gradient accumulators for per-device parameter `copies`: their shapes and placement, the dtype of the
  master `params` (FP32: a BF16 copy's micro-batch gradients add up in FP32, as the report keeps them)."""
  return jax.tree.map(lambda c, p: jnp.zeros(c.shape, p.dtype, device=c.sharding), copies, params)


def abstract_accumulators(copies, params):
  """`accumulators` as ShapeDtypeStructs (a dry run's)."""
  return jax.tree.map(lambda c, p: jax.ShapeDtypeStruct(c.shape, p.dtype, sharding=c.sharding), copies, params)


class Programs(NamedTuple):
  """The jitted stage programs. jit caches one executable per (static key, shapes, sub-mesh), so every
  stage of the same shape on the same sub-mesh shares them, across schedules and steps."""
  forward: Callable
  backward: Callable
  backward_input: Callable
  backward_weights: Callable
  evaluate: Callable
  forward_backward: Callable


@functools.lru_cache(maxsize=None)
def programs(compiler_options: Optional[Tuple[Tuple[str, Any], ...]] = None, fb_barriers: bool = True) -> Programs:
  """The stage programs compiled with `compiler_options` (XLA flags as (name, value) pairs, e.g. a lower
  CPU optimisation level for tests); the gradient accumulator is donated, so it is updated in place.
  fb_barriers: forward_backward's `barriers` (config pipeline.fb_barriers)."""
  opts = dict(compiler_options) if compiler_options else None
  return Programs(
      forward=jax.jit(forward, static_argnums=(0, 1, 7), compiler_options=opts),
      backward=jax.jit(backward, static_argnums=0, donate_argnums=4, compiler_options=opts),
      backward_input=jax.jit(backward_input, static_argnums=0, compiler_options=opts),
      backward_weights=jax.jit(backward_weights, static_argnums=0, donate_argnums=3, compiler_options=opts),
      evaluate=jax.jit(evaluate, static_argnums=(0, 1, 7), compiler_options=opts),
      forward_backward=jax.jit(functools.partial(forward_backward, barriers=fb_barriers),
                               static_argnums=(0, 1, 2, 3, 4), donate_argnums=12,
                               compiler_options=opts))
