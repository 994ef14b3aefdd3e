"""Checkpoints: atomic, latest wins, and interrupt + resume equals a run never interrupted."""


import h5py
import numpy as np
import pytest
import torch

from mpi_helpers import ROOT, assert_all_ranks, run_mpi
from mpipar.run.checkpoint import Checkpointer

JOB = str(ROOT / "jobs" / "resnet_dp.py")
RUN = ("--data", "synthetic", "--batch-size", "16", "--threads", "1", "--flush-every", "3", "--max-steps", "12",
       "--checkpoint-every", "5")


def shared_dir(comm, tmp_path):
    return comm.bcast(str(tmp_path) if comm.Get_rank() == 0 else None, root=0)


@pytest.mark.mpi
@pytest.mark.parametrize("per_rank", [False, True])
def test_save_latest_load_and_prune(comm, mpi_tmp_path, per_rank):
    directory = shared_dir(comm, mpi_tmp_path)
    checkpoints = Checkpointer(directory, comm, per_rank=per_rank, keep=2)
    empty = checkpoints.latest()
    for step in (3, 7, 11):
        checkpoints.save(step, {"step": step, "rank": comm.Get_rank(), "tensor": torch.arange(3.0) * step})
    latest = checkpoints.latest()
    state = checkpoints.load(latest)
    expected_rank = comm.Get_rank() if per_rank else 0
    kept = sorted(p.name for p in latest.parent.iterdir())
    assert_all_ranks(comm, empty is None and latest.name == "step-000000011" and state["step"] == 11
                     and state["rank"] == expected_rank and torch.equal(state["tensor"], torch.arange(3.0) * 11)
                     and kept == ["step-000000007", "step-000000011"], f"{latest} {state} {kept}")


def test_half_written_checkpoint_is_ignored(tmp_path):
    from mpi4py import MPI

    checkpoints = Checkpointer(tmp_path, MPI.COMM_SELF)
    checkpoints.save(4, {"step": 4})
    (tmp_path / "step-000000009.tmp-deadbeef").mkdir()   # a crash while writing step 9
    (tmp_path / "step-000000009.tmp-deadbeef" / "rank-0.pt").write_bytes(b"partial")
    (tmp_path / "step-000000010").mkdir()                # renamed but without meta: not complete
    assert checkpoints.latest().name == "step-000000004"
    assert checkpoints.load(checkpoints.latest())["step"] == 4


@pytest.mark.mpi(min_size=2)
def test_per_rank_checkpoint_needs_same_world_size(comm, mpi_tmp_path):
    from mpi4py import MPI

    directory = shared_dir(comm, mpi_tmp_path)
    Checkpointer(directory, comm, per_rank=True).save(1, {"x": 1})
    comm.Barrier()
    with pytest.raises(ValueError, match=f"written by {comm.Get_size()} ranks"):
        Checkpointer(directory, MPI.COMM_SELF, per_rank=True).load(Checkpointer(directory, comm).latest())


def final_state(out):
    return torch.load(out / "checkpoints" / "step-000000012" / "rank-0.pt", weights_only=False)


def test_killed_then_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    # without the mid-epoch checkpoint: saving one (BatchNorm buffers included) must not change the run
    result = run_mpi(2, JOB, *RUN, "--checkpoint-every", "0", "--out", str(straight), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

    killed = run_mpi(2, JOB, *RUN, "--out", str(interrupted), env={"MPIPAR_FAULT_AT_STEP": "8"}, timeout=240)
    assert killed.returncode != 0
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step-000000005"]

    refused = run_mpi(2, JOB, *RUN, "--out", str(interrupted), timeout=120)  # without --resume: refused
    assert refused.returncode != 0 and "holds an earlier run" in refused.stdout + refused.stderr

    resumed = run_mpi(2, JOB, *RUN, "--out", str(interrupted), "--resume", timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout

    a, b = final_state(straight), final_state(interrupted)
    assert any("running_mean" in key for key in a["model"])  # BatchNorm statistics are compared too
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    with h5py.File(straight / "metrics.h5") as fa, h5py.File(interrupted / "metrics.h5") as fb:
        assert fb["steps/loss"].shape == (12,)  # no duplicated or missing steps
        assert np.array_equal(fa["steps/loss"][...], fb["steps/loss"][...])
        assert np.array_equal(fa["epochs/test_accuracy"][...], fb["epochs/test_accuracy"][...])


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    first = run_mpi(2, JOB, *RUN, "--out", str(out), env={"MPIPAR_FAULT_AT_STEP": "6"}, timeout=240)
    assert first.returncode != 0
    other = run_mpi(2, JOB, *RUN, "--out", str(out), "--resume", "--lr", "0.3", timeout=240)
    output = other.stdout + other.stderr
    assert other.returncode != 0 and "other settings" in output and "lr" in output, output
    more = run_mpi(3, JOB, *RUN, "--out", str(out), "--resume", timeout=240)
    output = more.stdout + more.stderr
    assert more.returncode != 0 and "Traceback" not in output, output
    assert output.count("was written by 2 ranks, this run has 3") == 1, output
    assert (out / "checkpoints" / "step-000000005").is_dir()  # nothing destroyed
