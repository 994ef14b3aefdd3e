"""The state a :class:`~mpipar.pipeline.executor.Pipeline`'s concerns share, declared once for the type checker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

__all__ = ["PipelineParts"]

if TYPE_CHECKING:
    import torch
    from mpi4py import MPI
    from torch import nn

    from mpipar.comm import mpi_tensor
    from mpipar.models.skip import SkipEdge
    from mpipar.pipeline.shared import SharedGradients
    from mpipar.pipeline.stage import Stage, TensorSpec
    from mpipar.pipeline.step_state import RunState
    from mpipar.pipeline.versions import WeightVersions
    from mpipar.pipeline_plan.placement import Placement
    from mpipar.pipeline_plan.schedule import Schedule


class PipelineParts:
    """The base of ``Pipeline``'s concerns (``shapes.py``, ``transport.py``, ``windows.py``, ``compute.py``):
    the attributes ``Pipeline.__init__`` sets and the methods one concern calls on another, so that each
    concern's use of them is checked. Declarations only: nothing here exists at run time."""

    comm: MPI.Intracomm
    rank: int
    size: int
    placement: Placement
    schedule: Schedule
    skips: Tuple[SkipEdge, ...]
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    loss_scale: float  # the last stage backpropagates its loss times this (fp16 loss scaling)
    stage_ranks: Tuple[int, ...]
    stages: Dict[int, Stage]
    local_module: nn.ModuleList
    shared: SharedGradients
    stage_skips: Tuple[SkipEdge, ...]  # the skips that cross stages, as stage indices
    versions: Dict[int, WeightVersions]  # asynchronous schedules: each local stage's weight versions
    _finishing: Dict[int, nn.Module]
    _programs: Dict[tuple, list]
    _spec_tables: Dict[tuple, tuple]
    _input_specs: Dict[int, Optional[TensorSpec]]  # None only where the agreement failed (raised on every rank)
    _output_specs: Dict[int, Optional[TensorSpec]]
    _skip_specs: Dict[str, TensorSpec]
    _uses: Dict[int, List[str]]
    _saves: Dict[int, List[str]]
    _handlers: Dict[type, Callable[[Any, RunState], None]]  # instruction type -> its handler
    _optimizer: Optional[torch.optim.Optimizer]
    _batches: int
    _in_flight: bool
    _async_run: Optional[RunState]
    _previous_sends: List[mpi_tensor.PendingOp]
    _traced_sends: Dict[mpi_tensor.PendingOp, tuple]
    _batch_spec: Optional[Tuple[TensorSpec, int]]  # the fill's (micro-batch spec, batch size)
    _posted: Dict[Any, mpi_tensor.PendingOp]  # receive instruction -> its receive, posted ahead
    _queued: Dict[tuple, Deque[Any]]  # stream -> its receive instructions not posted yet
    _outstanding: Dict[tuple, int]  # stream -> its receives posted and not taken
    _routes: Dict[tuple, tuple]  # (stream, micro-batch mod count, count) -> (source, tag, spec), for the agreed specs
    _routes_key: Optional[tuple]  # the spec table the routes were found for

    if TYPE_CHECKING:
        @property
        def microbatches(self) -> int: ...

        @property
        def num_stages(self) -> int: ...

        @property
        def holds_first_stage(self) -> bool: ...

        @property
        def holds_last_stage(self) -> bool: ...

        @property
        def last_stage_rank(self) -> int: ...

        def _program(self, train: bool, microbatches: int) -> list: ...

        def _agree_batch(self, inputs: Optional[torch.Tensor], targets: Optional[torch.Tensor], train: bool,
                         microbatches: int) -> None: ...

        def _check_tags(self, microbatches: int) -> None: ...

        def _wait_sends(self, ops: List[mpi_tensor.PendingOp]) -> None: ...

        def _post_receives(self, program: List[Any], run: RunState) -> None: ...

        def _step_optimizer(self, params: List[nn.Parameter], share: float) -> None: ...

        def _output_grad(self, index: int, microbatch: int, run: RunState) -> Optional[torch.Tensor]: ...
