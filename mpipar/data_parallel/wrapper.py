"""Synchronous data parallelism: bucketed, overlapped, sample-weighted gradient Allreduce."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug
from mpipar.diagnostics.agree import agree_on

__all__ = ["DataParallel", "CommStats"]


@dataclass
class CommStats:
    """Communication accounting of one rank, accumulated until ``take()``.

    ``wait_time``: seconds this rank was blocked waiting on MPI (exposed
    communication plus waiting for slower ranks). ``bytes_sent``: bytes this rank
    put on the wire, estimated for Allreduce as 2 (p-1)/p of the payload (ring).
    """

    wait_time: float = 0.0
    bytes_sent: float = 0.0

    def take(self) -> CommStats:
        taken = CommStats(self.wait_time, self.bytes_sent)
        self.wait_time = 0.0
        self.bytes_sent = 0.0
        return taken


@dataclass
class _Bucket:
    params: List[nn.Parameter]
    buffer: torch.Tensor
    views: List[torch.Tensor]
    waiting: int = 0
    pending: Optional[mpi_tensor.PendingOp] = None
    ready_ids: set = field(default_factory=set)


class DataParallel(nn.Module):
    """Wrap ``module`` for synchronous data-parallel training over ``comm``.

    Semantics follow PyTorch DDP: construction broadcasts parameters and buffers
    from ``root``; after ``loss.backward()`` returns, every parameter's ``.grad``
    holds the average over the ranks of ``comm``. The average is weighted by each
    rank's sample count m_k: sum(m_k g_k) / sum(m_k), so unequal shards and short
    last batches give the gradient of the whole global batch (the local loss must
    be a mean over local samples, as ``cross_entropy`` is by default).

    Gradients live in flat per-bucket buffers (``.grad`` are views into them, so
    nothing is copied in or out); a bucket's non-blocking Allreduce starts as soon
    as all its gradients are ready during backward, in bucket order on every rank.
    Parameters that receive no gradient on a rank contribute zeros, so a bucket can
    never wait forever.

    Collective contract: every rank of ``comm`` constructs the wrapper with the
    same parameter shapes and dtypes (checked, with the differing ranks named),
    and calls forward and backward the same number of times. One forward per
    backward; use :meth:`no_sync` to accumulate over several. Size 1 runs the
    same code and communicates nothing.

    Args:
        module: the model. Its parameters may be on CPU or one CUDA device.
        comm: the data-parallel communicator.
        bucket_cap_mb: target bucket size in MiB.
        root: rank whose initial parameters and buffers everyone takes.
        weighted: weight by sample counts (True) or take the plain mean.

    Raises:
        ValueError: on every rank, when the ranks' models differ.
    """

    def __init__(self, module: nn.Module, comm: MPI.Intracomm, *, bucket_cap_mb: float = 25.0,
                 root: int = 0, weighted: bool = True):
        super().__init__()
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.module = module
        self.comm = comm
        self.weighted = weighted
        self.stats = CommStats()
        self._size = comm.Get_size()
        self._check_same_model()
        self._broadcast_state(root)
        self._buckets = self._build_buckets(bucket_cap_mb * 2**20)
        self._bucket_of = {id(p): i for i, b in enumerate(self._buckets) for p in b.params}
        for p in self._params():
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._sync = True
        self._armed = False          # a forward prepared a backward to reduce
        self._finalize_queued = False
        self._next_launch = 0
        self._samples_since_sync = 0
        self._count = torch.zeros(1, dtype=torch.int64)
        self._count_request: Optional[mpi_tensor.PendingOp] = None
        self._weight = 1.0

    # -- construction -----------------------------------------------------------

    def _params(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _check_same_model(self) -> None:
        layout = [(name, tuple(p.shape), str(p.dtype)) for name, p in self.module.named_parameters()]
        layout += [(name, tuple(b.shape), str(b.dtype)) for name, b in self.module.named_buffers()]
        agree_on(self.comm, "model parameters and buffers (name, shape, dtype)", layout,
                 hint="build the same model on every rank")

    def _broadcast_state(self, root: int) -> None:
        with torch.no_grad():
            for tensor in [*self.module.parameters(), *self.module.buffers()]:
                mpi_tensor.bcast_(tensor.data, self.comm, root)

    def _build_buckets(self, cap_bytes: float) -> List[_Bucket]:
        """Group parameters, last layer first (the order backward produces them),
        into buckets of one dtype and device, each at most ``cap_bytes`` unless a
        single parameter is bigger."""
        groups: List[List[nn.Parameter]] = []
        current: List[nn.Parameter] = []
        current_bytes = 0
        for p in reversed(self._params()):
            nbytes = p.numel() * p.element_size()
            fits = current and current_bytes + nbytes <= cap_bytes and \
                p.dtype == current[0].dtype and p.device == current[0].device
            if current and not fits:
                groups.append(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
        if current:
            groups.append(current)
        buckets = []
        for params in groups:
            buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                 device=params[0].device)
            views, offset = [], 0
            for p in params:
                views.append(buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            buckets.append(_Bucket(params, buffer, views))
        return buckets

    # -- forward ------------------------------------------------------------------

    def forward(self, *inputs, num_samples: Optional[int] = None, **kwargs):
        """Run the module. ``num_samples`` (default: ``len(inputs[0])``) is this
        rank's sample count for the weighted average."""
        if torch.is_grad_enabled() and self._params():
            if num_samples is None:
                num_samples = len(inputs[0])
            self._prepare_backward(int(num_samples))
        return self.module(*inputs, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the context
        reduces everything accumulated, weighted by all samples since the last sync."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _prepare_backward(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if self._armed:  # the previous forward's backward never ran: forget it
            self._finish_count()
            self._samples_since_sync = 0
        self._install_grad_views()
        self._samples_since_sync += num_samples
        self._finalize_queued = False
        self._armed = self._sync
        if not self._sync:
            return
        for bucket in self._buckets:
            bucket.ready_ids.clear()
            bucket.pending = None
        self._next_launch = 0
        if self.weighted and self._size > 1:
            self._count[0] = self._samples_since_sync
            self._count_request = mpi_tensor.iallreduce_(self._count, self.comm)
        else:
            self._weight = 1.0 / self._size

    def _install_grad_views(self) -> None:
        """Make every .grad a view into its bucket (zero-filled when it was None)."""
        with torch.no_grad():
            for bucket in self._buckets:
                for p, view in zip(bucket.params, bucket.views):
                    if p.grad is None:
                        view.zero_()
                        p.grad = view
                    elif p.grad.data_ptr() != view.data_ptr():
                        view.copy_(p.grad)
                        p.grad = view

    def _finish_count(self) -> None:
        if self._count_request is None:
            return
        start = time.perf_counter()
        self._count_request.wait()
        self.stats.wait_time += time.perf_counter() - start
        self._count_request = None
        total = int(self._count[0])
        if total <= 0:
            raise RuntimeError("no rank had samples in this step; nothing to average")
        self._weight = self._samples_since_sync / total

    # -- backward -----------------------------------------------------------------

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        if not self._finalize_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._finalize_queued = True
        index = self._bucket_of[id(param)]
        bucket = self._buckets[index]
        bucket.ready_ids.add(id(param))
        if len(bucket.ready_ids) == len(bucket.params):
            self._launch_ready_buckets()
        else:
            self._progress()

    def _launch_ready_buckets(self, force: bool = False) -> None:
        while self._next_launch < len(self._buckets):
            bucket = self._buckets[self._next_launch]
            if not force and len(bucket.ready_ids) < len(bucket.params):
                break
            self._launch(bucket)
            self._next_launch += 1
        self._progress()

    def _launch(self, bucket: _Bucket) -> None:
        with torch.no_grad():
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)  # someone replaced .grad after forward
                p.grad = view
            self._finish_count()
            if self._size == 1:
                return  # weight is 1: nothing to scale or send
            bucket.buffer.mul_(self._weight)
        bucket.pending = mpi_tensor.iallreduce_(bucket.buffer, self.comm)
        payload = bucket.buffer.numel() * bucket.buffer.element_size()
        self.stats.bytes_sent += 2.0 * (self._size - 1) / self._size * payload

    def _progress(self) -> None:
        """Let MPI advance outstanding reductions (no progress thread assumed)."""
        for bucket in self._buckets[:self._next_launch]:
            if bucket.pending is not None:
                bucket.pending.test()

    def _finish_backward(self) -> None:
        """Runs when autograd finishes: launch what is left, wait for everything."""
        self._launch_ready_buckets(force=True)
        start = time.perf_counter()
        for bucket in self._buckets:
            if bucket.pending is not None:
                bucket.pending.wait()
                bucket.pending = None
        self.stats.wait_time += time.perf_counter() - start
        self._armed = False
        self._samples_since_sync = 0

    # -- state --------------------------------------------------------------------

    def sync_buffers(self) -> None:
        """Average floating-point buffers (e.g. BatchNorm running statistics) over
        ``comm``; integer buffers are taken from rank 0. Collective."""
        with torch.no_grad():
            for buf in self.module.buffers():
                if buf.is_floating_point():
                    mpi_tensor.allreduce_(buf, self.comm)
                    buf.div_(self._size)
                else:
                    mpi_tensor.bcast_(buf, self.comm, 0)

    def gather_buffers(self, root: int = 0) -> Optional[List[dict]]:
        """Every rank's buffers (replicas' BatchNorm statistics drift apart between
        :meth:`sync_buffers` calls), as a list by rank on ``root``; None elsewhere.
        Collective. A checkpoint that stores them, instead of averaging first,
        leaves the run exactly as it would have gone without the checkpoint."""
        mine = {name: buf.detach().cpu().clone() for name, buf in self.module.named_buffers()}
        with debug.watched(self.comm, "gather", detail="buffers"):
            return self.comm.gather(mine, root=root)

    def load_rank_buffers(self, by_rank: List[dict]) -> bool:
        """Load this rank's entry of :meth:`gather_buffers`'s list. Local. Returns
        False (and loads nothing) when the list is for another number of ranks."""
        if len(by_rank) != self._size:
            return False
        with torch.no_grad():
            own = by_rank[self.comm.Get_rank()]
            for name, buf in self.module.named_buffers():
                buf.copy_(own[name])
        return True

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)
