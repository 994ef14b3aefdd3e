"""Checkpoints: atomic, latest wins, written by the ranks that hold state (resuming jobs: tests/test_resume.py)."""


from pathlib import Path

import pytest
import torch

from mpi_helpers import ROOT, assert_all_ranks
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
    empty, _ = checkpoints.resume()
    for step in (3, 7, 11):
        checkpoints.save(step, {"step": step, "rank": comm.Get_rank(), "tensor": torch.arange(3.0) * step})
    latest, state = checkpoints.resume()
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
    warnings = []
    latest, state = checkpoints.resume(warn=warnings.append)
    assert latest.name == "step-000000004" and state["step"] == 4
    assert len(warnings) == 1 and "step-000000010: meta.json is missing" in warnings[0]


@pytest.mark.mpi(min_size=2)
def test_per_rank_checkpoint_on_another_number_of_ranks_is_marked_for_relayout(comm, mpi_tmp_path):
    """Files per rank read by another number of ranks: every rank gets rank 0's state, marked, so
    the strategy rebuilds its part from all the files; on the same ranks, each its own."""
    from mpi4py import MPI

    directory = shared_dir(comm, mpi_tmp_path)
    Checkpointer(directory, comm, per_rank=True).save(1, {"rank": comm.Get_rank()})
    comm.Barrier()
    _, own = Checkpointer(directory, comm).resume()
    _, alone = Checkpointer(directory, MPI.COMM_SELF).resume()
    assert_all_ranks(comm, own == {"rank": comm.Get_rank()} and alone == {"rank": 0, "relayout": True},
                     f"{own} {alone}")


def test_import_refuses_a_torch_older_than_the_stated_minimum(monkeypatch):
    """Checkpoints need ``torch.serialization.safe_globals`` (torch 2.5): an older torch fails at import,
    once, with the versions in the message; setup.cfg states the same minimum."""
    import configparser
    import importlib
    import importlib.metadata

    import mpipar

    requires = configparser.ConfigParser()
    requires.read(ROOT / "setup.cfg")
    assert "torch>=2.5" in requires["options"]["install_requires"].split()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.1+cpu" if name == "torch" else "1.0")
    try:
        with pytest.raises(ImportError, match=r"needs torch >= 2\.5.*2\.4\.1\+cpu is installed"):
            importlib.reload(mpipar)
    finally:
        monkeypatch.undo()
        importlib.reload(mpipar)
    assert hasattr(torch.serialization, "safe_globals")


def test_publish_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The rename into place is made durable: the checkpoints' directory is fsynced after it."""
    import os

    from mpi4py import MPI

    import mpipar.run.checkpoint as checkpoint

    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def record_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def record_fsync(fd):
        events.append(("fsync", opened.get(fd)))
        return real_fsync(fd)

    def record_replace(source, target):
        real_replace(source, target)
        events.append(("replace", Path(target)))

    monkeypatch.setattr(checkpoint.os, "open", record_open)
    monkeypatch.setattr(checkpoint.os, "fsync", record_fsync)
    monkeypatch.setattr(checkpoint.os, "replace", record_replace)
    Checkpointer(tmp_path, MPI.COMM_SELF).save(5, {"step": 5})
    renamed = events.index(("replace", tmp_path / "step-000000005"))
    assert ("fsync", tmp_path) in events[renamed + 1:], events
