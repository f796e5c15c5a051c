"""What a compiled program overlaps: its collectives and the GEMMs that run inside their windows.

Reads XLA's scheduled HLO text (`compiled.as_text()`, or the <program>.hlo.txt files of the compile-only dry
run). In a scheduled module every computation's instructions are in execution order; an asynchronous
collective is a `*-start` ... `*-done` pair, and whatever is scheduled between the two runs while the
collective is in flight. A GEMM is a dot / convolution, a cuBLAS or Triton GEMM custom call, or a fusion,
call or loop whose computation holds one. Every instruction's chunk comes from the name scope in its
metadata (stages.FORWARD_SCOPE / BACKWARD_SCOPE in an F&B program), else from its operands'.

  python -m dsv3.analysis.overlap DIR/compiled/rank0_FB_stage1_stage0.hlo.txt ...
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional

from dsv3.pipeline.stages import BACKWARD_SCOPE, FORWARD_SCOPE

EXPERT_COLLECTIVES = ("all-to-all", "ragged-all-to-all")
COLLECTIVES = EXPERT_COLLECTIVES + ("all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: List[str]
  callees: List[str]
  op_name: str
  target: str          # custom-call target
  attrs: str = ""      # the text after the operand list (dimension numbers, replica groups, backend config)
  args: str = ""       # the operand list as printed (a parameter's index: `parameter(3)` -> '3')


@dataclasses.dataclass
class Collective:
  """One collective of a program: `window` counts the GEMMs scheduled inside it by chunk ('F', 'B', None)."""
  name: str
  kind: str
  chunk: Optional[str]
  bytes: int
  asynchronous: bool
  window: Dict[Optional[str], int]

  def hidden_by(self, chunk: Optional[str] = None) -> bool:
    """Whether a GEMM (of `chunk`, or any) runs while this collective is in flight."""
    return any(n for c, n in self.window.items() if chunk is None or c == chunk)


def _split_args(text: str) -> tuple:
  """(the operand list, the attributes after it) of `op(operands), attrs`."""
  depth = 0
  for i, ch in enumerate(text):
    depth += ch in "({["
    depth -= ch in ")}]"
    if depth < 0:
      return text[:i], text[i + 1:]
  return text, ""


def parse(text: str) -> Dict[str, List[Instruction]]:
  """Computation name -> its instructions in (scheduled) order."""
  comps, current = {}, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0].split("(")[0]:
      current = comps.setdefault(head.group(1), [])
      continue
    inst = _INSTRUCTION.match(line)
    if not inst or current is None:
      continue
    name, rest = inst.groups()
    op = None
    for m in _OPCODE.finditer(" " + rest):
      prefix = rest[:max(m.start() - 1, 0)]
      if prefix.count("(") == prefix.count(")"):
        op = m
        break
    if op is None:
      continue
    shape = rest[:max(op.start() - 1, 0)].strip()
    operands, attrs = _split_args(rest[op.end() - 1:])
    callees = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", attrs)
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    callees += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    target = re.search(r'custom_call_target="([^"]*)"', attrs)
    current.append(Instruction(name, shape, op.group(1), re.findall(r"%([\w.\-]+)", operands), callees,
                               op_name.group(1) if op_name else "", target.group(1) if target else "",
                               attrs, operands))
  return comps


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape: an array ('bf16[1024,128]{1,0}') or the arrays of a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


class Program:
  """A parsed scheduled HLO module: its collectives and, per collective, the GEMMs inside its window."""

  def __init__(self, text: str):
    self.computations = parse(text)
    self.by_name = {i.name: i for insts in self.computations.values() for i in insts}
    # Computations that are a fusion's body: their instructions are not scheduled on their own.
    self.fused = {c for insts in self.computations.values() for i in insts if i.opcode == "fusion" for c in i.callees}
    self._gemm_comp: Dict[str, bool] = {}
    self._chunk: Dict[str, Optional[str]] = {}

  def _holds_gemm(self, comp: str) -> bool:
    if comp not in self._gemm_comp:
      self._gemm_comp[comp] = False          # cycles cannot happen in HLO; this guards recursion anyway
      self._gemm_comp[comp] = any(self.is_gemm(i) for i in self.computations.get(comp, []))
    return self._gemm_comp[comp]

  def is_gemm(self, inst: Instruction) -> bool:
    if inst.opcode in ("dot", "convolution", "ragged-dot", "scaled-dot"):
      return True
    if inst.opcode == "custom-call" and re.search(r"gemm|matmul|triton|cublas|mosaic", inst.target, re.I):
      return True
    return inst.opcode in ("fusion", "call", "while", "conditional", "async-start") and any(
        self._holds_gemm(c) for c in inst.callees)

  def chunk(self, inst: Instruction, depth: int = 0) -> Optional[str]:
    """'F' / 'B' from the name scope in the metadata, else the first operand's that has one."""
    if inst.name in self._chunk:
      return self._chunk[inst.name]
    found = None
    # The outermost scope decides: the backward chunk's ops carry 'fb_backward/transpose(fb_forward)/...'
    # (the VJP of a forward traced under its own scope).
    at = {c: inst.op_name.find(scope) for c, scope in (("F", FORWARD_SCOPE), ("B", BACKWARD_SCOPE))}
    scoped = [c for c in at if at[c] >= 0]
    if scoped:
      found = min(scoped, key=at.get)
    elif depth < 50:
      for o in inst.operands:
        if o in self.by_name:
          found = self.chunk(self.by_name[o], depth + 1)
          if found:
            break
    self._chunk[inst.name] = found
    return found

  def collectives(self) -> List[Collective]:
    out = []
    for insts in self.computations.values():
      position = {i.name: k for k, i in enumerate(insts)}
      for k, inst in enumerate(insts):
        kind = collective_kind(self, inst)
        if kind is None or inst.opcode.endswith("-done"):
          continue
        window, asynchronous, result = {}, False, inst.shape
        if inst.opcode.endswith("-start"):
          done = next((j for j in insts[k + 1:] if j.opcode.endswith("-done") and inst.name in j.operands), None)
          if done is not None:
            asynchronous, result = True, done.shape
            for between in insts[k + 1:position[done.name]]:
              if self.is_gemm(between):
                c = self.chunk(between)
                window[c] = window.get(c, 0) + 1
        out.append(Collective(inst.name, kind, self.chunk(inst), shape_bytes(result), asynchronous, window))
    return out


