"""Checkpoints users can trust: damaged ones are skipped for the newest intact one, a full disk leaves the
earlier ones usable, and nothing but tensors and plain values is ever unpickled."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpi_helpers import assert_all_ranks
from mpipar import models
from mpipar.data import synthetic
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.checkpoint import Checkpointer, file_digest, read_state
from mpipar.run.config import TrainConfig
from mpipar.run.loop import train
from mpipar.run.session import Session

STEPS = 6  # checkpoints every 2 steps: step-4 and step-6 are kept


def shared(comm, path) -> Path:
    return Path(comm.bcast(str(path) if comm.Get_rank() == 0 else None, root=0))


def run(comm, out, kind, resume=False, resume_from=None):
    """The training loop for STEPS steps (an MLP): data parallel, or a pipeline of one stage per rank
    (one checkpoint file per rank). Returns the model and the session."""
    torch.manual_seed(3)
    model = models.mlp([784, 16, 12, 10])
    config = TrainConfig(data="synthetic", epochs=1, max_steps=STEPS, batch_size=4, lr=0.05, threads=1, out=str(out),
                         model="mlp", flush_every=2, log_every=0, checkpoint_every=2)
    splits = synthetic(200, 40, seed=0)
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=comm.Get_size()) if kind == "pipeline" else None
    session = Session(comm, config, settings=settings, resume=resume, resume_from=resume_from)
    if kind == "pipeline":
        strategy = PipelineStrategy(comm, model, settings, batch_size=4, state=session.state, say=session.say)
    else:
        strategy = DataParallelStrategy(model, comm)
    train(session, strategy, splits)
    return model, session


def damage(checkpoint: Path, how: str, rank: int) -> None:
    """Spoil one rank's part of ``checkpoint`` as a full disk, a bad copy or a dying node would."""
    meta, target = checkpoint / "meta.json", checkpoint / f"rank-{rank}.pt"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif how == "flipped":
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0xFF  # same size: only the checksum can tell
        target.write_bytes(bytes(data))
    elif how == "missing":
        target.unlink()
    elif how == "no metadata":
        meta.unlink()


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["data_parallel", "pipeline"])
@pytest.mark.parametrize("how", ["truncated", "flipped", "missing", "no metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(comm, mpi_tmp_path, kind, how):
    size, rank = comm.Get_size(), comm.Get_rank()
    out = shared(comm, mpi_tmp_path) / "run"
    straight, _ = run(comm, out, kind)
    newest = out / "checkpoints" / f"step-{STEPS:09d}"
    if rank == 0:  # the last rank's file, which only that rank reads in a pipeline
        damage(newest, how, size - 1 if kind == "pipeline" else 0)
    comm.Barrier()
    resumed, session = run(comm, out, kind, resume=True)
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert_all_ranks(comm, session.resumed_from.name == "step-000000004" and session.state["step"] == 4,
                     f"resumed from {session.resumed_from}")
    assert_all_ranks(comm, same, "the run resumed from the previous checkpoint ends elsewhere than the straight run")


@pytest.mark.mpi
def test_no_intact_checkpoint_is_one_error_and_nothing_is_removed(comm, mpi_tmp_path):
    out = shared(comm, mpi_tmp_path) / "run"
    run(comm, out, "data_parallel")
    checkpoints = sorted((out / "checkpoints").iterdir())
    if comm.Get_rank() == 0:
        damage(checkpoints[0], "flipped", 0)
        damage(checkpoints[1], "truncated", 0)
    comm.Barrier()
    before = {path: path.read_bytes() for c in checkpoints for path in c.iterdir()}
    with pytest.raises(ValueError, match="no intact checkpoint") as caught:
        run(comm, out, "data_parallel", resume=True)
    message = str(caught.value)
    assert_all_ranks(comm, "step-000000004: rank-0.pt does not match its SHA-256" in message
                     and "step-000000006: rank-0.pt has" in message, message)
    assert_all_ranks(comm, all(path.read_bytes() == data for path, data in before.items()), "a checkpoint changed")


@pytest.mark.mpi
def test_resume_from_names_the_checkpoint_and_refuses_a_damaged_one(comm, mpi_tmp_path):
    out = shared(comm, mpi_tmp_path) / "run"
    straight, _ = run(comm, out, "data_parallel")
    older = out / "checkpoints" / "step-000000004"
    _, session = run(comm, out, "data_parallel", resume_from=str(older))
    assert_all_ranks(comm, session.resumed_from == older and session.state["step"] == 4)
    if comm.Get_rank() == 0:
        damage(older, "missing", 0)
    comm.Barrier()
    with pytest.raises(ValueError, match=r"--resume-from .*step-000000004: rank-0.pt is missing"):
        run(comm, out, "data_parallel", resume_from=str(older))


class NotMpiparState:
    """An object mpipar never stores: unpickling it means importing and calling this module's code."""


def test_a_file_with_other_pickled_objects_is_refused(tmp_path):
    torch.save({"model": {}, "extra": NotMpiparState()}, tmp_path / "rank-0.pt")
    with pytest.raises(ValueError, match="holds objects mpipar does not store.*refusing to unpickle"):
        read_state(tmp_path / "rank-0.pt")
    # in a checkpoint whose checksums match, it is skipped like a damaged one, naming why
    checkpoint = tmp_path / "checkpoints" / "step-000000001"
    checkpoint.mkdir(parents=True)
    shutil.move(tmp_path / "rank-0.pt", checkpoint / "rank-0.pt")
    meta = {"format": 2, "step": 1, "world_size": 1, "per_rank": False,
            "files": {"rank-0.pt": file_digest(checkpoint / "rank-0.pt")}}
    (checkpoint / "meta.json").write_text(__import__("json").dumps(meta))
    warnings = []
    with pytest.raises(ValueError, match="no intact checkpoint.*refusing to unpickle"):
        Checkpointer(tmp_path / "checkpoints", MPI.COMM_SELF).resume(warn=warnings.append)
    assert len(warnings) == 1 and "holds objects mpipar does not store" in warnings[0]


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.mpi
def test_full_disk_during_a_write_is_one_error_and_leaves_the_previous_checkpoint(comm, mpi_tmp_path):
    disk = shared(comm, mpi_tmp_path) / "small-disk"
    size = comm.Get_size()  # a disk for one and a half checkpoints: 400 kB a rank
    mounted = comm.bcast(mount_tmpfs(disk, f"{600 * size}k") if comm.Get_rank() == 0 else None, root=0)
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        checkpoints = Checkpointer(disk, comm, per_rank=True)
        state = {"weights": torch.arange(100_000, dtype=torch.float32) + comm.Get_rank()}
        checkpoints.save(1, state)
        with pytest.raises(OSError, match="No space left on device"):
            checkpoints.save(2, state)
        comm.Barrier()
        leftovers = [p.name for p in disk.iterdir() if ".tmp-" in p.name]
        latest, loaded = checkpoints.resume()
        assert_all_ranks(comm, not leftovers and latest.name == "step-000000001"
                         and torch.equal(loaded["weights"], state["weights"]), f"{leftovers} {latest}")
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            subprocess.run(["umount", str(disk)], capture_output=True)
        comm.Barrier()


def test_rng_state_round_trips_through_safe_loading(tmp_path):
    import random

    import numpy as np

    from mpipar.run.checkpoint import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(read_state(tmp_path / "rng.pt"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert os.path.getsize(tmp_path / "rng.pt") > 0


def test_a_format_1_rng_state_still_loads_and_restores(tmp_path):
    """mpipar 0.1 stored numpy's RNG state as a tuple holding an array: allow-listed, not arbitrary code."""
    import numpy as np

    from mpipar.run.checkpoint import set_rng_state

    np.random.seed(11)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": __import__("random").getstate()}
    expected = np.random.rand(2)
    torch.save(old, tmp_path / "rank-0.pt")
    set_rng_state(read_state(tmp_path / "rank-0.pt"))
    assert np.array_equal(np.random.rand(2), expected)
