#!/bin/bash
# A GPT language model on bytes of text (data parallel; --tp, --stages) as a Slurm batch job.
#
#   sbatch slurm/gpt_lm.sh --data runs/stdlib.h5 --max-steps 1000    # a token file of mpipar-text2h5, 2 replicas
#   sbatch --ntasks=4 slurm/gpt_lm.sh --data synthetic --tp 2         # 2 replicas of 2 tensor-parallel tasks
#   sbatch --ntasks=4 slurm/gpt_lm.sh --data synthetic --stages 2     # 2 pipelines of 2 stages
#
# Submit from the repository root with the Python environment that has mpipar's
# dependencies active (sbatch passes the environment on), or set PYTHON.
# Launch: srun (PMIx) by default; LAUNCHER=mpirun uses the MPI's own mpirun inside
# the allocation instead (Open MPI 5 finds the allocation by itself); see slurm/launch.sh.
# Output: runs/<job name>-<job id>/ (metrics.h5, checkpoints/) and slurm-<job name>-<job id>.out.
# Time limit: Slurm sends SIGUSR1 two minutes before it; the job writes a checkpoint and
# requeues itself, and the requeued job (same id, same directory) resumes from it.
# MPIPAR_REQUEUE=0 stops after the checkpoint instead.
#SBATCH --job-name=gpt_lm
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail

if [ ! -f slurm/launch.sh ]; then
    echo "slurm/gpt_lm.sh: run from the mpipar repository root (sbatch slurm/gpt_lm.sh there, or sbatch --chdir=REPO)" >&2
    exit 2
fi
source slurm/launch.sh
launch_job jobs/gpt_lm.py "$@"
