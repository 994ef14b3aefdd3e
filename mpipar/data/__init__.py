"""Training data: datasets (IDX, HDF5, synthetic), the pure sharding of every epoch over ranks, and converters."""

from mpipar.data.datasets import *  # noqa: F401,F403
from mpipar.data.datasets import __all__  # noqa: F401
