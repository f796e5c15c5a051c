"""One process of an HF checkpoint import, as JSON: used by tests/test_hf_sharded.py and tests/hf_rss_probe.py.

  python tests/hf_load_worker.py CKPT_DIR MODE [EXPERT_AXIS]     MODE: sharded | unsharded | both | baseline

Started as N processes (DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID / DSV3_LOCAL_DEVICES, as
tests/test_multiprocess.py does) or as one. 'sharded' loads onto dsv3.parallel.sharding.param_shardings over a
(data, expert) mesh of every device; 'both' also loads unsharded afterwards and checks every local shard
against it. Prints peak RSS (VmHWM), what the sharded load read, and whether the values agree.
"""
import json
import sys
import time

from dsv3.parallel import distributed

info = distributed.maybe_initialize()   # before any other JAX call

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tiny_model  # noqa: E402  (tests/, this script's directory)

from dsv3 import hf  # noqa: E402
from dsv3.interop import safetensors_io
from dsv3.parallel import sharding


def peak_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def main():
  path, mode = sys.argv[1], sys.argv[2]
  expert = int(sys.argv[3]) if len(sys.argv) > 3 else jax.device_count()
  out = dict(process_id=jax.process_index(), num_processes=jax.process_count(), devices=jax.device_count())
  reads = []
  real_reader = safetensors_io.Reader

  class CountingReader(real_reader):      # records what this process read, for the test's assertions
    def __init__(self, files):
      super().__init__(files)
      reads.append(self)
  safetensors_io.Reader = CountingReader
  t0 = time.time()
  if mode in ("sharded", "both"):
    mesh = tiny_model.mesh(jax.device_count() // expert, expert)
    _, sharded = hf.load_checkpoint(path, shardings=lambda a: sharding.param_shardings(mesh, a))
    jax.block_until_ready(sharded)
    out.update(sharded_s=time.time() - t0, bytes_read=reads[-1].bytes_read,
               tensors_read=sorted(n for n, c in reads[-1].tensors_read.items() if c),
               local_shard_bytes=sum(s.data.nbytes for x in jax.tree.leaves(sharded)
                                     for s in x.addressable_shards))
    out["peak_rss_sharded"] = peak_rss_bytes()
  if mode in ("unsharded", "both"):
    t0 = time.time()
    _, whole = hf.load_checkpoint(path)
    jax.block_until_ready(whole)
    out.update(unsharded_s=time.time() - t0, peak_rss_unsharded=peak_rss_bytes())
  if mode == "both":
    equal = True
    for s, w in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
      whole_np = np.asarray(w)
      for shard in s.addressable_shards:
        equal &= bool(np.array_equal(np.asarray(shard.data), whole_np[shard.index])) and s.dtype == w.dtype
    out["equal"] = equal
  safetensors_io.Reader = real_reader
  out["peak_rss"] = peak_rss_bytes()       # baseline: Python + JAX with nothing loaded
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
