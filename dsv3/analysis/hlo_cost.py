"""A compiled program's time on a chip, from its scheduled HLO (dsv3.analysis.overlap parses it).

The program is walked in execution order on two streams:
- compute: every kernel in turn, each taking the larger of its FLOPs at the chip's peak for its operand dtype
  and its bytes (operands + result) at HBM bandwidth, plus a fixed launch cost; a loop costs its known trip
  count times its body;
- communication: every collective, one at a time, taking its bytes on the wire at the link its group spans
  (NVLink inside a node, InfiniBand across nodes), plus a latency. An asynchronous collective starts where
  it is scheduled and its `-done` waits for it; a synchronous one stalls the compute stream.
So a program's time includes exactly the overlap its schedule achieves. `latency_profile` gives the same costs
to XLA's profile-guided latency estimator.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional

import numpy as np

from dsv3.analysis import overlap
from dsv3.analysis.chip_figures import Figures

# ---------------------------------------------------------------------------------------------------
# One instruction's cost.
# ---------------------------------------------------------------------------------------------------
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "domain", "iota"}
_DIMS = re.compile(r"\[([0-9,]*)\]")


def _dims(shape: str) -> List[int]:
  found = _DIMS.search(shape)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


def _elements(shape: str) -> int:
  return math.prod(_dims(shape))


def _dtype(shape: str) -> str:
  found = re.match(r"\s*\(?\s*([a-z]+[0-9a-z]*)\[", shape)
  return found.group(1) if found else ""


def _precision(dtype: str) -> str:
  return "fp8" if dtype.startswith("f8") else "fp32" if dtype in ("f32", "f64") else "bf16"


def _ints(attrs: str, key: str) -> List[int]:
  found = re.search(key + r"=\{([0-9,]*)\}", attrs)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


class Costed(overlap.Program):
  """A scheduled program with a cost per instruction: FLOPs (by precision) and bytes."""

  def dot_flops(self, inst: overlap.Instruction) -> float:
    lhs = self.by_name.get(inst.operands[0]) if inst.operands else None
    if lhs is None:
      return 0.0
    dims = _dims(lhs.shape)
    contracting = _ints(inst.attrs, "lhs_contracting_dims")
    if not contracting:                     # cuBLAS calls keep the dimension numbers in their backend config
      found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
      contracting = [int(d) for d in re.findall(r"\d+", found.group(1))] if found else [len(dims) - 1]
    k = math.prod(dims[d] for d in contracting if d < len(dims))
    out = inst.shape if not inst.shape.lstrip().startswith("(") else inst.shape.lstrip()[1:]
    return 2.0 * _elements(out) * k

  def kernel_flops(self, inst: overlap.Instruction) -> float:
    """A GEMM kernel's FLOPs (Triton, Mosaic: no dimension numbers in the HLO) from its two largest
    operands and its result: M*K, K*N (or G*K*N) and M*N give M*N*K times the group count's square root."""
    shapes = sorted((self.by_name[o].shape for o in inst.operands if o in self.by_name), key=_elements)[-2:]
    if len(shapes) < 2:
        return 0.0
    sizes = [_elements(s) for s in shapes] + [max(_elements(inst.shape), 1)]
    ranks = [len(_dims(s)) for s in shapes + [inst.shape]]
    groups = max((_dims(s)[0] for s, r in zip(shapes + [inst.shape], ranks) if r == max(ranks) > min(ranks)),
                 default=1)
    return 2.0 * math.sqrt(math.prod(sizes) / max(groups, 1))

  def flops(self, inst: overlap.Instruction) -> Dict[str, float]:
    """FLOPs by precision of the GEMMs an instruction runs (a fusion's, including nested ones)."""
    if inst.opcode in ("dot", "convolution", "scaled-dot", "ragged-dot"):
      lhs = self.by_name.get(inst.operands[0]) if inst.operands else None
      return {_precision(_dtype(lhs.shape) if lhs else ""): self.dot_flops(inst)}
    if inst.opcode == "custom-call" and self.is_gemm(inst):
      if "contracting_dimensions" in inst.attrs:
        lhs = self.by_name.get(inst.operands[0])
        return {_precision(_dtype(lhs.shape) if lhs else ""): self.dot_flops(inst)}
      dtypes = [_dtype(self.by_name[o].shape) for o in inst.operands if o in self.by_name]
      return {"fp8" if any(d.startswith("f8") for d in dtypes) else "bf16": self.kernel_flops(inst)}
    out: Dict[str, float] = {}
    if inst.opcode == "fusion":
      for c in inst.callees:
        for i in self.computations.get(c, []):
          for k, v in self.flops(i).items():
            out[k] = out.get(k, 0.0) + v
    return out

  def bytes(self, inst: overlap.Instruction) -> float:
    """Bytes a kernel moves: read + written (`moved`)."""
    return float(sum(self.moved(inst)))

  def moved(self, inst: overlap.Instruction) -> tuple:
    """(read, written) bytes of a kernel: its operands and its result, where a fusion (or an asynchronous one's
    start) reads only a dynamic slice of an operand (a layer of a stacked weight) or writes one into its
    result, that slice."""
    result = overlap.shape_bytes(inst.shape)
    reads = [overlap.shape_bytes(self.by_name[o].shape) if o in self.by_name else 0 for o in inst.operands]
    if inst.opcode == "fusion-start":      # ((operands), result, context): the result is the middle element
      result -= sum(reads) + 4
    if inst.opcode in ("fusion", "fusion-start") and inst.callees:
      body = self.computations.get(inst.callees[0], [])
      params = {i.name: int(i.args) for i in body if i.opcode == "parameter" and i.args.strip().isdigit()}
      users: Dict[str, List[overlap.Instruction]] = {}
      for i in body:
        for o in i.operands:
          users.setdefault(o, []).append(i)
      for name, index in params.items():
        use = users.get(name, [])
        if use and index < len(reads) and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in use):
          reads[index] = sum(overlap.shape_bytes(u.shape) for u in use)
        if use and index < len(reads) and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name
                                              for u in use):
          update = sum(overlap.shape_bytes(self.by_name[u.operands[1]].shape) for u in use
                       if u.operands[1] in self.by_name)
          reads[index] = update
          result = min(result, update)    # written in place: only the update moves
    return float(sum(reads)), float(result)


  def kernel_cost(self, inst: overlap.Instruction, fig: Figures, ragged_fill: float = 1.0) -> tuple:
    """(seconds, FLOPs, bytes) of one kernel on `fig`: the larger of its GEMM FLOPs at the peak for their
    dtype and its bytes at HBM bandwidth, plus the launch; a ragged GEMM kernel computes `ragged_fill` of
    its static rows."""
    flops = self.flops(inst)
    if "ragged" in inst.op_name:           # a ragged GEMM kernel computes the rows its groups hold
      flops = {k: v * ragged_fill for k, v in flops.items()}
    nbytes = self.bytes(inst)
    gemm = sum(v / fig.flops[k] for k, v in flops.items())
    return max(gemm, nbytes / fig.hbm) + fig.launch, sum(flops.values()), nbytes

  def collective_cost(self, inst: overlap.Instruction, comp: str, kind: str, device_ids: List[int], fig: Figures,
                      ragged_fill: float = 1.0) -> float:
    """Seconds of one collective (its start, or the synchronous op) of computation `comp` on `fig`: the bytes
    of its result (a ragged all-to-all: `ragged_fill` of them) over its first device group."""
    result = inst.shape
    if inst.opcode.endswith("-start"):
      done = next((j for j in self.computations[comp] if j.opcode.endswith("-done") and inst.name in j.operands),
                  None)
      result = done.shape if done is not None else inst.shape
    attrs = inst.attrs
    if inst.opcode == "async-start":
      inner = [i for c in inst.callees for i in self.computations.get(c, []) if i.opcode in overlap.COLLECTIVES]
      attrs = inner[0].attrs if inner else attrs
    operand = sum(overlap.shape_bytes(self.by_name[o].shape) for o in inst.operands if o in self.by_name)
    group = replica_groups(attrs, len(device_ids))[0]
    nbytes = overlap.shape_bytes(result) * (ragged_fill if kind == "ragged-all-to-all" else 1.0)
    return collective_seconds(kind, nbytes, group, device_ids, fig, operand)


