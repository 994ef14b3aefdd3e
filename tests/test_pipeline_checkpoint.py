"""Pipeline jobs survive faults: each rank checkpoints its stages, and a killed, signalled or
requeued run resumes to the bitwise state of a run never interrupted."""

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, mpirun_command, run_mpi
from mpipar.run.checkpoint import check_same_run
from mpipar.run.launch import requeue_slurm_job

RUN = ("--data", "synthetic", "--threads", "1", "--flush-every", "3", "--max-steps", "12", "--checkpoint-every", "5",
       "--epochs", "1")
STEPS = 12
JOBS = {  # name: (ranks, arguments)
    "mlp_mp": (2, ("--batch-size", "16")),
    "resnet_hybrid": (4, ("--batch-size", "8", "--stages", "2", "--microbatches", "2")),  # 2 pipelines x 2 stages
    "resnet_pp": (3, ("--batch-size", "16", "--schedule", "gpipe", "--microbatches", "4", "--balance", "auto")),
}


def run_job(job, out, *args, env=None, timeout=300):
    ranks, job_args = JOBS[job]
    return run_mpi(ranks, str(ROOT / "jobs" / f"{job}.py"), *RUN, *job_args, "--out", str(out), *args, env=env,
                   timeout=timeout)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run of a job (run once per job for this module)."""
    done = {}

    def get(job):
        if job not in done:
            out = tmp_path_factory.mktemp(job) / "straight"
            result = run_job(job, out)
            assert result.returncode == 0, result.stdout + result.stderr
            done[job] = out
        return done[job]

    return get


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_same_as_uninterrupted(straight, resumed, ranks):
    """Every rank's final checkpoint and the whole metrics file equal the uninterrupted run's."""
    for rank in range(ranks):
        a, b = (torch.load(out / "checkpoints" / f"step-{STEPS:09d}" / f"rank-{rank}.pt", weights_only=False)
                for out in (straight, resumed))
        assert (a["step"], a["placement"]) == (b["step"], b["placement"])
        assert a["model"].keys() == b["model"].keys() and a["model"], rank
        for key, value in a["model"].items():  # parameters and BatchNorm statistics
            assert torch.equal(value, b["model"][key]), (rank, key)
        states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
        assert states_a.keys() == states_b.keys() and states_a, rank
        for index, state in states_a.items():
            assert torch.equal(state["momentum_buffer"], states_b[index]["momentum_buffer"]), (rank, index)
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"] == STEPS
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    with h5py.File(straight / "metrics.h5") as fa, h5py.File(resumed / "metrics.h5") as fb:
        assert fb["steps/loss"].shape == (STEPS,)  # no duplicated or missing steps
        for key in ("steps/loss", "steps/rank_loss", "steps/samples", "epochs/train_loss", "epochs/test_loss",
                    "epochs/test_accuracy", "epochs/last_step"):
            assert np.array_equal(fa[key][...], fb[key][...]), key


@pytest.mark.parametrize("job,fault", [("mlp_mp", "8"), ("resnet_hybrid", "8:1"), ("resnet_pp", "7:0")])
def test_killed_then_resumed_pipeline_equals_uninterrupted_run(straight_run, tmp_path, job, fault):
    interrupted = tmp_path / "interrupted"
    killed = run_job(job, interrupted, env={"MPIPAR_FAULT_AT_STEP": fault})
    assert killed.returncode != 0 and "MPIPAR_FAULT_AT_STEP" in killed.stderr, killed.stdout + killed.stderr
    assert checkpoints(interrupted) == ["step-000000005"]
    with h5py.File(interrupted / "metrics.h5") as f:
        assert len(f["steps/loss"]) >= 5  # rows flushed after the checkpoint are dropped on resume

    resumed = run_job(job, interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5 (epoch 1, step 5 of it)" in resumed.stdout
    if "auto" in JOBS[job][1]:  # profiling is not repeated: the resumed run keeps the checkpoint's placement
        assert "auto balance" in killed.stdout and "auto balance" not in resumed.stdout
        placement = torch.load(interrupted / "checkpoints" / f"step-{STEPS:09d}" / "rank-0.pt",
                               weights_only=False)["placement"]
        straight = tmp_path / "straight"  # another profile could choose another split: give this one
        balance = ",".join(str(placement.count(rank)) for rank in range(JOBS[job][0]))
        result = run_job(job, straight, "--balance", balance)
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        straight = straight_run(job)
    assert_same_as_uninterrupted(straight, interrupted, JOBS[job][0])


def rank_pid(job_pid, rank, script):
    """The pid of MPI rank ``rank`` running ``script`` under the mpirun ``job_pid`` (None until it runs)."""
    for pid in subprocess.run(["pgrep", "-f", script], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(pid) != job_pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(pid)
    return None


def catches(pid, signum):
    """Whether process ``pid`` has installed a handler for ``signum`` (Linux)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank processes through /proc")
