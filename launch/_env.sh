# Sourced by run.sh and mpirun.sh: the defaults both launchers share.
#   default_nproc: one rank per visible GPU, or 2 CPU ranks (gloo) without GPUs.
#   NVLink multicast stays off (DESIGN.md / gpu-notes.md): it can take a shared host's GPUs down.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  default_nproc=$(nvidia-smi -L | wc -l)
else
  default_nproc=2
  export FP4COMM_DIST_BACKEND=${FP4COMM_DIST_BACKEND:-gloo}
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
