# Sourced by the slurm/*.sh job scripts (not a job itself): launch_job JOB.py [ARGS...]
# starts JOB.py on every task of the allocation and becomes the launcher (exec), so the
# batch shell's warning signal (--signal=B:USR1@...) reaches it.
#
#   PYTHON     the interpreter with mpipar's dependencies (default: python3 on PATH)
#   LAUNCHER   srun (default; PMIx) or mpirun (the MPI's own, inside the allocation:
#              Open MPI 5 finds the allocation by itself)
#   MPIPAR_RUNS     parent of the run directory (default: runs); the run directory is
#                   <job name>-<job id>, the same for a requeued job, which resumes there
#   MPIPAR_REQUEUE  1 (default): on the time-limit warning, checkpoint and requeue;
#                   0: checkpoint and stop
# srun runs with --kill-on-bad-exit=1: a task that dies ends the step instead of leaving
# the others waiting (mpirun does that by itself).

launch_job() {
    local job=$1
    shift
    local python=${PYTHON:-python3} launcher=${LAUNCHER:-srun}
    local out=${MPIPAR_RUNS:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
    local resume=(--resume)   # resume from the run directory's latest checkpoint when there is one
    [ "${MPIPAR_REQUEUE:-1}" = 1 ] && resume+=(--requeue)
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export PYTHONUNBUFFERED=1
    case "$launcher" in
        mpirun)
            exec mpirun -n "$SLURM_NTASKS" --bind-to none \
                "$python" "$job" --out "$out" --threads "$OMP_NUM_THREADS" "${resume[@]}" "$@" ;;
        srun)
            exec srun --kill-on-bad-exit=1 \
                "$python" "$job" --out "$out" --threads "$OMP_NUM_THREADS" "${resume[@]}" "$@" ;;
        *)
            echo "slurm/launch.sh: LAUNCHER must be srun or mpirun, got '$launcher'" >&2
            exit 2 ;;
    esac
}
