#!/bin/bash
# Start one dsv3 training process on this host; run the same command on every host of the job.
#
#   launch/multihost.sh COORDINATOR:PORT NUM_PROCESSES PROCESS_ID --config=configs/small.py --workdir=DIR ...
#
# COORDINATOR is process 0's host (reachable from all hosts); PROCESS_ID runs 0..NUM_PROCESSES-1, one
# per host. Each process uses every local accelerator (set DSV3_LOCAL_DEVICE_IDS=0,1 to restrict).
# Extra environment (XLA_FLAGS, NCCL_*) is passed through unchanged.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 COORDINATOR:PORT NUM_PROCESSES PROCESS_ID [train args...]" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DSV3_COORDINATOR="$1" DSV3_NUM_PROCESSES="$2" DSV3_PROCESS_ID="$3"
shift 3
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
cd "${REPO}"
exec "${PYTHON:-python}" -m dsv3.train "$@"
