"""Local SGD and model averaging: ranks take local optimizer steps and average their models every H steps."""

from mpipar.local_sgd.config import LocalSGDConfig, sync_every_flag
from mpipar.local_sgd.outer import OuterOptimizer
from mpipar.local_sgd.strategy import LocalSGDStrategy
from mpipar.registry import StrategySpec, register

__all__ = ["LocalSGDConfig", "LocalSGDStrategy", "OuterOptimizer", "sync_every_flag"]

register(StrategySpec(
    name="local_sgd", package=__name__, settings="mpipar.local_sgd.config:LocalSGDConfig", checkpoint_key="local_sgd",
    consolidate="mpipar.local_sgd.consolidate:averaged_model", jobs=("resnet_dp.py",)))
