"""``fit``: a user's own model, loss and data through the one training loop, with data parallelism."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

from mpi4py import MPI
from torch import nn

from mpipar.data.arrays import DataSplits
from mpipar.data.pairs import tensor_splits
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.run.cli import training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session

__all__ = ["fit"]

GIVEN = "given"  # the --data of a run whose script hands its data to fit()

Pair = Tuple[object, object]  # (inputs, targets): inputs a tensor or a dict of keyword inputs


def fit(model: nn.Module, data: Union[Tuple[Pair, Pair], DataSplits, None] = None, *, comm: MPI.Intracomm,
        loss: Optional[Callable] = None, metric: Optional[Callable] = None, argv: Optional[Sequence[str]] = None,
        doc: str = "", out: str = "runs/own", name: Optional[str] = None, early_signals=()) -> bool:
    """Train ``model`` on ``data`` with data parallelism over ``comm``, in the jobs' loop: the jobs'
    flags (``argv``, default ``sys.argv[1:]``: ``--epochs``, ``--batch-size`` per rank, ``--lr``,
    ``--out``, ``--resume``, ``--checkpoint-every``, ``--requeue`` ...), checkpoints that resume bitwise
    on any number of ranks, the metrics file, the summary. ``model`` is changed in place.

    Collective over ``comm``: every rank calls it with the same flags and data (their sizes are agreed;
    a bad flag or bad data raises on every rank together). Size 1 is one process on the whole batch.

    Args:
        model: the model, built alike on every rank (rank 0's weights are broadcast).
        data: ``((train_inputs, train_targets), (test_inputs, test_targets))``, inputs a tensor or a
            dict of tensors (the model's keyword inputs), or a :class:`DataSplits`; None: ``--data``
            (an image HDF5 file, an IDX directory, ``synthetic``).
        loss: ``loss(outputs, targets)``, the batch's mean loss; default cross-entropy.
        metric: ``metric(outputs, targets)``, a mean over the batch's samples (so the test set's
            mean is the same on any number of ranks), stored as the epochs' ``test_accuracy``; default
            accuracy with the default loss, else none (NaN).
        doc: the script's usage text (``--help``). ``out``: the default ``--out``.
        name: the model's name in the metrics file (default its class name).
        early_signals: SIGUSR1/SIGTERM caught before the call (see ``jobs/_prelude.py``).

    Returns:
        True when a stop request (Slurm's warning signal) ended the run early.
    """
    parser = training_parser(doc, out=out, batch_help="samples per rank per step", rank=comm.Get_rank())
    if data is not None:
        parser.set_defaults(data=GIVEN)
    args = parser.parse_args(argv)
    if data is not None and (args.data != GIVEN or args.augment is not None):
        parser.error("--data and --augment are for the jobs' data; this script hands its own to fit()")
    session = Session.from_args(comm, args, early_signals, model=name or type(model).__name__)
    splits = session.data() if data is None else _own_splits(comm, data)
    config = session.config
    strategy = DataParallelStrategy(model, comm, bucket_mb=config.bucket_mb, device=session.device,
                                    grad_wire=config.grad_wire, loss_fn=loss, metric=metric,
                                    compress=config.compress)
    return train(session, strategy, splits)


def _own_splits(comm: MPI.Intracomm, data) -> DataSplits:
    """``data`` as :class:`DataSplits`, checked on every rank together and its sizes agreed. Collective."""
    def build() -> DataSplits:
        if isinstance(data, DataSplits):
            return data
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(f"data must be ((train_inputs, train_targets), (test_inputs, test_targets)) or "
                            f"DataSplits, got {type(data).__name__}")
        return tensor_splits(*data)
    splits = collective_check(comm, build, "data")
    agree_on(comm, "the dataset sizes", (len(splits.train), len(splits.test)), hint="give every rank the same data")
    return splits
