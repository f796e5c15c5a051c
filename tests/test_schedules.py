"""Pipeline schedules: notation, DualPipe's exact order, validation, and the paper's bubble table."""
import os
import subprocess
import sys

import pytest

from dsv3.pipeline import schedules, timeline
from dsv3.pipeline.ops import Op, parse_op

GENERATORS = {  # name -> (generator(P, chunks), number of stages PP for the paper's formula)
    "1f1b": (schedules.one_f_one_b, lambda p: p),
    "zb1p": (schedules.zb1p, lambda p: p),
    "dualpipe": (schedules.dualpipe, lambda p: p),
    "dualpipev": (schedules.dualpipev, lambda p: 2 * p),
}


def test_op_rendering_and_parsing():
  assert str(Op.f(0, 3)) == "F0:3"
  assert str(Op.b(1, 2)) == "B1:2"
  assert str(Op.b(1, 2, input_only=True)) == "B1:2*"
  assert str(Op.w()) == "W"
  unit = Op.fb(Op.f(0, 3), Op.b(1, 1))
  assert str(unit) == "F0:3&B1:1"
  assert (unit.kind, unit.forward.microbatch, unit.backward.phase) == ("FB", 3, 1)
  for text in ("F0:3", "B1:2", "B1:2*", "W", "F0:3&B1:1", "F1:12&B0:7*"):
    assert str(parse_op(text)) == text
  assert Op.f(0, 3) == "F0:3" and Op.b(0, 3) != Op.b(0, 3, True)
  with pytest.raises(ValueError, match="cannot parse"):
    parse_op("F0:3*")


# Hand-derived from the DualPipe order in docs/design.md for P=4 (H=2), num_chunks=8 (C=4). Rank 0 (h=0): 2(H-h-1)=2 F0; 1x[F0,F1];
# 1x[B1*,W,F1]; C-P+h+1=1 main iteration; 1x[B1, F1&B0]; 1x[B1,B0] with B* on at i=0 after B1 (h even);
# 1x[W,B0*]; 1 W. Rank 1 (h=1, a middle rank): 2x[F0,F1]; 2 main iterations, the first F0&B1 split;
# 2x[B1,B0] with B* on at i=1 before B1 (h odd); 2 W. Ranks 2 and 3 mirror 1 and 0.
DUALPIPE_4_8 = [
    "F0:0 F0:1 F0:2 F1:0 B1:0* W F1:1 F0:3&B1:1 F1:2&B0:0 B1:2 F1:3&B0:1 B1:3 B0:2* W B0:3* W",
    "F0:0 F1:0 F0:1 F1:1 F0:2 B1:0 F1:2&B0:0 F0:3&B1:1 F1:3&B0:1 B1:2 B0:2 B1:3* B0:3* W W",
]

# P=8 (H=4), num_chunks=16 (C=8): rank 2 (h=2, even: B* on between B1 and B0 of drain iteration 1) and
# rank 3 (h=3, middle, odd: B* on before B1 of drain iteration 2).
DUALPIPE_8_16_RANK2 = (
    "F0:0 F0:1 F0:2 F1:0 F0:3 F1:1 F0:4 F1:2 B1:0* W F1:3 "
    "F0:5&B1:1 F1:4&B0:0 F0:6&B1:2 F1:5&B0:1 F0:7&B1:3 F1:6&B0:2 B1:4 F1:7&B0:3 "
    "B1:5 B0:4 B1:6 B0:5* B1:7* B0:6* W B0:7* W W W")
DUALPIPE_8_16_RANK3 = (
    "F0:0 F1:0 F0:1 F1:1 F0:2 F1:2 F0:3 F1:3 F0:4 B1:0 F1:4&B0:0 F0:5&B1:1 F1:5&B0:1 F0:6&B1:2 "
    "F1:6&B0:2 F0:7&B1:3 F1:7&B0:3 B1:4 B0:4 B1:5 B0:5 B1:6* B0:6* B1:7* B0:7* W W W W")


def test_dualpipe_exact_order_small():
  got = [" ".join(ops) for ops in schedules.dualpipe(4, 8).strings()]
  assert got == DUALPIPE_4_8 + DUALPIPE_4_8[::-1]
  big = schedules.dualpipe(8, 16).strings()
  assert " ".join(big[2]) == DUALPIPE_8_16_RANK2 and " ".join(big[5]) == DUALPIPE_8_16_RANK2
  assert " ".join(big[3]) == DUALPIPE_8_16_RANK3 and " ".join(big[4]) == DUALPIPE_8_16_RANK3


def test_dualpipe_placement_and_middle_rule():
  s = schedules.dualpipe(8, 20)
  # Rank r holds stage r of direction 0 and stage P-1-r of direction 1; phase 0 arrives first.
  assert s.placement[0] == ((0, 0), (1, 7)) and s.placement[2] == ((0, 2), (1, 5))
  assert s.placement[5] == ((1, 2), (0, 5)) and s.placement[7] == ((1, 0), (0, 7))
  for r, ops in enumerate(s.strings()):
    i = next(i for i, op in enumerate(ops) if op.endswith("&B0:0"))   # 2nd op of the main loop
    if r in (3, 4):     # the middle ranks issue their first F0&B1 as F0 then B1
      assert ops[i - 2:i] == ["F0:4", "B1:0"]
    else:
      assert ops[i - 1].startswith("F0:") and "&B1:" in ops[i - 1]


