"""Runs a pipeline schedule over MPI: activations down, gradients up, with Send/Recv."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug, events
from mpipar.diagnostics.agree import agree_on, collective_check, gather_checked
from mpipar.diagnostics.failure import agreed
from mpipar.models.skip import SkipEdge, find_skips
from mpipar.pipeline.microbatch import check_microbatches
from mpipar.pipeline.shared import SharedGradients, check_shared
from mpipar.pipeline.stage import Stage, TensorSpec
from mpipar.pipeline.timing import StepClock, StepTimes
from mpipar.pipeline.versions import WeightVersions, step_with_decay_share
from mpipar.pipeline_plan.placement import Placement
from mpipar.pipeline_plan.schedule import (
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    RecvSkipGrad,
    Schedule,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    SkipInstruction,
    Update,
    rank_program,
    window_program,
)

__all__ = ["Pipeline", "StepResult"]

_SPEC_TAG = 0  # shape agreement; data messages use tags >= 1


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
class _RunState:
    """What the instruction handlers of one step (or evaluation) share on this rank."""

    clock: StepClock
    train: bool
    microbatches: int
    chunks: Optional[List[torch.Tensor]]
    target_chunks: Optional[List[torch.Tensor]]
    last_backward: Dict[int, Backward]  # stage -> its last backward in the program
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


def _finished_by_stage(module: nn.Module, shared: List[nn.Parameter]) -> nn.Module:
    """The parameters whose gradients a stage's last backward completes: all of the stage's, but those it
    shares with other stages (summed at the end of the step)."""
    if not shared:
        return module
    return nn.ParameterList([p for p in module.parameters() if all(p is not s for s in shared)])


def _as_placement(placement, module: nn.Sequential, size: int) -> Placement:
    if placement is None:
        return Placement.even(len(module), size)
    if isinstance(placement, Placement):
        return placement
    if isinstance(placement, Mapping):
        return Placement.from_names([name for name, _ in module.named_children()], placement)
    return Placement(tuple(placement))


class Pipeline:
    """An ``nn.Sequential`` split over the ranks of ``comm`` and run as a pipeline.

    Every rank builds the same Sequential and the same Pipeline; a rank uses only
    the layers its placement gives it (the others may be freed). A placement may be
    non-contiguous: each maximal run of consecutive layers on one rank is a stage,
    so ``[0, 1, 1, 0]`` makes three stages and sends the activation 0 -> 1 -> 0.

    Collective contract: the constructor, :meth:`step` and :meth:`evaluate` are
    collective over ``comm``: every rank calls them the same number of times. The
    placement, schedule and micro-batch count must match on every rank (checked).
    Input batches are needed on the rank of the first stage, targets on the rank of
    the last; other ranks may pass None. Activation shapes and dtypes are agreed
    along the pipeline (pickled metadata) before the first tensor Send/Recv and
    again whenever the input shape changes, so a mismatch is an error on every
    rank, never a hang. Tensors move with non-blocking sends and blocking receives
    in clock order (see :func:`~mpipar.pipeline.schedule.rank_program`), which
    cannot deadlock. Size 1 runs the same code with every stage on one rank.

    Skip connections (:mod:`mpipar.pipeline.skip`: a ``SaveSkip`` layer and a later
    ``AddSkip`` / ``CatSkip`` in a ``SkipSequential``) may span any stages: the skip
    tensor of each micro-batch goes straight from the saving stage's rank to the using
    stage's rank (no message when one rank holds both) and its gradient comes back the
    same way, with tags of their own; its shape and dtype are agreed with the
    activations'.

    Gradients of micro-batches accumulate into ``.grad`` (call ``zero_grad``
    between steps as usual) and equal the full-batch gradients of the mean loss.
    A parameter used by layers of several stages (a tied embedding and LM head) is
    found at construction (:mod:`~mpipar.pipeline.shared`): its holders' copies start
    equal and its gradient is summed over them at the end of each training step.
    Layers with batch statistics (BatchNorm in training mode) see one micro-batch
    at a time: outputs match the unsplit model run micro-batch by micro-batch, and
    running statistics are updated once per micro-batch.

    Asynchronous schedules (``pipedream``, ``2bw``) never flush: each :meth:`step` takes one
    batch into the pipeline and leaves the last ``stages - stage - 1`` micro-batches of each
    stage in flight for the next step (:func:`~mpipar.pipeline.schedule.window_program`);
    :meth:`drain` (collective) finishes them, and :meth:`evaluate` and
    :meth:`async_state_dict` drain first. Each stage keeps weight versions
    (:class:`~mpipar.pipeline.versions.WeightVersions`): a micro-batch's forward and backward
    use the version the schedule gives it, its gradient goes to the stashed copy, and at each
    ``Update`` the optimizer given to :meth:`bind_optimizer` steps the stage's parameters
    with that gradient (the learning rate it has then). Gradients never accumulate into the
    parameters' ``.grad``. The first step after a drain agrees on the batch like a flushing
    step; later steps exchange no metadata and broadcast no loss (either would stall every
    stage once per step): their batches must have the fill's shape (checked on the ranks of
    the first and last stage only; to change it, :meth:`drain` first).

    Args:
        module: the whole model.
        comm: the pipeline's communicator.
        placement: a :class:`Placement`, a list of ranks (one per layer), a
            ``{layer name: rank}`` mapping, or None for an even contiguous split.
        schedule: ``"naive"``, ``"gpipe"``, ``"1f1b"``, or the asynchronous ``"pipedream"`` and
            ``"2bw"`` (see below).
        microbatches: micro-batches per batch; must divide the batch size.
        loss_fn: ``loss_fn(output, target)``, the mean loss over a micro-batch.
        device: where this rank's stages run (their layers are moved there; activations and
            gradients are received there, also for a stage without parameters). Default:
            where each stage's layers already are.

    Raises:
        ValueError, TypeError: on every rank, for a bad placement (wrong length,
            ranks outside the communicator, a rank without layers), schedule or
            micro-batch count, or when ranks disagree on them; for a parameter used by
            several stages under an asynchronous schedule.
    """

    def __init__(self, module: nn.Sequential, comm: MPI.Intracomm,
                 placement: Union[Placement, Sequence[int], Mapping[str, int], None] = None, *,
                 schedule: str = "1f1b", microbatches: int = 1,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 device: Optional[torch.device] = None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

        def setup():
            if not isinstance(module, nn.Sequential):
                raise TypeError(f"a pipeline splits an nn.Sequential, got {type(module).__name__}; "
                                f"wrap the layers in nn.Sequential")
            chosen = _as_placement(placement, module, self.size)
            chosen.validate(len(module), self.size)
            plan = Schedule(schedule, len(chosen.segments), microbatches)
            check_shared(module, chosen, plan)
            return chosen, plan, find_skips(module)

        self.placement, self.schedule, self.skips = collective_check(comm, setup, "pipeline setup")
        agree_on(comm, "the pipeline (layers, placement, schedule, micro-batches)",
                 (len(module), self.placement.ranks, schedule, microbatches),
                 hint="build the model and the Pipeline with the same arguments on every rank")
        self.loss_fn = loss_fn
        self.stage_ranks = self.placement.stage_ranks
        self.stages: Dict[int, Stage] = {
            index: Stage(index, len(self.stage_ranks), module[s.start:s.stop], s.start, device=device)
            for index, s in enumerate(self.placement.segments) if s.rank == self.rank}
        self.local_module = nn.ModuleList(stage.module for stage in self.stages.values())
        if device is not None:
            self.local_module.to(device)
        self.shared = SharedGradients(module, self.placement, comm)  # parameters of several stages
        self._finishing = {index: _finished_by_stage(stage.module, self.shared.local)
                           for index, stage in self.stages.items()}
        self._programs: Dict[tuple, list] = {}
        self._spec_tables: Dict[tuple, tuple] = {}  # (input spec, train) -> (stage inputs, stage outputs)
        self._input_specs: Dict[int, TensorSpec] = {}
        self._output_specs: Dict[int, TensorSpec] = {}
        self._skip_specs: Dict[str, TensorSpec] = {}
        stage_of = [index for index, s in enumerate(self.placement.segments) for _ in range(s.start, s.stop)]
        self.stage_skips: Tuple[SkipEdge, ...] = tuple(  # the skips that cross stages, as stage indices
            SkipEdge(edge.name, stage_of[edge.producer], stage_of[edge.consumer]) for edge in self.skips
            if stage_of[edge.producer] != stage_of[edge.consumer])
        self._uses = {index: [e.name for e in self.stage_skips if e.consumer == index] for index in self.stages}
        self._saves = {index: [e.name for e in self.stage_skips if e.producer == index] for index in self.stages}
        self._handlers: Dict[type, Callable[[Instruction, _RunState], None]] = {
            RecvActivation: self._receive, RecvGrad: self._receive,
            SendActivation: self._send, SendGrad: self._send,
            RecvSkip: self._receive_skip, RecvSkipGrad: self._receive_skip,
            SendSkip: self._send_skip, SendSkipGrad: self._send_skip,
            Forward: self._forward, Backward: self._backward, Update: self._update}
        # asynchronous schedules: weight versions per stage, and what lives from one step to the next
        self.versions: Dict[int, WeightVersions] = {
            index: WeightVersions(index, stage.module, self.schedule) for index, stage in self.stages.items()
        } if self.schedule.is_async else {}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._batches = 0  # batches taken in over the run
        self._in_flight = False  # a step left micro-batches in the pipeline (the next runs "steady")
        self._async_run: Optional[_RunState] = None
        self._previous_sends: List[mpi_tensor.PendingOp] = []
        self._traced_sends: Dict[mpi_tensor.PendingOp, tuple] = {}  # sends posted in a sampled step -> their event
        self._batch_spec: Optional[tuple] = None

    # -- roles ----------------------------------------------------------------------

    @property
    def microbatches(self) -> int:
        return self.schedule.microbatches

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    @property
    def holds_first_stage(self) -> bool:
        return 0 in self.stages

    @property
    def holds_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stages

    @property
    def last_stage_rank(self) -> int:
        return self.stage_ranks[-1]

    def parameters(self):
        """This rank's parameters (for the optimizer)."""
        return self.local_module.parameters()

    def _program(self, train: bool, microbatches: int) -> list:
        key = (train, microbatches)
        if key not in self._programs:
            plan = self.schedule if train and microbatches == self.microbatches else \
                Schedule(self.schedule.name if train else "forward", self.num_stages, microbatches)
            self._check_tags(2 * microbatches if plan.is_async else microbatches)
            self._programs[key] = rank_program(plan, self.stage_ranks, self.rank,
                                               [(e.producer, e.consumer) for e in self.stage_skips])
        return self._programs[key]

    def _window(self, window: str) -> list:
        """This rank's program of an asynchronous schedule's ``window``, cached."""
        key = ("window", window)
        if key not in self._programs:
            self._check_tags(2 * self.microbatches)
            self._programs[key] = window_program(self.schedule, self.stage_ranks, self.rank, window,
                                                 [(e.producer, e.consumer) for e in self.stage_skips])
        return self._programs[key]

    def _check_tags(self, microbatches: int) -> None:
        top = self._skip_tag(len(self.stage_skips), False, 0, microbatches)
        tag_ub = self.comm.Get_attr(MPI.TAG_UB) or 32767  # not set on COMM_SELF or Split comms
        if top > tag_ub:
            raise ValueError(f"{self.num_stages} stages x {microbatches} micro-batches need MPI tags up "
                             f"to {top}, above this MPI's limit {tag_ub}; use fewer micro-batches")

    def _tag(self, boundary: int, grad: bool, microbatch: int, microbatches: int) -> int:
        return 1 + (2 * boundary + int(grad)) * microbatches + microbatch

    def _skip_tag(self, skip: int, grad: bool, microbatch: int, microbatches: int) -> int:
        """Tags above every activation tag: a skip message can never match an activation receive."""
        return 1 + (2 * self.num_stages + 2 * skip + int(grad)) * microbatches + microbatch

    # -- agreement ------------------------------------------------------------------

    def _check_batch(self, inputs, targets, train: bool, microbatches: int) -> dict:
        self._program(train, microbatches)
        report = {"microbatches": microbatches}
        if train and self.schedule.is_async and self.stages and self._optimizer is None:
            raise ValueError(f"the {self.schedule.name} schedule steps an optimizer at each update: call "
                             f"pipe.bind_optimizer(optimizer) before the first step")
        if self.holds_first_stage:
            if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
                raise TypeError(f"rank {self.rank} holds the first stage and needs the input batch as a "
                                f"tensor with a batch dimension, got {type(inputs).__name__}")
            size = check_microbatches(inputs.shape[0], microbatches)
            report["batch"] = inputs.shape[0]
            report["spec"] = TensorSpec((size, *inputs.shape[1:]), inputs.dtype)
        if self.holds_last_stage and (train or targets is not None):
            if train and self.loss_fn is None:
                raise ValueError("Pipeline.step needs a loss_fn; pass loss_fn=... to the Pipeline")
            if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
                raise TypeError(f"rank {self.rank} holds the last stage and needs the targets as a tensor "
                                f"with a batch dimension, got {type(targets).__name__}")
            report["target_batch"] = targets.shape[0]
        return report

    def _agree_batch(self, inputs, targets, train: bool, microbatches: int) -> None:
        reports = gather_checked(self.comm, lambda: self._check_batch(inputs, targets, train, microbatches),
                                  "pipeline batch")
        first, last = reports[self.stage_ranks[0]], reports[self.last_stage_rank]
        counts = [report["microbatches"] for report in reports]
        problem = None
        if len(set(counts)) > 1:
            problem = f"ranks ask for different micro-batch counts {counts}"
        elif "target_batch" in last and last["target_batch"] != first["batch"]:
            problem = (f"{first['batch']} inputs on rank {self.stage_ranks[0]} but {last['target_batch']} "
                       f"targets on rank {self.last_stage_rank}")
        if problem:
            raise agreed(ValueError)(f"pipeline batch: {problem}")
        self._batch_spec = (first["spec"], first["batch"])
        key = (first["spec"], train)
        if key not in self._spec_tables:
            self._agree_shapes(first["spec"], train)
            self._spec_tables[key] = (dict(self._input_specs), dict(self._output_specs), dict(self._skip_specs))
        self._input_specs, self._output_specs, self._skip_specs = (dict(t) for t in self._spec_tables[key])

    def _agree_shapes(self, input_spec: TensorSpec, train: bool) -> None:
        """Pass each stage's output shape and dtype down the pipeline (pickled metadata), with those of
        the skips saved so far and not used yet (a stage takes the ones it uses, adds the ones it saves)."""
        error = None
        self._skip_specs = {}
        for index in sorted(self.stages):
            stage = self.stages[index]
            if stage.is_first:
                spec, live = input_spec, {}
            else:
                with debug.watched(self.comm, "recv", peer=self.stage_ranks[index - 1], tag=_SPEC_TAG,
                                   detail=f"activation shape for stage {index}"):
                    spec, live = self.comm.recv(source=self.stage_ranks[index - 1], tag=_SPEC_TAG)
            out = None
            if spec is not None and error is None:
                try:
                    used = {name: live[name] for name in self._uses[index]}
                    out, saved = stage.output_spec(spec, used)
                    if train and not stage.is_last and not out.dtype.is_floating_point:
                        raise TypeError(f"its output dtype {out.dtype} cannot carry gradients back")
                    mpi_tensor.mpi_datatype(out.dtype)
                    saved = {name: saved[name] for name in self._saves[index]}
                    for name, skip in saved.items():
                        if train and not skip.dtype.is_floating_point:
                            raise TypeError(f"skip {name!r} has dtype {skip.dtype}, which cannot carry gradients back")
                        mpi_tensor.mpi_datatype(skip.dtype)
                    self._skip_specs.update(used)
                    self._skip_specs.update(saved)
                    live = {**{k: v for k, v in live.items() if k not in used}, **saved}
                except Exception as exc:  # noqa: BLE001 - reported on every rank below
                    kind = next((k for k in (TypeError, ValueError) if isinstance(exc, k)), RuntimeError)
                    error = kind(f"stage {index} ({stage.layers}) on rank {self.rank} with input {spec}: "
                                 f"{type(exc).__name__}: {exc}")
            self._input_specs[index], self._output_specs[index] = spec, out
            if not stage.is_last:
                self.comm.send((out, live if out is not None else None), dest=self.stage_ranks[index + 1],
                               tag=_SPEC_TAG)

        def raise_local():
            if error is not None:
                raise error

        gather_checked(self.comm, raise_local, "pipeline activation shapes")

    # -- running --------------------------------------------------------------------

    def step(self, inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None, *,
             before_last_backward: Optional[Callable[[nn.Module], None]] = None) -> StepResult:
        """Forward and backward of one batch under the schedule; gradients accumulate. Collective.

        ``before_last_backward(module)`` runs right before the last backward of each local
        stage, ``module`` holding the parameters whose gradients that backward completes (the
        stage's, less those it shares with other stages: completed at the end of the step) (e.g.
        :meth:`~mpipar.pipeline.ReplicaAverager.stage_finishing`, to reduce them
        while the backward still runs; not with an asynchronous schedule, whose updates are its own).

        An asynchronous schedule's step runs one window (see the class notes): it needs
        :meth:`bind_optimizer` first."""
        if self.schedule.is_async:
            if before_last_backward is not None:
                raise ValueError(f"{self.schedule.name} applies its updates itself; before_last_backward "
                                 f"(replicas reducing gradients) needs a flushing schedule")
            return self._run_async(inputs, targets)
        return self._run(inputs, targets, train=True, microbatches=self.microbatches,
                         before_last_backward=before_last_backward)

    # -- asynchronous schedules -------------------------------------------------------

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer an asynchronous schedule steps at each ``Update``, with only the updating
        stage's parameters holding a gradient (an optimizer skips parameters without one) and its
        weight decay scaled by the update's part of the batch (PipeDream: ``1/m``), so decay per
        batch is the flushing schedules'. Local (no communication)."""
        self._optimizer = optimizer

    def _step_optimizer(self, params: List[nn.Parameter], share: float) -> None:
        if self._optimizer is None:
            raise RuntimeError(f"the {self.schedule.name} schedule steps an optimizer at each update: call "
                               f"pipe.bind_optimizer(optimizer) before the first step")
        step_with_decay_share(self._optimizer, share)

    @property
    def in_flight(self) -> bool:
        """Whether an asynchronous schedule's last step left micro-batches in the pipeline."""
        return self._in_flight

    def _check_steady_batch(self, inputs, targets) -> None:
        """Local checks of a steady step's batch against the fill's (no communication)."""
        spec, batch = self._batch_spec
        if self.holds_first_stage:
            size = check_microbatches(inputs.shape[0], self.microbatches) if isinstance(inputs, torch.Tensor) \
                and inputs.dim() else None
            if size is None or TensorSpec((size, *inputs.shape[1:]), inputs.dtype) != spec:
                raise ValueError(f"rank {self.rank}: a steady step of {self.schedule.name} needs batches like the "
                                 f"fill's ({batch} x {spec}); call drain() before changing the batch")
        if self.holds_last_stage and (not isinstance(targets, torch.Tensor) or targets.shape[:1] != (batch,)):
            raise ValueError(f"rank {self.rank}: a steady step of {self.schedule.name} needs {batch} targets on "
                             f"the last stage's rank")

    def _async_state(self, clock: StepClock) -> _RunState:
        if self._async_run is None:
            self._async_run = _RunState(clock=clock, train=True, microbatches=self.microbatches, chunks=None,
                                        target_chunks=None, last_backward={}, before_last_backward=None,
                                        tag_count=2 * self.microbatches)
        run = self._async_run
        run.clock, run.base, run.bytes_sent, run.skip_bytes_sent = clock, self._batches * self.microbatches, 0, 0
        return run

    def _execute_window(self, window: str, run: _RunState) -> None:
        for instruction in self._window(window):
            instruction = dataclasses.replace(instruction, microbatch=run.base + instruction.microbatch)
            self._handlers[type(instruction)](instruction, run)

    def _run_async(self, inputs, targets) -> StepResult:
        clock = StepClock()
        window = "steady" if self._in_flight else "fill"
        if window == "fill":  # the pipeline is empty: agree like a flushing step (waiting: idle)
            self._agree_batch(inputs, targets, True, self.microbatches)
        else:
            self._check_steady_batch(inputs, targets)
        for stage in self.stages.values():
            stage.outputs.clear()
            stage.losses.clear()
            stage.forward_busy = stage.backward_busy = 0.0
            stage.peak_in_flight = 0
        for versions in self.versions.values():
            versions.reset_peaks()
        run = self._async_state(clock)
        run.chunks = list(inputs.chunk(self.microbatches)) if self.holds_first_stage else None
        run.target_chunks = list(targets.chunk(self.microbatches)) if self.holds_last_stage else None
        self._execute_window(window, run)
        self._batches += 1
        self._in_flight = True
        with clock.communicating():  # the previous window's sends: received in this window at the latest
            self._wait_sends(self._previous_sends)
        self._previous_sends, run.sends = run.sends, []
        clock.busy = sum(stage.busy for stage in self.stages.values())
        last = self.stages.get(self.num_stages - 1)
        mean = last.mean_loss() if last is not None else None
        return StepResult(
            loss=math.nan if mean is None else mean, outputs=last.gathered_outputs() if last else None,
            times=clock.finish(),
            stage_busy={index: stage.busy for index, stage in self.stages.items()},
            stage_times={index: (stage.forward_busy, stage.backward_busy) for index, stage in self.stages.items()},
            peak_in_flight={index: stage.peak_in_flight for index, stage in self.stages.items()},
            activation_bytes=sum(s.peak_in_flight * s.saved_bytes for s in self.stages.values()),
            bytes_sent=run.bytes_sent, skip_bytes_sent=run.skip_bytes_sent,
            weight_versions={index: v.peak_versions for index, v in self.versions.items()},
            stash_bytes=sum(v.peak_bytes for v in self.versions.values()),
            updates=self.take_updates())

    def take_updates(self) -> List[Tuple[int, int, int, int]]:
        """``(stage, micro-batch, forward version, applied version)`` of the local updates not yet
        reported (a step reports its own; this gives a drain's). Local."""
        return [(index, *record) for index, v in self.versions.items() for record in v.take_records()]

    def drain(self) -> None:
        """Finish the micro-batches an asynchronous schedule left in flight (their backwards and
        updates), so that nothing is in the pipeline. Collective over ``comm``; nothing to do
        for a flushing schedule or when already drained (the same on every rank). Results do
        not depend on where drains happen: versions follow the schedule's rule."""
        if not self._in_flight:
            return
        run = self._async_state(StepClock())
        run.chunks = run.target_chunks = None
        self._execute_window("drain", run)
        self._wait_sends(self._previous_sends + run.sends)
        self._previous_sends, run.sends = [], []
        run.received.clear()
        self._in_flight = False

    def async_state_dict(self) -> dict:
        """After a :meth:`drain` (done here; collective): the batch count and each local stage's
        weight versions that later forwards will use (``{}`` for a flushing schedule)."""
        if not self.schedule.is_async:
            return {}
        self.drain()
        return {"batches": self._batches,
                "stages": {index: versions.state_dict() for index, versions in self.versions.items()}}

    def load_async_state_dict(self, state: dict) -> None:
        """Continue from :meth:`async_state_dict` (same schedule and placement). Local."""
        if not self.schedule.is_async:
            return
        self._batches = int(state["batches"])
        for index, versions in self.versions.items():
            versions.load_state_dict(state["stages"][index])

    def evaluate(self, inputs: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None, *,
                 microbatches: Optional[int] = None) -> StepResult:
        """Forward only, without gradients (micro-batches streamed through the stages). Collective.

        ``microbatches`` (default: the pipeline's) may differ, e.g. for a short last batch. An
        asynchronous pipeline is drained first (:meth:`drain`; its updates are reported by
        :meth:`take_updates` or the next step).
        """
        self.drain()
        return self._run(inputs, targets, train=False, microbatches=microbatches or self.microbatches)

    def _run(self, inputs, targets, *, train: bool, microbatches: int,
             before_last_backward: Optional[Callable[[nn.Module], None]] = None) -> StepResult:
        clock = StepClock()
        for stage in self.stages.values():
            stage.reset()
            stage.peak_in_flight = 0
        self._traced_sends.clear()  # a failed step's
        self._agree_batch(inputs, targets, train, microbatches)  # waiting for other ranks: idle
        program = self._program(train, microbatches)
        run = _RunState(
            clock=clock, train=train, microbatches=microbatches, before_last_backward=before_last_backward,
            chunks=list(inputs.chunk(microbatches)) if self.holds_first_stage else None,
            target_chunks=list(targets.chunk(microbatches)) if isinstance(targets, torch.Tensor) and
            self.holds_last_stage else None,
            last_backward={instruction.stage: instruction for instruction in program
                           if isinstance(instruction, Backward)})
        for instruction in program:
            self._handlers[type(instruction)](instruction, run)
        with clock.communicating():
            self._wait_sends(run.sends)
            if train:
                self.shared.reduce()  # waits for the other holders of a shared parameter
        loss = self._broadcast_loss()  # waits for the last stage to finish: idle
        clock.busy = sum(stage.busy for stage in self.stages.values())
        outputs = self.stages[self.num_stages - 1].gathered_outputs() if self.holds_last_stage else None
        return StepResult(
            loss=loss, outputs=outputs, times=clock.finish(),
            stage_busy={index: stage.busy for index, stage in self.stages.items()},
            stage_times={index: (stage.forward_busy, stage.backward_busy) for index, stage in self.stages.items()},
            peak_in_flight={index: stage.peak_in_flight for index, stage in self.stages.items()},
            activation_bytes=sum(s.peak_in_flight * s.saved_bytes for s in self.stages.values()),
            bytes_sent=run.bytes_sent, skip_bytes_sent=run.skip_bytes_sent)

    # -- instructions (one handler per instruction type, see _handlers) -------------

    def _peer_and_tag(self, instruction: Instruction, microbatches: int) -> Tuple[int, int]:
        """The rank on the other end of a send or receive, and the message's tag."""
        grad = isinstance(instruction, (RecvGrad, SendGrad))
        upstream = isinstance(instruction, (RecvActivation, SendGrad))  # the peer holds stage - 1
        peer_stage = instruction.stage - 1 if upstream else instruction.stage + 1
        boundary = min(instruction.stage, peer_stage)
        return self.stage_ranks[peer_stage], self._tag(boundary, grad, instruction.microbatch % microbatches,
                                                       microbatches)

    def _receive(self, instruction: Union[RecvActivation, RecvGrad], run: _RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        grad = isinstance(instruction, RecvGrad)
        source, tag = self._peer_and_tag(instruction, run.tag_count or run.microbatches)
        buffer = (self._output_specs if grad else self._input_specs)[index].empty(self.stages[index].device)
        recorder = events.active()
        begin = time.perf_counter() if recorder is not None else 0.0
        with debug.watched(self.comm, "recv", peer=source, tag=tag, detail=(
                f"{'gradient' if grad else 'activation'} of micro-batch {i} for stage {index}")):
            self.comm.Probe(source=source, tag=tag)  # waiting for the peer: idle time
        with run.clock.communicating():
            run.received[instruction] = mpi_tensor.recv_(buffer, self.comm, source, tag)
        if recorder is not None:
            recorder.add("recv_grad" if grad else "recv_activation", begin, time.perf_counter(),
                         nbytes=buffer.numel() * buffer.element_size(), peer=source, peer_comm=self.comm, index=i,
                         stage=index)

    def _send(self, instruction: Union[SendActivation, SendGrad], run: _RunState) -> None:
        dest, tag = self._peer_and_tag(instruction, run.tag_count or run.microbatches)
        tensor = run.outgoing.pop(instruction)
        run.bytes_sent += self._post(tensor, dest, tag, run, instruction,
                                     "send_grad" if isinstance(instruction, SendGrad) else "send_activation")

    def _post(self, tensor: torch.Tensor, dest: int, tag: int, run: _RunState, instruction: Instruction,
              event: str) -> int:
        """Post a non-blocking send (its completion: :meth:`_wait_sends`); in a sampled step remember
        its event. Returns its bytes."""
        size = tensor.numel() * tensor.element_size()
        with run.clock.communicating():
            posted = time.perf_counter()
            op = mpi_tensor.isend(tensor, self.comm, dest, tag)
        run.sends.append(op)
        recorder = events.active()
        if recorder is not None:
            self._traced_sends[op] = (recorder, recorder.step, event, posted, size, dest, instruction.microbatch,
                                      instruction.stage)
        return size

    def _wait_sends(self, ops: List[mpi_tensor.PendingOp]) -> None:
        """Complete posted sends; a send posted in a sampled step becomes its event (posted to seen
        completed here, on the step that posted it) and, in a sampled step, the wait an event too."""
        recorder = events.active()
        begin = time.perf_counter()
        for op in ops:
            op.wait()
            traced = self._traced_sends.pop(op, None) if self._traced_sends else None
            if traced is not None:
                owner, step, event, posted, size, dest, microbatch, stage = traced
                owner.add(event, posted, time.perf_counter(), nbytes=size, peer=dest, peer_comm=self.comm,
                          index=microbatch, stage=stage, step=step)
        if recorder is not None and ops:
            recorder.add("wait_sends", begin, time.perf_counter())

    def _skip_peer_and_tag(self, instruction: SkipInstruction, microbatches: int) -> Tuple[int, int]:
        grad = isinstance(instruction, (SendSkipGrad, RecvSkipGrad))
        return (self.stage_ranks[instruction.peer],
                self._skip_tag(instruction.skip, grad, instruction.microbatch % microbatches, microbatches))

    def _receive_skip(self, instruction: Union[RecvSkip, RecvSkipGrad], run: _RunState) -> None:
        name, i = self.stage_skips[instruction.skip].name, instruction.microbatch
        grad = isinstance(instruction, RecvSkipGrad)
        source, tag = self._skip_peer_and_tag(instruction, run.tag_count or run.microbatches)
        buffer = self._skip_specs[name].empty(self.stages[instruction.stage].device)
        recorder = events.active()
        begin = time.perf_counter() if recorder is not None else 0.0
        with debug.watched(self.comm, "recv", peer=source, tag=tag, detail=(
                f"{'gradient of ' if grad else ''}skip {name!r} of micro-batch {i} for stage {instruction.stage}")):
            self.comm.Probe(source=source, tag=tag)  # waiting for the peer: idle time
        with run.clock.communicating():
            (run.skip_grads if grad else run.skips)[name, i] = mpi_tensor.recv_(buffer, self.comm, source, tag)
        if recorder is not None:
            recorder.add("recv_skip_grad" if grad else "recv_skip", begin, time.perf_counter(),
                         nbytes=buffer.numel() * buffer.element_size(), peer=source, peer_comm=self.comm, index=i,
                         stage=instruction.stage)

    def _send_skip(self, instruction: Union[SendSkip, SendSkipGrad], run: _RunState) -> None:
        name, i = self.stage_skips[instruction.skip].name, instruction.microbatch
        dest, tag = self._skip_peer_and_tag(instruction, run.tag_count or run.microbatches)
        grad = isinstance(instruction, SendSkipGrad)
        tensor = (run.skip_grads if grad else run.skips).pop((name, i))
        size = self._post(tensor, dest, tag, run, instruction, "send_skip_grad" if grad else "send_skip")
        run.bytes_sent += size
        run.skip_bytes_sent += size

    def _forward(self, instruction: Forward, run: _RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        x = run.chunks[i - run.base] if stage.is_first else run.received.pop(RecvActivation(index, i))
        used = {name: run.skips.pop((name, i)) for name in self._uses[index]}  # received, or saved on this rank
        weights = self.versions[index].weights_for(i) if run.train and self.versions else None
        begin = time.perf_counter()
        y, saved = stage.forward(i, x, train=run.train,
                                 target=run.target_chunks[i - run.base] if run.target_chunks else None,
                                 loss_fn=self.loss_fn, scale=1.0 / run.microbatches, skips=used, weights=weights)
        end = time.perf_counter()
        stage.forward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("forward", begin, end, index=i, stage=index)
        for name, tensor in saved.items():  # for SendSkip, or for a later stage on this rank
            run.skips[name, i] = tensor.detach()
        if not stage.is_last:
            run.outgoing[SendActivation(index, i)] = y.detach()

    def _backward(self, instruction: Backward, run: _RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        grad_output = None if stage.is_last else run.received.pop(RecvGrad(index, i))
        skip_grads = {name: run.skip_grads.pop((name, i)) for name in self._saves[index]}
        if run.before_last_backward is not None and instruction == run.last_backward[index]:
            run.before_last_backward(self._finishing[index])
        begin = time.perf_counter()
        grad_input, used_grads = stage.backward(i, grad_output, skip_grads)
        if self.versions:
            self.versions[index].take_gradient(i)
        end = time.perf_counter()
        stage.backward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("backward", begin, end, index=i, stage=index)
        for name, grad in used_grads.items():  # for SendSkipGrad, or for an earlier stage on this rank
            run.skip_grads[name, i] = grad
        if not stage.is_first:
            run.outgoing[SendGrad(index, i)] = grad_input

    def _update(self, instruction: Update, run: _RunState) -> None:
        begin = time.perf_counter()
        self.versions[instruction.stage].update(self._step_optimizer)
        end = time.perf_counter()
        self.stages[instruction.stage].backward_busy += end - begin  # compute: counted as busy
        recorder = events.active()
        if recorder is not None:
            recorder.add("update", begin, end, index=instruction.microbatch, stage=instruction.stage)

    def _broadcast_loss(self) -> float:
        value = torch.full((1,), math.nan, dtype=torch.float64)
        if self.holds_last_stage:
            mean = self.stages[self.num_stages - 1].mean_loss()
            value[0] = math.nan if mean is None else mean
        mpi_tensor.bcast_(value, self.comm, root=self.last_stage_rank)
        return float(value[0])
