#!/bin/bash
# Pipelined ResNet as a Slurm batch job: one stage per task, or pipelines replicated with --stages.
#
#   sbatch slurm/resnet_pp.sh                                           # Fashion-MNIST, 1f1b, 4 micro-batches
#   sbatch slurm/resnet_pp.sh --schedule gpipe --microbatches 8 --balance auto
#   sbatch --ntasks=4 slurm/resnet_pp.sh --stages 2                     # 2 pipelines x 2 stages (hybrid)
#   sbatch --ntasks=3 slurm/resnet_pp.sh --data synthetic --max-steps 5  # resources on the command line win
#
# Submit from the repository root with the Python environment that has mpipar's
# dependencies active (sbatch passes the environment on), or set PYTHON.
# Launch: srun (PMIx) by default; LAUNCHER=mpirun uses the MPI's own mpirun inside
# the allocation instead (Open MPI 5 finds the allocation by itself); see slurm/launch.sh.
# Output: runs/<job name>-<job id>/ (metrics.h5, checkpoints/) and slurm-<job name>-<job id>.out.
# Time limit: Slurm sends SIGUSR1 two minutes before it; the job writes a checkpoint and
# requeues itself, and the requeued job (same id, same directory) resumes from it.
# MPIPAR_REQUEUE=0 stops after the checkpoint instead.
#SBATCH --job-name=resnet_pp
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

if [ ! -f slurm/launch.sh ]; then
    echo "slurm/resnet_pp.sh: run from the mpipar repository root (sbatch slurm/resnet_pp.sh there, or sbatch --chdir=REPO)" >&2
    exit 2
fi
source slurm/launch.sh
launch_job jobs/resnet_pp.py "$@"
