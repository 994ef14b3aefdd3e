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
# the allocation instead (Open MPI 5 finds the allocation by itself).
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

PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-srun}
OUT=${MPIPAR_RUNS:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export PYTHONUNBUFFERED=1
RESUME=(--resume)   # resume from OUT's latest checkpoint when there is one (a requeued job)
[ "${MPIPAR_REQUEUE:-1}" = 1 ] && RESUME+=(--requeue)

if [ "$LAUNCHER" = mpirun ]; then
    exec mpirun -n "$SLURM_NTASKS" --bind-to none \
        "$PYTHON" jobs/mlp_mp.py --out "$OUT" --threads "$OMP_NUM_THREADS" "${RESUME[@]}" "$@"
fi
exec srun --kill-on-bad-exit=1 \
    "$PYTHON" jobs/mlp_mp.py --out "$OUT" --threads "$OMP_NUM_THREADS" "${RESUME[@]}" "$@"
