"""The ZeRO stage of sharded data parallelism: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ShardedConfig"]


@dataclass(frozen=True)
class ShardedConfig:
    """Settings of :class:`~mpipar.sharded.strategy.ShardedStrategy` (``--zero``). Raises ValueError.

    Attributes:
        zero: 1 (optimizer state sharded) or 2 (gradients too); 0 is plain data parallelism
            (jobs build ``DataParallelStrategy`` then), 3 (parameters too) is not implemented.
    """

    zero: int = 1

    def __post_init__(self):
        if self.zero == 3:
            raise ValueError("--zero 3 (sharded parameters) is not implemented yet; use --zero 1 or 2")
        if self.zero not in (1, 2):
            raise ValueError(f"--zero must be 0 (data parallelism), 1 or 2, got {self.zero!r}")

    def describe(self) -> str:
        return f"ZeRO-{self.zero}: optimizer state{' and gradients' if self.zero >= 2 else ''} sharded"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
