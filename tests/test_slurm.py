"""Every slurm/*.sh job script runs through a real ``sbatch --wait`` with a tiny configuration.

Needs a reachable Slurm cluster; on a Debian machine bring one up with::

    slurm/local-cluster.sh up
    python -m pytest tests/test_slurm.py -v
    slurm/local-cluster.sh down

Without ``sbatch`` or a controller answering ``scontrol ping`` the cluster tests
are skipped with the reason, unless ``MPIPAR_REQUIRE_SLURM=1`` (CI) makes that a
failure. A new script in slurm/ needs an entry in ``TINY_JOBS``; a test fails
until it has one.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
NOT_JOB_SCRIPTS = {"local-cluster.sh", "launch.sh"}  # the test cluster; the launcher the scripts share


@dataclass(frozen=True)
class TinyJob:
    """How to run one slurm/ script in seconds, and what it must leave behind.

    Job arguments may hold ``{out}``, replaced by a fresh run directory under the
    test's tmp_path, where ``metrics`` must appear.
    """

    args: Tuple[str, ...]  # a run of exactly `steps` optimizer steps
    steps: int
    long_args: Tuple[str, ...]  # a run that lasts until Slurm's time-limit signal stops it
    other_ntasks: Optional[int] = None  # a second size, given on the sbatch command line (mpirun test)
    # the launcher of the stop-without-requeue test, or None: each run waits 30-60 s for Slurm, so one script
    # has it (every script's signal path is exercised by the requeue test, launched with srun)
    time_limit_launcher: Optional[str] = None
    metrics: str = "metrics.h5"


def _tiny(*extra: str, steps: int = 3) -> Tuple[str, ...]:
    return ("--data", "synthetic", "--epochs", "1", "--max-steps", str(steps), "--batch-size", "8",
            "--out", "{out}", *extra)


def _long(*extra: str) -> Tuple[str, ...]:
    return ("--data", "synthetic", "--epochs", "1000", "--batch-size", "8", "--flush-every", "5",
            "--out", "{out}", *extra)


TINY_JOBS = {
    "resnet_dp.sh": TinyJob(args=_tiny(), steps=3, long_args=_long(), other_ntasks=3, time_limit_launcher="mpirun"),
    "mlp_mp.sh": TinyJob(args=_tiny(), steps=3, long_args=_long(), other_ntasks=4),  # 4 = 2 replicas
    "resnet_pp.sh": TinyJob(args=_tiny(), steps=3, long_args=_long(), other_ntasks=3),  # 3 stages
    "mlp_tp.sh": TinyJob(args=_tiny("--tp", "2"), steps=3, long_args=_long(), other_ntasks=4),  # 4 = 2 replicas
    "vit_tp.sh": TinyJob(args=_tiny("--tp", "2"), steps=3, long_args=_long(), other_ntasks=4),  # 4 = 2 replicas
    "resnet_ps.sh": TinyJob(args=_tiny("--mode", "async"), steps=3, long_args=_long(), other_ntasks=4),  # 3 workers
    "gpt_lm.sh": TinyJob(args=_tiny(), steps=3, long_args=_long(), other_ntasks=3),  # data parallel
}

JOB_TIMEOUT = 300  # seconds for a tiny job, queueing and Python start-up of every rank included
# slurmctld looks at time limits every 30 s and sends --signal's warning up to one such period
# early; it kills up to a period late. Limits are whole minutes.
SLURMCTLD_PERIOD = 30


def job_scripts():
    return sorted(p.name for p in SLURM_DIR.glob("*.sh") if p.name not in NOT_JOB_SCRIPTS)


def sbatch_directive(script: str, pattern: str) -> Optional[str]:
    """First value of an ``#SBATCH`` option in the script's header, or None."""
    for line in (SLURM_DIR / script).read_text().splitlines():
        found = re.match(r"#SBATCH\s+" + pattern + r"\s*(\S+)", line)
        if found:
            return found.group(1)
    return None


def tiny_job(script: str) -> TinyJob:
    if script not in TINY_JOBS:
        pytest.fail(f"slurm/{script} has no entry in TINY_JOBS (tests/test_slurm.py)", pytrace=False)
    return TINY_JOBS[script]


def signal_lead_seconds(script: str) -> int:
    """Seconds before the limit at which the script asks for its warning signal."""
    value = sbatch_directive(script, "--signal=")
    found = re.fullmatch(r"(?:B:)?(?:SIG)?USR1@(\d+)", value or "")
    if not found:
        pytest.fail(f"slurm/{script}: expected '#SBATCH --signal=B:USR1@SECONDS', found {value!r}", pytrace=False)
    return int(found.group(1))


