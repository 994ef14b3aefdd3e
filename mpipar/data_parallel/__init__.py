"""Synchronous data parallelism: the DataParallel wrapper and its strategy for the training loop."""

from mpipar.data_parallel.wrapper import CommStats, DataParallel

__all__ = ["DataParallel", "CommStats"]
