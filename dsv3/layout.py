"""The variables tree's layout: layer stacks, layer -> (stack, index), routing paths, and the per-layer form.

Two forms of the same variables ('params', 'routing', and the optimizer moments that mirror the params):
  stacked    the model's own tree: layers scanned into 'dense_layers' [first_k_dense_replace, ...] and
             'moe_layers' [num_moe_layers, ...]; unpipelined runs, exports, HF conversion.
  per-layer  every layer its own entry, layers/<global index, 3 digits>; everything else unchanged. A
             pipelined run keeps its state in this form (dsv3.pipeline.rank_state): a rank holds the
             layers it runs, and the form does not depend on the pipeline degree or schedule.
"""
from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

STACKS = ("dense_layers", "moe_layers")   # the scanned layer stacks, in layer order
DENSE_STACK, MOE_STACK = STACKS
LAYERS = "layers"                          # the per-layer form's key
BIAS = ("mlp", "e_score_correction_bias")  # the routing bias (and its load) inside an MoE block
MTP_BLOCK = "block"                        # an MTP module's transformer block


def mtp_key(k: int) -> str:
  """The top-level key of MTP module k (flax names the list attribute `mtp`'s entries mtp_0, mtp_1, ...)."""
  return f"mtp_{k}"


def bias_tree(value) -> dict:
  """`value` where an MoE block holds its routing bias: {'mlp': {'e_score_correction_bias': value}}."""
  return {BIAS[0]: {BIAS[1]: value}}


def load_tree(moe_load=None, mtp_loads=()) -> dict:
  """Per-expert loads shaped like the stacked 'routing' collection (the MoE stack's, each MTP block's)."""
  tree = {} if moe_load is None else {MOE_STACK: bias_tree(moe_load)}
  for k, load in enumerate(mtp_loads):
    if load is not None:
      tree[mtp_key(k)] = {MTP_BLOCK: bias_tree(load)}
  return tree


def is_moe(cfg, layer: int) -> bool:
  """Whether global layer `layer` is an MoE layer (the first first_k_dense_replace layers are dense)."""
  return layer >= cfg.first_k_dense_replace


def stack_and_index(cfg, layer: int) -> Tuple[str, int]:
  """(stack name, index in it) of global layer `layer`."""
  if not is_moe(cfg, layer):
    return DENSE_STACK, layer
  return MOE_STACK, layer - cfg.first_k_dense_replace


def layer_of(cfg, stack: str, index: int) -> int:
  """The global layer index of `stack`[index]."""
  return index if stack == DENSE_STACK else index + cfg.first_k_dense_replace


def layer_key(layer: int) -> str:
  return f"{layer:03d}"


def unstack(cfg, tree: dict) -> dict:
  """Stacked -> per-layer (arrays or numpy; inside jit it traces to slices)."""
  out = {k: v for k, v in tree.items() if k not in STACKS}
  layers = {}
  for stack in STACKS:
    if stack in tree:
      n = jax.tree.leaves(tree[stack])[0].shape[0]
      for i in range(n):
        layers[layer_key(layer_of(cfg, stack, i))] = jax.tree.map(lambda a: a[i], tree[stack])
  if layers:
    out[LAYERS] = layers
  return out


def stack(cfg, tree: dict) -> dict:
  """Per-layer -> stacked (jnp.stack for jax arrays, np.stack for numpy)."""
  out = {k: v for k, v in tree.items() if k != LAYERS}
  by_stack = {}
  for key in sorted(tree.get(LAYERS, {})):
    name, _ = stack_and_index(cfg, int(key))
    by_stack.setdefault(name, []).append(tree[LAYERS][key])
  for name, layers in by_stack.items():
    join = lambda *xs: (np.stack if isinstance(xs[0], np.ndarray) else jnp.stack)(xs)
    out[name] = jax.tree.map(join, *layers)
  return out


def unit_of(key: str, layer: str = None) -> str:
  """A unit's id: 'layers/007' for a layer of the per-layer form, else the top-level key ('embed_tokens')."""
  return f"{LAYERS}/{layer}" if key == LAYERS else key


def units(tree: dict) -> list:
  """The unit ids of a per-layer variables tree."""
  return [unit_of(k, l) for k, v in tree.items() for l in (v if k == LAYERS else [None])]


def by_unit(tree: dict) -> dict:
  """A per-layer tree as {unit id: subtree}."""
  return {unit_of(k, l): (v[l] if k == LAYERS else v) for k, v in tree.items() for l in (v if k == LAYERS else [None])}


def from_units(units: dict) -> dict:
  """{unit id: subtree} -> the per-layer tree (the inverse of by_unit)."""
  out = {}
  for unit, tree in units.items():
    if unit.startswith(LAYERS + "/"):
      out.setdefault(LAYERS, {})[unit.split("/")[1]] = tree
    else:
      out[unit] = tree
  return out


def select(tree: dict, keep) -> dict:
  """The part of a per-layer variables tree made of the units in `keep` (a collection of unit ids)."""
  out = {}
  for k, v in tree.items():
    if k == LAYERS:
      kept = {l: x for l, x in v.items() if unit_of(k, l) in keep}
      if kept:
        out[k] = kept
    elif k in keep:
      out[k] = v
  return out


def moe_loads(loads: dict) -> list:
  """The main MoE layers' per-expert loads in a loads (routing-shaped) tree of either form: [layers, E]
  when stacked, one [E] per layer when per-layer (MTP modules excluded)."""
  if "moe_layers" in loads:
    return [_get(loads["moe_layers"], BIAS)]
  return [_get(v, BIAS) for _, v in sorted(loads.get(LAYERS, {}).items())]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def is_per_layer(params: dict) -> bool:
  return LAYERS in params


def map_state(fn: Callable[[dict], dict], state: dict) -> dict:
  """`fn` applied to the variables trees of a train state: 'params', 'routing', and every node of
  'opt_state' shaped like the params (Adam's moments); other leaves (step counts) are kept."""
  params_def = jax.tree.structure(state["params"])
  is_vars = lambda x: isinstance(x, dict) and jax.tree.structure(x) == params_def
  out = dict(state, params=fn(state["params"]), routing=fn(state.get("routing", {})))
  if "opt_state" in state:
    out["opt_state"] = jax.tree.map(lambda x: fn(x) if is_vars(x) else x, state["opt_state"], is_leaf=is_vars)
  return out