def short_time_limit(script: str) -> int:
    """A limit in minutes whose warning comes 1-2 slurmctld periods after the start:
    late enough that every rank has set up its handler, well before the kill."""
    return -(-(signal_lead_seconds(script) + 2 * SLURMCTLD_PERIOD) // 60)


def default_ntasks(script: str) -> int:
    value = sbatch_directive(script, r"(?:--ntasks=|--ntasks\s|-n\s*)")
    if value is None:
        pytest.fail(f"slurm/{script} has no '#SBATCH --ntasks=N': state the rank count it runs with")
    return int(value)


# -- the cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster():
    """Skip (or, with MPIPAR_REQUIRE_SLURM=1, fail) when no Slurm cluster answers."""
    missing = None
    if shutil.which("sbatch") is None:
        missing = "sbatch not found"
    else:
        try:
            ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
            if ping.returncode != 0 or "UP" not in ping.stdout:
                said = (ping.stdout + ping.stderr).strip().splitlines() or ["no output"]
                missing = f"no Slurm controller answers 'scontrol ping' ({said[-1].strip()})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            missing = f"'scontrol ping' failed: {exc}"
    if missing:
        message = f"{missing}; start a one-node cluster with 'slurm/local-cluster.sh up' (root, Debian)"
        if os.environ.get("MPIPAR_REQUIRE_SLURM") == "1":
            pytest.fail(message + " [MPIPAR_REQUIRE_SLURM=1]", pytrace=False)
        pytest.skip(message)


def job_environment(**extra: str) -> dict:
    """The submitting environment (sbatch passes it to the job): this Python first on
    PATH, no Slurm or MPI variables leaking in from an enclosing job or mpirun."""
    leaked = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMIX_", "PRTE_", "PMI_", "OMPI_COMM_WORLD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaked) or k == "SLURM_CONF"}
    env.pop("MPIPAR_EXPECTED_WORLD_SIZE", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    if os.geteuid() == 0:  # Open MPI's mpirun refuses root without these
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra)
    return env


@dataclass
class JobResult:
    returncode: int
    output: str  # the job's --output file
    out_dir: Path
    seconds: float

    def describe(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return f"sbatch --wait exit code {self.returncode} after {self.seconds:.0f} s; job output (tail):\n{tail}"


def submit(script: str, tmp_path: Path, job_args, *, options=(), env=None, timeout=JOB_TIMEOUT) -> JobResult:
    """``sbatch --wait`` the script from the repository root; wait at most ``timeout`` s."""
    out_dir = tmp_path / "run"
    output = tmp_path / "slurm-%j.out"
    command = ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={output}",
               f"--job-name=test-{Path(script).stem}", *options,
               str(SLURM_DIR / script), *(a.replace("{out}", str(out_dir)) for a in job_args)]
    start = time.monotonic()
    try:
        done = subprocess.run(["timeout", "--kill-after=10", str(timeout), *command], capture_output=True,
                              text=True, env=env or job_environment(), timeout=timeout + 30)
    except subprocess.TimeoutExpired as exc:  # only if `timeout` itself hung; its output comes as bytes
        said = [b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (exc.stdout, exc.stderr)]
        done = subprocess.CompletedProcess(command, 124, *said)
    seconds = time.monotonic() - start
    job_id = (done.stdout or "").strip().split(";")[0]
    if done.returncode == 124:
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True)
        pytest.fail(f"sbatch --wait slurm/{script} did not finish in {timeout} s (job {job_id or '?'}): "
                    f"{_read_outputs(tmp_path)[-3000:]}")
    if not job_id.isdigit():
        pytest.fail(f"sbatch refused slurm/{script} (exit {done.returncode}): {done.stderr.strip()}")
    log = tmp_path / f"slurm-{job_id}.out"
    assert log.exists(), f"job {job_id} left no output file {log}; sbatch said: {done.stderr.strip()}"
    return JobResult(done.returncode, log.read_text(errors="replace"), out_dir, seconds)


def _read_outputs(tmp_path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("slurm-*.out")))


