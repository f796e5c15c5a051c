"""Timing engine for pipeline schedules: per-rank op lists run against per-cell costs (README.md, "Pipeline
op notation", defines the dependencies, costs, bubble and activation count). Each rank runs its ops in list
order, each as soon as the rank is free and its inputs have arrived: the longest path through the dependency
graph, so the result does not depend on the order in which ranks are visited.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, List, Sequence, Tuple


@dataclasses.dataclass
class SimResult:
  """Outcome of `simulate`: per-rank timelines, makespan, bubbles and activation peaks."""
  name: str
  timelines: List[List[Tuple[float, float, Any]]]   # per rank: (start, end, op) in execution order
  makespan: float
  busy: List[float]                                 # per rank: time spent computing
  bubble_per_rank: List[float]                      # per rank: makespan - busy
  peak_activations: List[int]                       # per rank: micro-batch activations held at most
  placement: List[Tuple[Tuple[int, int], ...]]     # per rank, per phase: (direction, stage)
  costs: dict

  @property
  def bubble(self) -> float:
    """The step's bubble: the largest per-rank idle time (Table 2's quantity)."""
    return max(self.bubble_per_rank)

  @property
  def num_ranks(self) -> int:
    return len(self.timelines)


def _key(placement, rank, phase, microbatch):
  direction, stage = placement[rank][phase]
  return direction, stage, microbatch


def run(name: str, ranks: Sequence[Sequence[Any]], placement, num_stages: int, *, F: float, B: float,
        W: float, FB: float, comm: float) -> SimResult:
  """Simulates `ranks` (lists of Ops) whose phases map to (direction, stage) through `placement`.

  Raises ValueError naming the blocked ops when no rank can make progress (a deadlock).
  """
  num_ranks = len(ranks)
  owner = {}                                        # (direction, stage) -> rank, for comm costs
  for r, phases in enumerate(placement):
    for direction_stage in phases:
      owner[direction_stage] = r
  f_done, b_done = {}, {}                           # (direction, stage, m) -> finish time
  pointer = [0] * num_ranks
  free_at = [0.0] * num_ranks
  deferred = [collections.deque() for _ in range(num_ranks)]
  timelines = [[] for _ in range(num_ranks)]

  def arrival(done, key, rank):
    # Returns when `key`'s result is usable on `rank`, or None if it has not been produced yet.
    if key not in done:
      return None
    return done[key] + (comm if owner[key[:2]] != rank else 0.0)

  def forward_ready(op, rank):
    d, s, m = _key(placement, rank, op.phase, op.microbatch)
    return 0.0 if s == 0 else arrival(f_done, (d, s - 1, m), rank)

  def backward_ready(op, rank):
    d, s, m = _key(placement, rank, op.phase, op.microbatch)
    own = f_done.get((d, s, m))
    if own is None:
      return None
    if s == num_stages - 1:
      return own                                    # the loss stage seeds its own gradient
    grad = arrival(b_done, (d, s + 1, m), rank)
    return None if grad is None else max(own, grad)

  def ready_and_cost(op, rank):
    if op.kind == "F":
      return forward_ready(op, rank), F
    if op.kind == "B":
      return backward_ready(op, rank), (B - W if op.input_only else B)
    if op.kind == "W":
      return (0.0 if deferred[rank] else None), W
    f, b = forward_ready(op.forward, rank), backward_ready(op.backward, rank)
    ready = None if f is None or b is None else max(f, b)
    return ready, (FB - W if op.backward.input_only else FB)

  def finish(op, rank, end):
    if op.kind == "F":
      f_done[_key(placement, rank, op.phase, op.microbatch)] = end
    elif op.kind == "B":
      b_done[_key(placement, rank, op.phase, op.microbatch)] = end
      if op.input_only:
        deferred[rank].append(op)
    elif op.kind == "W":
      deferred[rank].popleft()
    else:
      finish(op.forward, rank, end)
      finish(op.backward, rank, end)

  progress = True
  while progress:
    progress = False
    for r in range(num_ranks):
      while pointer[r] < len(ranks[r]):
        op = ranks[r][pointer[r]]
        ready, cost = ready_and_cost(op, r)
        if ready is None:
          break
        start = max(free_at[r], ready)
        free_at[r] = start + cost
        timelines[r].append((start, start + cost, op))
        finish(op, r, start + cost)
        pointer[r] += 1
        progress = True

  blocked = [f"rank {r} at op {pointer[r]} ({ranks[r][pointer[r]]})"
             for r in range(num_ranks) if pointer[r] < len(ranks[r])]
  if blocked:
    raise ValueError(f"schedule {name!r} deadlocks: no rank can proceed; blocked: " + "; ".join(blocked))

  makespan = max((t[-1][1] for t in timelines if t), default=0.0)
  busy = [sum(end - start for start, end, _ in t) for t in timelines]
  return SimResult(
      name=name, timelines=timelines, makespan=makespan, busy=busy,
      bubble_per_rank=[makespan - b for b in busy],
      peak_activations=[peak_activations(ops) for ops in ranks],
      placement=[tuple(p) for p in placement],
      costs=dict(F=F, B=B, W=W, FB=FB, comm=comm))


def peak_activations(ops: Sequence[Any]) -> int:
  """Most micro-batch activations held at once by one rank, counted at op boundaries."""
  held = peak = 0
  for op in ops:
    if op.kind == "F":
      held += 1
    elif op.kind == "B":
      held -= 1
    peak = max(peak, held)                          # F&B and W leave `held` unchanged
  return peak