def collective_kind(program: Program, inst: Instruction) -> Optional[str]:
  """The collective an instruction is or starts ('all-to-all', ...; its -start, -done or async wrapper), else None."""
  op = inst.opcode
  for suffix in ("-start", "-done"):
    op = op[:-len(suffix)] if op.endswith(suffix) else op
  if op in COLLECTIVES:
    return op
  if op == "async":      # async-start wrapping a collective in its own computation
    for c in inst.callees:
      for i in program.computations.get(c, []):
        if i.opcode in COLLECTIVES:
          return i.opcode
  return None


FRACTIONS = ("asynchronous", "hidden_by_other_chunk", "hidden_by_any_gemm")
NO_ALL_TO_ALL = "no expert all-to-all (nothing to overlap)"


def summary(text: str, expert_only: bool = True) -> dict:
  """Overlap figures of one scheduled program, over its expert all-to-alls (or all collectives):
  bytes and count, the asynchronous fraction, and the fraction of bytes whose window holds a GEMM of the
  other chunk ('other'; F&B programs) or any GEMM ('any'); plus the per-collective rows. A program with no
  such collective has None for every fraction (not 0% or 100%: there is nothing to overlap)."""
  program = Program(text)
  rows = [c for c in program.collectives() if not expert_only or c.kind in EXPERT_COLLECTIVES]
  return from_rows([dataclasses.asdict(c) for c in rows],
                   gemms=sum(1 for name, insts in program.computations.items() if name not in program.fused
                             for i in insts if program.is_gemm(i)))


def from_rows(rows: List[dict], gemms: int) -> dict:
  """`summary`'s dict over collective rows (dataclasses.asdict(Collective)); fractions None without rows."""
  total = sum(r["bytes"] for r in rows)
  other = {"F": "B", "B": "F"}
  hidden = lambda r, chunk=None: any(n for c, n in r["window"].items() if chunk is None or c == chunk)
  frac = lambda keep: sum(r["bytes"] for r in rows if keep(r)) / total if rows and total else None
  return dict(count=len(rows), bytes=total,
              asynchronous=frac(lambda r: r["asynchronous"]),
              hidden_by_other_chunk=frac(lambda r: r["chunk"] in other and hidden(r, other[r["chunk"]])),
              hidden_by_any_gemm=frac(lambda r: hidden(r)), gemms=gemms, rows=rows)


def percent(value: Optional[float]) -> str:
  """A fraction of `summary` as printed: 'n/a' where the program has no all-to-all."""
  return "n/a" if value is None else f"{value:.0%}"


def describe(s: dict) -> str:
  """One line for a `summary`: what overlaps, or that there is no all-to-all."""
  if not s["count"]:
    return NO_ALL_TO_ALL
  return (f"{s['count']} expert all-to-alls, {s['bytes'] / 2**20:.2f} MiB; asynchronous {percent(s['asynchronous'])}, "
          f"window holds the other chunk's GEMMs {percent(s['hidden_by_other_chunk'])}, any GEMM "
          f"{percent(s['hidden_by_any_gemm'])} (of bytes)")


def fb_cost(F: float, B: float, hidden: float, comm_ratio: float = 1.0) -> float:
  """An F&B cell's cost when a fraction `hidden` of each chunk's all-to-all time runs under the other chunk's
  compute (never more than that compute), F and B being the chunks' costs with nothing overlapped and
  all-to-all : compute = comm_ratio within each. F + B at hidden = 0."""
  f_compute, b_compute = F / (1 + comm_ratio), B / (1 + comm_ratio)
  saved = (min(hidden * comm_ratio * f_compute, b_compute) + min(hidden * comm_ratio * b_compute, f_compute))
  return F + B - saved


def format_rows(name: str, s: dict) -> str:
  lines = [f"{name}: {describe(s)}"]
  for r in s["rows"]:
    gemms = ", ".join(f"{k or '?'}:{v}" for k, v in sorted(r["window"].items(), key=str)) or "-"
    lines.append(f"  {r['name']:<34} {r['kind']:<18} chunk {r['chunk'] or '?'}  {r['bytes']:>10} B  "
                 f"{'async' if r['asynchronous'] else 'sync ':<5}  GEMMs inside: {gemms}")
  return "\n".join(lines)
