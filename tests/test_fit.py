"""``mpipar.fit``: a user's own model (a regression MLP on tabular data, MSE loss, mean absolute error
as its metric; tuple or keyword inputs) through the loop: N ranks equal one process on the whole
batch, a stop and resume is bitwise the straight run, a resume on another number of ranks goes on;
the example script runs and its metrics are read by mpipar-summary and mpipar-report."""

import os
import signal

import h5py
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, assert_all_ranks, run_mpi, shared_directory
from mpipar.trainer import fit

BATCH, STEPS = 6, 6  # samples per rank; optimizer steps
TOL = dict(rtol=1e-9, atol=1e-12)  # float64; only the order of the sums differs


class KeywordMLP(torch.nn.Module):
    """A model called with keyword inputs: ``model(numeric=..., flags=...)``."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))

    def forward(self, numeric, flags):
        return self.body(torch.cat([numeric, flags], dim=1))


def build_model(layout: str) -> torch.nn.Module:
    torch.manual_seed(3)
    if layout == "keywords":
        return KeywordMLP().double()
    return torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).double()


def tabular(layout: str, samples: int = 240):
    """Seeded float64 tabular data, 200 train / 40 test: ((inputs, targets), (inputs, targets))."""
    generator = torch.Generator().manual_seed(11)
    numeric = torch.randn(samples, 5, generator=generator, dtype=torch.float64)
    flags = torch.randint(0, 2, (samples, 2), generator=generator).double()
    targets = (numeric.sum(1, keepdim=True) - flags[:, :1] + 0.3 * torch.sin(2 * numeric[:, 1:2]))
    inputs = {"numeric": numeric, "flags": flags} if layout == "keywords" else torch.cat([numeric, flags], 1)

    def part(rows):
        return ({k: v[rows] for k, v in inputs.items()} if layout == "keywords" else inputs[rows]), targets[rows]
    return part(slice(0, 200)), part(slice(200, samples))


def mean_absolute_error(outputs, targets):  # a mean over samples: the same on any number of ranks
    return (outputs - targets).abs().mean()


def flags(out, batch_size, *extra):
    return ["--epochs", "1", "--max-steps", str(STEPS), "--batch-size", str(batch_size), "--lr", "0.05",
            "--threads", "1", "--log-every", "0", "--flush-every", "2", "--checkpoint-every", "2",
            "--out", str(out), *extra]


@pytest.fixture(autouse=True)
def signal_handlers():
    """fit() handles SIGUSR1 and SIGTERM (a stop request): give the test process its own back."""
    saved = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGUSR1", "SIGTERM")}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)


def run_fit(comm, layout, out, batch_size, *extra, loss=torch.nn.functional.mse_loss):
    """``fit`` of a fresh model on ``comm``; returns (model, stopped)."""
    model = build_model(layout)
    stopped = fit(model, tabular(layout), comm=comm, loss=loss, metric=mean_absolute_error,
                  argv=flags(out, batch_size, *extra))
    return model, stopped


def serial_reference(directory, layout, replicas):
    """One process (COMM_SELF) on the whole global batch of ``replicas`` ranks; (model, its metrics file)."""
    out = directory / f"serial-{layout}-{replicas}-{MPI.COMM_WORLD.Get_rank()}"
    model, _ = run_fit(MPI.COMM_SELF, layout, out, BATCH * replicas)
    return model, out / "metrics.h5"


def stopping_loss(comm, at_call: int):
    """MSE that, on rank 0 of ``comm`` at its ``at_call``-th training call, sends this process Slurm's
    warning signal (a stop request: seen by every rank at the next metrics flush)."""
    calls = [0]

    def mse_loss(outputs, targets):
        if torch.is_grad_enabled():  # a training step, not the evaluation
            calls[0] += 1
            if calls[0] == at_call and comm.Get_rank() == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
        return torch.nn.functional.mse_loss(outputs, targets)
    return mse_loss


def differences(model, reference, exact=False):
    found = []
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        same = torch.equal(mine, theirs) if exact else torch.allclose(mine, theirs, **TOL)
        if not same:
            found.append(f"{name}: max difference {(mine - theirs).abs().max().item():.2e}")
    return found


@pytest.mark.mpi
@pytest.mark.parametrize("layout", ["tuple", "keywords"])
def test_fit_on_n_ranks_equals_one_process_on_the_whole_batch(comm, mpi_tmp_path, layout):
    directory = shared_directory(comm, mpi_tmp_path)
    reference, reference_metrics = serial_reference(directory, layout, comm.Get_size())
    model, stopped = run_fit(comm, layout, directory / f"run-{layout}", BATCH)
    problems = differences(model, reference) + (["stopped early"] if stopped else [])
    with h5py.File(directory / f"run-{layout}" / "metrics.h5", "r") as f, h5py.File(reference_metrics, "r") as g:
        for field in ("test_loss", "test_accuracy", "train_loss"):  # the user's loss and metric over the test set
            mine, theirs = torch.from_numpy(f["epochs"][field][:]), torch.from_numpy(g["epochs"][field][:])
            if mine.shape != (1,) or not torch.allclose(mine, theirs, **TOL):
                problems.append(f"{field}: {mine.tolist()} vs {theirs.tolist()}")
        names = (f.attrs["loss"], f.attrs["test_metric"], f.attrs["model"])
        if names != ("mse_loss", "mean_absolute_error", type(model).__name__):
            problems.append(f"attributes {f.attrs['loss']}, {f.attrs['test_metric']}, {f.attrs['model']}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_fit_stopped_and_resumed_is_bitwise_the_straight_run(comm, mpi_tmp_path):
    directory = shared_directory(comm, mpi_tmp_path)
    straight, _ = run_fit(comm, "tuple", directory / "straight", BATCH)
    _, stopped = run_fit(comm, "tuple", directory / "stopped", BATCH, loss=stopping_loss(comm, 2))
    resumed, again = run_fit(comm, "tuple", directory / "stopped", BATCH, "--resume")
    problems = differences(resumed, straight, exact=True)
    if (stopped, again) != (True, False):
        problems.append(f"stopped: {stopped}, then {again}")
    with h5py.File(directory / "stopped" / "metrics.h5", "r") as f:
        if f["steps/loss"].shape[0] != STEPS:
            problems.append(f"{f['steps/loss'].shape[0]} steps recorded")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("before,after", [(2, 1), (1, 3), (3, 2), (4, 3), (2, 4)])
def test_fit_resumed_on_another_number_of_ranks_equals_one_process(comm, mpi_tmp_path, before, after):
    size, rank = comm.Get_size(), comm.Get_rank()
    if max(before, after) > size:
        pytest.skip(f"needs {max(before, after)} ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference, _ = serial_reference(directory, "keywords", before)  # the checkpoint's global batch is kept
    out, problems = directory / "run", []
    first = comm.Split(0 if rank < before else MPI.UNDEFINED, rank)
    if first != MPI.COMM_NULL:
        _, stopped = run_fit(first, "keywords", out, BATCH, loss=stopping_loss(first, 2))
        first.Free()
        if not stopped:
            problems.append("the first run did not stop")
    comm.Barrier()
    second = comm.Split(0 if rank < after else MPI.UNDEFINED, rank)
    if second != MPI.COMM_NULL:
        model, _ = run_fit(second, "keywords", out, BATCH, "--resume")
        second.Free()
        problems += differences(model, reference)
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.launch
def test_example_script_runs_on_two_ranks_and_its_metrics_are_read(tmp_path):
    pytest.importorskip("matplotlib")
    from mpipar.report.cli import main as report
    from mpipar.run.summary import summarize

    out = tmp_path / "own"
    result = run_mpi(2, str(ROOT / "examples" / "own_model.py"), "--epochs", "1", "--batch-size", "50",
                     "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model: regression-mlp" in result.stdout and "final test mean_absolute_error" in result.stdout
    assert ", test mean_absolute_error " in result.stdout  # the epoch line names the user's metric
    summary = summarize(out / "metrics.h5")
    assert "data_parallel on 2 ranks" in summary and "epochs: 1, final test mean_absolute_error" in summary
    with h5py.File(out / "metrics.h5", "r") as f:
        assert (f.attrs["loss"], f.attrs["test_metric"]) == ("mse_loss", "mean_absolute_error")
        assert f["steps/loss"].shape == (20,) and 0 < f["epochs/test_accuracy"][0] < 0.5  # a fit was learnt
    assert report([str(out), "-o", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").exists()
