"""How often local SGD averages the ranks' models, and DiLoCo's outer optimizer: a frozen, validated dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

__all__ = ["LocalSGDConfig", "sync_every_flag"]


@dataclass(frozen=True)
class LocalSGDConfig:
    """Settings of :class:`~mpipar.local_sgd.strategy.LocalSGDStrategy`. Raises ValueError naming the bad flag.

    Attributes:
        sync_every: H, local optimizer steps between two averages of the ranks' models
            (1: every step; 0: only at epoch ends, i.e. one-shot averaging at the end of a
            one-epoch run: ParallelSGD). Epoch ends always average (evaluation and the
            epoch's checkpoint see one model).
        local_warmup: synchronous steps first (gradients averaged every step, exactly as
            data parallelism), then local steps (post-local SGD).
        outer_lr: DiLoCo's outer learning rate: at each average the global weights (those
            of the last average) take an SGD step along the outer gradient global - average.
        outer_momentum: the outer step's Nesterov momentum (0: none).
        With outer_lr 1 and outer_momentum 0 (the defaults) the outer step is the plain
        average, and no outer optimizer is kept.
    """

    sync_every: int = 1
    local_warmup: int = 0
    outer_lr: float = 1.0
    outer_momentum: float = 0.0

    def __post_init__(self):
        if self.sync_every < 0:
            raise ValueError(f"--sync-every must be >= 0 (0 or 'end': average only at epoch ends), "
                             f"got {self.sync_every}")
        if self.local_warmup < 0:
            raise ValueError(f"--local-warmup must be >= 0 synchronous steps, got {self.local_warmup}")
        if self.local_warmup and self.sync_every == 1:
            raise ValueError(f"--local-warmup {self.local_warmup} needs local steps after it: with --sync-every 1 "
                             f"every step is synchronous already; give --sync-every H > 1 (or 0)")
        if not (math.isfinite(self.outer_lr) and self.outer_lr > 0):
            raise ValueError(f"--outer-lr must be a positive number (1: plain averaging), got {self.outer_lr}")
        if not (0 <= self.outer_momentum < 1):
            raise ValueError(f"--outer-momentum must be in [0, 1) (0: none), got {self.outer_momentum}")

    @property
    def outer_optimizer(self) -> bool:
        """Whether averages go through DiLoCo's outer optimizer (else they are taken as they are)."""
        return self.outer_lr != 1.0 or self.outer_momentum != 0.0

    def describe(self) -> str:
        every = "at epoch ends only" if self.sync_every == 0 else \
            f"every {self.sync_every} local step{'s' if self.sync_every > 1 else ''}"
        parts = [f"models averaged {every}"]
        if self.local_warmup:
            parts.insert(0, f"{self.local_warmup} synchronous warm-up steps")
        if self.outer_optimizer:
            parts.append(f"outer SGD lr {self.outer_lr}, Nesterov momentum {self.outer_momentum}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sync_every_flag(text: str) -> int:
    """``--sync-every``: a number of local steps, or ``end`` (0: average only at epoch ends)."""
    if text == "end":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'end', got {text!r}") from None
