"""Per-device memory of compiled programs, and of a pipeline rank over its step (compile_only's report).

A program's figures are its `compiled.memory_analysis()`; a pipelined rank's peak is not one program's, so
`rank_peak` adds what it holds across programs to each phase's compiled temporaries. GB = 1e9 bytes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsv3.analysis import overlap


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (every device holds as much)."""
  return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


def program_memory(compiled) -> dict:
  """Per-device bytes of one compiled program (its memory_analysis), with its peak."""
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)
  out = dict(argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
             temp_bytes=get("temp_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
             generated_code_bytes=get("generated_code_size_in_bytes"))
  # XLA:GPU's peak comes from buffer assignment's heap simulation; XLA:CPU's can be below the arguments plus
  # the temp buffer that are live together, so the larger of the two is reported, and both are kept.
  out["compiler_peak_bytes"] = get("peak_memory_in_bytes")
  out["sum_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  out["peak_bytes"] = max(out["compiler_peak_bytes"], out["sum_bytes"])
  return out


def rank_peak(info: dict, rows: list) -> dict:
  """Rank info's peak bytes per device over one step, from its representative's compiled programs (rows).
  held: the state (the params in it are the ZeRO-sharded FP32 master) + the per-device parameter copies and
  their gradient accumulators.

    forward/backward phase  held + in-flight x residuals + the largest F temp or B/B*/W temp and new outputs
    gradient sums           held + the sums' temp and output (the ZeRO-1 gradients)
    copies                  state + the parameter copies (the moment they are gathered)
    update                  the update program's peak (state, gradients, optimizer temporaries)
    evaluation              state + the EMA's device copy (ema_bytes) + the parameter copies it runs on
                            + an eval program's temp and output
    save                    state (orbax copies it to the host)

  The residuals of one micro-batch are the largest output of the rank's F programs (its VJP residuals and
  the activation it sends on)."""
  mine = [r for r in rows if r["program"] in info["programs"]]
  kind = lambda r: r["program"].split("_")[1]
  of = lambda *kinds: [r for r in mine if kind(r) in kinds]
  held = info["state_bytes"] + info["copies_bytes"]
  residual = max(r["output_bytes"] for r in of("F"))
  # F's outputs are the residuals counted in flight; a backward's are the input gradient, cotangents and the
  # accumulator (donated: aliased); an F&B's are both, its F's residuals among those counted in flight.
  work = max([r["temp_bytes"] for r in of("F")]
             + [r["temp_bytes"] + r["output_bytes"] - r["alias_bytes"] for r in of("B", "Bstar", "W")]
             + [r["temp_bytes"] + r["output_bytes"] - r["alias_bytes"] - residual for r in of("FB", "FBstar")])
  phases = dict(
      forward_backward=held + info["inflight_microbatches"] * residual + work,
      sums=held + max(r["temp_bytes"] + r["output_bytes"] for r in of("sums")),
      copies=info["state_bytes"] + info["parameter_copies_bytes"],
      update=max(r["peak_bytes"] for r in of("update")),
      evaluation=info["state_bytes"] + info.get("ema_bytes", 0) + info["parameter_copies_bytes"]
      + max([r["temp_bytes"] + r["output_bytes"] for r in of("eval")] or [0]),
      save=info["state_bytes"])
  worst = max(phases, key=phases.get)
  return dict(info, residual_bytes_per_microbatch=residual, working_bytes=work, phases=phases,
              peak_phase=worst, peak_bytes=phases[worst])


def peaks(rows: list, ranks: Optional[list], single: Optional[dict] = None) -> dict:
  """The worst figures of memory.json: over mesh positions, or pipelined over ranks (`rank_peak`; each rank's
  peak in per_rank_peak_bytes, one entry unpipelined), and the worst single program. rows: program_memory's
  per program (with 'program' and 'position'). single (unpipelined): {state_bytes, ema_bytes}, for the
  phases outside the train step (evaluation: the state, the EMA's device copy and the eval step's temp)."""
  worst_program = max(rows, key=lambda r: r["peak_bytes"])
  phases = None
  if ranks is not None:
    ranks = [rank_peak(info, rows) for info in ranks]
    worst_rank = max(ranks, key=lambda r: r["peak_bytes"])
    max_peak, max_position = worst_rank["peak_bytes"], f"rank{worst_rank['rank']} ({worst_rank['peak_phase']})"
  else:
    max_peak, max_position = worst_program["peak_bytes"], worst_program["position"]
    if single is not None:
      evals = [r for r in rows if r["program"].startswith("eval")]
      phases = dict(train=max(r["peak_bytes"] for r in rows if not r["program"].startswith("eval")),
                    evaluation=single["state_bytes"] + single["ema_bytes"]
                    + max([r["temp_bytes"] + r["output_bytes"] for r in evals] or [0]),
                    save=single["state_bytes"])
      phase = max(phases, key=phases.get)
      max_peak, max_position = phases[phase], f"{worst_program['position']} ({phase})"
  return dict(ranks=ranks, phases=phases, max_peak_bytes_per_device=max_peak, max_peak_position=max_position,
              per_rank_peak_bytes=[r["peak_bytes"] for r in ranks] if ranks is not None else [max_peak],
              max_program_peak_bytes=worst_program["peak_bytes"], max_peak_program=worst_program["program"])


def shortfalls(result: dict) -> list:
  """Every (rank, phase) whose compiled figure exceeds the target's memory: [{rank, phase, need_bytes,
  short_bytes}] (rank None unpipelined); [] when everything fits or the target has no capacity (CPU)."""
  cap = result.get("capacity_bytes_per_device")
  if not cap:
    return []
  rows = ([(r["rank"], r["phases"]) for r in result["ranks"]] if result.get("ranks") is not None
          else [(None, result.get("phases") or {"step": result["max_peak_bytes_per_device"]})])
  return [dict(rank=rank, phase=phase, need_bytes=need, short_bytes=need - cap)
          for rank, phases in rows for phase, need in phases.items() if need > cap]


def gb(n: Optional[int]) -> str:
  return "-" if n is None else f"{n / 1e9:.3f}"


def format_table(result: dict) -> str:
  """The per-device memory table (GB = 1e9 bytes) with the worst position, the estimate and the notes."""
  head = (f"compile-only {result['target']} ({result['device_kind']}, {result['devices']} devices, mesh "
          f"{result['mesh']}): memory per device, GB")
  cols = ("program", "position", "argument", "output", "temp", "alias", "peak")
  lines = [head, f"{cols[0]:<24} {cols[1]:<26}" + "".join(f"{c:>10}" for c in cols[2:])]
  for r in result["programs"]:
    lines.append(f"{r['program']:<24} {r['position']:<26}" + "".join(
        f"{gb(r[k + '_bytes']):>10}" for k in cols[2:]))
  if result.get("ranks"):
    cols = ("rank", "stages", "inflight", "state", "copies", "residual", "working", "peak", "plan", "phase")
    lines.append("per rank over the step (GB per device; copies = parameter copies + gradient accumulators, "
                 "residual = one micro-batch's, plan = dsv3.plan's estimate of the rank's step):")
    lines.append("".join(f"{c:>10}" for c in cols))
    for r in result["ranks"]:
      lines.append("".join(f"{v:>10}" for v in (
          r["rank"], ",".join(map(str, r["stages"])), r["inflight_microbatches"],
          gb(r["state_bytes"]), gb(r["copies_bytes"]), gb(r["residual_bytes_per_microbatch"]),
          gb(r["working_bytes"]), gb(r["peak_bytes"]), gb(r.get("plan_bytes")))) + f"  {r['peak_phase']}")
  for r in result["programs"]:
    if "overlap" in r:
      lines.append(f"{r['program']}: {overlap.describe(r['overlap'])} (dsv3.analysis.overlap)")
  cap = result["capacity_bytes_per_device"]
  lines.append(f"max peak {gb(result['max_peak_bytes_per_device'])} GB ({result['max_peak_position']})"
               + (f" of {gb(cap)} GB" if cap else "")
               + f"; dsv3.plan estimate {gb(result['estimated_peak_bytes_per_device'])} GB (with activations), "
               f"ratio {result['peak_over_estimate']:.2f}")
  for s in result.get("shortfalls") or []:
    where = "every device" if s["rank"] is None else f"rank {s['rank']}"
    lines.append(f"DOES NOT FIT: {where}, {s['phase']} phase: {gb(s['need_bytes'])} GB of {gb(cap)} GB, "
                 f"{gb(s['short_bytes'])} GB short")
  lines += [f"note: {n}" for n in result["notes"]]
  return "\n".join(lines)