def test_dualpipev_is_the_dualpipe_list_with_H_equal_ranks():
  v = schedules.dualpipev(4, 8)
  assert v.placement == [((0, 0), (0, 7)), ((0, 1), (0, 6)), ((0, 2), (0, 5)), ((0, 3), (0, 4))]
  # H = N = 4, h = r, C = num_chunks: rank r's list is DualPipe's rank with the same h for P = 8, C = 8.
  d = schedules.dualpipe(8, 16)
  assert v.strings() == d.strings()[:4]
  assert v.num_microbatches == 8 and v.num_stages == 8


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
def test_validator_accepts_generated_schedules(pp):
  for chunks in (2 * pp, 2 * pp + 2, 4 * pp):
    for make in (schedules.gpipe, schedules.one_f_one_b, schedules.zb1p, schedules.dualpipe,
                 schedules.dualpipev):
      schedules.validate(make(pp, chunks))
  for make in (schedules.gpipe, schedules.one_f_one_b, schedules.zb1p):
    schedules.validate(make(pp, 1))           # fewer micro-batches than stages is still valid
  schedules.validate(schedules.dualpipev(pp, 2 * pp + 1))   # DualPipeV allows an odd count
  schedules.validate(schedules.dualpipe(pp, 2 * pp).strings())   # bare notation strings work too


def test_w_count_matches_deferred_backwards():
  for sched in (schedules.zb1p(8, 20), schedules.dualpipe(8, 20), schedules.dualpipev(4, 12)):
    for ops in sched:
      halves = [h for op in ops for h in ((op.forward, op.backward) if op.kind == "FB" else (op,))]
      assert sum(op.kind == "W" for op in ops) == sum(h.kind == "B" and h.input_only for h in halves)


def _edited(sched, rank, edit):
  ranks = sched.strings()
  ranks[rank] = edit(list(ranks[rank]))
  return ranks


def test_validator_rejects_broken_schedules():
  s = schedules.dualpipe(4, 8)
  dropped = _edited(s, 1, lambda ops: ops[:4] + ops[5:])                     # lose F0:2
  with pytest.raises(ValueError, match=r"rank 1, phase 0: F .*missing \[2\]"):
    schedules.validate(dropped)
  duplicated = _edited(s, 0, lambda ops: ops[:1] + ops[:1] + ops[1:])
  with pytest.raises(ValueError, match=r"rank 0, phase 0: F"):
    schedules.validate(duplicated)
  out_of_order = _edited(s, 0, lambda ops: [ops[1], ops[0]] + ops[2:])       # F0:1 before F0:0
  with pytest.raises(ValueError, match="in order"):
    schedules.validate(out_of_order)
  no_w = _edited(s, 0, lambda ops: ops[:-1])
  with pytest.raises(ValueError, match="#W must equal #B"):
    schedules.validate(no_w)
  early_w = _edited(s, 0, lambda ops: ["W"] + ops[:5] + ops[6:])              # W before any B*
  with pytest.raises(ValueError, match="W with no deferred B"):
    schedules.validate(early_w)
  # Backward before its own forward on one rank: structurally fine, but it can never run.
  b_first = _edited(s, 0, lambda ops: ops[:3] + [ops[4], ops[3]] + ops[5:])  # B1:0* before F1:0
  with pytest.raises(ValueError, match="deadlocks.*rank 0 at op 3 \\(B1:0\\*\\)"):
    schedules.validate(b_first)
  # A cross-rank cycle: with P=2 both ranks start with the other direction's stage 1, which waits
  # for the other rank's stage 0, which comes second there.
  two = schedules.dualpipe(2, 4).strings()
  assert two[0][:2] == ["F0:0", "F1:0"]
  swapped = [[ops[1], ops[0]] + ops[2:] for ops in two]
  with pytest.raises(ValueError, match="deadlocks"):
    schedules.validate(swapped)
  with pytest.raises(ValueError, match="phase"):
    schedules.validate(schedules.one_f_one_b(2, 2).strings() + [["F1:0", "B1:0"]])


def test_argument_errors_name_the_argument():
  with pytest.raises(ValueError, match="num_ranks must be even"):
    schedules.dualpipe(3, 12)
  with pytest.raises(ValueError, match="num_chunks"):
    schedules.dualpipe(4, 6)          # fewer than 2P
  with pytest.raises(ValueError, match="num_chunks"):
    schedules.dualpipe(4, 9)          # odd
  with pytest.raises(ValueError, match="num_chunks"):
    schedules.dualpipev(4, 7)
  with pytest.raises(ValueError, match="num_microbatches"):
    schedules.one_f_one_b(4, 0)
  with pytest.raises(ValueError, match="num_ranks"):
    schedules.zb1p(0, 4)


