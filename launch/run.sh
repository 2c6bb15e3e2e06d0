#!/usr/bin/env bash
# torchrun entry point: ./launch/run.sh SCRIPT [ARGS...]
#   ./launch/run.sh launch/moe_demo.py --payload nvfp4
#   NGPU=4 LOG_RANK=0 ./launch/run.sh benchmarks/bench_dispatch.py --tokens 4096
# Overridable env (defaults in brackets):
#   NGPU [all visible GPUs, or 2 CPU ranks without GPUs]  NNODES [1]  NODE_RANK [0]
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]  LOG_RANK [all ranks; e.g. 0 or 0,1]
#   DRY_RUN=1: print the resolved command and each rank's environment, run nothing.
# NVLink multicast stays off (DESIGN.md / gpu-notes.md).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,9p' "$0"; exit 2
fi
source "$(dirname "$0")/_env.sh"
NGPU=${NGPU:-$default_nproc}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

cmd=(torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NGPU"
     --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
if [[ -n "${LOG_RANK:-}" ]]; then
  cmd+=(--local-ranks-filter "$LOG_RANK")   # rank log filter: only these ranks' output
fi
cmd+=("$@")

if [[ "${DRY_RUN:-0}" != "0" ]]; then
  echo "would run: ${cmd[*]}"
  here=$(cd "$(dirname "$0")" && pwd)
  for ((r = 0; r < NGPU; r++)); do
    RANK=$((NODE_RANK * NGPU + r)) WORLD_SIZE=$((NNODES * NGPU)) LOCAL_RANK=$r \
      MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT \
      python -c "import sys; sys.path.insert(0, '$here'); import dist_env; print(dist_env.detect().describe())"
  done
  exit 0
fi
exec "${cmd[@]}"
