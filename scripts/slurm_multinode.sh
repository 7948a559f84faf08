#!/usr/bin/env bash
# Multi-node DDP under SLURM: 2 nodes x 8 GPUs, one task per GPU. Lightning reads SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID and the node list itself, so srun starts every rank and no torchrun is needed.
#SBATCH --job-name=ldm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=logs/slurm-%j.out
#SBATCH --signal=SIGUSR1@90          # ldm saves at the end of the step, requeues, and the requeued job resumes
set -euo pipefail
source .venv/bin/activate
export NCCL_ASYNC_ERROR_HANDLING=1
# every rank and every requeue of this job uses the same run directory (the default under SLURM too, made explicit)
RUN_DIR=logs/train/runs/slurm-${SLURM_JOB_ID}
srun python train.py trainer=multinode trainer.num_nodes="${SLURM_NNODES}" trainer.devices="${SLURM_NTASKS_PER_NODE}" \
    hydra.run.dir="${RUN_DIR}" "$@"
