"""Small pickled-object collectives for metadata, each visible to a running stall watchdog."""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
from mpi4py import MPI

from mpipar.diagnostics import debug

__all__ = ["allgather", "gather", "bcast", "allreduce_sum"]


def allgather(comm: MPI.Intracomm, value: Any, what: str) -> List[Any]:
    """Every rank's ``value``, as a list by rank, on every rank.

    Collective over ``comm``: every rank calls it together (size 1 works). For small
    picklable metadata, not tensors (use :mod:`mpipar.comm.mpi_tensor` for those).

    Args:
        comm: the ranks that exchange.
        value: this rank's picklable contribution.
        what: what is exchanged, as a running watchdog names this wait.

    Returns:
        ``[value of rank 0, value of rank 1, ...]``.
    """
    with debug.watched(comm, "allgather", detail=what):
        return comm.allgather(value)


def gather(comm: MPI.Intracomm, value: Any, what: str, root: int = 0) -> Optional[List[Any]]:
    """Every rank's ``value``, as a list by rank, on ``root``; None elsewhere.

    Collective over ``comm``: every rank calls it together with the same ``root``
    (size 1 works).

    Args:
        comm: the ranks that exchange.
        value: this rank's picklable contribution.
        what: what is exchanged, as a running watchdog names this wait.
        root: the rank that receives the list.

    Returns:
        The list on ``root``, None on the other ranks.
    """
    with debug.watched(comm, "gather", detail=what):
        return comm.gather(value, root=root)


def bcast(comm: MPI.Intracomm, value: Any, what: str, root: int = 0) -> Any:
    """``root``'s ``value`` on every rank (the others' ``value`` is ignored).

    Collective over ``comm``: every rank calls it together with the same ``root``
    (size 1 works).

    Args:
        comm: the ranks that exchange.
        value: the picklable value to send (used on ``root`` only).
        what: what is exchanged, as a running watchdog names this wait.
        root: the rank whose value is sent.

    Returns:
        ``root``'s value.
    """
    with debug.watched(comm, "bcast", detail=what):
        return comm.bcast(value, root=root)


def allreduce_sum(comm: MPI.Intracomm, array: np.ndarray, what: str) -> np.ndarray:
    """Sum a small numpy array over the ranks of ``comm``, in place.

    Collective over ``comm``: every rank calls it together with an array of the same
    shape and dtype (size 1 works).

    Args:
        comm: the ranks that sum.
        array: contiguous numpy array; replaced by the sum over ranks.
        what: what is summed, as a running watchdog names this wait.

    Returns:
        ``array``, now holding the sum.
    """
    with debug.watched(comm, "Allreduce", detail=what):
        comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
    return array