# ---------------------------------------------------------------------------------------------------
# A program on two streams.
# ---------------------------------------------------------------------------------------------------
def replica_groups(attrs: str, devices: int) -> List[List[int]]:
  """The device groups of a collective ('{{0,1},{2,3}}', the iota form '[2,4]<=[4,2]T(1,0)', or all)."""
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if pairs:
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", pairs.group(1) + "}")]
  iota = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
  if iota:
    shape = [int(d) for d in iota.group(1).split(",")]
    ids = np.arange(math.prod(int(d) for d in iota.group(2).split(","))).reshape(
        [int(d) for d in iota.group(2).split(",")])
    if iota.group(3):
      ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()
  listed = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", attrs)
  if listed:
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", listed.group(1))]
    if groups and groups[0]:
      return groups
  return [list(range(devices))]


def collective_seconds(kind: str, nbytes: float, group: List[int], device_ids: List[int], fig: Figures,
                       operand_bytes: float = 0.0) -> float:
  """One device's time for a collective over `group` (logical ids into `device_ids`) moving `nbytes` (its
  result; `operand_bytes` for a reduce-scatter): the bytes each device sends, split by the link they cross."""
  n = max(len(group), 1)
  if n == 1:
    return 0.0
  nodes = [device_ids[g] // fig.gpus_per_node if g < len(device_ids) else g // fig.gpus_per_node for g in group]
  crosses = len(set(nodes)) > 1
  if kind == "collective-permute":
    bw, lat = (fig.ib, fig.ib_latency) if crosses else (fig.nvlink, fig.nvlink_latency)
    return nbytes / bw + lat
  if kind in ("all-to-all", "ragged-all-to-all"):
    local = nodes.count(nodes[0])            # peers in this device's node, itself included
    nv, ib = nbytes * (local - 1) / n, nbytes * (n - local) / n
    return max(nv / fig.nvlink, ib / fig.ib if ib else 0.0) + (fig.ib_latency if crosses else fig.nvlink_latency)
  sent = {"all-gather": nbytes * (n - 1) / n, "reduce-scatter": operand_bytes * (n - 1) / n,
          "all-reduce": 2 * nbytes * (n - 1) / n}.get(kind, nbytes)
  # A ring across nodes runs at its slowest link.
  bw, lat = (fig.ib, fig.ib_latency) if crosses else (fig.nvlink, fig.nvlink_latency)
  return sent / bw + lat * (math.log2(n) if kind != "all-to-all" else 1)


@dataclasses.dataclass
class ProgramTime:
  """A program's estimated seconds and their parts: compute (kernels back to back), communication (every
  collective's own time), exposed (communication the compute stream waited for), and the counts."""
  seconds: float = 0.0
  compute: float = 0.0
  communication: float = 0.0
  exposed: float = 0.0
  flops: float = 0.0
  bytes: float = 0.0
  kernels: int = 0
  collectives: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def program_time(text: str, fig: Figures, device_ids: Optional[List[int]] = None,
                 ragged_fill: float = 1.0) -> ProgramTime:
  """The estimated time of one scheduled program (HLO text) on `fig`'s target; `device_ids`: the global ids
  of the program's devices in order (which node each is on), default 0..n-1. ragged_fill: the share of a
  ragged op's static buffer its data fills (a ragged all-to-all's bytes, a ragged GEMM kernel's FLOPs);
  the expert buffers are sized ep_buffer_factor x the balanced load, so 1 / that factor when balanced."""
  program = Costed(text)
  entry = _entry(text, program)
  ids = device_ids or list(range(_num_partitions(text)))
  out = ProgramTime()

  def kernel(inst) -> float:
    seconds, flops, nbytes = program.kernel_cost(inst, fig, ragged_fill)
    out.flops += flops
    out.bytes += nbytes
    out.kernels += 1
    return seconds

  def walk(comp: str, t: float, comm_free: float) -> tuple:
    pending: Dict[str, float] = {}
    for inst in program.computations.get(comp, []):
      kind = overlap.collective_kind(program, inst)
      if kind is not None:
        if inst.opcode.endswith("-done"):
          start = next((o for o in inst.operands if o in pending), None)
          if start is not None:
            finish = pending.pop(start)
            out.exposed += max(0.0, finish - t)
            t = max(t, finish)
          continue
        cost = program.collective_cost(inst, comp, kind, ids, fig, ragged_fill)
        out.communication += cost
        out.collectives += 1
        begin = max(t, comm_free)
        comm_free = begin + cost
        if inst.opcode.endswith("-start"):
          pending[inst.name] = comm_free
        else:                                       # synchronous: the compute stream waits
          out.exposed += comm_free - t
          t = comm_free
        continue
      if inst.opcode in _FREE or inst.opcode.endswith("-done"):
        continue
      if inst.opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
        n = int(trips.group(1)) if trips else 1
        body = re.search(r"body=%([\w.\-]+)", inst.attrs)
        fields = [f.name for f in dataclasses.fields(out)]
        before = [getattr(out, f) for f in fields]
        end, comm_free = walk(body.group(1), t, comm_free) if body else (t, comm_free)
        for f, b in zip(fields, before):           # the other n - 1 trips cost what the first did
          setattr(out, f, getattr(out, f) + (n - 1) * (getattr(out, f) - b))
        once = end - t
        t, comm_free = end + (n - 1) * once, comm_free + (n - 1) * once
        continue
      if inst.opcode in ("call", "conditional", "async-start") and inst.callees:
        ends = []
        for c in inst.callees if inst.opcode != "conditional" else inst.callees[:1]:
          end, comm_free = walk(c, t, comm_free)
          ends.append(end)
        t = max(ends)
        continue
      cost = kernel(inst)
      out.compute += cost
      t += cost
    return t, comm_free

  end, comm_free = walk(entry, 0.0, 0.0)
  out.seconds = max(end, comm_free)
  return out


PGLE_OPTION = "xla_gpu_pgle_profile_file_or_directory_path"


def latency_profile(text: str, fig: Figures, device_ids: Optional[List[int]] = None, ragged_fill: float = 1.0) -> str:
  """A profile for XLA's profile-guided latency estimator (the text proto its PGLE option reads: `costs {
  name: ... cost_us: ... }`), made from this cost model instead of a device: every kernel and collective of
  the scheduled program `text`, by name. Compiled again with it (PGLE_OPTION = the file), the latency-hiding
  scheduler weighs GEMMs and all-to-alls at their modelled times rather than alike. Instruction names are
  the same when the same program compiles again with the same options."""
  program = Costed(text)
  ids = device_ids or list(range(_num_partitions(text)))
  lines = []
  for comp, insts in program.computations.items():
    if comp in program.fused:
      continue
    for inst in insts:
      kind = overlap.collective_kind(program, inst)
      if kind is not None:
        if inst.opcode.endswith("-done"):
          continue
        seconds = program.collective_cost(inst, comp, kind, ids, fig, ragged_fill)
      elif inst.opcode in _FREE or inst.opcode in ("while", "call", "conditional") or inst.opcode.endswith("-done"):
        continue
      else:
        seconds = program.kernel_cost(inst, fig, ragged_fill)[0]
      lines.append(f'costs {{ name: "{inst.name}" cost_us: {seconds * 1e6:.3f} }}')
  return "\n".join(lines) + "\n"


def _entry(text: str, program: overlap.Program) -> str:
  found = re.search(r"^ENTRY\s+%([\w.\-]+)", text, re.M)
  return found.group(1) if found else next(iter(program.computations))


def _num_partitions(text: str) -> int:
  found = re.search(r"num_partitions=(\d+)", text)
  return int(found.group(1)) if found else 1

