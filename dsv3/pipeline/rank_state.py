"""Where a pipelined run's state lives: each rank holds only the units of the stages it runs.

Per-rank trees (MPMD, as JaxPP keeps them) in dsv3.layout's per-layer form, each on its rank's sub-mesh, not
layers stacked [stages, ...] over 'pipeline': DualPipe runs every stage on two ranks and the embedding on
the first and last, which one sharded axis cannot place. A unit is one layer or one top-level module; every
holder keeps its own copy and applies the same update from a gradient reduced among the holders. `view`
shows each unit once (checkpoints, EMA, exports), independent of the schedule and pipeline degree.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3 import layout
from dsv3.parallel import sharding
from dsv3.training import steps


def needs(spec, unit: str) -> bool:
  """Whether stage `spec` (stages.StageSpec) runs `unit`: its layers; the embedding on the first stage and
  on the last (the MTP modules embed the shifted tokens); every other top-level module on the last."""
  if unit.startswith(layout.LAYERS + "/"):
    return int(unit.split("/")[1]) in spec.layers
  return spec.last or (spec.first and unit == "embed_tokens")


class RankLayout:
  """Which rank holds which units, and how per-rank arrays and per-unit views convert (both ways, no copy)."""

  def __init__(self, mesh: Mesh, stages_of_rank: Sequence[Sequence]):
    """mesh: the ('pipeline', 'data', 'expert') mesh; stages_of_rank[r]: the StageSpecs rank r runs."""
    self.mesh = mesh
    self.meshes = sharding.stage_meshes(mesh)
    self.num_ranks = len(self.meshes)
    self.stages = [tuple(s) for s in stages_of_rank]
    me = jax.process_index()
    self.local = [any(d.process_index == me for d in m.devices.flat) for m in self.meshes]

  @functools.lru_cache(maxsize=None)
  def holders(self, unit: str) -> tuple:
    """The ranks holding `unit` ('' marks a leaf outside any variables tree, e.g. a step count: all)."""
    if not unit:
      return tuple(range(self.num_ranks))
    return tuple(r for r, specs in enumerate(self.stages) if any(needs(s, unit) for s in specs))

  def rank_units(self, tree: dict, r: int) -> set:
    return {u for u in layout.units(tree) if r in self.holders(u)}

  def primary(self, tree: dict, r: int) -> set:
    """The units of `tree` that rank r counts in whole-model sums: those whose first holder it is."""
    return {u for u in layout.units(tree) if self.holders(u)[0] == r}

  @functools.lru_cache(maxsize=None)
  def group_mesh(self, ranks: tuple) -> Mesh:
    """The ('pipeline', 'data', 'expert') mesh of some ranks' devices: a unit's holders."""
    return Mesh(self.mesh.devices[list(ranks)], self.mesh.axis_names)

  # -------------------------------------------------------------------------------------------------
  # A state's leaves and their units.
  # -------------------------------------------------------------------------------------------------
  def marks(self, state):
    """A tree like `state` (a per-layer train state or part of one) whose leaves are their unit ids."""
    def mark(tree):
      return {k: ({l: jax.tree.map(lambda _, l=l: layout.unit_of(k, l), x) for l, x in v.items()}
                  if k == layout.LAYERS else jax.tree.map(lambda _, k=k: k, v)) for k, v in tree.items()}
    if "params" in state:
      marked = layout.map_state(mark, state)
      return jax.tree.map(lambda x: x if isinstance(x, str) else "", marked)
    return mark(state)

  def restrict(self, state, r: int):
    """Rank r's part of a per-layer train state (or variables tree): the units it holds."""
    keep = lambda tree: layout.select(tree, self.rank_units(tree, r))
    return layout.map_state(keep, state) if "params" in state else keep(state)

  def rank_shardings(self, abstract_state, r: int) -> dict:
    """Shardings of rank r's part of a train state on its sub-mesh: dsv3.training.steps.saved_shardings'
    rules, except that the params, the FP32 master weights, are ZeRO-1 sharded like their optimizer state.
    A step works on per-device working copies gathered from them (dsv3.pipeline.per_device), so the master
    is never whole on a device, and the update is local to each shard."""
    out = steps.saved_shardings(self.meshes[r], abstract_state)
    if "params" in abstract_state:
      out["params"] = sharding.zero1_shardings(self.meshes[r], abstract_state["params"])
    return out

  def view_shardings(self, abstract_state):
    """The per-unit view's shardings: each leaf over its holders' devices, laid out within each rank as
    the rank holds it (step counts over the whole mesh)."""
    rank0 = self.rank_shardings(abstract_state, 0)
    return jax.tree.map(lambda unit, s: NamedSharding(self.group_mesh(self.holders(unit)), s.spec),
                        self.marks(abstract_state), rank0)

  # -------------------------------------------------------------------------------------------------
  # Per-rank arrays <-> per-unit views, sharing buffers.
  # -------------------------------------------------------------------------------------------------
  def view(self, rank_states: Sequence[Optional[dict]], abstract):
    """The per-unit view of per-rank trees (None for ranks without local devices; `abstract`: the whole
    tree's shapes): each leaf one global array over its holders' devices, sharing the local holders'
    buffers, laid out within each rank as the rank holds it."""
    flat_marks, treedef = jax.tree.flatten(self.marks(abstract))
    flat_rank = [None if s is None else dict(_by_path(s)) for s in rank_states]
    rules = None
    out = []
    for (path, a), unit in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], flat_marks):
      key, holders = jax.tree_util.keystr(path), self.holders(unit)
      local = [flat_rank[r][key] for r in holders if flat_rank[r] is not None]
      if local:
        spec = local[0].sharding.spec
      else:   # no holder in this process: the train state's rules say how the others hold it
        rules = rules or dict(_by_path(self.view_shardings(abstract)))
        spec = rules[key].spec
      shards = [s.data for x in local for s in x.addressable_shards]
      out.append(jax.make_array_from_single_device_arrays(
          a.shape, NamedSharding(self.group_mesh(holders), spec), shards))
    return treedef.unflatten(out)

  def split(self, state, abstract_state) -> List[Optional[dict]]:
    """Per-rank states (None for ranks without local devices) from a per-unit view or any per-layer
    state: arrays already on `view_shardings` are shared, anything else is placed there first (which
    needs every process to hold the whole array)."""
    shardings = self.view_shardings(abstract_state)
    state = jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s else jax.device_put(x, s),
                         state, shardings)
    out = []
    for r, mesh in enumerate(self.meshes):
      if not self.local[r]:
        out.append(None)
        continue
      devices = set(mesh.devices.flat)
      part = self.restrict(state, r)
      out.append(jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
          x.shape, NamedSharding(mesh, x.sharding.spec), [s.data for s in x.addressable_shards
                                                         if s.device in devices]), part))
    return out

  def on_rank(self, x, r: int):
    """A whole-mesh or holders-mesh array as seen by rank r (its shards there, no copy). An array split over
    'pipeline' on its leading axis (one row per rank) gives rank r's row, [1, ...]."""
    mesh, devices = self.meshes[r], set(self.meshes[r].devices.flat)
    spec, shape = tuple(x.sharding.spec), x.shape
    if spec and spec[0] == "pipeline":
      spec, shape = (None, *spec[1:]), (1, *shape[1:])
    return jax.make_array_from_single_device_arrays(
        shape, NamedSharding(mesh, P(*spec)), [s.data for s in x.addressable_shards if s.device in devices])

  def gather_rows(self, rows: Dict[int, jax.Array]) -> jax.Array:
    """[1, ...] arrays, one per local rank on its sub-mesh, as one [P, ...] array over the pipeline mesh."""
    first = next(iter(rows.values()))
    spec = P("pipeline", *tuple(first.sharding.spec)[1:])
    return jax.make_array_from_single_device_arrays(
        (self.num_ranks, *first.shape[1:]), NamedSharding(self.mesh, spec),
        [s.data for r in sorted(rows) for s in rows[r].addressable_shards])


def _by_path(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
