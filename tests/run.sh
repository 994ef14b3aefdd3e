#!/bin/bash
# Run the whole test suite: the linter, the serial pass, then the MPI tests on 1, 2, 3 and 4 ranks.
#   bash tests/run.sh                 # uses .venv/bin/python if present, else python3
#   SIZES="2 4" bash tests/run.sh     # other rank counts
#   PYTEST_ARGS="-m 'not slurm'" ...  # extra pytest arguments for the serial pass
# Exits non-zero on any failure, including a pass in which no test ran (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MPIRUN=${MPIRUN:-$(dirname "$PYTHON")/mpirun}
[ -x "$MPIRUN" ] || MPIRUN=mpirun
SIZES=${SIZES:-"1 2 3 4"}
MPI_TIMEOUT=${MPI_TIMEOUT:-900}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
failed=0

run() {  # run a pytest pass; any non-zero status (5 = no tests ran included) is a failure
    echo "==> $*"
    "$@"
    local status=$?
    if [ $status -ne 0 ]; then
        echo "FAILED (exit $status): $*"
        failed=1
    fi
}

run "$PYTHON" -m ruff check .  # configured in pyproject.toml
eval "extra=(${PYTEST_ARGS:-})"  # shell words, so quoted arguments stay whole
run "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "${extra[@]}"
for n in $SIZES; do
    run timeout "$MPI_TIMEOUT" "$MPIRUN" -n "$n" --oversubscribe "$PYTHON" -m pytest --only-mpi -q \
        -p no:cacheprovider
done
[ $failed -eq 0 ] && echo "all test passes succeeded" || echo "some test passes FAILED"
exit $failed
