"""The ZeRO stage of sharded data parallelism: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ShardedConfig"]


@dataclass(frozen=True)
class ShardedConfig:
    """Settings of :class:`~mpipar.sharded.strategy.ShardedStrategy` (``--zero``). Raises ValueError.

    Attributes:
        zero: 1 (optimizer state sharded), 2 (gradients too) or 3 (parameters too, gathered per
            unit); 0 is plain data parallelism (jobs build ``DataParallelStrategy`` then).
    """

    zero: int = 1

    def __post_init__(self):
        if self.zero not in (1, 2, 3):
            raise ValueError(f"--zero must be 0 (data parallelism), 1, 2 or 3, got {self.zero!r}")

    def describe(self) -> str:
        sharded = ("optimizer state", "optimizer state and gradients", "optimizer state, gradients and parameters")
        return f"ZeRO-{self.zero}: {sharded[self.zero - 1]} sharded"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
