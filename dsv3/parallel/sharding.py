"""The device mesh and where every array lives on it: DeepSeek-V3's PP × DP(ZeRO-1) × EP, no TP.

One mesh with three named axes, outermost first:
  'pipeline'  pipeline stages (consumed by dsv3.pipeline's executor; one sub-mesh per stage, on which a
              rank keeps its FP32 master params ZeRO-1 sharded like their optimizer state),
  'data'      data parallelism; optimizer state is ZeRO-1 sharded over it,
  'expert'    expert parallelism; routed experts are split over it on their E axis.
Tokens are sharded over ('data', 'expert') together: an expert-parallel group is also a data-parallel
group for everything that is not a routed expert (attention, dense layers, shared experts), exactly as
in the report, where EP64 ranks each process their own micro-batch slice.

Placement is one short table of (regex over the parameter path, PartitionSpec builder). Everything the
table does not name is replicated — small models stay simple, and the only large, naturally split
tensors in DeepSeek-V3 are the routed experts. `fsdp=True` additionally shards the replicated
parameters over 'data' (ZeRO-3 style) for configs that do not fit otherwise.

Axes are `AxisType.Auto`: the model is written in the global (jit) view and lets XLA propagate
shardings; only the MoE dispatch is written per-device, inside `jax.shard_map` (dsv3.parallel.expert_parallel).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("pipeline", "data", "expert")
STAGE_AXES = ("data", "expert")
TOKEN_AXES = ("data", "expert")     # the batch/token axis is split over both


def _get(mesh_cfg, name: str) -> int:
  value = mesh_cfg[name] if isinstance(mesh_cfg, dict) else getattr(mesh_cfg, name, 1)
  return int(1 if value is None else value)


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The ('pipeline', 'data', 'expert') mesh from config.mesh (fields data, expert, pipeline).

  Accepts a ConfigDict, a dict, or any object with those attributes (missing ones count as 1).
  """
  shape = {a: _get(mesh_cfg, a) for a in AXES}
  for a, n in shape.items():
    if n < 1:
      raise ValueError(f"mesh.{a} must be >= 1, got {n}")
  devices = list(jax.devices() if devices is None else devices)
  total = shape["data"] * shape["expert"] * shape["pipeline"]
  if total != len(devices):
    raise ValueError(
        f"mesh.data × mesh.expert × mesh.pipeline = {shape['data']} × {shape['expert']} × "
        f"{shape['pipeline']} = {total} but there are {len(devices)} devices; set the three so that "
        f"their product is {len(devices)} (e.g. --config.mesh.data={len(devices)} --config.mesh.expert=1 "
        f"--config.mesh.pipeline=1), or change the device count (on CPU: "
        f"XLA_FLAGS=--xla_force_host_platform_device_count=N; otherwise the number of processes/GPUs)")
  return jax.make_mesh(tuple(shape[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def stage_meshes(mesh: Mesh) -> list[Mesh]:
  """One ('data', 'expert') sub-mesh per pipeline rank, so EP and DP run inside each stage."""
  if "pipeline" not in mesh.axis_names:
    return [mesh]
  devs = np.moveaxis(mesh.devices, mesh.axis_names.index("pipeline"), 0)
  rest = tuple(a for a in mesh.axis_names if a != "pipeline")
  return [Mesh(devs[p], rest, axis_types=(AxisType.Auto,) * len(rest)) for p in range(devs.shape[0])]


def axis_size(mesh: Mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.axis_names else 1


# -------------------------------------------------------------------------------------------------
# Parameters.
# -------------------------------------------------------------------------------------------------
def path_str(path) -> str:
  """A key path as 'params/moe_layers/mlp/experts_gate_proj' (optimizer wrappers add their own keys)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _expert_spec(shape, mesh: Mesh) -> P:
  """Routed experts [..., E, H, I] (a leading layer axis when scanned): E over 'expert'."""
  e_axis = len(shape) - 3
  ep = axis_size(mesh, "expert")
  if shape[e_axis] % ep:
    raise ValueError(f"{shape[e_axis]} routed experts cannot be split over mesh.expert={ep}; "
                     f"choose mesh.expert dividing model.n_routed_experts")
  return P(*([None] * e_axis), "expert" if ep > 1 else None)


# The whole placement policy. First match wins; anything unmatched is replicated.
PARTITION_RULES: list[tuple[str, Callable[[tuple, Mesh], P]]] = [
    (r"(^|/)experts_(gate|up|down)_proj($|/)", _expert_spec),
]


def spec_for(path: str, shape: tuple, mesh: Mesh) -> P:
  for pattern, build in PARTITION_RULES:
    if re.search(pattern, path) and len(shape) >= 3:
      return build(shape, mesh)
  return P()


def _add_data_axis(spec: P, shape: tuple, mesh: Mesh, axes: tuple = ("data",)) -> P:
  """Also shard over `axes` (together) on the first free axis their size divides (ZeRO); unchanged if none."""
  axes = tuple(a for a in axes if axis_size(mesh, a) > 1)
  n = int(np.prod([axis_size(mesh, a) for a in axes]))
  if n == 1:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  for i, size in enumerate(shape):
    if entries[i] is None and size % n == 0 and size >= n:
      entries[i] = axes[0] if len(axes) == 1 else axes
      while entries and entries[-1] is None:     # canonical form: P('data') rather than P('data', None)
        entries.pop()
      return P(*entries)
  return spec


def param_specs(mesh: Mesh, abstract_variables, fsdp: bool = False):
  """PartitionSpecs for a variables tree (arrays or ShapeDtypeStructs)."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    spec = spec_for(path_str(path), shape, mesh)
    return _add_data_axis(spec, shape, mesh) if fsdp else spec
  return jax.tree_util.tree_map_with_path(one, abstract_variables)


def param_shardings(mesh: Mesh, abstract_variables, fsdp: bool = False):
  """NamedShardings: routed experts over 'expert' on E, everything else replicated (or over 'data')."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(mesh, abstract_variables, fsdp),
                      is_leaf=lambda x: isinstance(x, P))


def zero1_shardings(mesh: Mesh, abstract_opt_state):
  """ZeRO-1: each optimizer-state leaf over its data-parallel axes on its first axis they divide: 'data',
  'expert' (the batch is split over both, so non-expert weights are data-parallel over data x expert, the
  report's DP degree) and 'pipeline' where present.

  A pipelined run applies it to each rank's own state on the rank's sub-mesh (dsv3.pipeline.rank_state),
  so there it splits over the rank's devices. Expert leaves (Adam moments of routed experts; their paths
  end in the parameter name) keep E over 'expert' and take 'data' elsewhere.
  Scalars (step counts) and indivisible leaves are replicated.
  """
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    spec = spec_for(path_str(path), shape, mesh)
    used = set(jax.tree.leaves(tuple(spec)))
    axes = tuple(a for a in ("pipeline", "data", "expert") if a not in used)
    return NamedSharding(mesh, _add_data_axis(spec, shape, mesh, axes=axes))
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def token_axes(mesh: Mesh, split: bool = False, axes: Sequence[str] = TOKEN_AXES) -> tuple:
  """The axes of `mesh` that a batch's rows (its tokens) are split over: TOKEN_AXES ('data', 'expert'),
  those the mesh has; `split`: only those of size > 1 (what a collective over the token axes needs).
  `axes`: other names for the two (an ExpertParallel's data_axis and expert_axis)."""
  present = tuple(a for a in axes if a in mesh.axis_names)
  return tuple(a for a in present if mesh.shape[a] > 1) if split else present


def batch_spec(mesh: Mesh, rows: Optional[int] = None) -> P:
  """The spec of a batch (its leading, row axis) on `mesh`: rows over token_axes(mesh), replicated over the
  rest ('pipeline'). Given `rows` (a pipeline micro-batch on a rank's sub-mesh), over the longest prefix of
  the token axes whose devices divide `rows`, else replicated."""
  axes = token_axes(mesh)
  if rows is None:
    return P(axes)
  for n in range(len(axes), 0, -1):
    size = int(np.prod([mesh.shape[a] for a in axes[:n]]))
    if rows % size == 0:
      return P(axes[:n] if size > 1 else None)
  return P()


def batch_sharding(mesh: Mesh, rows: Optional[int] = None) -> NamedSharding:
  """A batch on `mesh`, laid out by batch_spec."""
  return NamedSharding(mesh, batch_spec(mesh, rows))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
