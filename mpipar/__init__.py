"""mpipar: PyTorch training across MPI processes, with metrics of where the time goes.

The names below load on first use (PEP 562), so ``import mpipar.report`` (``mpipar-report``,
``mpipar-summary``) does not import torch or MPI.
"""

from mpipar._lazy import lazy_getattr
from mpipar._requirements import check_torch

check_torch()  # one clear message on a torch too old, before any of its APIs is missed

__version__ = "0.1.0"

_LAZY = {  # name: (module, attribute or None for the module itself)
    "DataParallel": ("mpipar.data_parallel.wrapper", "DataParallel"),
    "GradientReducer": ("mpipar.comm.reducer", "GradientReducer"),
    "MetricsWriter": ("mpipar.run.metrics", "MetricsWriter"),
    "train": ("mpipar.run.loop", "train"),
    "fit": ("mpipar.trainer", "fit"),
    "agree": ("mpipar.diagnostics.agree", None),
    "failure": ("mpipar.diagnostics.failure", None),
    "mpi_tensor": ("mpipar.comm.mpi_tensor", None),
    "sharding": ("mpipar.data.sharding", None),
}

__all__ = [*_LAZY, "__version__"]

__getattr__ = lazy_getattr("mpipar", _LAZY, globals())
