"""The GEMMs of a compiled GPU program and what runs each, read from its scheduled HLO.

Every scheduled GEMM is one of: a kernel custom call (`triton_kernel_call*`: a Triton kernel through
jax-triton, e.g. dsv3.fp8_triton's or tokamax's; `mosaic_gpu*`: a Mosaic GPU kernel, e.g. tokamax's
sm90 grouped GEMM), a cuBLAS / cuBLASLt call (`__cublas$...`, `$f8` for FP8), a fusion holding a dot (XLA's
own Triton GEMM emitter), or a bare dot. Operand dtypes are the scheduled operands' (f8e4m3fn: E4M3).

  python -m dsv3.hlo_gemms DIR/compiled/train_step.hlo.txt
"""
from __future__ import annotations

import collections
import re
import sys
from typing import List

from dsv3 import overlap

KERNEL_TARGETS = ("triton_kernel_call", "mosaic_gpu", "__cublas", "__gpu$xla.gpu.triton")


def _dtype(shape: str) -> str:
  found = overlap._ARRAY.search(shape)
  return found.group(1) if found else shape


def gemms(text: str) -> List[dict]:
  """One row per scheduled GEMM: kind, target, operand dtypes, output shape, op_name, computation."""
  program = overlap.Program(text)
  rows = []
  for comp, insts in program.computations.items():
    if comp in program.fused:
      continue
    for inst in insts:
      if inst.opcode == "custom-call" and inst.target.startswith(KERNEL_TARGETS):
        kind = ("triton_kernel" if inst.target.startswith("triton_kernel_call") else
                "mosaic_kernel" if inst.target.startswith("mosaic_gpu") else
                "cublas" if inst.target.startswith("__cublas") else "xla_triton")
      elif inst.opcode == "fusion" and any(program._holds_gemm(c) for c in inst.callees):
        kind = "xla_fusion"
      elif inst.opcode in ("dot", "ragged-dot", "scaled-dot"):
        kind = inst.opcode
      else:
        continue
      operands = [_dtype(program.by_name[o].shape) for o in inst.operands if o in program.by_name]
      rows.append(dict(kind=kind, target=inst.target, operands=operands, shape=inst.shape,
                       op_name=inst.op_name, computation=comp))
  return rows


def is_fp8(row: dict) -> bool:
  """Whether the GEMM reads E4M3 operands (FP8 tensor-core work: Triton/Mosaic kernels, cuBLASLt f8)."""
  return any(d.startswith("f8") for d in row["operands"])


def counts(rows: List[dict]) -> dict:
  """{(kind, 'fp8' | 'wide'): count}."""
  return dict(collections.Counter((r["kind"], "fp8" if is_fp8(r) else "wide") for r in rows))


def main(argv=None):
  for path in (argv if argv is not None else sys.argv[1:]):
    with open(path) as f:
      rows = gemms(f.read())
    print(f"{path}: {len(rows)} GEMMs")
    for (kind, precision), n in sorted(counts(rows).items()):
      print(f"  {kind:14} {precision:5} {n}")
    for r in rows:
      print(f"    {r['kind']:14} {','.join(r['operands'])[:60]:60} {r['op_name'][-70:]}")


if __name__ == "__main__":
  main()
