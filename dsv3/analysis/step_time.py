"""How long a compiled training step takes on its target: a cost model of the scheduled programs.

Each program's scheduled HLO (dsv3.analysis.overlap parses it) is walked in execution order on two streams:
- compute: every kernel in turn, each taking the larger of its FLOPs at the chip's peak for its operand dtype
  and its bytes (operands + result) at HBM bandwidth, plus a fixed launch cost; a loop costs its known trip
  count times its body;
- communication: every collective, one at a time, taking its bytes on the wire at the link its group spans
  (NVLink inside a node, InfiniBand across nodes), plus a latency. An asynchronous collective starts where
  it is scheduled and its `-done` waits for it; a synchronous one stalls the compute stream.
So a program's time includes exactly the overlap its schedule achieves. A pipelined step then runs the
schedule's simulator (dsv3.pipeline.schedules.simulate) with the slowest rank's F, B, W and F&B programs
as cell costs and the activation transfer between ranks as the edge cost, and adds the gradient sums,
update and guard programs that follow it.

The target figures (`FIGURES`: HBM and link bandwidths; peak FLOP/s from dsv3.training.metrics.PEAK_FLOPS)
are datasheet or published numbers; 'cpu' is measured on this machine (`measure_cpu`), which is how the
model is calibrated against real steps (python -m dsv3.bench --what=estimate).

  python -m dsv3.analysis.step_time DIR [--target=h800]     # re-estimate a dry run's programs
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Dict, List, Optional

import numpy as np
from absl import flags

from dsv3.analysis import overlap

FIGURES_FILE = "dsv3/analysis/step_time.py (FIGURES) and dsv3/training/metrics.py (PEAK_FLOPS)"


@dataclasses.dataclass(frozen=True)
class Figures:
  """What one device of a target sustains. flops: peak FLOP/s by GEMM operand dtype ('fp8', 'bf16', 'fp32');
  hbm: bytes/s; nvlink / ib: bytes/s one GPU sends to the peers inside its node / across nodes; latencies
  in seconds; launch: fixed seconds per kernel; gpus_per_node; sources: where each figure comes from."""
  target: str
  flops: Dict[str, float]
  hbm: float
  nvlink: float
  ib: float
  launch: float
  nvlink_latency: float
  ib_latency: float
  gpus_per_node: int
  sources: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# HBM: datasheets (H100/H800 SXM 3.35 TB/s, H200 4.8 TB/s). Links, one direction per GPU: H100/H200 NVLink 4
# 900 GB/s both ways; H800: the DeepSeek-V3 report's achieved NVLink 160 GB/s and InfiniBand 50 GB/s (400 Gb/s
# NICs, one per GPU, as on the H100 clusters). Launch: a kernel's fixed cost without CUDA graphs.
FIGURES = {
    "h100": dict(device_kind="h100", hbm=3.35e12, nvlink=450e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H100 SXM datasheet (989 TF BF16, 1979 TF FP8 dense, 3.35 TB/s HBM3, NVLink 900 GB/s "
                         "both ways), 400 Gb/s InfiniBand per GPU"),
    "h800": dict(device_kind="h800", hbm=3.35e12, nvlink=160e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H800 SXM: H100 compute and HBM; NVLink 160 GB/s and InfiniBand 50 GB/s as the "
                         "DeepSeek-V3 report (section 3.2.2) gives them"),
    "h200": dict(device_kind="h200", hbm=4.8e12, nvlink=450e9, ib=50e9, launch=3e-6, nvlink_latency=5e-6,
                 ib_latency=15e-6, gpus_per_node=8,
                 sources="H200 SXM datasheet (H100 compute, 4.8 TB/s HBM3e, NVLink 900 GB/s both ways), "
                         "400 Gb/s InfiniBand per GPU"),
}


class UnknownTargetError(ValueError):
  """No figures for the asked target; the message names the file to add them to."""


def figures(target: str) -> Figures:
  """The figures of a GPU `target` (a FIGURES key). 'cpu' has none on record: `measure_cpu` measures them.
  Raises UnknownTargetError naming the target and the file to add it to."""
  from dsv3.training import metrics
  row = FIGURES.get(target)
  peaks = dict(metrics.PEAK_FLOPS)
  if row is None or row["device_kind"] not in peaks:
    known = ", ".join(sorted(FIGURES))
    hint = " ('cpu' is measured: measure_cpu())" if target == "cpu" else ""
    raise UnknownTargetError(
        f"no step-time figures for target {target!r}{hint}; known: {known}. Add its peak FLOP/s, HBM and "
        f"NVLink / InfiniBand bandwidths to {FIGURES_FILE}")
  row = dict(row)
  kind = row.pop("device_kind")
  return Figures(target=target, flops=dict(peaks[kind]), **row)


def for_device(device_kind: str) -> Figures:
  """The figures of the GPU whose jax device_kind is `device_kind` (e.g. 'NVIDIA H100 80GB HBM3');
  UnknownTargetError for one with none on record."""
  kind = device_kind.lower()
  for target, row in FIGURES.items():
    if row["device_kind"] in kind:
      return figures(target)
  raise UnknownTargetError(f"no step-time figures for device {device_kind!r}; known: {', '.join(sorted(FIGURES))}. "
                           f"Add its peak FLOP/s, HBM and NVLink / InfiniBand bandwidths to {FIGURES_FILE}")


def measure_cpu(devices: int = 1, size: int = 1024, mib: int = 256) -> Figures:
  """This CPU's figures, measured: an f32 GEMM's FLOP/s (every dtype: XLA:CPU computes narrower GEMMs
  through f32), the bandwidth of a large elementwise kernel into a new buffer, and a kernel's fixed cost (a chain of small
  dependent ops that do not fuse). `devices` simulated devices share the machine: each gets its 1/devices
  share of the FLOP/s and bandwidth. Its 'links' are memory."""
  import jax
  import jax.numpy as jnp
  from dsv3.training import metrics

  gemm = metrics.device_peak_flops(jax.devices("cpu")[0], "fp32")
  n = mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  # Into a fresh result, as XLA:CPU's kernels write theirs each call (its first touch of the pages included).
  add = jax.jit(lambda a: a * 1.0001 + 1.0)
  add(x).block_until_ready()
  hbm = 2 * n * 4 / min(_timed(lambda: add(x).block_until_ready()) for _ in range(5))   # one read, one write
  chain = 64

  def ops(a):                                    # `chain` kernels: each sort depends on the last
    for _ in range(chain):
      a = jnp.sort(a)[::-1] + 1.0
    return a
  f = jax.jit(ops)
  small = jnp.arange(8, dtype=jnp.float32)
  f(small).block_until_ready()
  launch = min(_timed(lambda: f(small).block_until_ready()) for _ in range(5)) / (2 * chain)
  gemm, hbm = gemm / devices, hbm / devices
  return Figures(target="cpu", flops={"fp8": gemm, "bf16": gemm, "fp32": gemm}, hbm=hbm, nvlink=hbm, ib=hbm,
                 launch=launch, nvlink_latency=launch, ib_latency=launch, gpus_per_node=1 << 30,
                 sources=f"measured on this CPU: {size}x{size} f32 GEMM, a {mib} MiB elementwise kernel into a "
                         f"new buffer, {2 * chain} small dependent kernels; shared by {devices} device(s)")


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


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


# ---------------------------------------------------------------------------------------------------
# A step: the programs one training step runs, composed as the executor runs them.
# ---------------------------------------------------------------------------------------------------
AFTER_PIPELINE = ("sums", "update")


def _kind_from_name(name: str) -> str:
  """A program's kind from its name ('rank3_FBstar_stage3_stage12' -> 'FBstar'; 'train_step' -> 'train'), for
  a memory.json written before its rows carried `kind`."""
  found = re.match(r"rank\d+_([A-Za-z]+)", name)
  return found.group(1) if found else name.split("_")[0]


def _edge_seconds(settings: dict, fig: Figures) -> tuple:
  """(seconds, bytes) of one micro-batch's hidden states crossing to the next pipeline rank, per device: its
  share of the micro-batch rows x seq_len x hidden in the compute dtype, over the link between the ranks."""
  from dsv3.pipeline import schedules
  mesh, model = settings["mesh"], settings["model"]
  shards = int(mesh["data"]) * int(mesh["expert"])
  rows = schedules.microbatch_rows(int(settings["batch_size"]), int(settings["pipeline"]["microbatches"]), shards)
  width = 4 if str(model.get("dtype", "bfloat16")) in ("float32", "fp32") else 2
  nbytes = rows / shards * int(settings["seq_len"]) * int(model["hidden_size"]) * width
  ib = shards >= fig.gpus_per_node        # a rank fills a node or more: its neighbour is in another node
  return nbytes / (fig.ib if ib else fig.nvlink) + (fig.ib_latency if ib else fig.nvlink_latency), nbytes


def estimate(memory: dict, hlo_dir: str, fig: Figures, echo=None) -> dict:
  """estimate.json's dict for a dry run (memory.json's dict, its <program>.hlo.txt files in `hlo_dir`) on
  `fig`'s target: each program's time (`program_time`), the step (a pipelined one through the schedule's
  simulator), tokens/s per device, MFU, and the assumptions."""
  import ml_collections
  from dsv3 import plan
  from dsv3.pipeline import schedules

  settings = memory["settings"]
  factor = float(settings["model"].get("ep_buffer_factor", 0) or 0)
  # Only expert-parallel buffers are sized by the factor (one expert shard: the rows are the routed ones).
  fill = 1.0 / factor if factor > 1 and int(settings["mesh"]["expert"]) > 1 else 1.0
  times = {}
  for row in memory["programs"]:
    with open(os.path.join(hlo_dir, row["hlo"])) as f:
      times[row["program"]] = dict(kind=row.get("kind") or _kind_from_name(row["program"]), position=row["position"],
                                   **program_time(f.read(), fig, row.get("devices"), fill).as_dict())
    if echo:
      echo(f"estimated {row['program']}: {times[row['program']]['seconds'] * 1e3:.2f} ms")
  devices = int(memory["devices"])
  tokens = int(settings["batch_size"]) * int(settings["seq_len"])
  schedule = str(settings.get("pipeline", {}).get("schedule", "none"))
  pipelined = memory.get("ranks") is not None
  cells, simulated, edge = None, None, None
  if pipelined:
    ranks = memory["ranks"]
    cost = lambda kind: max((times[n]["seconds"] for r in ranks for n in r["programs"]
                             if n in times and times[n]["kind"] == kind), default=None)
    F, W = cost("F"), cost("W") or 0.0
    B = max(x for x in (cost("B"), (cost("Bstar") or 0.0) + W if cost("Bstar") else None) if x is not None)
    FB = max((x for x in (cost("FB"), cost("FBstar") + W if cost("FBstar") else None) if x is not None),
             default=None)
    edge, edge_bytes = _edge_seconds(settings, fig)
    sched = schedules.make(schedule, int(settings["mesh"]["pipeline"]), int(settings["pipeline"]["microbatches"]))
    sim = schedules.simulate(sched, F=F, B=B, W=W, FB=FB, comm=edge)
    after = max(sum(times[n]["seconds"] for n in r["programs"] if n in times and times[n]["kind"] in AFTER_PIPELINE)
                for r in ranks)
    check = max((t["seconds"] for t in times.values() if t["kind"] == "check"), default=0.0)
    step = sim.makespan + after + check
    cells = dict(F=F, B=B, W=W, FB=FB if FB is not None else F + B, edge=edge, edge_bytes=edge_bytes)
    simulated = dict(pipeline_seconds=sim.makespan, bubble_seconds=sim.bubble, after_pipeline_seconds=after,
                     check_seconds=check)
  else:
    step = sum(t["seconds"] for t in times.values() if t["kind"] == "train")
  p = plan.plan(ml_collections.ConfigDict(settings), platform="gpu" if fig.target != "cpu" else "cpu")
  bf16 = fig.flops["bf16"]
  out = dict(
      target=fig.target, step_seconds=step, tokens_per_step=tokens,
      tokens_per_second_per_device=tokens / step / devices,
      mfu=p["flops_per_step"] / step / devices / bf16,
      flops_per_step=p["flops_per_step"], devices=devices, ragged_fill=fill, schedule=schedule, cells=cells, pipeline=simulated,
      programs=times,
      assumptions=dict(
          figures=fig.as_dict(),
          mfu="causal model FLOPs (dsv3.flops: 6 x activated matmul params + causal attention, MTP included) "
              "per step / (step seconds x devices x the chip's dense BF16 peak)",
          kernels="each kernel takes max(GEMM FLOPs / peak for its operand dtype, bytes read + written / HBM "
                  "bandwidth) + a launch cost; a loop its known trip count times its body",
          collectives="one at a time on a communication stream: bytes each device sends (all-to-all (n-1)/n of "
                      "its result, split by the link each peer is on; all-gather / reduce-scatter (n-1)/n; "
                      "all-reduce 2(n-1)/n; a ring across nodes at InfiniBand) + a latency; asynchronous ones "
                      "overlap whatever the schedule runs inside their window. A ragged all-to-all counts its "
                      "static buffer times ragged_fill (1 / model.ep_buffer_factor: the buffers hold that factor x the "
                      "balanced load), as a ragged GEMM kernel its FLOPs; other expert GEMMs (scan, tiled) run "
                      "their static shapes",
          pipeline=("the schedule's simulator (dsv3.pipeline.schedules.simulate) with the slowest rank's F, B "
                    "(B* + W), W and F&B programs as cell costs and one micro-batch's hidden states between "
                    "ranks as the edge; then the slowest rank's gradient sums and update, and the guard's check"
                    if pipelined else "one train_step program (gradient accumulation inside)"),
          not_counted="data loading, host-side metrics and checkpoint saves; XLA's sort stands in for CUB's "
                      "on GPU targets (compile_only's notes)"))
  return out


def format_table(est: dict) -> str:
  """The estimate as printed after a dry run."""
  fig = est["assumptions"]["figures"]
  lines = [f"step-time estimate for {est['target']} ({est['devices']} devices, {est['schedule']}): compiled "
           f"programs costed at {_rate(fig['flops']['bf16'], 'FLOP/s')} BF16 ({_rate(fig['flops']['fp8'], 'FLOP/s')} "
           f"FP8), HBM {_rate(fig['hbm'], 'B/s')}, NVLink {_rate(fig['nvlink'], 'B/s')}, InfiniBand "
           f"{_rate(fig['ib'], 'B/s')} per device",
           f"{'program':<28} {'ms':>10} {'compute ms':>11} {'comm ms':>9} {'exposed ms':>11} {'TFLOPs':>8}"]
  for name, t in est["programs"].items():
    lines.append(f"{name:<28} {t['seconds'] * 1e3:>10.2f} {t['compute'] * 1e3:>11.2f} {t['communication'] * 1e3:>9.2f} "
                 f"{t['exposed'] * 1e3:>11.2f} {t['flops'] / 1e12:>8.3f}")
  if est["cells"]:
    c, p = est["cells"], est["pipeline"]
    lines.append(f"cells: F {c['F'] * 1e3:.2f} ms, B {c['B'] * 1e3:.2f}, W {c['W'] * 1e3:.2f}, F&B {c['FB'] * 1e3:.2f}, "
                 f"edge {c['edge'] * 1e3:.3f} ms; pipeline {p['pipeline_seconds'] * 1e3:.1f} ms (bubble "
                 f"{p['bubble_seconds'] * 1e3:.1f}), then sums + update {p['after_pipeline_seconds'] * 1e3:.1f} ms")
  lines.append(f"step {est['step_seconds']:.4g} s; {est['tokens_per_second_per_device']:,.0f} tokens/s per device; "
               f"MFU {est['mfu']:.1%} (compiled, not run)")
  return "\n".join(lines)


def _rate(value: float, unit: str) -> str:
  for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if value >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def write(memory: dict, out_dir: str, fig: Figures, echo=print) -> dict:
  """Estimates the dry run in `out_dir` (its memory.json's dict given), writes out_dir/estimate.json (through a
  temporary file: never a half-written one) and prints the table."""
  est = estimate(memory, out_dir, fig)
  tmp = os.path.join(out_dir, "estimate.json.tmp")
  with open(tmp, "w") as f:
    json.dump(est, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "estimate.json"))
  echo(format_table(est))
  return est


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """`python -m dsv3.analysis.step_time`'s flags (importing the module defines none)."""
  flags.DEFINE_string("target", None, f"Whose figures to cost with: {', '.join(sorted(FIGURES))} or cpu (measured "
                      "here); default the dry run's own target.", flag_values=flag_values)


def main(argv):
  from dsv3 import cli
  if len(argv) != 2:
    raise cli.UsageError("usage: python -m dsv3.analysis.step_time DIR [--target=h800]: DIR is a --compile_only "
                         "workdir (it holds compiled/memory.json)")
  out_dir = os.path.join(argv[1], "compiled")
  path = os.path.join(out_dir, "memory.json")
  if not os.path.exists(path):
    raise cli.UsageError(f"{path} does not exist: run python -m dsv3.train --compile_only=TARGET "
                         f"--workdir={argv[1]} first")
  with open(path) as f:
    memory = json.load(f)
  target = flags.FLAGS.target or memory["target"]
  try:
    fig = measure_cpu() if target == "cpu" else figures(target)
  except UnknownTargetError as e:
    raise cli.UsageError(f"--target: {e}") from None
  write(memory, out_dir, fig)


if __name__ == "__main__":
  from dsv3 import cli
  define_flags()
  cli.run(main)
