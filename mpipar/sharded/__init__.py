"""Sharded data parallelism (ZeRO-1/2/3): optimizer state, gradients and parameters split over the ranks."""

from mpipar.registry import StrategySpec, register
from mpipar.sharded.config import ShardedConfig
from mpipar.sharded.layout import FlatLayout
from mpipar.sharded.strategy import ShardedStrategy
from mpipar.sharded.zero import ShardedDataParallel

__all__ = ["ShardedConfig", "ShardedDataParallel", "ShardedStrategy", "FlatLayout"]

register(StrategySpec(
    name="sharded", package=__name__, settings="mpipar.sharded.config:ShardedConfig", checkpoint_key="sharded",
    consolidate="mpipar.sharded.consolidate:full_model", jobs=("resnet_dp.py",),
    predict="mpipar.sharded.prediction:predict",
    consolidate_optimizer="mpipar.sharded.consolidate:full_optimizer"))
