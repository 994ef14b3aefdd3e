"""How a parameter-server job trains: a frozen, validated dataclass with typed fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["ParameterServerConfig", "MODES"]

MODES = ("sync", "async", "bounded")


@dataclass(frozen=True)
class ParameterServerConfig:
    """The parameter server's settings. Raises ValueError naming the bad flag.

    Attributes:
        mode: ``sync`` (the servers wait for every worker's gradient of a step and apply
            their sample-weighted mean: equals data parallelism), ``async`` (each gradient
            is applied when it arrives) or ``bounded`` (async, but no gradient is applied
            more than ``staleness`` versions after the one it was computed on).
        staleness: the bound of ``bounded`` mode (0 serialises the workers).
        servers: ranks 0..servers-1 hold the weights, each a share of the parameters;
            the other ranks are workers.
        staleness_lr: divide each gradient's step by its staleness (when above 1).
        one_sided: workers ``Accumulate`` into and ``Get`` from an MPI window on the
            servers (plain SGD, ``async`` only); the servers take no part in the updates.
        straggler: a worker rank slowed down for experiments (-1: none) ...
        slowdown: ... by this factor (2: it computes at half speed).
    """

    mode: str = "async"
    staleness: int = 2
    servers: int = 1
    staleness_lr: bool = False
    one_sided: bool = False
    straggler: int = -1
    slowdown: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.staleness < 0:
            raise ValueError(f"--staleness must be >= 0, got {self.staleness}")
        if self.servers < 1:
            raise ValueError(f"--servers must be >= 1, got {self.servers}")
        if self.one_sided and self.mode != "async":
            raise ValueError(f"--one-sided updates are asynchronous: use it with --mode async, not {self.mode!r}")
        if self.slowdown < 1.0:
            raise ValueError(f"--slowdown must be >= 1 (a factor of the compute time), got {self.slowdown}")
        if self.straggler >= 0 and self.straggler < self.servers:
            raise ValueError(f"--straggler must be a worker rank (>= --servers {self.servers}), got {self.straggler}")

    @property
    def bound(self) -> Optional[int]:
        """The staleness bound the grants enforce: None (none) in async mode."""
        return self.staleness if self.mode == "bounded" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