# Uniform costs in the regime where the paper's closed forms are exact: a forward cell costs the same as
# an input-gradient cell (F = B - W), W <= F, and B <= F&B <= F + B (see dsv3.pipeline.simulate).
COSTS = [(1.0, 2.0, 1.0, 3.0), (1.0, 2.0, 1.0, 2.0), (1.0, 1.5, 0.5, 2.0), (2.0, 3.0, 1.0, 4.0),
         (2.0, 4.0, 2.0, 5.0), (1.0, 1.25, 0.25, 1.75)]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("method", sorted(GENERATORS))
def test_bubble_matches_paper_table(method, pp):
  make, stages = GENERATORS[method]
  for chunks in (2 * pp, 2 * pp + 2, 4 * pp):
    sched = make(pp, chunks)
    for F, B, W, FB in COSTS:
      res = schedules.simulate(sched, F=F, B=B, W=W, FB=FB)
      assert res.bubble == pytest.approx(schedules.paper_bubble(method, stages(pp), F, B, W, FB), abs=1e-9)
      if method in ("1f1b", "zb1p") or FB == F + B:   # then every rank idles equally long
        assert max(res.bubble_per_rank) - min(res.bubble_per_rank) == pytest.approx(0, abs=1e-9)


def test_one_f_one_b_bubble_holds_for_any_costs():
  for F, B in ((1.0, 3.0), (2.5, 1.0)):
    res = schedules.simulate(schedules.one_f_one_b(8, 24), F=F, B=B, W=0.5)
    assert res.bubble == pytest.approx(7 * (F + B))


def test_dualpipe_bubble_departs_from_formula_when_forward_differs_from_input_backward():
  # F = 2, B - W = 1: the warm-up/drain path gets longer by (PP/2-1)(F-(B-W)) than the closed form.
  res = schedules.simulate(schedules.dualpipe(8, 20), F=2.0, B=2.0, W=1.0, FB=4.0)
  assert res.bubble == pytest.approx(schedules.paper_bubble("dualpipe", 8, 2.0, 2.0, 1.0, 4.0) + 3 * 1.0)


def test_overlap_gain_lands_on_middle_ranks():
  res = schedules.simulate(schedules.dualpipe(8, 20), F=1.0, B=2.0, W=1.0, FB=2.5)
  assert res.bubble_per_rank == pytest.approx([3.5, 4.0, 4.5, 4.5, 4.5, 4.5, 4.0, 3.5])


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_peak_activations(pp):
  # 1F1B / ZB1P: rank r holds P - r micro-batches (P on rank 0, the paper's "PP").
  for make in (schedules.one_f_one_b, schedules.zb1p):
    assert schedules.simulate(make(pp, 3 * pp)).peak_activations == [pp - r for r in range(pp)]
  # DualPipe: PP+1 on the two middle ranks (P/2-1 and P/2, whose first F0 of the main loop runs before
  # B1 frees one), PP on every other rank.
  want = [pp + 1 if r in (pp // 2 - 1, pp // 2) else pp for r in range(pp)]
  assert schedules.simulate(schedules.dualpipe(pp, 2 * pp + 4)).peak_activations == want
  # DualPipeV over N = pp ranks has PP = 2N stages: PP+1 on the last rank (where micro-batches turn),
  # PP elsewhere.
  want_v = [2 * pp] * (pp - 1) + [2 * pp + 1]
  assert schedules.simulate(schedules.dualpipev(pp, 2 * pp + 3)).peak_activations == want_v


def test_timelines_follow_schedule_order_and_comm_costs():
  sched = schedules.dualpipe(4, 12)
  res = schedules.simulate(sched, comm=0.25)
  for ops, line in zip(sched, res.timelines):
    assert [op for _, _, op in line] == list(ops)
    assert all(e0 <= s1 for (_, e0, _), (s1, _, _) in zip(line, line[1:]))
  # GPipe's makespan is the textbook M(F+B) + (P-1)(F+B+2*comm).
  res = schedules.simulate(schedules.gpipe(4, 6), F=1.0, B=2.0, W=1.0, comm=0.5)
  assert res.makespan == pytest.approx(6 * 3 + 3 * (3 + 1.0))


def test_timeline_png_and_cli(tmp_path):
  res = schedules.simulate(schedules.dualpipe(4, 10), F=1.0, B=2.0, W=1.0, FB=2.5)
  path = timeline.plot_timeline(res, str(tmp_path / "dualpipe.png"), title="DualPipe 4x10")
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  timeline.plot_timeline(schedules.simulate(schedules.dualpipev(2, 5)), str(tmp_path / "v.png"))
  assert (tmp_path / "v.png").stat().st_size > 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "dsv3.pipeline.schedules", "--ranks", "4", "--chunks", "8", "--png",
                        str(tmp_path / "cli.png")], cwd=root, capture_output=True, text=True, check=True).stdout
  assert "dualpipev" in out and "1f1b" in out and (tmp_path / "cli.png").stat().st_size > 0
