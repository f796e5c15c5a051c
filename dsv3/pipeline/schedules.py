"""Pipeline schedules: per-rank op lists for GPipe, 1F1B, ZB1P, DualPipe and DualPipeV.

A schedule says, for every pipeline rank, the order in which it runs forward and backward cells of
micro-batches. Ops use the notation of README.md ("Pipeline op notation"):
  F0:3        forward of micro-batch 3 of phase 0
  B1:2        full backward (input and weight gradients)
  B1:2*       backward for inputs only; its weight-gradient work is deferred (zero-bubble style)
  W           runs the oldest deferred weight-gradient work of this rank
  F0:3&B1:1   a forward and a backward issued as one overlapped unit
The phase is rank-local: phase 0 is the direction whose micro-batches reach the rank first. Which model
stage a (rank, phase) pair holds is the schedule's `placement`:
  GPipe / 1F1B / ZB1P   P ranks, one direction, rank r holds stage r (phase 0 only).
  DualPipe              P ranks (even), two directions of num_chunks/2 micro-batches each; direction 0
                        enters at rank 0 (stage r on rank r), direction 1 at rank P-1 (stage P-1-r on
                        rank r). Each rank holds two stages, i.e. twice the parameters of 1F1B.
  DualPipeV             N ranks, one direction through 2N stages in a V: rank r holds stage r (phase 0,
                        going down) and stage 2N-1-r (phase 1, coming back); micro-batches turn on the
                        last rank. 2N stages on N devices: each device holds two stages' parameters.

`validate` checks a schedule (each F/B once, in order, W balanced, no deadlock) and `simulate` times it
with per-cell costs (see dsv3.pipeline.simulate for the cost model and the bubble definition), e.g.
  python -m dsv3.pipeline.schedules --ranks 8 --chunks 20 --png dualpipe.png
prints Table 2 of the DeepSeek-V3 report, measured next to the paper's formulas.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Iterable, List, Optional, Sequence

from dsv3.pipeline import simulate as _engine
from dsv3.pipeline.simulate import SimResult

__all__ = ["Op", "Schedule", "parse_op", "make", "gpipe", "one_f_one_b", "zb1p", "dualpipe", "dualpipev",
           "validate", "simulate", "paper_bubble", "bubble_table", "SimResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
  """One pipeline op. `str(op)` is its notation (README.md), and an Op compares equal to that string."""
  kind: str                          # 'F', 'B', 'W' or 'FB' (an overlapped forward & backward unit)
  phase: int = 0                     # F, B: rank-local phase (direction) 0 or 1
  microbatch: int = 0                # F, B: micro-batch index within its direction
  input_only: bool = False           # B: weight-gradient work deferred to a later W (B*)
  forward: Optional["Op"] = None     # FB: the forward half
  backward: Optional["Op"] = None    # FB: the backward half

  @classmethod
  def f(cls, phase: int, microbatch: int) -> "Op":
    return cls("F", phase, microbatch)

  @classmethod
  def b(cls, phase: int, microbatch: int, input_only: bool = False) -> "Op":
    return cls("B", phase, microbatch, input_only)

  @classmethod
  def w(cls) -> "Op":
    return cls("W")

  @classmethod
  def fb(cls, forward: "Op", backward: "Op") -> "Op":
    return cls("FB", forward=forward, backward=backward)

  def __str__(self) -> str:
    if self.kind == "F":
      return f"F{self.phase}:{self.microbatch}"
    if self.kind == "B":
      return f"B{self.phase}:{self.microbatch}" + ("*" if self.input_only else "")
    if self.kind == "W":
      return "W"
    return f"{self.forward}&{self.backward}"

  __repr__ = __str__

  def __eq__(self, other) -> bool:
    if isinstance(other, (Op, str)):
      return str(self) == str(other)
    return False                    # an Op only equals an Op or its own notation string

  def __hash__(self) -> int:
    return hash(str(self))


_OP_RE = re.compile(r"^([FB])([01]):(\d+)(\*?)$")


def parse_op(text: str) -> Op:
  """Inverse of str(Op): 'F0:3', 'B1:2', 'B1:2*', 'W' or 'F0:3&B1:1'."""
  text = text.strip()
  if text == "W":
    return Op.w()
  if "&" in text:
    f, b = (parse_op(t) for t in text.split("&"))
    if f.kind != "F" or b.kind != "B":
      raise ValueError(f"overlapped unit {text!r} must be a forward then a backward")
    return Op.fb(f, b)
  match = _OP_RE.match(text)
  if not match or (match[1] == "F" and match[4]):
    raise ValueError(f"cannot parse op {text!r}; expected e.g. 'F0:3', 'B1:2', 'B1:2*', 'W', 'F0:3&B1:1'")
  kind, phase, microbatch, star = match[1], int(match[2]), int(match[3]), bool(match[4])
  return Op.f(phase, microbatch) if kind == "F" else Op.b(phase, microbatch, star)


class Schedule(list):
  """Per-rank op lists (a list of lists of Op) plus the stage placement they refer to.

  placement[r][phase] = (direction, stage); every direction has `num_stages` stages and
  `num_microbatches` micro-batches.
  """

  def __init__(self, name: str, ranks: Iterable[Sequence[Op]], placement, num_microbatches: int):
    super().__init__(list(r) for r in ranks)
    self.name = name
    self.placement = [tuple(p) for p in placement]
    self.num_microbatches = num_microbatches
    self.num_stages = 1 + max(stage for phases in self.placement for _, stage in phases)

  def strings(self) -> List[List[str]]:
    """The op lists in notation form, one list of strings per rank."""
    return [[str(op) for op in ops] for ops in self]


def _check_int(name: str, value, minimum: int = 1):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


NAMES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")   # every schedule; config, executor and plan ask here


def _linear_placement(num_ranks):
  return [((0, r),) for r in range(num_ranks)]


def placement(name: str, num_ranks: int) -> list:
  """placement[r] = the (direction, stage) of each phase of rank r under schedule `name` ('none' = one rank
  per stage): the one owner of which rank runs which stages.

  DualPipe: rank r holds stage r of direction 0 and stage P-1-r of direction 1, its phase 0 being direction 0
  in the first half of the ranks. DualPipeV: 2P stages in a V, rank r holds stages r and 2P-1-r.
  """
  if name == "dualpipe":
    half = num_ranks // 2
    own = [((0, r), (1, num_ranks - 1 - r)) for r in range(num_ranks)]
    return [o if r < half else o[::-1] for r, o in enumerate(own)]
  if name == "dualpipev":
    return [((0, r), (0, 2 * num_ranks - 1 - r)) for r in range(num_ranks)]
  return _linear_placement(num_ranks)


def num_stages(name: str, num_ranks: int) -> int:
  """Model stages per direction for `num_ranks` ranks under schedule `name`."""
  return 1 + max(stage for phases in placement(name, num_ranks) for _, stage in phases)


def stages_held(name: str, num_ranks: int) -> list:
  """The stages each rank holds (sorted, each once)."""
  return [sorted({stage for _, stage in phases}) for phases in placement(name, num_ranks)]


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
  """GPipe: all forwards, then all backwards (in reverse, the order autodiff would flush them)."""
  _check_int("num_ranks", num_ranks)
  _check_int("num_microbatches", num_microbatches)
  ranks = [[Op.f(0, m) for m in range(num_microbatches)] + [Op.b(0, m) for m in range(num_microbatches)]
           for _ in range(num_ranks)]
  return Schedule("gpipe", ranks, _linear_placement(num_ranks), num_microbatches)


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
  """1F1B: rank r warms up with P-1-r forwards, alternates F and B, then drains its backwards."""
  _check_int("num_ranks", num_ranks)
  _check_int("num_microbatches", num_microbatches)
  ranks = []
  for r in range(num_ranks):
    warmup = min(num_ranks - 1 - r, num_microbatches)
    ops = [Op.f(0, m) for m in range(warmup)]
    for m in range(num_microbatches - warmup):
      ops += [Op.f(0, warmup + m), Op.b(0, m)]
    ops += [Op.b(0, m) for m in range(num_microbatches - warmup, num_microbatches)]
    ranks.append(ops)
  return Schedule("1f1b", ranks, _linear_placement(num_ranks), num_microbatches)


def zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
  """ZB1P (ZB-H1 of Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with every backward split.

  Rank r runs 1F1B's order with B* (input gradients only) in place of B, so gradients travel upstream
  at B - W per stage, and holds back r weight-gradient cells: its steady state is F, B*, W once r W's
  are pending, and the held-back W's fill the cool-down, where 1F1B idles waiting for gradients. The
  in-flight activations stay those of 1F1B (P on rank 0).
  """
  _check_int("num_ranks", num_ranks)
  _check_int("num_microbatches", num_microbatches)
  ranks = []
  for r in range(num_ranks):
    warmup = min(num_ranks - 1 - r, num_microbatches)
    ops, pending = [Op.f(0, m) for m in range(warmup)], 0
    for m in range(num_microbatches):
      if warmup + m < num_microbatches:
        ops.append(Op.f(0, warmup + m))
      ops.append(Op.b(0, m, input_only=True))
      pending += 1
      if pending > r:
        ops.append(Op.w())
        pending -= 1
    ops += [Op.w()] * pending
    ranks.append(ops)
  return Schedule("zb1p", ranks, _linear_placement(num_ranks), num_microbatches)


def _dual_rank_ops(half: int, h: int, chunks: int, middle: bool) -> List[Op]:
  """One rank's DualPipe order (the report's Figure 5): H=half, h=distance to the nearer end, C=chunks."""
  ops: List[Op] = []
  next_f, next_b = [0, 0], [0, 0]   # micro-batches are consumed in order within each phase

  def fwd(phase):
    next_f[phase] += 1
    return Op.f(phase, next_f[phase] - 1)

  def bwd(phase, input_only=False):
    next_b[phase] += 1
    return Op.b(phase, next_b[phase] - 1, input_only)

  ops += [fwd(0) for _ in range(2 * (half - h - 1))]          # warm-up of phase 0
  for _ in range(h + 1):                                      # both directions start
    ops += [fwd(0), fwd(1)]
  for _ in range(half - h - 1):                               # zero-bubble B1*, W keeps phase 1 flowing
    ops += [bwd(1, True), Op.w(), fwd(1)]
  for i in range(chunks - 2 * half + h + 1):                  # main loop: overlapped F&B pairs
    if i == 0 and middle:
      # The middle ranks get B1's gradient straight from their twin; not overlapping this pair lets
      # F0's activation leave early and shrinks the bubble (hence PP+1 activations there).
      ops += [fwd(0), bwd(1)]
    else:
      ops.append(Op.fb(fwd(0), bwd(1)))
    ops.append(Op.fb(fwd(1), bwd(0)))
  for _ in range(half - h - 1):
    ops += [bwd(1), Op.fb(fwd(1), bwd(0))]
  input_only = False                                          # second half of the drain uses B*
  for i in range(h + 1):
    if i == (h + 1) // 2 and h % 2 == 1:
      input_only = True
    ops.append(bwd(1, input_only))
    if i == (h + 1) // 2 and h % 2 == 0:
      input_only = True
    ops.append(bwd(0, input_only))
  for _ in range(half - h - 1):
    ops += [Op.w(), bwd(0, True)]
  ops += [Op.w()] * (h + 1)
  return ops


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
  """DualPipe over `num_ranks` (even) ranks with `num_chunks` micro-batches, half in each direction.

  num_chunks must be even and >= 2 * num_ranks. Rank r holds stage r of direction 0 (entering at rank
  0) and stage P-1-r of direction 1 (entering at rank P-1); its phase 0 is direction 0 in the first half
  of the ranks and direction 1 in the second half.
  """
  _check_int("num_ranks", num_ranks, 2)
  if num_ranks % 2:
    raise ValueError(f"num_ranks must be even for DualPipe (two mirrored halves), got {num_ranks}")
  _check_int("num_chunks", num_chunks)
  if num_chunks % 2 or num_chunks < 2 * num_ranks:
    raise ValueError(f"num_chunks must be even and >= 2 * num_ranks = {2 * num_ranks} for DualPipe, "
                     f"got {num_chunks}")
  half = num_ranks // 2
  ranks = []
  for r in range(num_ranks):
    h = min(r, num_ranks - 1 - r)
    ranks.append(_dual_rank_ops(half, h, num_chunks // 2, middle=(h == half - 1)))
  return Schedule("dualpipe", ranks, placement("dualpipe", num_ranks), num_chunks // 2)


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
  """DualPipeV ("cut-in-half" DualPipe): `num_ranks` ranks, 2*num_ranks stages in a V, one direction.

  The DualPipe list with H = num_ranks, h = r and C = num_chunks; the last rank plays the middle rank.
  num_chunks must be >= 2 * num_ranks.
  """
  _check_int("num_ranks", num_ranks)
  _check_int("num_chunks", num_chunks)
  if num_chunks < 2 * num_ranks:
    raise ValueError(f"num_chunks must be >= 2 * num_ranks = {2 * num_ranks} for DualPipeV, got {num_chunks}")
  ranks = [_dual_rank_ops(num_ranks, r, num_chunks, middle=(r == num_ranks - 1)) for r in range(num_ranks)]
  return Schedule("dualpipev", ranks, placement("dualpipev", num_ranks), num_chunks)


def make(schedule: str, num_ranks: int, microbatches: int) -> Schedule:
  """The op lists for `schedule`, with errors phrased in the config fields a user sets."""
  if schedule not in NAMES:
    raise ValueError(f"pipeline.schedule must be one of {NAMES} when mesh.pipeline > 1, got {schedule!r}")
  if not isinstance(num_ranks, int) or num_ranks < 1:
    raise ValueError(f"mesh.pipeline must be a positive integer, got {num_ranks!r}")
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"pipeline.microbatches must be a positive integer, got {microbatches!r}")
  if schedule == "dualpipe":
    if num_ranks < 2 or num_ranks % 2:
      raise ValueError(f"mesh.pipeline must be even (>= 2) for dualpipe: its two directions mirror each "
                       f"other, got {num_ranks}")
    if microbatches % 2 or microbatches < 2 * num_ranks:
      raise ValueError(f"pipeline.microbatches must be even and >= 2 * mesh.pipeline = {2 * num_ranks} for "
                       f"dualpipe (half of them enter from each end), got {microbatches}")
    return dualpipe(num_ranks, microbatches)
  if schedule == "dualpipev":
    if microbatches < 2 * num_ranks:
      raise ValueError(f"pipeline.microbatches must be >= 2 * mesh.pipeline = {2 * num_ranks} for "
                       f"dualpipev, got {microbatches}")
    return dualpipev(num_ranks, microbatches)
  return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p}[schedule](
      num_ranks, microbatches)


def _as_schedule(schedule) -> Schedule:
  """Accepts a Schedule, or bare per-rank lists of Ops / notation strings.

  Bare lists carry no placement, so it is inferred: one phase means a linear pipeline (stage r on rank
  r); two phases mean DualPipe's placement.
  """
  if isinstance(schedule, Schedule):
    ranks, placement, name = schedule, schedule.placement, schedule.name
  else:
    ranks, placement, name = schedule, None, "custom"
  ranks = [[parse_op(op) if isinstance(op, str) else op for op in ops] for ops in ranks]
  if not ranks:
    raise ValueError("schedule has no ranks")
  counts = {}
  for ops in ranks:
    for op in ops:
      for half in ((op.forward, op.backward) if op.kind == "FB" else (op,)):
        if half.kind in "FB":
          counts[half.phase] = max(counts.get(half.phase, 0), half.microbatch + 1)
  if placement is None:
    p = len(ranks)
    if set(counts) <= {0}:
      placement = _linear_placement(p)
    else:
      placement = [((0, r), (1, p - 1 - r)) if r < p // 2 else ((1, p - 1 - r), (0, r)) for r in range(p)]
  microbatches = getattr(schedule, "num_microbatches", None) or max(counts.values(), default=0)
  return Schedule(name, ranks, placement, microbatches)


def _check_structure(sched: Schedule):
  """Static checks: placement, phases exist, each F and B once and in order, W matches the B*."""
  if len(sched.placement) != len(sched):
    raise ValueError(f"placement has {len(sched.placement)} ranks but the schedule has {len(sched)}")
  stages = [ds for phases in sched.placement for ds in phases]
  expected = [(d, s) for d in sorted({d for d, _ in stages}) for s in range(sched.num_stages)]
  if sorted(stages) != expected:
    raise ValueError(f"placement must hold every (direction, stage) exactly once, got {sched.placement}")
  want = list(range(sched.num_microbatches))
  for r, ops in enumerate(sched):
    seen = {(kind, phase): [] for phase in range(len(sched.placement[r])) for kind in "FB"}
    deferred = 0
    for i, op in enumerate(ops):
      if op.kind == "W":
        if deferred == 0:
          raise ValueError(f"rank {r}: op {i} is a W with no deferred B* before it")
        deferred -= 1
        continue
      for half in ((op.forward, op.backward) if op.kind == "FB" else (op,)):
        if (half.kind, half.phase) not in seen:
          raise ValueError(f"rank {r}: op {i} ({op}) uses phase {half.phase}, but the rank holds only "
                           f"{len(sched.placement[r])} phase(s)")
        seen[half.kind, half.phase].append(half.microbatch)
        deferred += half.kind == "B" and half.input_only
    if deferred:
      raise ValueError(f"rank {r}: {deferred} deferred B* have no matching W (#W must equal #B*)")
    for (kind, phase), got in seen.items():
      if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(m for m in set(got) if got.count(m) > 1 or m not in want)
        raise ValueError(f"rank {r}, phase {phase}: {kind} must run micro-batches 0..{len(want) - 1} once "
                         f"each, in order; missing {missing}, duplicated/unknown {extra}, got {got}")


def validate(schedule) -> Schedule:
  """Raises ValueError unless `schedule` is runnable; returns it (as a Schedule) otherwise.

  Checks: every stage of every direction sits on exactly one (rank, phase); on each rank every
  micro-batch's F and B appear exactly once per phase, in micro-batch order; the number of W equals
  the number of deferred B* (and no W comes before its B*); and the cross-rank dependencies can be met
  (simulating with unbounded queues never gets stuck). Bare per-rank lists (of Ops or notation
  strings) carry no placement: one phase is read as a linear pipeline, two as DualPipe.
  """
  sched = _as_schedule(schedule)
  simulate(sched)                   # runs the static checks, then raises if the ranks deadlock
  return sched


def simulate(schedule, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: Optional[float] = None,
             comm: float = 0.0) -> SimResult:
  """Times `schedule` with the given cell costs; see dsv3.pipeline.simulate for the model.

  F: forward cell; B: full backward cell (input + weight gradients), so B* costs B - W; W: deferred
  weight-gradient cell; FB: overlapped F&B unit (default F + B); comm: added on every cross-rank edge.
  Returns a SimResult (timelines, makespan, bubble per rank, peak activations per rank).
  """
  sched = _as_schedule(schedule)
  _check_structure(sched)
  if W > B:
    raise ValueError(f"W ({W}) must not exceed B ({B}): B is the full backward, B* costs B - W")
  return _engine.run(sched.name, sched, sched.placement, sched.num_stages, F=F, B=B, W=W,
                     FB=(F + B) if FB is None else FB, comm=comm)


def paper_bubble(method: str, num_stages: int, F: float, B: float, W: float, FB: float) -> float:
  """Table 2 of the DeepSeek-V3 report (DualPipeV: the DualPipe row with PP = 2 * ranks stages)."""
  pp = num_stages
  return {"1f1b": (pp - 1) * (F + B), "zb1p": (pp - 1) * (F + B - 2 * W),
          "dualpipe": (pp / 2 - 1) * (FB + B - 3 * W), "dualpipev": (pp / 2 - 1) * (FB + B - 3 * W)}[method]


def bubble_table(num_ranks: int, num_chunks: int, F=1.0, B=2.0, W=1.0, FB=None):
  """Rows (method, stages, measured bubble, paper bubble, parameters, peak activations) like Table 2.

  1F1B and ZB1P run num_ranks stages over num_chunks micro-batches, DualPipe num_ranks stages with
  num_chunks/2 per direction, DualPipeV 2*num_ranks stages on num_ranks ranks (the report: PP is the
  number of stages, so DualPipeV's row uses PP = 2 * num_ranks).
  """
  FB = F + B if FB is None else FB
  runs = [("1f1b", num_ranks, one_f_one_b(num_ranks, num_chunks), "1x"),
          ("zb1p", num_ranks, zb1p(num_ranks, num_chunks), "1x"),
          ("dualpipe", num_ranks, dualpipe(num_ranks, num_chunks), "2x"),
          ("dualpipev", 2 * num_ranks, dualpipev(num_ranks, num_chunks), "2x")]
  rows = []
  for method, stages, sched, params in runs:
    res = simulate(sched, F=F, B=B, W=W, FB=FB)
    rows.append((method, stages, res.bubble, paper_bubble(method, stages, F, B, W, FB), params,
                 max(res.peak_activations), res))
  return rows


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ranks", type=int, default=8)
  parser.add_argument("--chunks", type=int, default=20, help="micro-batches (DualPipe: both directions)")
  for name, default in (("F", 1.0), ("B", 2.0), ("W", 1.0)):
    parser.add_argument(f"--{name}", type=float, default=default, help=f"cost of a {name} cell")
  parser.add_argument("--FB", type=float, default=None, help="cost of an overlapped F&B unit (default F+B)")
  parser.add_argument("--png", default=None, help="write the DualPipe timeline picture here")
  parser.add_argument("--print-ops", action="store_true", help="print DualPipe's per-rank op lists")
  args = parser.parse_args(argv)
  rows = bubble_table(args.ranks, args.chunks, args.F, args.B, args.W, args.FB)
  fb = args.F + args.B if args.FB is None else args.FB
  print(f"ranks={args.ranks} chunks={args.chunks} F={args.F} B={args.B} W={args.W} F&B={fb}")
  print(f"{'method':<10} {'PP':>3} {'bubble (sim)':>13} {'bubble (paper)':>15} {'params':>7} {'activations':>12}")
  for method, stages, measured, paper, params, acts, _ in rows:
    print(f"{method:<10} {stages:>3} {measured:>13g} {paper:>15g} {params:>7} {acts:>12}")
  if args.print_ops:
    for r, ops in enumerate(dualpipe(args.ranks, args.chunks).strings()):
      print(f"rank {r}: " + " ".join(ops))
  if args.png:
    from dsv3.pipeline import timeline   # matplotlib only when a picture is asked for
    timeline.plot_timeline(rows[2][-1], args.png,
                           title=f"DualPipe, {args.ranks} ranks, {args.chunks} micro-batches (F={args.F}, "
                                 f"B={args.B}, W={args.W}, F&B={fb})")
    print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
