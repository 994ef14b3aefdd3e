"""What a pipeline step gives back (``StepResult``) and what its instruction handlers share (``RunState``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.pipeline.timing import StepClock, StepTimes
from mpipar.pipeline_plan.instructions import Instruction

__all__ = ["StepResult", "RunState"]


@dataclass
class StepResult:
    """What one step (or evaluation) gave on this rank.

    Attributes:
        loss: mean loss over the whole batch, on every rank (NaN without targets); for an
            asynchronous schedule's step on the rank of the last stage only (NaN elsewhere: a
            broadcast would make every step wait for the last stage, the flush it avoids).
        outputs: the model's outputs for the whole batch on the rank holding the
            last stage; None elsewhere.
        times: this rank's busy / communication / idle seconds.
        stage_busy: compute seconds of each stage this rank holds.
        stage_times: (forward, backward) seconds of each stage this rank holds.
        peak_in_flight: most micro-batches each local stage held activations for.
        activation_bytes: estimated peak bytes of activations saved for backward on
            this rank (peak in flight times the saved bytes of one micro-batch).
        bytes_sent: bytes of activations, skips and gradients this rank sent to other stages.
        skip_bytes_sent: the part of ``bytes_sent`` that carried skip tensors and their gradients.
        weight_versions: asynchronous schedules: most weight versions each local stage held.
        stash_bytes: asynchronous schedules: most bytes of stashed weight copies on this rank
            (the sum of the local stages' peaks).
        updates: asynchronous schedules: ``(stage, micro-batch, forward version, applied version)``
            of every update this rank applied in the step (micro-batches numbered over the run).
    """

    loss: float
    outputs: Optional[torch.Tensor]
    times: StepTimes
    stage_busy: Dict[int, float] = field(default_factory=dict)
    stage_times: Dict[int, tuple] = field(default_factory=dict)
    peak_in_flight: Dict[int, int] = field(default_factory=dict)
    activation_bytes: int = 0
    bytes_sent: int = 0
    skip_bytes_sent: int = 0
    weight_versions: Dict[int, int] = field(default_factory=dict)
    stash_bytes: int = 0
    updates: List[Tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class RunState:
    """What the instruction handlers of one step (or evaluation) share on this rank."""

    clock: StepClock
    train: bool
    microbatches: int
    chunks: Optional[List[torch.Tensor]]
    target_chunks: Optional[List[torch.Tensor]]
    last_backward: Dict[int, Instruction]  # stage -> its last backward (split: weight half) in the program
    before_last_backward: Optional[Callable[[nn.Module], None]]
    received: Dict[Instruction, torch.Tensor] = field(default_factory=dict)
    outgoing: Dict[Instruction, torch.Tensor] = field(default_factory=dict)
    sends: List[mpi_tensor.PendingOp] = field(default_factory=list)
    skips: Dict[Tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (skip, micro-batch) -> tensor
    skip_grads: Dict[Tuple[str, int], torch.Tensor] = field(default_factory=dict)  # ... -> its gradient
    bytes_sent: int = 0
    skip_bytes_sent: int = 0
    base: int = 0  # run-wide number of the batch's first micro-batch (asynchronous schedules)
    tag_count: int = 0  # micro-batch numbers in tags are taken modulo this (default: microbatches)
