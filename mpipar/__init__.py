"""mpipar: PyTorch training across MPI processes, with metrics of where the time goes."""

__version__ = "0.1.0"

from mpipar.comm import mpi_tensor  # noqa: E402,F401
from mpipar.comm.reducer import GradientReducer  # noqa: E402
from mpipar.data import sharding  # noqa: E402,F401
from mpipar.data_parallel.wrapper import DataParallel  # noqa: E402
from mpipar.diagnostics import agree, failure  # noqa: E402,F401
from mpipar.run.loop import train  # noqa: E402
from mpipar.run.metrics import MetricsWriter  # noqa: E402

__all__ = ["DataParallel", "GradientReducer", "MetricsWriter", "train", "agree", "failure", "mpi_tensor", "sharding",
           "__version__"]
