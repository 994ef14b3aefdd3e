#!/bin/bash
# A small vision transformer with its attention heads and MLP split over --tp tasks (tensor parallelism) as a Slurm batch job.
#
#   sbatch slurm/vit_tp.sh                                       # Fashion-MNIST, every block split over 2 tasks
#   sbatch --ntasks=4 slurm/vit_tp.sh --tp 2                     # 2 data-parallel replicas of 2 tasks each
#   sbatch --ntasks=4 slurm/vit_tp.sh --data synthetic           # --tp defaults to all tasks (1, 2 or 4 for vit-tiny)
#
# Submit from the repository root with the Python environment that has mpipar's
# dependencies active (sbatch passes the environment on), or set PYTHON.
# Launch: srun (PMIx) by default; LAUNCHER=mpirun uses the MPI's own mpirun inside
# the allocation instead (Open MPI 5 finds the allocation by itself); see slurm/launch.sh.
# Output: runs/<job name>-<job id>/ (metrics.h5, checkpoints/) and slurm-<job name>-<job id>.out.
# Time limit: Slurm sends SIGUSR1 two minutes before it; the job writes a checkpoint and
# requeues itself, and the requeued job (same id, same directory) resumes from it. It must get
# the same number of tasks again: a tensor-parallel checkpoint resumes only on the ranks that
# wrote it. MPIPAR_REQUEUE=0 stops after the checkpoint instead.
#SBATCH --job-name=vit_tp
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

if [ ! -f slurm/launch.sh ]; then
    echo "slurm/vit_tp.sh: run from the mpipar repository root (sbatch slurm/vit_tp.sh there, or sbatch --chdir=REPO)" >&2
    exit 2
fi
source slurm/launch.sh
launch_job jobs/vit_tp.py "$@"
