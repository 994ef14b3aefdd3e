"""Data parallelism across replicas of a partitioned model: one position's gradients averaged over its copies."""

from __future__ import annotations

from typing import Optional

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import GradientReducer, average_buffers
from mpipar.comm.topology import spans_nodes
from mpipar.diagnostics.agree import agree_on

__all__ = ["ReplicaAverager"]


class ReplicaAverager:
    """Averages the gradients of one pipeline position over the data-parallel group.

    After every replica's ``Pipeline.step`` has accumulated its micro-batch
    gradients, :meth:`average` makes each ``.grad`` the sample-weighted mean over
    the replicas: sum(n_k g_k) / sum(n_k), which equals the gradient of the whole
    global batch when each replica's loss is a mean over its own samples. The
    reduction is a :class:`~mpipar.comm.reducer.GradientReducer` (the one
    :class:`~mpipar.data_parallel.DataParallel` uses): ``.grad`` are views into
    flat buckets.

    Overlapped use: :meth:`begin_step` before the step and
    ``Pipeline.step(..., before_last_backward=averager.stage_finishing)``: during
    the last micro-batch's backward each bucket's non-blocking Allreduce starts as
    soon as its gradients are final (in bucket order on every replica), and
    :meth:`average` waits for the rest. Without :meth:`begin_step`,
    :meth:`average` does the whole reduction after the step.

    Collective contract: every rank of ``comm`` constructs it with parameters of
    the same shapes and dtypes in the same order (checked; parameters and buffers
    are then broadcast from rank 0 of ``comm``), and calls :meth:`begin_step` (if
    at all) and :meth:`average` the same number of times. Size 1: gradients are
    left as they are.

    Args:
        module: the stage module(s) this rank holds (``Pipeline.local_module``).
        comm: the data-parallel group (``ProcessGrid.data_comm``).
        bucket_cap_mb: bucket size in MiB.
        wire: the reducer's 16-bit wire (``--grad-wire``), or None.

    Raises:
        ValueError: on every rank, when the replicas' parameters differ.
    """

    def __init__(self, module: nn.Module, comm: MPI.Intracomm, *, bucket_cap_mb: float = 25.0,
                 wire: Optional[torch.dtype] = None):
        params = [p for p in module.parameters() if p.requires_grad]
        agree_on(comm, "the parameters of this pipeline position (shape, dtype)",
                 [(tuple(p.shape), str(p.dtype)) for p in params],
                 hint="build the same model and placement in every replica")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                mpi_tensor.bcast_(tensor.data, comm, 0)
        self.comm = comm
        self.reducer = GradientReducer(params, comm, bucket_cap_mb=bucket_cap_mb, out_of_place=spans_nodes(comm),
                                       wire=wire)
        self.stats = self.reducer.stats
        self._final: set = set()  # parameters whose next accumulation completes this step's gradient
        if comm.Get_size() > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @property
    def buckets(self) -> list:
        return self.reducer.buckets

    @property
    def launched_early(self) -> int:
        """Buckets started during backward (overlapped), since construction."""
        return self.reducer.launched_early

    def begin_step(self, num_samples: Optional[int] = None) -> None:
        """Before a step (after ``zero_grad``): make every ``.grad`` a view into its
        bucket and start reducing the replicas' sample counts (``num_samples``:
        this replica's; None: equal weights). Starts a collective on ``comm``."""
        if self.comm.Get_size() == 1:
            return
        self._final.clear()
        self.reducer.begin(num_samples)

    def stage_finishing(self, module: nn.Module) -> None:
        """Called by the pipeline right before the last backward of a local stage:
        the next accumulation into its parameters completes their gradients. Local."""
        if self.reducer.active:
            self._final.update(id(p) for p in module.parameters() if p.requires_grad)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.reducer.active:
            return
        self.reducer.note_accumulated(param)
        if id(param) in self._final:
            self._final.discard(id(param))
            self.reducer.mark_ready(param)

    def average(self, num_samples: Optional[int] = None) -> None:
        """Finish the step's reduction: ``.grad`` = the weighted mean over the group.
        Collective. ``num_samples`` is used only without :meth:`begin_step` (which
        took it there); None means equal weights."""
        if self.comm.Get_size() == 1:
            return
        if not self.reducer.active:
            self.begin_step(num_samples)
        self.reducer.finish()

    def sync_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the group;
        others are taken from rank 0. Collective."""
        average_buffers(module, self.comm)
