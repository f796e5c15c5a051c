"""Multi-process start-up: one call that does the right thing on a laptop, under SLURM, MPI or by hand.

    from dsv3.parallel import distributed
    info = distributed.maybe_initialize()     # FIRST, before any other JAX call

JAX runs one process per host (or per GPU); `jax.distributed.initialize` connects them so that
`jax.devices()` lists every device of the job and collectives cross hosts. It must run before anything
touches a JAX backend (jax.devices(), creating an array, jit), because backends are created once and
would otherwise come up single-process. This module only decides WHETHER and HOW to call it:

  1. explicit arguments, else
  2. DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID (set by launch/multihost.sh, launch/local.sh),
  3. SLURM (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1): JAX's own cluster detection finds
     the coordinator; we only fix `local_device_ids` — JAX would pin each process to the GPU numbered by
     its local rank, which with one process per node leaves 7 of 8 GPUs idle,
  4. otherwise a single process: nothing to do.

CPU processes need a cross-process collectives implementation: 'gloo' is set before initialising (it
is ignored by GPU backends). DSV3_LOCAL_DEVICES=N gives each CPU process N simulated devices.
Calling again returns the first result (idempotent).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  process_id: int = 0
  num_processes: int = 1
  coordinator: Optional[str] = None
  local_device_ids: Optional[tuple] = None
  source: str = "single"            # 'args' | 'env' | 'slurm' | 'openmpi' | 'single'

  @property
  def multi_process(self) -> bool:
    return self.num_processes > 1


_INFO: Optional[DistributedInfo] = None


def _int_env(name: str) -> Optional[int]:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def _ids(value) -> Optional[tuple]:
  if value is None or value == "":
    return None
  if isinstance(value, str):
    return tuple(int(v) for v in value.split(",") if v.strip())
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def _all_local_gpus() -> Optional[tuple]:
  """All GPUs this process may see, for one-process-per-node jobs (indices after CUDA_VISIBLE_DEVICES)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
  if visible:
    return tuple(range(len([v for v in visible.split(",") if v.strip()])))
  for name in ("SLURM_GPUS_ON_NODE", "DSV3_GPUS_PER_NODE"):
    count = _int_env(name)
    if count:
      return tuple(range(count))
  return None


def _tasks_per_node() -> Optional[int]:
  for name in ("SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
    if _int_env(name):
      return _int_env(name)
  nodes, tasks = _int_env("SLURM_JOB_NUM_NODES") or _int_env("SLURM_NNODES"), _int_env("SLURM_NTASKS")
  if nodes and tasks:
    return tasks // nodes
  per_node = os.environ.get("SLURM_TASKS_PER_NODE", "")   # e.g. '1(x4)' or '8'
  return int(per_node.split("(")[0]) if per_node.split("(")[0].isdigit() else None


def _detect(coordinator, num_processes, process_id, local_device_ids):
  """-> (source, coordinator, num_processes, process_id, local_device_ids); None fields: JAX detects."""
  if num_processes is not None or coordinator is not None:
    return "args", coordinator, num_processes, process_id, local_device_ids
  if _int_env("DSV3_NUM_PROCESSES"):
    return ("env", os.environ.get("DSV3_COORDINATOR"), _int_env("DSV3_NUM_PROCESSES"),
            _int_env("DSV3_PROCESS_ID"), local_device_ids or _ids(os.environ.get("DSV3_LOCAL_DEVICE_IDS")))
  for source, size_var in (("slurm", "SLURM_NTASKS"), ("openmpi", "OMPI_COMM_WORLD_SIZE")):
    if (_int_env(size_var) or 1) > 1:
      ids = local_device_ids or _ids(os.environ.get("DSV3_LOCAL_DEVICE_IDS"))
      if ids is None and _tasks_per_node() == 1:
        ids = _all_local_gpus()      # one process drives every GPU of its node
      return source, None, None, None, ids
  return "single", None, num_processes, process_id, local_device_ids


def maybe_initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     local_device_ids: Optional[Sequence[int]] = None) -> DistributedInfo:
  """Initialise jax.distributed when this is one process of several; a no-op otherwise.

  Call it before any other JAX call. Explicit arguments win over the environment. Returns who we are.
  """
  global _INFO
  if _INFO is not None:
    return _INFO
  local_devices = _int_env("DSV3_LOCAL_DEVICES")
  if local_devices:                   # simulated CPU devices per process (launch/local.sh)
    jax.config.update("jax_num_cpu_devices", local_devices)
  source, coordinator, num_processes, process_id, ids = _detect(
      coordinator, num_processes, process_id, _ids(local_device_ids))
  if source == "single" or (source in ("args", "env") and (num_processes or 1) <= 1):
    _INFO = DistributedInfo(source="single")
    return _INFO
  if source in ("args", "env") and (coordinator is None or process_id is None):
    raise ValueError(f"multi-process start ({source}): num_processes={num_processes} needs a coordinator "
                     f"address (host:port) and this process's id; got coordinator={coordinator!r}, "
                     f"process_id={process_id!r} (set DSV3_COORDINATOR and DSV3_PROCESS_ID)")
  # Gloo gives CPU devices real cross-process collectives; GPU backends use NCCL and ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Explicit settings switch JAX's own cluster detection off, so that a launch/multihost.sh run inside
  # a SLURM allocation is not second-guessed (JAX would pin each process to one GPU).
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=list(ids) if ids else None,
                             cluster_detection_method="deactivate" if source in ("args", "env") else None)
  _INFO = DistributedInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                          coordinator=coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                          local_device_ids=ids, source=source)
  return _INFO