def check_metrics(path: Path, *, world_size: int, steps: Optional[int] = None) -> int:
    """The run's HDF5 file is complete: its world size, step count, and a row of
    timings from every rank at every step. Returns the number of steps."""
    assert path.exists(), f"no metrics file {path}"
    with h5py.File(path, "r") as f:
        assert int(f.attrs["world_size"]) == world_size, f"world_size {f.attrs['world_size']} != ntasks {world_size}"
        assert f.attrs.get("strategy"), "no 'strategy' attribute"
        loss = f["steps/loss"][()]
        if steps is not None:
            assert loss.shape == (steps,), f"expected {steps} steps, found {loss.shape[0]}"
        assert loss.shape[0] >= 1, "no steps recorded"
        assert np.isfinite(loss).all(), f"non-finite loss {loss}"
        for name in ("compute_time", "step_time"):
            timing = f[f"steps/{name}"][()]
            assert timing.shape == (loss.shape[0], world_size), f"/steps/{name} has shape {timing.shape}"
            silent = sorted({int(r) for r in np.argwhere(~(timing > 0))[:, 1]})
            assert not silent, f"ranks {silent} have zero /steps/{name} entries: not every rank took part"
        return loss.shape[0]


def assert_clean_output(result: JobResult) -> None:
    assert "Traceback" not in result.output, result.describe()
    # PMIx/Open MPI help-file noise means mpi.conf's PMIxEnv (or the MPI install) is off.
    assert "Sorry!  You were supposed to get help" not in result.output, result.describe()


# -- tests --------------------------------------------------------------------------------

def test_every_script_has_a_tiny_configuration():
    scripts = job_scripts()
    assert scripts, f"no job scripts in {SLURM_DIR}"
    missing = [s for s in scripts if s not in TINY_JOBS]
    assert not missing, (f"slurm/{', slurm/'.join(missing)} has no entry in TINY_JOBS in {__file__}: "
                         f"add the job arguments of a run that takes seconds, so CI submits it")
    stale = sorted(set(TINY_JOBS) - set(scripts))
    assert not stale, f"TINY_JOBS names scripts that are gone: {stale}"


@pytest.mark.parametrize("script", job_scripts())
def test_script_asks_for_a_signal_before_the_time_limit(script):
    """``B:`` sends the signal to the batch shell, which the script replaces by its
    launcher with ``exec``: srun and mpirun both pass SIGUSR1 on to every rank.
    Without ``B:`` Slurm signals only job steps, so ranks under ``mpirun`` (which
    runs inside the batch step) never hear it and are killed at the limit."""
    value = sbatch_directive(script, "--signal=")
    assert value, f"slurm/{script} has no '#SBATCH --signal=B:USR1@SECONDS'"
    assert re.fullmatch(r"B:(SIG)?USR1@\d+", value), (
        f"slurm/{script}: '--signal={value}'; use '--signal=B:USR1@SECONDS' and 'exec' the launcher")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
@pytest.mark.parametrize("script", job_scripts())
def test_script_runs_under_sbatch(slurm_cluster, tmp_path, script, launcher):
    job = tiny_job(script)
    ntasks = default_ntasks(script)
    options = []
    if launcher == "mpirun" and job.other_ntasks:
        ntasks = job.other_ntasks  # also: resources on the sbatch command line win over the script's
        options.append(f"--ntasks={ntasks}")
    result = submit(script, tmp_path, job.args, options=options, env=job_environment(LAUNCHER=launcher))
    assert result.returncode == 0, result.describe()
    assert_clean_output(result)
    check_metrics(result.out_dir / job.metrics, world_size=ntasks, steps=job.steps)


@pytest.mark.slurm
@pytest.mark.slow
def test_local_sgd_runs_under_sbatch(slurm_cluster, tmp_path):
    """slurm/resnet_dp.sh passes its arguments on to the job: local SGD (one synchronous step, then an
    average every 2 local steps) runs under sbatch, every rank checkpoints its own model, and the metrics
    mark the synchronised steps."""
    script, steps = "resnet_dp.sh", 4
    ntasks = default_ntasks(script)
    result = submit(script, tmp_path, _tiny("--sync-every", "2", "--local-warmup", "1", steps=steps))
    assert result.returncode == 0, result.describe()
    assert_clean_output(result)
    check_metrics(result.out_dir / "metrics.h5", world_size=ntasks, steps=steps)
    with h5py.File(result.out_dir / "metrics.h5", "r") as f:
        assert f.attrs["strategy"] == "local_sgd", result.describe()
        synced = f["steps/synced"][()]
    assert synced.tolist() == [[1.0] * ntasks, [0.0] * ntasks, [1.0] * ntasks, [0.0] * ntasks], synced
    final = result.out_dir / "checkpoints" / f"step-{steps:09d}"
    assert sorted(p.name for p in final.glob("rank-*.pt")) == sorted(f"rank-{r}.pt" for r in range(ntasks))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in job_scripts() if s in ("resnet_dp.sh", "resnet_ps.sh")])
