"""mpipar: PyTorch training across MPI processes, with metrics of where the time goes."""

__version__ = "0.1.0"

from . import agree, failure, mpi_tensor, sharding  # noqa: E402,F401
from .data_parallel import DataParallel  # noqa: E402
from .metrics import MetricsWriter  # noqa: E402

__all__ = ["DataParallel", "MetricsWriter", "agree", "failure", "mpi_tensor", "sharding", "__version__"]
