"""Reading compiled HLO text in tests: which collectives a program holds, and how big they are."""
import re

import numpy as np

_REDUCTION = re.compile(r"= (\S+|\(.*?\)) (all-reduce|reduce-scatter)(?:-start)?\((.*)$", re.M)


def largest(shape: str) -> int:
  """Elements of an HLO shape ('f32[4,128]{1,0}'), or of the largest array in a tuple of them."""
  return max([int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
              for dims in re.findall(r"\[([\d,]*)\]", shape)] or [0])


def computations(hlo: str) -> dict:
  """{computation name: body text} of an HLO module's text."""
  return {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%?(\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)}


def reductions(text: str, min_elements: int = 65) -> list:
  """(op, shape) of every all-reduce / reduce-scatter in `text` that moves data between devices (not
  single-device groups) and reduces an array of at least `min_elements` elements."""
  out = []
  for shape, op, rest in _REDUCTION.findall(text):
    groups = re.search(r"replica_groups=\{(.*?)\}\}?", rest)
    if groups and re.fullmatch(r"(\{\d+\},?)*\}?", groups.group(1) + "}"):
      continue                                   # {{0},{1},...}: every device alone, nothing moves
    if largest(shape) >= min_elements:
      out.append((op, shape))
  return out


def gpu_toolchain() -> bool:
  """Whether this Python can compile for GPUs without one (pip install -e ".[aot]": docs/compile_only.md)."""
  from dsv3.analysis import compile_only
  try:
    compile_only.check_toolchain("h100")
    return True
  except compile_only.CompileOnlyError:
    return False
