"""Whether the loaded MPI library takes CUDA device buffers, and in which calls.

The answer comes from, in order:

1. ``MPIPAR_CUDA_AWARE=1`` or ``0`` in the environment (a site that knows better; ``1`` against
   a library that answers 0 is an error, see below);
2. ``MPIX_Query_cuda_support()``, called through ctypes in the MPI library this
   process has loaded (Open MPI exports it when built with its CUDA extension;
   MPICH 4 exports it too and answers whether GPU support is enabled at run time);
3. otherwise: not CUDA-aware (the library cannot say, so device buffers are staged).

mpi4py has no wrapper for the query (4.1 included), hence ctypes. The decision and
its reason are logged once per process and stored in the metrics file's attributes.

Which calls get device buffers even from a CUDA-aware MPI: point-to-point (blocking
and non-blocking) and blocking collectives. Open MPI's CUDA support covers exactly
these; its non-blocking reductions would reduce device memory on the host. The same
conservative set is assumed for every other MPI. Non-blocking collectives on CUDA
tensors are therefore always staged (:mod:`mpipar.comm.staging` overlaps them).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from mpi4py import MPI

from mpipar.diagnostics.agree import collective_check

__all__ = ["CudaAwareness", "agreed_cuda_awareness", "cuda_awareness", "decide", "DEVICE_BUFFER_CALLS"]

log = logging.getLogger("mpipar.comm.cuda_aware")

DEVICE_BUFFER_CALLS = frozenset({"send", "recv", "isend", "irecv", "allreduce", "allgather", "bcast"})
"""The mpi_tensor calls that may hand a CUDA tensor to a CUDA-aware MPI (not ``iallreduce``)."""

_QUERY = "MPIX_Query_cuda_support"


@dataclass(frozen=True)
class CudaAwareness:
    """The decision: ``aware`` (device buffers may go to MPI) and why."""

    aware: bool
    reason: str

    def describe(self) -> str:
        how = "CUDA-aware (device buffers to MPI in point-to-point and blocking collectives)" if self.aware \
            else "staged through pinned host memory"
        return f"GPU tensors: {how} [{self.reason}]"


def decide(library: str, query: Optional[Callable[[], int]], environ: Mapping[str, str] = os.environ) \
        -> CudaAwareness:
    """The decision for an MPI named ``library`` whose ``MPIX_Query_cuda_support``
    is ``query`` (None when the library does not export it). Pure apart from calling ``query``.

    Raises:
        ValueError: ``MPIPAR_CUDA_AWARE`` is neither 1 nor 0.
        RuntimeError: ``MPIPAR_CUDA_AWARE=1`` but the library answers 0 (device buffers would be
            read as host memory).
    """
    forced = environ.get("MPIPAR_CUDA_AWARE", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        answer = None if query is None else int(query())
        if answer == 0:
            raise RuntimeError(f"MPIPAR_CUDA_AWARE=1, but {library}: {_QUERY}() = 0 (built without CUDA, or its "
                               f"CUDA support did not load on this node); unset MPIPAR_CUDA_AWARE or use a "
                               f"CUDA-aware MPI (docs/gpu.md)")
        return CudaAwareness(True, "MPIPAR_CUDA_AWARE=1" + ("" if answer is None else f" ({library}: {_QUERY}() = "
                                                                                       f"{answer})"))
    if forced in ("0", "false", "no", "off"):
        return CudaAwareness(False, "MPIPAR_CUDA_AWARE=0")
    if forced:
        raise ValueError(f"MPIPAR_CUDA_AWARE must be 1 or 0 (or unset), got {forced!r}")
    if query is None:
        return CudaAwareness(False, f"{library} does not export {_QUERY} (built without CUDA support); "
                                    f"set MPIPAR_CUDA_AWARE=1 if it is CUDA-aware anyway")
    answer = int(query())
    if answer:
        return CudaAwareness(True, f"{library}: {_QUERY}() = {answer}")
    return CudaAwareness(False, f"{library}: {_QUERY}() = 0 (built without CUDA, or CUDA support not "
                                f"enabled at run time)")


def _loaded_mpi_libraries() -> list:
    """Paths of the MPI C libraries mapped into this process (Linux), most specific first."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line and ".so" in line}
    except OSError:
        return []
    return sorted(paths, key=lambda p: ("libmpi_" in p, p))  # libmpi.so / libmpich.so before helpers


def _find_query() -> Optional[Callable[[], int]]:
    """``MPIX_Query_cuda_support`` from the loaded MPI library, or None."""
    candidates = [None, *_loaded_mpi_libraries()]  # None: the global namespace
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
            function = getattr(library, _QUERY)
        except (OSError, AttributeError):
            continue
        function.restype, function.argtypes = ctypes.c_int, []
        return function
    return None


def library_name() -> str:
    """The MPI library's name and version, e.g. ``Open MPI v5.0.11``."""
    first = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
    return " ".join(first.split(",")[0].split())  # MPICH pads with spaces


_decision: Optional[CudaAwareness] = None


def cuda_awareness() -> CudaAwareness:
    """This process's decision, made (and logged) once."""
    global _decision
    if _decision is None:
        _decision = decide(library_name(), _find_query())
        log.info(_decision.describe())
    return _decision


def agreed_cuda_awareness(comm: MPI.Intracomm) -> CudaAwareness:
    """:func:`cuda_awareness`, raised on every rank of ``comm`` if it fails on any
    (the library's answer can differ by node). Collective over ``comm``."""
    return collective_check(comm, cuda_awareness, "the CUDA-aware MPI decision")


def reset() -> None:
    """Forget the decision (tests that change ``MPIPAR_CUDA_AWARE``)."""
    global _decision
    _decision = None
