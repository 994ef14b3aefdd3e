"""Synchronous data parallelism: the DataParallel wrapper and its strategy for the training loop."""

from mpipar.data_parallel.wrapper import CommStats, DataParallel
from mpipar.registry import StrategySpec, register

__all__ = ["DataParallel", "CommStats"]

register(StrategySpec(
    name="data_parallel", package=__name__, settings=None, checkpoint_key="",
    consolidate="mpipar.run.consolidate:whole_model", predict="mpipar.data_parallel.prediction:predict",
    jobs=("resnet_dp.py",), loop_cases=("data_parallel",)))
