"""Helpers for tests that run on several ranks: gathered assertions and mpirun launches."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
running_test = None  # the pytest item being run (set by conftest.py), for require_launch_mark


def assert_all_ranks(comm, ok: bool, message: str = "") -> None:
    """Assert ``ok`` on every rank, failing on all ranks together with the failing ranks named."""
    results = comm.allgather((bool(ok), message))
    failed = [(rank, msg) for rank, (good, msg) in enumerate(results) if not good]
    assert not failed, "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)


def assert_close_all_ranks(comm, actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float,
                           what: str = "") -> None:
    ok = actual.shape == expected.shape and torch.allclose(actual, expected, rtol=rtol, atol=atol)
    err = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
    assert_all_ranks(comm, ok, f"{what}: max abs difference {err:.3e}")


def require_launch_mark() -> None:
    """Fail the running test unless it is marked ``launch``: a job launch costs seconds of
    start-up, and ``-m "not launch"`` (``tests/run.sh --fast``) must leave every one out."""
    if running_test is not None and running_test.get_closest_marker("launch") is None:
        pytest.fail(f"{running_test.nodeid} launches a job: mark it @pytest.mark.launch (its fixtures' launches "
                    "count too)", pytrace=False)


def mpirun_command(n: int, *args: str) -> list:
    """An mpirun command line that works as root and with more ranks than cores; only a
    test marked ``launch`` may ask for one (every launch in the tests comes through here)."""
    require_launch_mark()
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        raise RuntimeError("mpirun not found")
    return [mpirun, "-n", str(n), "--oversubscribe", sys.executable, *args]


def run_mpi(n: int, *args: str, timeout: float = 180, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run ``python args...`` on ``n`` ranks; fails the test if it outlives ``timeout``."""
    environ = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    for key in [k for k in environ if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "OMPI_MCA_ess", "PRTE_"))]:
        environ.pop(key)  # do not inherit the launching test's own MPI world
    return subprocess.run(mpirun_command(n, *args), capture_output=True, text=True, timeout=timeout,
                          env=environ, cwd=cwd)


def assert_comm_still_usable(comm) -> None:
    """After an error raised on every rank: a collective on ``comm`` still matches up (no rank
    left an operation pending that would pair with this one) and gives the right sum."""
    total = comm.allreduce(comm.Get_rank() + 1)
    size = comm.Get_size()
    assert_all_ranks(comm, total == size * (size + 1) // 2, f"allreduce after the error gave {total}")


def count_tensor_calls(monkeypatch) -> list:
    """Record the name of every mpi_tensor collective called from now on (the test's monkeypatch
    undoes it); returns the list the names are appended to."""
    from mpipar.comm import mpi_tensor

    calls = []

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return wrapper

    for name in ("allreduce_", "iallreduce_", "allgather_", "bcast_"):
        monkeypatch.setattr(mpi_tensor, name, counted(name, getattr(mpi_tensor, name)))
    return calls


class ToFloat64(torch.nn.Module):
    """The data's float32 images as float64, so the comparisons can be tight."""

    def forward(self, images):
        return images.double()


def float64_mlp(sizes, seed: int) -> torch.nn.Sequential:
    """``ToFloat64``, then :func:`mpipar.models.mlp` of ``sizes`` in float64, seeded."""
    from mpipar import models

    torch.manual_seed(seed)
    return torch.nn.Sequential(ToFloat64(), *models.mlp(list(sizes))).double()


def shared_directory(comm, mpi_tmp_path) -> Path:
    """Rank 0's ``mpi_tmp_path`` on every rank: the folder the ranks share their files in."""
    return Path(comm.bcast(str(mpi_tmp_path) if comm.Get_rank() == 0 else None, root=0))


def loop_session(comm, out, batch_size: int, settings=None, *, resume: bool = False, **config):
    """A :class:`~mpipar.run.session.Session` of the loop for an in-process test, on synthetic data:
    one epoch, lr 0.05, one thread, the ``mlp`` label, no step logging; ``config`` sets other
    :class:`~mpipar.run.config.TrainConfig` fields (``max_steps``, ``flush_every`` ...). Collective."""
    from mpipar.run.config import TrainConfig
    from mpipar.run.session import Session

    defaults = dict(data="synthetic", epochs=1, batch_size=batch_size, lr=0.05, threads=1, out=str(out),
                    model="mlp", log_every=0)
    return Session(comm, TrainConfig(**{**defaults, **config}), settings=settings, resume=resume)


def random_batch(step: int, batch: int, *, features: int = 5, dtype=torch.float64, device="cpu"):
    """A batch of ``features`` normal inputs and labels of 3 classes, seeded by ``step`` (100 + step)."""
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(batch, features, generator=generator, dtype=dtype).to(device),
            torch.randint(0, 3, (batch,), generator=generator).to(device))
