"""Pipeline schedules: per-rank op lists for GPipe, 1F1B, ZB1P, DualPipe and DualPipeV.

The one owner of the schedule names (NAMES) and of stage placement (which rank runs which stages), and the
checks (`validate`) and timing (`simulate`) of a schedule; the notation is dsv3.pipeline.ops's. As a command,
  python -m dsv3.pipeline.schedules --ranks 8 --chunks 20 --png dualpipe.png
prints Table 2 of the DeepSeek-V3 report, measured next to the paper's formulas.
"""
from __future__ import annotations

from typing import List, Optional

from absl import flags

from dsv3 import cli
from dsv3.pipeline import simulate as _engine, timeline
from dsv3.pipeline.ops import Op, Schedule, parse_op
from dsv3.pipeline.simulate import SimResult

__all__ = ["NAMES", "placement", "num_stages", "stages_held", "make", "gpipe", "one_f_one_b", "zb1p",
           "dualpipe", "dualpipev", "validate", "simulate", "paper_bubble", "bubble_table"]


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


def _check_count(microbatches) -> None:
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"pipeline.microbatches must be a positive integer, got {microbatches!r}")


def microbatch_rows(batch_size: int, microbatches: int, shards: int = 1) -> int:
  """Rows per micro-batch of a `batch_size`-row batch cut into `microbatches`, each split over `shards`
  devices (a rank's data x expert). The one check of the cut: the trainer's config check, the executor and
  the planner ask it; ValueError names the config fields."""
  _check_count(microbatches)
  if batch_size % (microbatches * shards):
    split = f" divisible by mesh.data*mesh.expert={shards}" if shards > 1 else ""
    raise ValueError(f"pipeline.microbatches: batch_size={batch_size} must split into {microbatches} "
                     f"micro-batches{split}")
  return batch_size // microbatches


def make(schedule: str, num_ranks: int, microbatches: int) -> Schedule:
  """The op lists for `schedule`, with errors phrased in the config fields a user sets."""
  if schedule not in NAMES:
    raise ValueError(f"pipeline.schedule must be one of {NAMES} when mesh.pipeline > 1, got {schedule!r}")
  if not isinstance(num_ranks, int) or num_ranks < 1:
    raise ValueError(f"mesh.pipeline must be a positive integer, got {num_ranks!r}")
  _check_count(microbatches)
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
  """A Schedule, or bare per-rank lists of Ops / notation strings, whose placement is inferred: one phase is
  a linear pipeline, two are DualPipe's."""
  if isinstance(schedule, Schedule):
    ranks, where, name = schedule, schedule.placement, schedule.name
  else:
    ranks, where, name = schedule, None, "custom"
  ranks = [[parse_op(op) if isinstance(op, str) else op for op in ops] for ops in ranks]
  if not ranks:
    raise ValueError("schedule has no ranks")
  counts = {}
  for ops in ranks:
    for op in ops:
      for half in ((op.forward, op.backward) if op.kind == "FB" else (op,)):
        if half.kind in "FB":
          counts[half.phase] = max(counts.get(half.phase, 0), half.microbatch + 1)
  if where is None:
    where = placement("none" if set(counts) <= {0} else "dualpipe", len(ranks))
  microbatches = getattr(schedule, "num_microbatches", None) or max(counts.values(), default=0)
  return Schedule(name, ranks, where, microbatches)


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
  runs = [("1f1b", one_f_one_b(num_ranks, num_chunks), "1x"), ("zb1p", zb1p(num_ranks, num_chunks), "1x"),
          ("dualpipe", dualpipe(num_ranks, num_chunks), "2x"), ("dualpipev", dualpipev(num_ranks, num_chunks), "2x")]
  rows = []
  for method, sched, params in runs:
    res = simulate(sched, F=F, B=B, W=W, FB=FB)
    rows.append((method, sched.num_stages, res.bubble, paper_bubble(method, sched.num_stages, F, B, W, FB), params,
                 max(res.peak_activations), res))
  return rows


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags, defined only by `python -m dsv3.pipeline.schedules` (importing the module, as
  the planner and the trainer do, defines none)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("ranks", 8, "Pipeline ranks.", **fv)
  flags.DEFINE_integer("chunks", 20, "Micro-batches (DualPipe: both directions together).", **fv)
  for name, default in (("F", 1.0), ("B", 2.0), ("W", 1.0)):
    flags.DEFINE_float(name, default, f"Cost of a {name} cell.", **fv)
  flags.DEFINE_float("FB", None, "Cost of an overlapped F&B unit (default F+B).", **fv)
  flags.DEFINE_string("png", None, "Write the DualPipe timeline picture here.", **fv)
  flags.DEFINE_bool("print_ops", False, "Print DualPipe's per-rank op lists.", **fv)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
  a = flags.FLAGS
  try:
    rows = bubble_table(a.ranks, a.chunks, a.F, a.B, a.W, a.FB)
  except ValueError as e:      # e.g. an odd --ranks for DualPipe: the message names the rule
    raise cli.UsageError(f"--ranks {a.ranks} --chunks {a.chunks}: {e}") from e
  fb = a.F + a.B if a.FB is None else a.FB
  print(f"ranks={a.ranks} chunks={a.chunks} F={a.F} B={a.B} W={a.W} F&B={fb}")
  print(f"{'method':<10} {'PP':>3} {'bubble (sim)':>13} {'bubble (paper)':>15} {'params':>7} {'activations':>12}")
  for method, stages, measured, paper, params, acts, _ in rows:
    print(f"{method:<10} {stages:>3} {measured:>13g} {paper:>15g} {params:>7} {acts:>12}")
  if a.print_ops:
    for r, ops in enumerate(dualpipe(a.ranks, a.chunks).strings()):
      print(f"rank {r}: " + " ".join(ops))
  if a.png:
    timeline.plot_timeline(rows[2][-1], a.png, title=f"DualPipe, {a.ranks} ranks, {a.chunks} micro-batches "
                                                      f"(F={a.F}, B={a.B}, W={a.W}, F&B={fb})")
    print(f"wrote {a.png}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
