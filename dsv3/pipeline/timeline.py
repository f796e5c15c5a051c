"""Draws a simulated schedule as a timeline in the style of Figure 5 of the DeepSeek-V3 report: one row per
rank; F orange, B green, W blue, B* hatched, a dark and a light shade per direction (DualPipeV: per leg of
the V), an F&B unit as two half cells inside one black border.
"""
from __future__ import annotations

from typing import Optional

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

# (dark, light) shade per kind: the first is direction 0 (or the V's down leg), the second the other.
_COLOURS = {"F": ("#f08c2e", "#fbd3a6"), "B": ("#3f9a4f", "#b5dfb7"), "W": ("#5b7fd1", "#5b7fd1")}


def _leg(sim_result, rank, phase):
  """Colour index of a (rank, phase): its direction, or for one-direction V schedules its leg."""
  directions = {d for phases in sim_result.placement for d, _ in phases}
  direction, _ = sim_result.placement[rank][phase]
  return direction if len(directions) > 1 else phase


def _cell(ax, x0, x1, y0, y1, colour, hatch=None, text=None, fontsize=6):
  ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, edgecolor="#444444",
                         linewidth=0.4, hatch=hatch))
  if text is not None:
    ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="center", fontsize=fontsize)


def _draw_op(ax, sim_result, rank, start, end, op, y, height, fontsize):
  if op.kind == "W":
    _cell(ax, start, end, y, y + height, _COLOURS["W"][0], text="W", fontsize=fontsize)
    return
  if op.kind == "FB":
    half = height / 2
    _draw_op(ax, sim_result, rank, start, end, op.forward, y + half, half, fontsize * 0.85)
    _draw_op(ax, sim_result, rank, start, end, op.backward, y, half, fontsize * 0.85)
    ax.add_patch(Rectangle((start, y), end - start, height, fill=False, edgecolor="black", linewidth=1.6))
    return
  colour = _COLOURS[op.kind][_leg(sim_result, rank, op.phase)]
  hatch = "///" if op.kind == "B" and op.input_only else None
  _cell(ax, start, end, y, y + height, colour, hatch=hatch, text=str(op.microbatch), fontsize=fontsize)


def plot_timeline(sim_result, path: str, title: Optional[str] = None, dpi: int = 120) -> str:
  """Writes a PNG of `sim_result` (from schedules.simulate) to `path` and returns `path`."""
  num_ranks = sim_result.num_ranks
  makespan = max(sim_result.makespan, 1e-9)
  width = min(60.0, max(8.0, 0.35 * makespan / min(sim_result.costs["F"], sim_result.costs["W"] or 1.0)))
  fig = Figure(figsize=(width, 0.55 * num_ranks + 1.6))
  ax = fig.add_subplot(1, 1, 1)
  cell_inches = width * 0.8 * sim_result.costs["F"] / makespan
  fontsize = max(3.0, min(8.0, 22 * cell_inches))
  for rank, ops in enumerate(sim_result.timelines):
    y = num_ranks - 1 - rank                                   # rank 0 on top, as in the paper
    for start, end, op in ops:
      _draw_op(ax, sim_result, rank, start, end, op, y + 0.05, 0.9, fontsize)
  ax.set_xlim(0, makespan)
  ax.set_ylim(0, num_ranks)
  ax.set_yticks([num_ranks - 1 - r + 0.5 for r in range(num_ranks)])
  ax.set_yticklabels([f"rank {r}" for r in range(num_ranks)])
  ax.set_xlabel("time (cell-cost units)")
  ax.set_title(title or f"{sim_result.name}: makespan {makespan:g}, bubble {sim_result.bubble:g}")
  legend = [Patch(facecolor=_COLOURS["F"][0], label="forward"),
            Patch(facecolor=_COLOURS["B"][0], label="backward"),
            Patch(facecolor=_COLOURS["B"][0], hatch="///", label="backward for input (B*)"),
            Patch(facecolor=_COLOURS["W"][0], label="backward for weights (W)"),
            Patch(facecolor=_COLOURS["F"][1], label="forward, other direction"),
            Patch(facecolor=_COLOURS["B"][1], label="backward, other direction"),
            Patch(facecolor="white", edgecolor="black", linewidth=1.6, label="overlapped F&B")]
  ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.2 / num_ranks),
            ncol=len(legend), fontsize=7, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  return path
