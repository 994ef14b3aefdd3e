"""Every job survives faults through the one training loop: killed, signalled or requeued runs resume to
the bitwise state of a run never interrupted, and a resume with other settings or ranks is refused.

Each test is one body, parametrised over every job in ``JOBS``.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, mpirun_command, run_mpi
from mpipar.run.checkpoint import check_same_run, verify_file
from mpipar.run.launch import requeue_slurm_job

RUN = ("--data", "synthetic", "--threads", "1", "--flush-every", "3", "--max-steps", "12", "--checkpoint-every", "5",
       "--epochs", "1")
STEPS = 12
JOBS = {  # name: (script, ranks, arguments, MPIPAR_FAULT_AT_STEP)
    "resnet_dp": ("resnet_dp.py", 2, ("--batch-size", "16"), "8"),
    "mlp_mp": ("mlp_mp.py", 2, ("--batch-size", "16"), "8"),  # fc1, fc4 | fc2, fc3: non-contiguous
    "resnet_pp": ("resnet_pp.py", 3, ("--batch-size", "16", "--schedule", "gpipe", "--microbatches", "4",
                                      "--balance", "auto"), "7:0"),
    "resnet_hybrid": ("resnet_pp.py", 4, ("--batch-size", "8", "--stages", "2", "--microbatches", "2"), "8:1"),
    "mlp_tp": ("mlp_tp.py", 2, ("--batch-size", "16", "--tp", "2"), "8:0"),  # every layer split over both ranks
    "mlp_tp_pp": ("mlp_tp.py", 4, ("--batch-size", "16", "--tp", "2", "--stages", "2"), "8:3"),  # 2 stages x 2
    "vit_tp": ("vit_tp.py", 2, ("--batch-size", "16", "--tp", "2"), "8:0"),  # heads and MLP split
    # local SGD: a synchronous step, then averages after steps 4, 7 and 10 (counted from 1) and at the epoch end,
    # with DiLoCo's outer momentum; the checkpoints of steps 3 and 5 fall between averages (the ranks' models
    # differ), the one of step 5 after the outer momentum began
    "resnet_dp_local_sgd": ("resnet_dp.py", 2, ("--batch-size", "16", "--sync-every", "3", "--local-warmup", "1",
                                                "--outer-lr", "0.7", "--outer-momentum", "0.5"), "8"),
    # the synchronous parameter server: 1 server, 2 workers; the fault kills a worker
    "resnet_ps": ("resnet_ps.py", 3, ("--batch-size", "8", "--mode", "sync"), "8:2"),
}
OTHER_RANKS = {"resnet_dp": 3, "mlp_mp": 4, "resnet_pp": 2, "resnet_hybrid": 2,  # a resume on another allocation
               "mlp_tp": 4, "mlp_tp_pp": 8, "vit_tp": 4,  # tensor-parallel ones refused (SAME_RANKS_ONLY)
               "resnet_dp_local_sgd": 3, "resnet_ps": 4}
SAME_RANKS_ONLY = {  # jobs whose checkpoint resumes only on the ranks that wrote it: the refusal
    "mlp_tp": "a tensor-parallel checkpoint resumes only on the ranks that wrote it",
    "mlp_tp_pp": "a checkpoint with tensor-parallel stages resumes only on the layout that wrote it",
    "vit_tp": "a tensor-parallel checkpoint resumes only on the ranks that wrote it",
    "resnet_dp_local_sgd": "a local-SGD checkpoint resumes only on the number of ranks that wrote it",
    "resnet_ps": "a parameter-server checkpoint resumes only on the ranks and --servers that wrote it",
}
OTHER_SETTINGS = {  # name: (a flag that changes results, and how the refusal names it); --lr is changed too
    "resnet_dp": (("--model", "resnet18"), "model: checkpoint 'resnet-small', now 'resnet18'", 0.1),
    "mlp_mp": (("--schedule", "1f1b"), "schedule: checkpoint 'naive', now '1f1b'", 0.05),
    "resnet_pp": (("--schedule", "1f1b"), "schedule: checkpoint 'gpipe', now '1f1b'", 0.05),
    "resnet_hybrid": (("--schedule", "gpipe"), "schedule: checkpoint '1f1b', now 'gpipe'", 0.05),
    "mlp_tp": (("--tp", "1"), "tp: checkpoint 2, now 1", 0.05),
    "mlp_tp_pp": (("--schedule", "gpipe"), "schedule: checkpoint '1f1b', now 'gpipe'", 0.05),
    "vit_tp": (("--model", "vit-small"), "model: checkpoint 'vit-tiny', now 'vit-small'", 0.05),
    "resnet_dp_local_sgd": (("--sync-every", "2"), "sync_every: checkpoint 3, now 2", 0.1),
    "resnet_ps": (("--mode", "async"), "mode: checkpoint 'sync', now 'async'", 0.1),
}


def run_job(job, out, *args, env=None, ranks=None, timeout=300):
    script, default_ranks, job_args, _ = JOBS[job]
    return run_mpi(ranks or default_ranks, str(ROOT / "jobs" / script), *RUN, *job_args, "--out", str(out), *args,
                   env=env, timeout=timeout)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run of a job, without mid-epoch checkpoints (so saving one must not change
    the run), run once per job and balance for this module."""
    done = {}

    def get(job, *args):
        if (job, args) not in done:
            out = tmp_path_factory.mktemp(job) / "straight"
            result = run_job(job, out, "--checkpoint-every", "0", *args)
            assert result.returncode == 0, result.stdout + result.stderr
            done[job, args] = out
        return done[job, args]

    return get


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A copy of the job's run killed by ``MPIPAR_FAULT_AT_STEP`` after its checkpoint of step 5,
    killed once per job for this module (the tests resume or refuse copies of it)."""
    done = {}

    def get(job, destination):
        if job not in done:
            out = tmp_path_factory.mktemp(job) / "killed"
            killed = run_job(job, out, env={"MPIPAR_FAULT_AT_STEP": JOBS[job][3]})
            assert killed.returncode != 0 and "MPIPAR_FAULT_AT_STEP" in killed.stderr, killed.stdout + killed.stderr
            assert checkpoints(out) == ["step-000000005"]
            with h5py.File(out / "metrics.h5") as f:
                assert len(f["steps/loss"]) >= 5  # rows flushed after the checkpoint are dropped on resume
            done[job] = out, killed.stdout
        shutil.copytree(done[job][0], destination)
        return done[job][1]

    return get


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def final_states(out):
    """Every file of the final checkpoint (one per rank for partitions, rank 0's for replicas)."""
    directory = out / "checkpoints" / f"step-{STEPS:09d}"
    return [torch.load(path, weights_only=True) for path in sorted(directory.glob("rank-*.pt"))]


def assert_same_as_uninterrupted(straight, resumed):
    """Every checkpoint file of the final step and the whole metrics file equal the uninterrupted run's."""
    states_a, states_b = final_states(straight), final_states(resumed)
    assert len(states_a) == len(states_b) >= 1
    if "resnet" in straight.parent.name:  # BatchNorm statistics are compared too
        assert any("running_mean" in key for state in states_a for key in state["model"])
    for a, b in zip(states_a, states_b):
        assert (a["step"], a.get("placement")) == (b["step"], b.get("placement"))
        assert a["model"].keys() == b["model"].keys() and a["model"]
        for key, value in a["model"].items():  # parameters and BatchNorm statistics
            assert torch.equal(value, b["model"][key]), key
        for rank, (buffers_a, buffers_b) in enumerate(zip(a.get("rank_buffers") or [], b.get("rank_buffers") or [])):
            for key, value in buffers_a.items():  # every replica's own statistics
                assert torch.equal(value, buffers_b[key]), (rank, key)
        optimizer_a, optimizer_b = a["optimizer"]["state"], b["optimizer"]["state"]
        holds_parameters = not (a.get("parameter_server") and a["parameter_server"]["version"] is None)
        assert optimizer_a.keys() == optimizer_b.keys() and (optimizer_a or not holds_parameters)  # a PS worker
        for index, state in optimizer_a.items():
            assert torch.equal(state["momentum_buffer"], optimizer_b[index]["momentum_buffer"]), index
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"] == STEPS
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    with h5py.File(straight / "metrics.h5") as fa, h5py.File(resumed / "metrics.h5") as fb:
        assert fb["steps/loss"].shape == (STEPS,)  # no duplicated or missing steps
        for key in ("steps/loss", "steps/rank_loss", "steps/samples", "epochs/train_loss", "epochs/test_loss",
                    "epochs/test_accuracy", "epochs/last_step"):
            assert np.array_equal(fa[key][...], fb[key][...]), key


def same_split(job, out):
    """Arguments that make a straight run use the interrupted run's placement (auto balance could
    profile another split on a second run)."""
    if "auto" not in JOBS[job][2]:
        return ()
    placement = final_states(out)[0]["placement"]
    return ("--balance", ",".join(str(placement.count(rank)) for rank in range(JOBS[job][1])))


@pytest.mark.launch
@pytest.mark.parametrize("job", JOBS)
def test_killed_then_resumed_run_equals_uninterrupted_run(straight_run, killed_run, tmp_path, job):
    interrupted = tmp_path / "interrupted"
    killed_output = killed_run(job, interrupted)
    resumed = run_job(job, interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5 (epoch 1, step 5 of it)" in resumed.stdout
    if "auto" in JOBS[job][2]:  # profiling is not repeated: the resumed run keeps the checkpoint's placement
        assert "auto balance" in killed_output and "auto balance" not in resumed.stdout
    assert_same_as_uninterrupted(straight_run(job, *same_split(job, interrupted)), interrupted)


@pytest.mark.launch
@pytest.mark.parametrize("job", JOBS)
def test_resume_with_other_settings_is_refused_and_on_other_ranks_goes_on(killed_run, tmp_path, job):
    out = tmp_path / "run"
    killed_run(job, out)
    if job in ("resnet_dp", "resnet_pp"):  # the loop's check, with one checkpoint file and with one per rank
        again = run_job(job, out, timeout=120)  # without --resume: the earlier run is not overwritten
        assert again.returncode != 0 and "holds an earlier run" in again.stdout + again.stderr

    flags, named, lr = OTHER_SETTINGS[job]
    other = run_job(job, out, "--resume", "--lr", "0.3", *flags, timeout=120)
    output = other.stdout + other.stderr
    assert other.returncode != 0 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "other settings" in line]
    assert len(lines) == 1, output
    assert f"lr: checkpoint {lr}, now 0.3" in lines[0] and named in lines[0], lines[0]

    assert checkpoints(out) == ["step-000000005"]  # nothing destroyed

    ranks, other = JOBS[job][1], OTHER_RANKS[job]
    moved = run_job(job, out, "--resume", ranks=other, timeout=240)
    output = moved.stdout + moved.stderr
    if job in SAME_RANKS_ONLY:  # refused on every rank together (exit 2: no abort), once, and nothing spoiled
        assert moved.returncode == 2 and "Traceback" not in output, output
        assert len([line for line in output.splitlines() if SAME_RANKS_ONLY[job] in line]) == 1, output
        assert checkpoints(out) == ["step-000000005"]
        assert len(list((out / "checkpoints" / "step-000000005").glob("rank-*.pt"))) == ranks
        saved = out / "checkpoints" / "step-000000005"  # every rank's file intact against meta.json
        meta = json.loads((saved / "meta.json").read_text())
        damaged = [problem for name, entry in meta["files"].items() if (problem := verify_file(saved / name, entry))]
        assert meta["step"] == 5 and not damaged, damaged
        with h5py.File(out / "metrics.h5") as f:
            assert len(f["steps/loss"]) >= 5 and int(f.attrs["world_size"]) == ranks
        return
    assert moved.returncode == 0, output
    assert "resumed from" in output and "at step 5" in output, output
    if JOBS[job][0] != "resnet_dp.py":  # files per rank: model and optimizer re-laid out on the new placement
        assert "re-laid out the checkpoint's placement" in output, output
    with h5py.File(out / "metrics.h5") as f:
        assert f["steps/world_size"][...].tolist() == [ranks] * 5 + [other] * (STEPS - 5)
        assert f["steps/comm_time"].shape == (STEPS, max(ranks, other))


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


@pytest.mark.launch
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank processes through /proc")
@pytest.mark.parametrize("job", JOBS)
def test_stop_signal_checkpoints_requeues_and_resumes(straight_run, tmp_path, job):
    """Slurm's warning signal on rank 1 while the job starts: every rank stops at the
    first flush, saves, rank 0 runs 'scontrol requeue', and the resumed run is exact."""
    fake_bin, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    script, ranks, job_args, _ = JOBS[job]
    out, path = tmp_path / "signalled", str(ROOT / "jobs" / script)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", SLURM_JOB_ID="4242", PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    command = mpirun_command(ranks, path, *RUN, *job_args, "--out", str(out), "--resume", "--requeue")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT)
    try:
        deadline, target = time.monotonic() + 60, None
        while target is None or not catches(target, signal.SIGUSR1):  # the job's first lines have run
            assert time.monotonic() < deadline and process.poll() is None, "rank 1 never installed its handler"
            target = target or rank_pid(process.pid, 1, path)
            time.sleep(0.02)
        os.kill(target, signal.SIGUSR1)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopping early: a stop was requested on another rank" in output, output
    assert checkpoints(out) == ["step-000000003"]  # the first flush
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in output

    resumed = run_job(job, out, "--resume", "--requeue")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 3" in resumed.stdout and "stopping early" not in resumed.stdout
    assert_same_as_uninterrupted(straight_run(job, *same_split(job, out)), out)


def test_check_same_run_ignores_free_settings_and_names_the_others():
    saved = {"lr": 0.1, "threads": 2, "out": "a", "schedule": "gpipe", "microbatches": 2, "stages": 2,
             "balance": "even", "placement": None}
    # free: threads, logging, output, and a pipeline's layout (re-laid out on resume)
    check_same_run(saved, {**saved, "threads": 8, "out": "b", "flush_every": 7, "stages": 3, "balance": (2, 2, 1),
                           "placement": (0, 1, 1)})
    with pytest.raises(ValueError, match=r"^the checkpoint was written with other settings: lr: checkpoint 0.1, "
                                         r"now 0.2, microbatches: checkpoint 2, now None; resume with the same flags$"):
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
