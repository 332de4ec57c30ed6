#!/usr/bin/env bash
# Multi-node customization job under Slurm: one torchrun per node, one process per GPU.
#
#   sbatch --nodes=2 scripts/slurm_customize.sh model=llama-3.3-70b-instruct model.checkpoint=/ckpt/llama-3.3-70b \
#       dataset.path=/data/my-dataset output_dir=/results/job-70b
#
# Extra arguments are Hydra overrides for `python -m nemo_customizer`. Tensor parallelism stays inside a node
# (model.tensor_parallel_size <= GPUs per node); pipeline and data parallelism span nodes.
#SBATCH --job-name=nemo-customizer
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# mcore overlaps tensor-parallel communication with compute only when CUDA keeps one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m nemo_customizer "$@"
