"""Data parallelism across pipeline replicas: one stage's gradients averaged over its copies."""

from __future__ import annotations

import time
from typing import List, Optional

import torch
from mpi4py import MPI
from torch import nn

from .. import debug, mpi_tensor
from ..agree import agree_on

__all__ = ["ReplicaAverager"]


class ReplicaAverager:
    """Averages the gradients of one pipeline position over the data-parallel group.

    After every replica's ``Pipeline.step`` has accumulated its micro-batch
    gradients, :meth:`average` makes each ``.grad`` the sample-weighted mean over
    the replicas: sum(n_k g_k) / sum(n_k), which equals the gradient of the whole
    global batch when each replica's loss is a mean over its own samples. Gradients
    travel in flat buckets (one Allreduce per bucket, by dtype and device); a
    parameter without a gradient contributes zeros.

    Collective contract: every rank of ``comm`` constructs it with parameters of
    the same shapes and dtypes in the same order (checked; parameters and buffers
    are then broadcast from rank 0 of ``comm``) and calls :meth:`average` the same
    number of times. Size 1: gradients are left as they are.

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
        self.params = [p for p in module.parameters() if p.requires_grad]
        agree_on(comm, "the parameters of this pipeline position (shape, dtype)",
                 [(tuple(p.shape), str(p.dtype)) for p in self.params],
                 hint="build the same model and placement in every replica")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                mpi_tensor.bcast_(tensor.data, comm, 0)
        self.buckets = self._buckets(bucket_cap_mb * 2**20)
        self.comm_time = 0.0
        self.bytes_sent = 0.0

    def _buckets(self, cap: float) -> List[List[nn.Parameter]]:
        buckets: List[List[nn.Parameter]] = []
        size = 0
        for p in self.params:
            nbytes = p.numel() * p.element_size()
            last = buckets[-1] if buckets else None
            if last and size + nbytes <= cap and (p.dtype, p.device) == (last[0].dtype, last[0].device):
                last.append(p)
                size += nbytes
            else:
                buckets.append([p])
                size = nbytes
        return buckets

    def average(self, num_samples: Optional[int] = None) -> None:
        """Average ``.grad`` over the group, weighted by ``num_samples`` (default: equal). Collective."""
        size = self.comm.Get_size()
        if size == 1:
            return
        begin = time.perf_counter()
        if num_samples is None:
            weight = 1.0 / size
        else:
            with debug.watched(self.comm, "allreduce", detail="replica sample counts"):
                total = self.comm.allreduce(int(num_samples), op=MPI.SUM)
            if total <= 0:
                raise RuntimeError("no replica had samples in this step; nothing to average")
            weight = num_samples / total
        for bucket in self.buckets:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in bucket]).mul_(weight)
            mpi_tensor.allreduce_(flat, self.comm)
            self.bytes_sent += 2.0 * (size - 1) / size * flat.numel() * flat.element_size()
            offset = 0
            for p in bucket:
                chunk = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += p.numel()
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

