"""A failing or dying rank ends the job promptly; it never leaves the others waiting."""

import os
import signal
import subprocess
import time

import h5py
import pytest

from mpi_helpers import ROOT, mpirun_command, run_mpi

SCENARIOS = ROOT / "tests" / "scenarios"


@pytest.mark.launch
def test_exception_on_one_rank_ends_the_job_printed_once():
    start = time.monotonic()
    result = run_mpi(3, str(SCENARIOS / "one_rank_raises.py"), timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    output = result.stdout + result.stderr
    assert "unreachable" not in output
    assert output.count("ZeroDivisionError: deliberate failure on rank 1") == 1, output
    assert "[rank 1/3]" in output and "rank 1 of 3 failed" in output


@pytest.mark.launch
def test_failed_assertion_on_one_rank_fails_the_pytest_mpi_run():
    result = run_mpi(2, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                     str(SCENARIOS / "one_rank_fails_assert.py"), timeout=90)
    assert result.returncode != 0
    assert "deliberate failure on the last rank" in result.stdout + result.stderr


@pytest.mark.launch
def test_sigkill_of_one_rank_ends_the_job_and_leaves_metrics_readable(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    command = mpirun_command(2, str(ROOT / "jobs" / "resnet_dp.py"), "--data", "synthetic", "--epochs", "50",
                             "--batch-size", "16", "--flush-every", "2", "--out", str(out), "--threads", "1")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with h5py.File(out / "metrics.h5", "r") as f:
                    if "steps/loss" in f and len(f["steps/loss"]) >= 4:
                        break
            except (OSError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the job never flushed 4 steps")
        ranks = subprocess.run(["pgrep", "-f", "-P", str(job.pid), "resnet_dp.py"], capture_output=True,
                               text=True).stdout.split()
        if not ranks:  # ranks are grandchildren under some launchers
            ranks = subprocess.run(["pgrep", "-f", f"resnet_dp.py.*{out}"], capture_output=True,
                                   text=True).stdout.split()
            ranks = [pid for pid in ranks if int(pid) != job.pid]
        assert ranks, "could not find the rank processes"
        killed_at = time.monotonic()
        os.kill(int(ranks[-1]), signal.SIGKILL)
        job.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    with h5py.File(out / "metrics.h5", "r") as f:
        assert len(f["steps/loss"]) >= 4
        assert f["steps/compute_time"].shape[1] == 2
