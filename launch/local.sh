#!/bin/bash
# N CPU processes on this machine, talking through gloo collectives: a multi-host run in miniature.
#
#   launch/local.sh 2 --config=configs/tiny.py --workdir=/tmp/dsv3_mp --config.mesh.data=2 --config.mesh.expert=4
#
# DSV3_MAIN picks another module to run (default dsv3.train; tests use tests.mp_worker).
# Each process gets DSV3_LOCAL_DEVICES simulated CPU devices (default 4), so the job sees N × that.
# Waits for every process; exits non-zero (and stops the others) if any fails. Process i's output is
# printed with the prefix "[i] ".
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [train args...]" >&2
  exit 2
fi
NUM=$1
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT=${DSV3_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export DSV3_LOCAL_DEVICES=${DSV3_LOCAL_DEVICES:-4}
export JAX_PLATFORMS=cpu
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
# One device count per process comes from DSV3_LOCAL_DEVICES; drop any conflicting XLA flag.
export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
cd "${REPO}"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM
for ((i = 0; i < NUM; i++)); do
  DSV3_COORDINATOR="localhost:${PORT}" DSV3_NUM_PROCESSES="${NUM}" DSV3_PROCESS_ID="$i" \
    "${PYTHON:-python}" -m "${DSV3_MAIN:-dsv3.train}" "$@" > >(sed "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n`: portable to older bash, and each exit status is collected exactly once.
status=0
while ((${#pids[@]} > 0)); do
  for idx in "${!pids[@]}"; do
    pid=${pids[$idx]}
    if kill -0 "${pid}" 2>/dev/null; then
      continue
    fi
    wait "${pid}"
    rc=$?
    unset 'pids[idx]'
    if ((rc != 0 && status == 0)); then
      echo "local.sh: process ${idx} exited with status ${rc}; stopping the others" >&2
      status=${rc}
      cleanup
    fi
  done
  sleep 1
done
exit "${status}"
