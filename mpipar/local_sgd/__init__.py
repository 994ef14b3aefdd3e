"""Local SGD and model averaging: ranks take local optimizer steps and average their models every H steps."""

from mpipar.local_sgd.config import LocalSGDConfig, sync_every_flag
from mpipar.local_sgd.outer import OuterOptimizer
from mpipar.local_sgd.strategy import LocalSGDStrategy

__all__ = ["LocalSGDConfig", "LocalSGDStrategy", "OuterOptimizer", "sync_every_flag"]
