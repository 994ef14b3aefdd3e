"""How a pipeline job splits and schedules its model: a frozen, validated dataclass with typed fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from mpipar.pipeline_plan.schedule import ASYNC_SCHEDULES, TRAIN_SCHEDULES

__all__ = ["PipelineConfig", "TRAIN_SCHEDULES"]


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is split and scheduled. Raises ValueError naming the bad flag.

    Attributes:
        schedule: one of :data:`TRAIN_SCHEDULES`, the registered schedules that train (``pipedream`` and
            ``2bw`` never flush; see
            :class:`~mpipar.pipeline.strategy.PipelineStrategy`).
        microbatches: micro-batches per batch (must divide the batch).
        stages: ranks per pipeline; the data-parallel degree is the world size divided by it.
        balance: ``"even"`` (by layer count), ``"auto"`` (profiled) or layers per stage.
        placement: a rank per layer (may be non-contiguous); overrides ``balance``.
        tp: ranks that split every stage's layers (tensor parallelism inside the stages).
        stage_memory_mb: with ``balance="auto"``, the most MiB a stage may hold (parameters, gradients,
            momentum, and the saved activations of the micro-batches the schedule keeps in flight on
            it); 0: no limit.
    """

    schedule: str = "1f1b"
    microbatches: int = 4
    stages: int = 2
    balance: Union[str, Tuple[int, ...]] = "even"
    placement: Optional[Tuple[int, ...]] = None
    tp: int = 1
    stage_memory_mb: float = 0.0

    def __post_init__(self):
        if self.schedule not in TRAIN_SCHEDULES:
            raise ValueError(f"--schedule must be one of {list(TRAIN_SCHEDULES)}, got {self.schedule!r}")
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.microbatches < 1 or self.stages < 1:
            raise ValueError(f"--microbatches and --stages must be >= 1, got {self.microbatches}, {self.stages}")
        if self.schedule in ASYNC_SCHEDULES and self.microbatches < self.stages - 1:
            raise ValueError(f"--schedule {self.schedule} with {self.stages} stages needs --microbatches >= "
                             f"{self.stages - 1} (the micro-batches a stage holds across a batch's end), got "
                             f"{self.microbatches}")
        if isinstance(self.balance, str):
            if self.balance not in ("even", "auto"):
                raise ValueError(f"--balance must be 'even', 'auto' or layers per stage, got {self.balance!r}")
        elif len(self.balance) != self.stages or min(self.balance) < 1:
            raise ValueError(f"--balance must be 'even', 'auto' or {self.stages} positive layer counts "
                             f"'N,N,...', got {','.join(map(str, self.balance))!r}")
        if self.stage_memory_mb < 0 or (self.stage_memory_mb and self.balance != "auto"):
            raise ValueError(f"--stage-memory-mb must be >= 0 and is used by --balance auto only, got "
                             f"{self.stage_memory_mb} with --balance {self.balance}")
        if self.placement is not None and sorted(set(self.placement)) != list(range(self.stages)):
            raise ValueError(f"--placement must give a rank in 0..{self.stages - 1} to every layer and use "
                             f"each of them, got {','.join(map(str, self.placement))!r}")

    def to_dict(self) -> dict:
        """The settings; ``stage_memory_mb`` only when set (checkpoints from before it compare equal)."""
        settings = dataclasses.asdict(self)
        if not settings["stage_memory_mb"]:
            del settings["stage_memory_mb"]
        return settings
