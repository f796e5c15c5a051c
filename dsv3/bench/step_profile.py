"""Where a compiled step's time goes: per-op times from a jax.profiler trace, grouped by op class and model part.

`profile(fn, *args)` compiles the jitted `fn`, traces a few calls, and joins every traced op (XLA:CPU names
its thunks after the HLO instructions) with the compiled HLO: its opcode, what its fusion computes, its
shapes and the JAX op_name it came from. Times are exclusive (an op's children are subtracted), in ms per
call. GEMM rows also give the FLOPs and the achieved GFLOP/s, from the dot shapes.

  python -m dsv3.bench --what=profile --hf_configs=16m     # the table for the dsv3-vs-HF configs
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Dict, List, Optional

import jax

from dsv3.analysis import hlo_cost

# Model parts, matched in order against the op_name JAX records (module paths of dsv3.model).
PARTS = (("head", ("Transformer.head", "lm_head")), ("router", ("mlp/gate", "router", "top_k", "argsort")),
         ("shared expert", ("shared_experts",)), ("routed experts", ("moe_layers/mlp",)),
         ("dense mlp", ("dense_layers/mlp",)), ("attention", ("self_attn",)), ("norm", ("norm",)),
         ("embedding", ("embed",)))


@dataclasses.dataclass
class Op:
  name: str
  kind: str            # gemm | gather | scatter | sort | layout copy | elementwise/reduce | broadcast | ...
  phase: str           # forward | backward | optimizer/other
  part: str            # one of PARTS' names, 'loss', 'layer plumbing' or 'other'
  ms: float            # exclusive time per call
  flops: float         # per call (GEMMs only)


@dataclasses.dataclass
class Profile:
  ops: List[Op]
  step_ms: float       # wall time per call, measured outside the trace

  def table(self, key: str, top: Optional[int] = None) -> List[list]:
    """[[group, ms, share of op time, GEMM share of the group, GEMM GFLOP/s], ...] grouped by `key`
    ('kind', 'part', 'phase' or 'phase/part'), largest first."""
    ms, gemm_ms, flops = collections.Counter(), collections.Counter(), collections.Counter()
    for op in self.ops:
      group = f"{op.phase}: {op.part}" if key == "phase/part" else getattr(op, key)
      ms[group] += op.ms
      if op.flops:
        gemm_ms[group] += op.ms
        flops[group] += op.flops
    total = sum(ms.values())
    return [[g, f"{t:.1f}", f"{t / total:.1%}", f"{gemm_ms[g] / t:.0%}" if flops[g] else "",
             f"{flops[g] / gemm_ms[g] / 1e6:.0f}" if flops[g] else ""] for g, t in ms.most_common(top)]

  def top_ops(self, n: int = 15) -> List[list]:
    """The n slowest ops: [[name, kind, phase: part, ms, GFLOP/s or '']]."""
    ops = sorted(self.ops, key=lambda op: -op.ms)[:n]
    return [[op.name, op.kind, f"{op.phase}: {op.part}", f"{op.ms:.2f}",
             f"{op.flops / op.ms / 1e6:.0f}" if op.flops else ""] for op in ops]

  @property
  def op_ms(self) -> float:
    return sum(op.ms for op in self.ops)


def _hlo_index(hlo: str) -> Dict[str, dict]:
  """Instruction name -> {opcode, line, op_name} for every instruction, plus each computation's body."""
  comps, index, current = {}, {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      comps[current] = []
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?|\(.*?\)) ([\w\-]+)\(", line)
    if m and current is not None:
      meta = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = dict(opcode=m.group(3), line=line, op_name=meta.group(1) if meta else "")
      comps[current].append(m.group(1))
  for v in index.values():
    called = re.search(r"calls=%?([\w.\-]+)", v["line"])
    v["body"] = [index[n] for n in comps.get(called.group(1), [])] if called else []
  return index


def _kind(inst: dict) -> str:
  ops = {b["opcode"] for b in inst["body"]} or {inst["opcode"]}
  if "dot" in ops or "convolution" in ops:
    return "gemm"
  for kind in ("scatter", "gather", "sort"):
    if kind in ops:
      return kind
  if inst["opcode"] == "custom-call":
    return "custom call"
  if ops <= {"while", "call", "conditional", "tuple", "get-tuple-element"}:
    return "control"
  if ops & {"dynamic-slice", "dynamic-update-slice"}:
    return "dynamic slice"
  if ops <= {"copy", "transpose", "bitcast", "parameter", "reshape", "slice", "concatenate", "pad"}:
    return "layout copy"
  if ops <= {"broadcast", "constant", "parameter", "bitcast", "reshape", "iota"}:
    return "broadcast"
  return "elementwise/reduce"


def _phase_and_part(op_name: str):
  phase = ("backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "optimizer/other")
  for part, keys in PARTS:
    if any(k in op_name for k in keys):
      return phase, part
  if "_layers" in op_name:
    return phase, "layer plumbing"
  if op_name.startswith("jit(") and ("jvp()" in op_name or "transpose(jvp())" in op_name):
    return phase, "loss"
  return phase, "other"


def _exclusive_us(events) -> collections.Counter:
  """Exclusive microseconds per event name: each event's duration minus its children's, per thread."""
  out, by_thread = collections.Counter(), collections.defaultdict(list)
  for e in events:
    by_thread[e["pid"], e["tid"]].append(e)
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []
    for e in evs:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      e["_excl"] = e["dur"]
      if stack:
        stack[-1]["_excl"] -= e["dur"]
      stack.append(e)
    for e in evs:
      out[e["name"]] += e["_excl"]
  return out


def profile(fn, *args, calls: int = 5, warmup: int = 2) -> Profile:
  """Profile of `fn(*args)` (a jax.jit function; nothing is donated: pass fresh args). See the module doc."""
  compiled = fn.lower(*args).compile()
  index = _hlo_index(compiled.as_text())
  costed = hlo_cost.Costed(compiled.as_text())       # the GEMMs' FLOPs, as the step-time estimate counts them
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  t0 = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(compiled(*args))
  step_ms = (time.perf_counter() - t0) / calls * 1e3
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler wrote no perfetto trace under {tmp}")
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X" and e.get("name") in index]
  ops = []
  for name, us in _exclusive_us(events).items():
    inst = index[name]
    kind = _kind(inst)
    flops = sum(costed.flops(costed.by_name[name]).values()) if kind == "gemm" and name in costed.by_name else 0.0
    op_name = inst["op_name"] or next((b["op_name"] for b in inst["body"] if b["op_name"]), "")
    ops.append(Op(name, kind, *_phase_and_part(op_name), us / calls / 1e3, flops))
  return Profile(ops, step_ms)
