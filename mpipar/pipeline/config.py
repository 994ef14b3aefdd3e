"""How a pipeline job splits and schedules its model: a frozen, validated dataclass with typed fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from mpipar.pipeline_plan.kinds import schedule_kind
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
        balance: ``"even"`` (by layer count), ``"auto"`` (profiled) or layers per stage (per chunk with
            ``virtual_stages``: ``stages * virtual_stages`` counts).
        placement: a rank per layer (may be non-contiguous); overrides ``balance``.
        tp: ranks that split every stage's layers (tensor parallelism inside the stages).
        stage_memory_mb: with ``balance="auto"``, the most MiB a stage may hold (parameters, gradients,
            momentum, and the saved activations of the micro-batches the schedule keeps in flight on
            it); 0: no limit.
        zero: ``--zero``: 1 shards each stage's optimizer state over its replicas (ZeRO-1,
            :class:`~mpipar.sharded.optimizer.ShardedUpdate`); 0 does not. Flushing schedules only.
        virtual_stages: chunks per rank of a schedule of virtual stages (``interleaved``): the model split
            into ``stages * virtual_stages`` chunks, chunk ``c`` on rank ``c % stages``; 1 otherwise (``zbv``
            takes 1 or 2 and always places two chunks per rank, in a V: :attr:`chunks_per_rank`).
    """

    schedule: str = "1f1b"
    microbatches: int = 4
    stages: int = 2
    balance: Union[str, Tuple[int, ...]] = "even"
    placement: Optional[Tuple[int, ...]] = None
    tp: int = 1
    stage_memory_mb: float = 0.0
    zero: int = 0
    virtual_stages: int = 1

    def __post_init__(self):
        if self.zero not in (0, 1):
            raise ValueError(f"--zero {self.zero}: a pipeline shards its stages' optimizer state over the replicas "
                             f"(--zero 1) or nothing (--zero 0); gradients and parameters (--zero 2, 3) are sharded "
                             f"only without pipeline stages (see docs/sharded.md, Grids)")
        if self.zero and self.schedule in ASYNC_SCHEDULES:
            flushing = ", ".join(name for name in TRAIN_SCHEDULES if name not in ASYNC_SCHEDULES)
            raise ValueError(f"--zero {self.zero} needs a flushing schedule ({flushing}): --schedule "
                             f"{self.schedule} updates each stage on its own, with no replicas to shard over; "
                             f"use --zero 0 with it")
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
        fixed = schedule_kind(self.schedule).fixed_virtual_stages
        if fixed and (self.virtual_stages not in (1, fixed) or self.placement is not None or self.tp > 1):
            raise ValueError(f"--schedule {self.schedule} places {fixed} chunks on each rank itself (rank r: "
                             f"chunks r and {fixed} stages - 1 - r) and splits no layers; leave out "
                             f"--virtual-stages and --placement and use --tp 1 (got --virtual-stages "
                             f"{self.virtual_stages}, --placement {self.placement}, --tp {self.tp})")
        if self.virtual_stages < 1 or (self.virtual_stages > 1 and not schedule_kind(self.schedule).virtual):
            raise ValueError(f"--virtual-stages must be >= 1, and above 1 only with a schedule of virtual stages "
                             f"(interleaved), got {self.virtual_stages} with --schedule {self.schedule}")
        if not fixed and self.virtual_stages > 1 and (self.placement is not None or self.tp > 1):
            raise ValueError("--virtual-stages places the chunks itself (chunk c on rank c % stages) and splits no "
                             "layers; leave out --placement and use --tp 1")
        if self.virtual_stages > 1 and not fixed and self.microbatches % self.stages:
            raise ValueError(f"--schedule {self.schedule} --virtual-stages {self.virtual_stages} needs --microbatches "
                             f"a multiple of --stages {self.stages} (Megatron's rule), got {self.microbatches}")
        chunks = self.stages * self.chunks_per_rank
        if isinstance(self.balance, str):
            if self.balance not in ("even", "auto"):
                raise ValueError(f"--balance must be 'even', 'auto' or layers per stage, got {self.balance!r}")
        elif len(self.balance) != chunks or min(self.balance) < 1:
            raise ValueError(f"--balance must be 'even', 'auto' or {chunks} positive layer counts "
                             f"'N,N,...', got {','.join(map(str, self.balance))!r}")
        if self.stage_memory_mb < 0 or (self.stage_memory_mb and self.balance != "auto"):
            raise ValueError(f"--stage-memory-mb must be >= 0 and is used by --balance auto only, got "
                             f"{self.stage_memory_mb} with --balance {self.balance}")
        if self.placement is not None and sorted(set(self.placement)) != list(range(self.stages)):
            raise ValueError(f"--placement must give a rank in 0..{self.stages - 1} to every layer and use "
                             f"each of them, got {','.join(map(str, self.placement))!r}")

    @property
    def chunks_per_rank(self) -> int:
        """The chunks each rank holds: ``virtual_stages``, or the schedule's fixed count (``zbv``: 2)."""
        return schedule_kind(self.schedule).chunks_per_rank(self.virtual_stages)

    def to_dict(self) -> dict:
        """The settings; ``stage_memory_mb``, ``zero`` and ``virtual_stages`` only when set (checkpoints from
        before them compare equal)."""
        settings = dataclasses.asdict(self)
        for key in ("stage_memory_mb", "zero"):
            if not settings[key]:
                del settings[key]
        if settings["virtual_stages"] == 1:
            del settings["virtual_stages"]
        return settings
