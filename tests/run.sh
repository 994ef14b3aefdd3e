#!/bin/bash
# Run the whole test suite: ruff and mypy, the serial pass, then the MPI tests on 1, 2, 3 and 4 ranks.
#   bash tests/run.sh                 # uses .venv/bin/python if present, else python3
#   bash tests/run.sh --fast          # no job launches, no cluster: serial pass, MPI passes on 2 and 3 ranks
#   SIZES="2 4" bash tests/run.sh     # other rank counts
#   PYTEST_ARGS="-m 'not slurm'" ...  # extra pytest arguments for the serial pass
# Exits non-zero on any failure, including a pass in which no test ran (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MPIRUN=${MPIRUN:-$(dirname "$PYTHON")/mpirun}
[ -x "$MPIRUN" ] || MPIRUN=mpirun
select=() sizes="1 2 3 4"
if [ "${1:-}" = "--fast" ]; then  # the developer's loop: what CI runs less the launch and cluster marks
    select=(-m "not launch and not cluster") sizes="2 3"
elif [ $# -gt 0 ]; then
    echo "usage: bash tests/run.sh [--fast]" >&2
    exit 2
fi
SIZES=${SIZES:-$sizes}
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
run "$PYTHON" -m mypy  # mpipar/, configured in pyproject.toml
eval "extra=(${PYTEST_ARGS:-})"  # shell words, so quoted arguments stay whole
run "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "${select[@]}" "${extra[@]}"
for n in $SIZES; do
    run timeout "$MPI_TIMEOUT" "$MPIRUN" -n "$n" --oversubscribe "$PYTHON" -m pytest --only-mpi -q \
        -p no:cacheprovider "${select[@]}"
done
[ $failed -eq 0 ] && echo "all test passes succeeded" || echo "some test passes FAILED"
exit $failed
