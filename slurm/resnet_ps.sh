#!/bin/bash
# ResNet training with a parameter server (rank 0 serves, the others are workers) as a Slurm batch job.
#
#   sbatch slurm/resnet_ps.sh                                   # Fashion-MNIST, defaults
#   sbatch slurm/resnet_ps.sh --mode bounded --staleness 2   # extra arguments go to the job
#   sbatch --ntasks=8 slurm/resnet_ps.sh --epochs 10            # resources on the command line win
#
# Submit from the repository root with the Python environment that has mpipar's
# dependencies active (sbatch passes the environment on), or set PYTHON.
# Launch: srun (PMIx) by default; LAUNCHER=mpirun uses the MPI's own mpirun inside
# the allocation instead (Open MPI 5 finds the allocation by itself); see slurm/launch.sh.
# Output: runs/<job name>-<job id>/ (metrics.h5, checkpoints/) and slurm-<job name>-<job id>.out.
# Time limit: Slurm sends SIGUSR1 two minutes before it; the job writes a checkpoint and
# requeues itself, and the requeued job (same id, same directory) resumes from it.
# MPIPAR_REQUEUE=0 stops after the checkpoint instead.
#SBATCH --job-name=resnet_ps
#SBATCH --ntasks=3
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

if [ ! -f slurm/launch.sh ]; then
    echo "slurm/resnet_ps.sh: run from the mpipar repository root (sbatch slurm/resnet_ps.sh there, or sbatch --chdir=REPO)" >&2
    exit 2
fi
source slurm/launch.sh
launch_job jobs/resnet_ps.py "$@"
