"""Runs a pipeline schedule over MPI: activations down, gradients up, with Send/Recv.

``Pipeline`` sets up the stages and runs a rank's program; its concerns live beside it: shape agreement
(``shapes.py``), messages and their waits (``transport.py``), asynchronous windows (``windows.py``), the compute
of an instruction (``compute.py``), what a step gives back (``step_state.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.models.skip import SkipEdge, find_skips
from mpipar.pipeline.compute import Compute, finished_by_stage
from mpipar.pipeline.shapes import ShapeAgreement
from mpipar.pipeline.shared import SharedGradients, check_shared
from mpipar.pipeline.split_backward import SplitBackward
from mpipar.pipeline.stage import Stage, TensorSpec
from mpipar.pipeline.step_state import RunState, StepResult
from mpipar.pipeline.timing import StepClock
from mpipar.pipeline.transport import Transport
from mpipar.pipeline.versions import WeightVersions
from mpipar.pipeline.windows import AsyncWindows
from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.pipeline_plan.placement import Placement, even_balance
from mpipar.pipeline_plan.schedule import (
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    RecvSkipGrad,
    Schedule,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    Update,
    rank_program,
)

__all__ = ["Pipeline", "StepResult"]


def _as_placement(placement, module: nn.Sequential, size: int, schedule: str, virtual_stages: int) -> Placement:
    if placement is None:  # the schedule's own placement of even chunks (zbv: a V)
        kind = schedule_kind(schedule)
        return kind.placement(even_balance(len(module), size * kind.chunks_per_rank(virtual_stages)), size)
    if isinstance(placement, Placement):
        return placement
    if isinstance(placement, Mapping):
        return Placement.from_names([name for name, _ in module.named_children()], placement)
    return Placement(tuple(placement))


class Pipeline(ShapeAgreement, Transport, AsyncWindows, Compute, SplitBackward):
    """An ``nn.Sequential`` split over the ranks of ``comm`` and run as a pipeline.

    Every rank builds the same Sequential and the same Pipeline; a rank uses only
    the layers its placement gives it (the others may be freed). A placement may be
    non-contiguous: each maximal run of consecutive layers on one rank is a stage,
    so ``[0, 1, 1, 0]`` makes three stages and sends the activation 0 -> 1 -> 0; a placement's
    ``boundaries`` cut a run into several stages (``Placement.v_shape``: four stages on ``[0, 1, 1, 0]``),
    and between two stages of one rank the activation and its gradient pass in memory (no message).

    Collective contract: the constructor, :meth:`step` and :meth:`evaluate` are
    collective over ``comm``: every rank calls them the same number of times. The
    placement, schedule and micro-batch count must match on every rank (checked).
    Input batches are needed on the rank of the first stage, targets on the rank of
    the last; other ranks may pass None. Activation shapes and dtypes are agreed
    along the pipeline (pickled metadata) before the first tensor Send/Recv and
    again whenever the input shape changes, so a mismatch is an error on every
    rank, never a hang. Tensors move with non-blocking sends and receives posted
    ahead (``receives_ahead`` per stream), waited for in clock order (see
    :func:`~mpipar.pipeline.schedule.rank_program`), which cannot deadlock. Size 1
    runs the same code with every stage on one rank.

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
        schedule: a registered schedule that trains (``TRAIN_SCHEDULES``: ``"naive"``, ``"gpipe"``,
            ``"1f1b"``, or the asynchronous ``"pipedream"`` and ``"2bw"``, see below).
        microbatches: micro-batches per batch; must divide the batch size.
        loss_fn: ``loss_fn(output, target)``, the mean loss over a micro-batch.
        device: where this rank's stages run (their layers are moved there; activations and
            gradients are received there, also for a stage without parameters). Default:
            where each stage's layers already are.
        receives_ahead: receives kept posted per stream (activations into a stage, gradients into
            it, each skip), into buffers of the agreed shapes, so a message lands while the stage
            computes; 0 posts each when the program reaches it. Local (may differ between ranks).
        virtual_stages: with ``placement=None``, the stages per rank (:meth:`Placement.interleaved`, for
            ``schedule="interleaved"``); default 1: an even contiguous split (``"zbv"``: always two chunks
            per rank in a V, :meth:`Placement.v_shape`). A schedule of virtual stages
            takes the placement's stages per rank (each rank must hold as many).

    A schedule that splits the backward (``"zero-bubble"``, ``"zbv"``: input gradient ``I`` on the critical path, weight
    gradients ``W`` later, :mod:`~mpipar.pipeline.split_backward`) cuts each stage's graph between its layers
    (after each trainable one; a layer must not change its input in place); the gradients are those of the
    unsplit backward, and a micro-batch's activations are held until its ``W`` (``peak_in_flight`` counts them).

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
                 device: Optional[torch.device] = None, receives_ahead: int = 2, virtual_stages: int = 1):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

        def setup():
            if not isinstance(module, nn.Sequential):
                raise TypeError(f"a pipeline splits an nn.Sequential, got {type(module).__name__}; "
                                f"wrap the layers in nn.Sequential")
            if isinstance(receives_ahead, bool) or not isinstance(receives_ahead, int) or receives_ahead < 0:
                raise ValueError(f"receives_ahead must be an int >= 0, got {receives_ahead!r}")
            chosen = _as_placement(placement, module, self.size, schedule, virtual_stages)
            chosen.validate(len(module), self.size)
            plan = Schedule.on(schedule, chosen.stage_ranks, microbatches)
            in_place = [name for name, layer in module.named_children() if getattr(layer, "inplace", False)]
            if plan.kind.splits_backward and in_place:
                raise ValueError(f"{schedule} cuts each stage's graph between its layers and cannot differentiate "
                                 f"layers {in_place}, which change their input in place; use their out-of-place "
                                 f"form (e.g. nn.ReLU() for nn.ReLU(inplace=True))")
            check_shared(module, chosen, plan)
            return chosen, plan, find_skips(module)

        self.placement, self.schedule, self.skips = collective_check(comm, setup, "pipeline setup")
        agree_on(comm, "the pipeline (layers, placement, schedule, micro-batches)",
                 (len(module), self.placement.ranks, self.placement.boundaries, schedule, microbatches),
                 hint="build the model and the Pipeline with the same arguments on every rank")
        self.loss_fn = loss_fn
        self.loss_scale = 1.0  # fp16: the loss scaler's scale, set before each step (the reported loss is unscaled)
        self.receives_ahead = receives_ahead
        self.stage_ranks = self.placement.stage_ranks
        self.stages: Dict[int, Stage] = {
            index: Stage(index, len(self.stage_ranks), cast(nn.Sequential, module[s.start:s.stop]), s.start,
                         device=device)
            for index, s in enumerate(self.placement.segments) if s.rank == self.rank}
        self.local_module = nn.ModuleList(stage.module for stage in self.stages.values())
        if device is not None:
            self.local_module.to(device)
        self.shared = SharedGradients(module, self.placement, comm)  # parameters of several stages
        self._finishing = {index: finished_by_stage(stage.module, self.shared.local)
                           for index, stage in self.stages.items()}
        self._programs: Dict[tuple, list] = {}
        self._spec_tables: Dict[tuple, tuple] = {}  # (input spec, train) -> (stage inputs, stage outputs)
        self._input_specs: Dict[int, Optional[TensorSpec]] = {}
        self._output_specs: Dict[int, Optional[TensorSpec]] = {}
        self._skip_specs: Dict[str, TensorSpec] = {}
        stage_of = [index for index, s in enumerate(self.placement.segments) for _ in range(s.start, s.stop)]
        self.stage_skips: Tuple[SkipEdge, ...] = tuple(  # the skips that cross stages, as stage indices
            SkipEdge(edge.name, stage_of[edge.producer], stage_of[edge.consumer]) for edge in self.skips
            if stage_of[edge.producer] != stage_of[edge.consumer])
        self._uses = {index: [e.name for e in self.stage_skips if e.consumer == index] for index in self.stages}
        self._saves = {index: [e.name for e in self.stage_skips if e.producer == index] for index in self.stages}
        self._handlers: Dict[type, Callable[[Any, RunState], None]] = {  # instruction type -> its handler
            RecvActivation: self._receive, RecvGrad: self._receive,
            SendActivation: self._send, SendGrad: self._send,
            RecvSkip: self._receive_skip, RecvSkipGrad: self._receive_skip,
            SendSkip: self._send_skip, SendSkipGrad: self._send_skip,
            Forward: self._forward, Backward: self._backward, Update: self._update,
            BackwardInput: self._backward_input, BackwardWeight: self._backward_weight}
        if self.schedule.kind.splits_backward:
            self._install_split_backward()
        # asynchronous schedules: weight versions per stage, and what lives from one step to the next
        self.versions: Dict[int, WeightVersions] = {
            index: WeightVersions(index, stage.module, self.schedule) for index, stage in self.stages.items()
        } if self.schedule.is_async else {}
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._batches = 0  # batches taken in over the run
        self._in_flight = False  # a step left micro-batches in the pipeline (the next runs "steady")
        self._async_run: Optional[RunState] = None
        self._previous_sends: List[mpi_tensor.PendingOp] = []
        self._traced_sends: Dict[mpi_tensor.PendingOp, tuple] = {}  # sends posted in a sampled step -> their event
        self._batch_spec: Optional[tuple] = None
        self._posted: Dict[Any, mpi_tensor.PendingOp] = {}  # receives posted ahead (transport.py)
        self._queued: Dict[tuple, Deque[Any]] = {}
        self._outstanding: Dict[tuple, int] = {}
        self._routes: Dict[tuple, tuple] = {}
        self._routes_key: Optional[tuple] = None

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
            plan = dataclasses.replace(self.schedule, microbatches=microbatches) if train else \
                Schedule("forward", self.num_stages, microbatches)
            self._check_tags(2 * microbatches if plan.is_async else microbatches)
            self._programs[key] = rank_program(plan, self.stage_ranks, self.rank,
                                               [(e.producer, e.consumer) for e in self.stage_skips])
        return self._programs[key]

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
        if self.schedule.kind.splits_backward:
            self._reset_split_backward()
        self._traced_sends.clear()  # a failed step's
        self._agree_batch(inputs, targets, train, microbatches)  # waiting for other ranks: idle
        program = self._program(train, microbatches)
        run = RunState(
            clock=clock, train=train, microbatches=microbatches, before_last_backward=before_last_backward,
            chunks=list(inputs.chunk(microbatches)) if self.holds_first_stage else None,
            target_chunks=list(targets.chunk(microbatches)) if isinstance(targets, torch.Tensor) and
            self.holds_last_stage else None,
            last_backward={instruction.stage: instruction for instruction in program
                           if isinstance(instruction, (Backward, BackwardWeight))})
        self._post_receives(program, run)
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
            activation_bytes=sum(s.activation_peak_bytes for s in self.stages.values()),
            bytes_sent=run.bytes_sent, skip_bytes_sent=run.skip_bytes_sent)
