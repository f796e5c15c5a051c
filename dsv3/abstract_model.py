"""The model's variables read off the real model definition, without allocating: one Leaf per variable.

`jax.eval_shape(model.init, ...)` gives every shape and dtype (the 671B model in well under a second on CPU),
so the planner's counts and memory model restate nothing of the architecture.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3 import layout, model
from dsv3.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One variable of the model, described per layer."""
  path: str
  group: str          # 'embed' | 'dense' | 'moe' | 'head' (final norm, lm_head) | 'mtp'
  layers: int         # length of the stacked layer axis (1 when not stacked)
  size: int           # elements per layer
  dtype: str
  routed: bool        # a routed-expert weight [E, ...]: sharded over mesh.expert, k of E active per token
  matmul: bool        # multiplies activations (counts in FLOPs); embedding lookups and norm scales do not
  trainable: bool     # 'params'; the 'routing' biases are state (no grad, no optimizer)

  @property
  def total(self) -> int:
    return self.layers * self.size


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


# Top-level variable names -> planner groups; anything else (final norm, lm_head, ...) sits with the head.
_GROUPS = {"embed_tokens": "embed", layout.DENSE_STACK: "dense", layout.MOE_STACK: "moe"}


def _group(top: str) -> str:
  return "mtp" if top.startswith("mtp") else _GROUPS.get(top, "head")


@functools.lru_cache(maxsize=16)
def abstract_variables(cfg: ModelConfig):
  """ShapeDtypeStructs of model.init's variables (nothing is allocated)."""
  return jax.eval_shape(functools.partial(model.init, cfg), jax.random.key(0))


@functools.lru_cache(maxsize=16)
def leaves(cfg: ModelConfig) -> tuple:
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]:
    names = [_key_name(k) for k in path]
    collection, group = names[0], _group(names[1])
    stacked = group in ("dense", "moe")
    layers = x.shape[0] if stacked else 1
    shape = x.shape[1:] if stacked else x.shape
    out.append(Leaf(path="/".join(names), group=group, layers=layers, size=int(np.prod(shape, dtype=np.int64)),
                    dtype=jnp.dtype(x.dtype).name, routed=names[-1].startswith("experts_"),
                    matmul=group != "embed" and len(shape) >= 2, trainable=collection == "params"))
  return tuple(out)
