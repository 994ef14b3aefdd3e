#!/bin/bash
# MLP split by layer over 2 ranks (fc1,fc4 | fc2,fc3; 2k tasks = k replicas) as a Slurm batch job.
#
#   sbatch slurm/mlp_mp.sh                                       # Fashion-MNIST, naive model parallelism
#   sbatch slurm/mlp_mp.sh --schedule 1f1b --microbatches 8      # pipelined
#   sbatch --ntasks=4 slurm/mlp_mp.sh --data synthetic           # 2 data-parallel replicas
#
# Submit from the repository root with the Python environment that has mpipar's
# dependencies active (sbatch passes the environment on), or set PYTHON.
# Launch: srun (PMIx) by default; LAUNCHER=mpirun uses the MPI's own mpirun inside
# the allocation instead (Open MPI 5 finds the allocation by itself); see slurm/launch.sh.
# Output: runs/<job name>-<job id>/ (metrics.h5, checkpoints/) and slurm-<job name>-<job id>.out.
# Time limit: Slurm sends SIGUSR1 two minutes before it; the job writes a checkpoint and
# requeues itself, and the requeued job (same id, same directory) resumes from it.
# MPIPAR_REQUEUE=0 stops after the checkpoint instead.
#SBATCH --job-name=mlp_mp
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

if [ ! -f slurm/launch.sh ]; then
    echo "slurm/mlp_mp.sh: run from the mpipar repository root (sbatch slurm/mlp_mp.sh there, or sbatch --chdir=REPO)" >&2
    exit 2
fi
source slurm/launch.sh
launch_job jobs/mlp_mp.py "$@"