def test_wrong_mpi_plugin_fails_loudly(slurm_cluster, tmp_path, script):
    """``srun --mpi=pmi2`` with an MPI that only speaks PMIx starts every rank as
    its own world of size 1; the job must notice and fail, not train N models. Every job
    checks it in the same place (``mpipar/run/launch.py``): two scripts, one with a role layout
    (servers and workers), stand for all."""
    job = tiny_job(script)
    ntasks = default_ntasks(script)
    assert ntasks > 1, f"slurm/{script} runs 1 task: a singleton launch cannot be told apart"
    result = submit(script, tmp_path, job.args, env=job_environment(LAUNCHER="srun", SLURM_MPI_TYPE="pmi2"))
    assert result.returncode != 0, "a launch whose ranks are singletons exited 0\n" + result.describe()
    said = result.output.lower()
    assert "world size" in said and str(ntasks) in said, (
        "the failure does not say that the MPI world size differs from SLURM_NTASKS\n" + result.describe())
    assert "pmix" in said, "the failure does not say how to launch right (srun --mpi=pmix)\n" + result.describe()


def dead_rank_cases():
    """A rank killed mid-run, under both launchers for the data-parallel job and under srun
    for a pipeline job (its ranks wait in Send/Recv rather than in a collective)."""
    cases = [("resnet_dp.sh", "srun"), ("resnet_dp.sh", "mpirun"), ("resnet_pp.sh", "srun")]
    return [case for case in cases if case[0] in job_scripts()]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script,launcher", dead_rank_cases())
def test_a_rank_that_dies_ends_the_job(slurm_cluster, tmp_path, script, launcher):
    """One rank SIGKILLs itself at step 8 of an endless run: the whole job must end with a
    failure well before any time limit, never leave the other ranks waiting, and leave
    the metrics flushed before the death readable."""
    job = tiny_job(script)
    ntasks = default_ntasks(script)
    victim = ntasks - 1
    result = submit(script, tmp_path, job.long_args, options=["--time=10", "--no-requeue"],
                    env=job_environment(LAUNCHER=launcher, MPIPAR_FAULT_AT_STEP=f"8:{victim}", MPIPAR_REQUEUE="0"),
                    timeout=240)
    assert result.returncode != 0, "the job exited 0 although a rank was killed\n" + result.describe()
    assert f"rank {victim} kills itself at step 8" in result.output, result.describe()
    assert "DUE TO TIME LIMIT" not in result.output, "the other ranks waited until the time limit\n" + \
        result.describe()
    assert check_metrics(result.out_dir / job.metrics, world_size=ntasks) >= 5  # flushed every 5 steps


def time_limit_cases():
    """The scripts that name a launcher for it: each run waits 30-60 s for Slurm's warning, and the
    requeue test below gets that warning to every script under srun already; this one adds the
    stop without requeue (``MPIPAR_REQUEUE=0``) and the signal's way through ``mpirun``."""
    return [(script, TINY_JOBS[script].time_limit_launcher) for script in job_scripts()
            if script in TINY_JOBS and TINY_JOBS[script].time_limit_launcher]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script,launcher", time_limit_cases())
def test_time_limit_signal_flushes_metrics(slurm_cluster, tmp_path, script, launcher):
    """A run longer than its limit gets the script's ``--signal`` first, stops all
    ranks at the same step, flushes its metrics and exits 0 before Slurm kills it."""
    job = tiny_job(script)
    ntasks = default_ntasks(script)
    limit = short_time_limit(script)
    result = submit(script, tmp_path, job.long_args, options=[f"--time={limit}"],
                    env=job_environment(LAUNCHER=launcher, MPIPAR_REQUEUE="0"),
                    timeout=limit * 60 + 3 * SLURMCTLD_PERIOD)
    killed = "DUE TO TIME LIMIT" in result.output
    assert not killed, "Slurm killed the job at its time limit: the ranks never acted on --signal\n" + result.describe()
    assert result.returncode == 0, result.describe()
    assert "SIGUSR1" in result.output, "the job did not say that SIGUSR1 stopped it\n" + result.describe()
    assert_clean_output(result)
    check_metrics(result.out_dir / job.metrics, world_size=ntasks)


@dataclass
class RequeueJob:
    """An endless run submitted with a short time limit, for the requeue test."""

    job_id: str
    log: Path
    out_dir: Path
    ntasks: int
    deadline: float  # monotonic time by which it must have been requeued and resumed


