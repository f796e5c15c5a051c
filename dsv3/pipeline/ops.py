"""The pipeline op notation (README.md, "Pipeline op notation"): Op, its parser, and Schedule, the per-rank
op lists together with the stage placement they refer to."""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, List, Optional, Sequence


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
