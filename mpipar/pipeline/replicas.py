"""Data parallelism across pipeline replicas: one stage's gradients averaged over its copies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.diagnostics.agree import agree_on

__all__ = ["ReplicaAverager"]


@dataclass
class _Bucket:
    params: List[nn.Parameter]
    buffer: torch.Tensor
    views: List[torch.Tensor]
    ready: set = field(default_factory=set)
    pending: Optional[mpi_tensor.PendingOp] = None


class ReplicaAverager:
    """Averages the gradients of one pipeline position over the data-parallel group.

    After every replica's ``Pipeline.step`` has accumulated its micro-batch
    gradients, :meth:`average` makes each ``.grad`` the sample-weighted mean over
    the replicas: sum(n_k g_k) / sum(n_k), which equals the gradient of the whole
    global batch when each replica's loss is a mean over its own samples. A
    parameter without a gradient contributes zeros.

    Gradients live in flat buckets (``.grad`` are views into them, last layer
    first, one dtype and device per bucket). Overlapped use: :meth:`begin_step`
    before the step and ``Pipeline.step(..., before_last_backward=averager.stage_finishing)``:
    during the last micro-batch's backward each bucket's non-blocking Allreduce
    starts as soon as its gradients are final (in bucket order on every replica),
    and :meth:`average` waits for the rest. Without :meth:`begin_step`,
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

    Raises:
        ValueError: on every rank, when the replicas' parameters differ.
    """

    def __init__(self, module: nn.Module, comm: MPI.Intracomm, *, bucket_cap_mb: float = 25.0):
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.comm = comm
        self.size = comm.Get_size()
        self.params = [p for p in module.parameters() if p.requires_grad]
        agree_on(comm, "the parameters of this pipeline position (shape, dtype)",
                 [(tuple(p.shape), str(p.dtype)) for p in self.params],
                 hint="build the same model and placement in every replica")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                mpi_tensor.bcast_(tensor.data, comm, 0)
        self.buckets = self._buckets(bucket_cap_mb * 2**20)
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket.params}
        self._final: set = set()  # parameters whose next accumulation completes this step's gradient
        self._active = False
        self._next_launch = 0
        self._count = torch.zeros(1, dtype=torch.int64)
        self._count_request: Optional[mpi_tensor.PendingOp] = None
        self._samples: Optional[int] = None
        self._weight = 1.0 / self.size
        self.comm_time = 0.0
        self.bytes_sent = 0.0
        self.launched_early = 0  # buckets launched during backward (overlapped), since construction
        if self.size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _buckets(self, cap: float) -> List[_Bucket]:
        groups: List[List[nn.Parameter]] = []
        size = 0
        for p in reversed(self.params):  # the order backward finishes them
            nbytes = p.numel() * p.element_size()
            last = groups[-1] if groups else None
            if last and size + nbytes <= cap and (p.dtype, p.device) == (last[0].dtype, last[0].device):
                last.append(p)
                size += nbytes
            else:
                groups.append([p])
                size = nbytes
        buckets = []
        for params in groups:
            buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            views, offset = [], 0
            for p in params:
                views.append(buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            buckets.append(_Bucket(params, buffer, views))
        return buckets

    def begin_step(self, num_samples: Optional[int] = None) -> None:
        """Before a step (after ``zero_grad``): make every ``.grad`` a view into its
        bucket and start reducing the replicas' sample counts (``num_samples``:
        this replica's; None: equal weights). Starts a collective on ``comm``."""
        if self.size == 1:
            return
        with torch.no_grad():
            for bucket in self.buckets:
                for p, view in zip(bucket.params, bucket.views):
                    if p.grad is None:
                        view.zero_()
                    elif p.grad.data_ptr() != view.data_ptr():
                        view.copy_(p.grad)
                    p.grad = view
                bucket.ready.clear()
                bucket.pending = None
        self._final.clear()
        self._next_launch = 0
        self._active = True
        self._samples = num_samples
        if num_samples is None:
            self._weight = 1.0 / self.size
        else:
            self._count[0] = int(num_samples)
            self._count_request = mpi_tensor.iallreduce_(self._count, self.comm)

    def stage_finishing(self, module: nn.Module) -> None:
        """Called by the pipeline right before the last backward of a local stage:
        the next accumulation into its parameters completes their gradients. Local."""
        if self._active:
            self._final.update(id(p) for p in module.parameters() if p.requires_grad)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._active or id(param) not in self._final:
            return
        bucket = self.buckets[self._bucket_of[id(param)]]
        bucket.ready.add(id(param))
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.ready) < len(bucket.params):
                break
            self._launch(bucket)
            self.launched_early += not force
            self._next_launch += 1
        for bucket in self.buckets[:self._next_launch]:  # let MPI progress (no progress thread assumed)
            if bucket.pending is not None:
                bucket.pending.test()

    def _launch(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)  # .grad was replaced after begin_step
                p.grad = view
            if self._count_request is not None:
                begin = time.perf_counter()
                self._count_request.wait()
                self.comm_time += time.perf_counter() - begin
                self._count_request = None
                total = int(self._count[0])
                if total <= 0:
                    raise RuntimeError("no replica had samples in this step; nothing to average")
                self._weight = self._samples / total
            bucket.buffer.mul_(self._weight)
        bucket.pending = mpi_tensor.iallreduce_(bucket.buffer, self.comm)
        self.bytes_sent += 2.0 * (self.size - 1) / self.size * bucket.buffer.numel() * bucket.buffer.element_size()

    def average(self, num_samples: Optional[int] = None) -> None:
        """Finish the step's reduction: ``.grad`` = the weighted mean over the group.
        Collective. ``num_samples`` is used only without :meth:`begin_step` (which
        took it there); None means equal weights."""
        if self.size == 1:
            return
        begin = time.perf_counter()
        if not self._active:
            self.begin_step(num_samples)
        self._launch_ready(force=True)
        for bucket in self.buckets:
            if bucket.pending is not None:
                bucket.pending.wait()
                bucket.pending = None
        self._active = False
        self.comm_time += time.perf_counter() - begin

    def sync_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over the group;
        others are taken from rank 0. Collective."""
        size = self.comm.Get_size()
        with torch.no_grad():
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    mpi_tensor.allreduce_(buffer, self.comm)
                    buffer.div_(size)
                else:
                    mpi_tensor.bcast_(buffer, self.comm, 0)

    def take_stats(self) -> tuple:
        """``(comm seconds, bytes sent)`` since the last call."""
        stats = (self.comm_time, self.bytes_sent)
        self.comm_time = self.bytes_sent = 0.0
        return stats

