"""mpipar: PyTorch training across MPI processes, with metrics of where the time goes."""

__version__ = "0.1.0"

from .data_parallel import DataParallel  # noqa: E402

__all__ = ["DataParallel", "__version__"]