def submit_requeue_job(script: str, directory: Path) -> RequeueJob:
    """Submit ``script`` endless with its short time limit (no --wait)."""
    job = tiny_job(script)
    limit = short_time_limit(script)
    out_dir, log_pattern = directory / "run", directory / "slurm-%j.out"
    args = [a.replace("{out}", str(out_dir)) for a in job.long_args] + ["--max-steps", "100000000"]
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log_pattern}", f"--time={limit}",
         f"--job-name=test-{Path(script).stem}", str(SLURM_DIR / script), *args],
        capture_output=True, text=True, env=job_environment(), timeout=60)
    job_id = submitted.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        pytest.fail(f"sbatch refused slurm/{script}: {submitted.stderr.strip()}")
    return RequeueJob(job_id, directory / f"slurm-{job_id}.out", out_dir, default_ntasks(script),
                      time.monotonic() + limit * 60 * 2 + 4 * SLURMCTLD_PERIOD)


def cancel(job_id: str) -> Optional[str]:
    """scancel (SIGTERM: stop, and do not requeue) and wait until Slurm has let go of the job;
    the job's state when it would not go, else None."""
    subprocess.run(["scancel", job_id], capture_output=True)
    for _ in range(90):
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if not state.stdout.strip():
            return None
        time.sleep(1)
    subprocess.run(["scancel", "--signal=KILL", "--full", job_id], capture_output=True)
    return state.stdout.strip() or "?"


@pytest.fixture(scope="module")
def requeue_jobs(slurm_cluster, tmp_path_factory):
    """Every script's endless run, submitted together at the first requeue test: each waits a
    minute or more for Slurm's warning, so they wait at the same time (the local cluster
    advertises enough CPUs for all of them at once). Whatever is left is cancelled at the end."""
    scripts = [s for s in job_scripts() if s in TINY_JOBS]
    needed = sum(default_ntasks(script) for script in scripts)
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, env=job_environment())
    cpus = max((int(v) for v in re.findall(r"\d+", sinfo.stdout)), default=0)
    if cpus < needed:
        pytest.fail(f"the requeue tests run {needed} tasks at once but the largest node advertises {cpus} CPUs; "
                    f"restart the local cluster ('slurm/local-cluster.sh down' then 'up': 24 by default) or set "
                    f"MPIPAR_SLURM_CPUS={needed}", pytrace=False)
    jobs = {script: submit_requeue_job(script, tmp_path_factory.mktemp(f"requeue-{Path(script).stem}"))
            for script in scripts}
    yield jobs
    for job in jobs.values():
        cancel(job.job_id)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in job_scripts() if s in TINY_JOBS])
def test_time_limit_requeues_and_resumes(requeue_jobs, script):
    """On the warning signal the job checkpoints and requeues itself; the requeued job
    (same id, same directory) resumes from the checkpoint and continues the metrics
    file: the rows of the first run end exactly at the checkpoint's step, the second
    run's begin right after it (no duplicated or missing steps).

    The run is endless on purpose (any machine speed gets the warning first); the
    test cancels it once the resumed run has flushed a few steps. Jobs are checked one
    after another, so a later one may have been requeued again by then: every restart
    of the metrics' clock must then be one of the log's resumes, in order."""
    job = tiny_job(script)
    run = requeue_jobs[script]
    resumed_at, rows = None, 0
    try:
        while time.monotonic() < run.deadline:
            text = run.log.read_text(errors="replace") if run.log.exists() else ""
            found = re.findall(r"resumed from \S+ at step (\d+)", text)
            if found:
                resumed_at = int(found[-1])
                try:
                    with h5py.File(run.out_dir / job.metrics, "r") as f:
                        rows = len(f["steps/loss"])
                except (OSError, KeyError):
                    rows = 0
                if rows >= resumed_at + 10:
                    break
            time.sleep(2)
    finally:
        stuck = cancel(run.job_id)
        if stuck is not None:
            pytest.fail(f"job {run.job_id} still in the queue after scancel (state {stuck}): "
                        f"a cancelled job must not requeue itself")
    text = run.log.read_text(errors="replace") if run.log.exists() else ""
    tail = "\n".join(text.splitlines()[-40:])
    assert resumed_at is not None, f"the job was never requeued and resumed within the wait:\n{tail}"
    assert "requeued Slurm job" in text and "SIGUSR1" in text, tail
    assert rows >= resumed_at + 10, f"the resumed run recorded only {rows - resumed_at} steps:\n{tail}"
    with h5py.File(run.out_dir / job.metrics, "r") as f:
        clock = f["steps/wall_clock"][()]
        assert int(f.attrs["world_size"]) == run.ntasks
    restarts = [i for i in range(1, len(clock)) if clock[i] < clock[i - 1]]
    resumes = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumes and restarts == resumes, (
        f"the metrics' clock restarts at rows {restarts}; a clean resume restarts it exactly at the "
        f"checkpoint's step, and the log's resumes are at steps {resumes}")