def test_stop_signal_checkpoints_requeues_and_resumes(straight_run, tmp_path):
    """Slurm's warning signal on one rank while the job starts: every rank stops at the
    first flush, saves, rank 0 runs 'scontrol requeue', and the resumed run is exact."""
    fake_bin, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    out, script = tmp_path / "signalled", str(ROOT / "jobs" / "mlp_mp.py")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", SLURM_JOB_ID="4242", PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    command = mpirun_command(2, script, *RUN, *JOBS["mlp_mp"][1], "--out", str(out), "--resume", "--requeue")
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline, target = time.monotonic() + 60, None
        while target is None or not catches(target, signal.SIGUSR1):  # the job's first lines have run
            assert time.monotonic() < deadline and job.poll() is None, "rank 1 never installed its handler"
            target = target or rank_pid(job.pid, 1, script)
            time.sleep(0.02)
        os.kill(target, signal.SIGUSR1)
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, output
    assert "stopping early: a stop was requested on another rank" in output, output
    assert checkpoints(out) == ["step-000000003"]  # the first flush
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in output

    resumed = run_job("mlp_mp", out, "--resume", "--requeue")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 3" in resumed.stdout and "stopping early" not in resumed.stdout
    assert_same_as_uninterrupted(straight_run("mlp_mp"), out, JOBS["mlp_mp"][0])


def test_resume_with_other_settings_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    killed = run_job("mlp_mp", out, env={"MPIPAR_FAULT_AT_STEP": "6"})
    assert killed.returncode != 0 and checkpoints(out) == ["step-000000005"]

    again = run_job("mlp_mp", out)  # without --resume: the earlier run is not overwritten
    assert again.returncode != 0 and "holds an earlier run" in again.stdout + again.stderr

    other = run_job("mlp_mp", out, "--resume", "--lr", "0.3", "--schedule", "1f1b", timeout=120)
    output = other.stdout + other.stderr
    assert other.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "other settings" in line]
    assert len(lines) == 1, output
    assert "lr: checkpoint 0.05, now 0.3" in lines[0] and "schedule: checkpoint 'naive', now '1f1b'" in lines[0]
    assert checkpoints(out) == ["step-000000005"]  # nothing destroyed

    fewer = run_mpi(4, str(ROOT / "jobs" / "mlp_mp.py"), *RUN, *JOBS["mlp_mp"][1], "--out", str(out), "--resume",
                    timeout=120)
    output = fewer.stdout + fewer.stderr
    assert fewer.returncode != 0 and output.count("was written by 2 ranks, this run has 4") == 1, output


def test_check_same_run_ignores_free_settings_and_names_the_others():
    saved = {"lr": 0.1, "threads": 2, "out": "a", "schedule": "gpipe", "stages": 2}
    check_same_run(saved, {**saved, "threads": 8, "out": "b", "flush_every": 7})
    with pytest.raises(ValueError, match=r"^the checkpoint was written with other settings: lr: checkpoint 0.1, "
                                         r"now 0.2, stages: checkpoint 2, now None; resume with the same flags$"):
        check_same_run(saved, {"lr": 0.2, "threads": 2, "out": "a", "schedule": "gpipe"})


def test_requeue_runs_scontrol_on_rank_0_only_under_slurm(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    said = []
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={})
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={"SLURM_JOB_ID": "77"})
    assert said == ["--requeue: not running under Slurm; nothing to requeue", "requeued Slurm job 77"]
    assert (tmp_path / "calls").read_text() == "requeue 77\n"
