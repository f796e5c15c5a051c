"""Gradient reduction at the end of a pipelined step (`plan` is a dsv3.pipeline.executor.Plan).

Each rank sums its per-device copies into ZeRO-1 shards (its one reduction over its devices); a unit held by
several ranks (DualPipe's two copies, the embedding on the first and last stage) is then summed among its
holders only, and the scalars (losses, the squared gradient norm) over 'pipeline'.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3 import layout
from dsv3.parallel import sharding
from dsv3.pipeline import per_device
from dsv3.training import steps as steps_lib

SCALARS = ("loss", "balance", "ce", "mtp_loss", "grad_sq")    # a rank's row of whole-model sums


def _rank_sums(stage_specs, devices, shared, shardings, acc, auxes):
  """One rank's gradients and loads by unit, summed over its micro-batches and stage copies.

  Every unit comes back reduced (the per-device copies summed into their ZeRO-1 shards, the rank's one
  reduction); `shared` units (also held by other ranks) with a leading axis of one row, for the sum among
  their holders. Also returns the rank's row of SCALARS."""
  grads = layout.by_unit(acc)      # the rank's per-unit accumulators, shared by its stage copies
  loads = {}
  add = lambda d, k, v: d.__setitem__(k, v if k not in d else jax.tree.map(jnp.add, d[k], v))
  total = lambda xs: sum(xs[1:], xs[0])
  row = dict.fromkeys(SCALARS, jnp.zeros((), jnp.float32))
  for spec, aux in zip(stage_specs, auxes):
    for name in ("loss", "balance", "ce", "mtp_loss"):
      if aux[0].get(name) is not None:
        row[name] = row[name] + total([a[name] for a in aux])
    moe = [l for l, is_moe in zip(spec.layers, spec.moe) if is_moe]
    for j, l in enumerate(moe):
      add(loads, layout.unit_of(layout.LAYERS, layout.layer_key(l)), layout.bias_tree(total([a["loads"][j] for a in aux])))
    for key in (aux[0].get("mtp_loads") or {}):
      add(loads, key, jax.tree.map(lambda *xs: total(xs), *[a["mtp_loads"][key] for a in aux]))
  # Every unit's copies summed into its ZeRO-1 shards here (the rank's one reduction); a shared unit's shards
  # get a leading axis of one row for the sum among its holders, which then moves 1/devices of the unit.
  reduced = {u: jax.tree.map(jax.lax.with_sharding_constraint, devices.sum_copies(g), shardings[u])
             for u, g in grads.items()}
  own = {u: g for u, g in reduced.items() if u not in shared}
  shared_grads = {u: jax.tree.map(lambda x: x[None], g) for u, g in reduced.items() if u in shared}
  row["grad_sq"] = steps_lib.sq_norm(own)
  return (own, shared_grads, {u: l for u, l in loads.items() if u not in shared},
          {u: jax.tree.map(lambda x: x[None], l) for u, l in loads.items() if u in shared},
          jnp.stack([row[k] for k in SCALARS])[None])


def _group_sum(grad_shardings, load_shardings, sq_sharding, grads, loads):
  """Shared units' rows from all their holders ([holders * rows, ...]) summed: the gradients into their
  ZeRO-1 shards, replicated over the holders; and the holders' squared norm, counted on the first."""
  grads = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x.sum(0), s), grads, grad_shardings)
  loads = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x.sum(0), s), loads, load_shardings)
  holders = sq_sharding.mesh.shape["pipeline"]
  sq = jnp.zeros((holders,), jnp.float32).at[0].set(steps_lib.sq_norm(grads))
  return grads, loads, jax.lax.with_sharding_constraint(sq, sq_sharding)


