"""The GEMMs of a compiled GPU program and what runs each, read from its scheduled HLO.

Every scheduled GEMM is one of: a kernel custom call (`triton_kernel_call*`: a Triton kernel through
jax-triton, e.g. dsv3.kernels.fp8_triton's or tokamax's; `mosaic_gpu*`: a Mosaic GPU kernel, e.g. tokamax's
sm90 grouped GEMM), a cuBLAS / cuBLASLt call (`__cublas$...`, `$f8` for FP8), a fusion holding a dot (XLA's
own Triton GEMM emitter), or a bare dot. Operand dtypes are the scheduled operands' (f8e4m3fn: E4M3). For a
kernel, `mma` lists the tensor-core instructions in its code: a Triton kernel's PTX (in the call's compressed
backend config), a Mosaic GPU kernel's inline PTX (e.g. 'wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3':
Hopper's FP8 tensor cores, accumulating in FP32).

  python -m dsv3.bench.hlo_gemms DIR/compiled/train_step.hlo.txt
"""
from __future__ import annotations

import collections
import re
import zlib
from typing import List

from dsv3 import cli
from dsv3.analysis import overlap
from dsv3.bench import common

KERNEL_TARGETS = ("triton_kernel_call", "mosaic_gpu", "__cublas", "__gpu$xla.gpu.triton")
_MMA = re.compile(r"wgmma\.mma_async[\w.]*|\bmma\.sync[\w.]*")
_OPAQUE = re.compile(r'backend_config=\{opaque = "((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": 10, "t": 9, "\\": 92, '"': 34, "'": 39}


def _unescape(text: str) -> bytes:
  """The bytes of an HLO-printed string (\\XX hex escapes and C escapes)."""
  out, i = bytearray(), 0
  while i < len(text):
    if text[i] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1:i + 3]):
      out.append(int(text[i + 1:i + 3], 16))
      i += 3
    elif text[i] == "\\":
      out.append(_ESCAPES.get(text[i + 1], ord(text[i + 1])))
      i += 2
    else:
      out.append(ord(text[i]))
      i += 1
  return bytes(out)


def tensor_core_ops(line: str) -> List[str]:
  """The distinct MMA instructions in a kernel call's HLO line (its PTX, zlib-compressed by jax-triton)."""
  code = line
  opaque = _OPAQUE.search(line)
  if opaque:
    try:
      code = zlib.decompress(_unescape(opaque.group(1))).decode("latin1")
    except zlib.error:
      pass
  return sorted(set(_MMA.findall(code)))


_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[")


def _dtype(shape: str) -> str:
  found = _ARRAY.search(shape)
  return found.group(1) if found else shape


def gemms(text: str) -> List[dict]:
  """One row per scheduled GEMM: kind, target, operand dtypes, output shape, op_name, computation."""
  program = overlap.Program(text)
  lines = {m.group(1): m.group(0) for m in re.finditer(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*$", text, re.M)}
  rows = []
  for comp, insts in program.computations.items():
    if comp in program.fused:
      continue
    for inst in insts:
      # XLA may wrap a kernel call in a fusion (e.g. to fold the slicing of its operands): the kernel runs it.
      inner = [i for c in inst.callees for i in program.computations.get(c, [])] if inst.opcode == "fusion" else []
      kernel = [i for i in [inst] + inner if i.opcode == "custom-call" and i.target.startswith(KERNEL_TARGETS)]
      if kernel:
        target = kernel[0].target
        kind = ("triton_kernel" if target.startswith("triton_kernel_call") else
                "mosaic_kernel" if target.startswith("mosaic_gpu") else
                "cublas" if target.startswith("__cublas") else "xla_triton")
      elif inst.opcode == "fusion" and program.is_gemm(inst):
        kind = "xla_fusion"
      elif inst.opcode in ("dot", "ragged-dot", "scaled-dot"):
        kind = inst.opcode
      else:
        continue
      operands = [_dtype(program.by_name[o].shape) for o in inst.operands if o in program.by_name]
      rows.append(dict(kind=kind, target=kernel[0].target if kernel else inst.target, operands=operands,
                       shape=inst.shape, op_name=inst.op_name, computation=comp,
                       mma=tensor_core_ops(lines.get(kernel[0].name, "")) if kernel else []))
  return rows


def is_fp8(row: dict) -> bool:
  """Whether the GEMM reads E4M3 operands (FP8 tensor-core work: Triton/Mosaic kernels, cuBLASLt f8)."""
  return any(d.startswith("f8") for d in row["operands"])


def fp8_tensor_cores(row: dict) -> bool:
  """Whether the kernel's code multiplies E4M3 operands on tensor cores."""
  return any(".e4m3" in m for m in row["mma"])


def counts(rows: List[dict]) -> dict:
  """{(kind, 'fp8' | 'wide'): count}."""
  return dict(collections.Counter((r["kind"], "fp8" if is_fp8(r) else "wide") for r in rows))


def main(argv):
  if not argv[1:]:
    raise cli.UsageError("give one or more scheduled-HLO files, e.g. DIR/compiled/train_step.hlo.txt")
  for path in argv[1:]:
    with open(path) as f:
      rows = gemms(f.read())
    print(f"{path}: {len(rows)} GEMMs")
    for (kind, precision), n in sorted(counts(rows).items()):
      print(f"  {kind:14} {precision:5} {n}")
    for r in rows:
      print(f"    {r['kind']:14} {','.join(r['operands'])[:40]:40} {','.join(r['mma'])[:60]:60} "
            f"{r['op_name'][-60:]}")


if __name__ == "__main__":
  common.run(main)