def assemble(plan, sums: dict):
  """Per-rank gradients and loads (each unit reduced once, among its holders) and the whole-model scalars,
  from each local rank's `rank_sums_program` outputs (sums[r])."""
  lay = plan.layout
  zero1 = lambda r, tree: sharding.zero1_shardings(
      plan.meshes[r], jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  own, shared, own_loads, shared_loads, rows = ({r: out[i] for r, out in sums.items()} for i in range(5))

  # Shared units: one program per group of holders sums their rows (every process holding one of them runs it).
  grads = {r: dict(own[r]) for r in plan.local_ranks}
  loads = {r: dict(own_loads[r]) for r in plan.local_ranks}
  pieces = {r: [] for r in plan.local_ranks}
  groups = {}
  for r in plan.local_ranks:
    for u in shared[r]:
      groups.setdefault(lay.holders(u), set()).add(u)
    for u in shared_loads[r]:
      groups.setdefault(lay.holders(u), set()).add(u)
  for holders, units in sorted(groups.items()):
    mesh, local = lay.group_mesh(holders), [r for r in holders if r in grads]
    first = local[0]

    def stacked(per_rank, u):
      def leaf(*xs):
        x = xs[0]
        lead = tuple(x.sharding.spec)[0] if len(x.sharding.spec) else None
        lead = () if lead is None else (lead if isinstance(lead, tuple) else (lead,))
        spec = P(("pipeline", *lead), *tuple(x.sharding.spec)[1:])
        return jax.make_array_from_single_device_arrays(
            (len(holders) * x.shape[0], *x.shape[1:]), NamedSharding(mesh, spec),
            [s.data for y in xs for s in y.addressable_shards])
      return jax.tree.map(leaf, *[per_rank[r][u] for r in local])
    g_units = sorted(u for u in units if u in shared[first])
    l_units = sorted(u for u in units if u in shared_loads[first])
    g_in = {u: stacked(shared, u) for u in g_units}
    l_in = {u: stacked(shared_loads, u) for u in l_units}
    to_group = lambda s: NamedSharding(mesh, s.spec)
    key = ("group", holders, tuple(g_units), tuple(l_units),
           tuple((x.shape, x.dtype) for x in jax.tree.leaves((g_in, l_in))))
    if key not in plan.program_cache:
      param = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
      g_out = {u: jax.tree.map(to_group, zero1(first, jax.tree.map(param, g_in[u]))) for u in g_units}
      l_out = {u: jax.tree.map(lambda _: NamedSharding(mesh, P()), l_in[u]) for u in l_units}
      plan.program_cache[key] = jax.jit(functools.partial(_group_sum, g_out, l_out, NamedSharding(mesh, P("pipeline"))))
    g_sum, l_sum, sq = plan.program_cache[key](g_in, l_in)
    for r in local:
      grads[r].update({u: jax.tree.map(lambda x: lay.on_rank(x, r), g) for u, g in g_sum.items()})
      loads[r].update({u: jax.tree.map(lambda x: lay.on_rank(x, r), l) for u, l in l_sum.items()})
      pieces[r].append(lay.on_rank(sq, r))

  for r in plan.local_ranks:
    if pieces[r]:
      rows[r] = _add_grad_sq(rows[r], pieces[r])
  totals = sum_over_ranks(lay.gather_rows(rows), NamedSharding(plan.mesh, P()))
  loss, metrics, grad_norm = step_metrics(plan.cfg, plan.microbatches, totals)
  out = lambda per_rank: [layout.from_units(per_rank[r]) if r in per_rank else None for r in range(len(plan.meshes))]
  return loss, metrics, out(grads), out(loads), grad_norm


def step_metrics(cfg, microbatches: int, totals):
  """(loss, metrics, gradient norm) of the step from the whole-model SCALARS `totals`. Each micro-batch's
  loss is spread over the stages (every stage's balance share, the last stage's CE and MTP); the batch
  value is the mean over micro-batches of the per-micro-batch sums."""
  mean = {k: totals[i] / microbatches for i, k in enumerate(SCALARS)}
  metrics = {"ce": mean["ce"]}
  if cfg.num_nextn_predict_layers:
    metrics["mtp_loss"] = mean["mtp_loss"]
  if cfg.num_moe_layers:
    metrics["balance_loss"] = mean["balance"]
  metrics["loss"] = mean["loss"]
  return mean["loss"], metrics, jnp.sqrt(totals[SCALARS.index("grad_sq")])


def stage_copies(plan, r: int) -> list:
  """The (direction, stage) copies rank r runs, in the order its gradient sums take them."""
  return sorted(ds for ds, owner in plan.owner.items() if owner == r)


def rank_sums_program(plan, r: int, params, devices: per_device.Devices):
  """Rank r's jitted _rank_sums for its (abstract or real) per-layer `params`: (the rank's per-layer
  accumulators, its stage copies' auxes) -> (own grads, shared rows, own loads, shared load rows, SCALARS row)."""
  mine = stage_copies(plan, r)
  key = ("sums", r, tuple(mine), devices, jax.tree.structure(params),
         tuple((x.shape, x.dtype) for x in jax.tree.leaves(params)))
  if key not in plan.program_cache:
    units = layout.by_unit(params)
    shared = tuple(sorted(u for u in units if len(plan.layout.holders(u)) > 1))
    shardings = {u: sharding.zero1_shardings(
        plan.meshes[r], jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)) for u, t in units.items()}
    plan.program_cache[key] = jax.jit(functools.partial(
        _rank_sums, tuple(plan.specs[s] for _, s in mine), devices, shared, shardings))
  return plan.program_cache[key]


def _add_grad_sq(row, pieces):
  return row.at[0, SCALARS.index("grad_sq")].add(sum(p[0] for p in pieces))


@functools.partial(jax.jit, static_argnums=1)
def sum_over_ranks(rows, target):
  """[P, k] rows summed over 'pipeline', replicated over the pipeline mesh."""
  return jax.lax.with_sharding_constraint(rows.sum(0), target)
