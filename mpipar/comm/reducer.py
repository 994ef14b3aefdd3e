"""The bucketed, sample-weighted gradient Allreduce shared by every strategy that averages gradients."""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.averaging import average_tensors
from mpipar.comm.buckets import LaunchOrder, assign_buckets
from mpipar.comm.compress import PowerSGDSum
from mpipar.comm.staging import HostMirror
from mpipar.comm.wire import WireSum
from mpipar.diagnostics import events

__all__ = ["GradientReducer", "CommStats", "average_buffers", "check_one_device", "layout_signature"]


@dataclass
class CommStats:
    """Communication accounting of one rank, accumulated until :meth:`take`.

    ``wait_time``: seconds this rank was blocked waiting on MPI (exposed transfer
    plus waiting for slower ranks; the metrics file splits the two). ``bytes_sent``:
    bytes this rank put on the wire, estimated for Allreduce as 2 (p-1)/p of the
    payload (ring).
    """

    wait_time: float = 0.0
    bytes_sent: float = 0.0

    def take(self) -> CommStats:
        """The totals since the last call; resets them."""
        taken = CommStats(self.wait_time, self.bytes_sent)
        self.wait_time = self.bytes_sent = 0.0
        return taken


@dataclass
class _Bucket:
    params: List[nn.Parameter]
    buffer: torch.Tensor
    views: List[torch.Tensor]
    pending: Union[mpi_tensor.PendingOp, WireSum, PowerSGDSum, None] = None  # the sum in flight
    mirror: Optional[HostMirror] = None  # a CUDA bucket's pinned host copy (MPI reduces it, not device memory)
    source: Optional[torch.Tensor] = None  # out of place: this rank's weighted contribution (MPI reads it)
    launched: Optional[float] = None    # in a sampled step (events.active()): when its Allreduce started
    completed: Optional[float] = None   # and when a test() first found it complete
    wire: Union[WireSum, PowerSGDSum, None] = None  # a 16-bit wire or PowerSGD: the bucket's two-phase sum


def layout_signature(values: Iterable) -> int:
    """A small integer fingerprint of ``values`` (e.g. which parameters require grad),
    compared across ranks inside the step's sample-count Allreduce."""
    return zlib.crc32(repr(list(values)).encode()) & 0xFFFFF  # 20 bits: its square summed over ranks fits int64


def check_one_device(devices: Iterable[torch.device]) -> None:
    """Raise ValueError when ``devices`` (the parameters') name more than one device. Pure.

    One reducer reduces from one device: a CUDA bucket starts once its host copy has
    landed and a CPU bucket at once, so buckets of two devices could start in different
    orders on different ranks (mismatched collectives).
    """
    counts: dict = {}
    for device in devices:
        counts[str(device)] = counts.get(str(device), 0) + 1
    if len(counts) > 1:
        found = ", ".join(f"{count} on {device}" for device, count in counts.items())
        raise ValueError(f"the parameters are on {len(counts)} devices ({found}); gradients are averaged from "
                         f"one device: move the whole module there (module.to(device)) before wrapping it")


class GradientReducer:
    """Averages the gradients of ``params`` over ``comm``, bucket by bucket, during backward.

    Gradients live in flat per-bucket buffers (``.grad`` are views into them, so
    nothing is copied when the caller keeps them). Buckets are filled last parameter
    first (the order backward produces them), one dtype and device per bucket. A
    step is :meth:`begin` (views installed, the sample counts' non-blocking
    Allreduce started), :meth:`mark_ready` for each parameter whose gradient is
    final (a bucket's non-blocking Allreduce starts when it is complete and every
    earlier bucket has started, so buckets start in the same order on every rank),
    then :meth:`finish` (the remaining buckets start, everything is waited for).
    Afterwards ``.grad`` = sum(m_k g_k) / sum(m_k) over the ranks k of ``comm``
    (m_k: :meth:`begin`'s ``num_samples``; equal weights when None). A parameter
    that has no gradient on a rank contributes zeros there; one that had none on
    every rank is left with ``.grad`` None, as in serial training.

    Collective contract: every rank of ``comm`` builds the reducer with parameters
    of the same shapes and dtypes in the same order (callers agree on it first) and
    calls :meth:`begin` and :meth:`finish` the same number of times. A CUDA bucket is
    copied to its pinned host mirror on a side stream when complete, and its
    Allreduce starts once the copy has landed (polled, so backward never waits for
    it); buckets still start in bucket order. With CUDA tensors the hooks run on
    autograd's device thread: MPI must be initialised with ``MPI_THREAD_MULTIPLE``
    (checked, RuntimeError otherwise). ``signature``
    (an int from :func:`layout_signature`) must be equal on every rank: it is
    checked inside the sample-count Allreduce, and a difference raises ValueError on
    every rank at the first bucket. Size 1: nothing is communicated; gradients are
    left as they are.

    Args:
        params: the parameters to average (each requires grad), all on one device
            (:func:`check_one_device`; ValueError otherwise, local: callers agree on it first).
        comm: the group to average over.
        bucket_cap_mb: target bucket size in MiB (a bigger parameter has its own bucket).
        out_of_place: reduce host buckets (CPU tensors) from a separate send buffer (one more bucket-sized
            buffer each) instead of in place; callers pass ``topology.spans_nodes(comm)``: on
            Open MPI an in-place non-blocking Allreduce takes a binomial tree that sends the whole
            bucket across the network on every level (2.2x the time of out of place at 16 MiB on
            4 ranks of 2 nodes, 1 Gbit/s; see docs/cost_model.md). Must be equal on every rank.
        wire: None (default): each bucket is summed by an Allreduce in its own dtype (16-bit ones in
            fp32); ``torch.bfloat16`` or ``torch.float16``: floating-point buckets travel in that dtype and
            are added in fp32 (:class:`~mpipar.comm.wire.WireSum`: half the bytes; the result differs from
            the fp32 sum by rounding each weighted contribution and the sum to 16 bits). Its Ialltoalls
            start during backward; its Iallgathers start in :meth:`finish`, in bucket order (one order
            of collectives on every rank). Must be equal on every rank; ignored at size 1.
        compress: None (default), or a PowerSGD rank r: every floating-point bucket is summed by a
            :class:`~mpipar.comm.compress.PowerSGDSum` (matrix gradients as rank-r factors with error
            feedback, two Allreduces: the first during backward, the second in :meth:`finish`, in bucket
            order). Not with ``wire``. Must be equal on every rank; applied at size 1 too (the same
            algorithm, so a run does not depend on the number of ranks).
    """

    def __init__(self, params: Sequence[nn.Parameter], comm: MPI.Intracomm, *, bucket_cap_mb: float = 25.0,
                 out_of_place: bool = False, wire: Optional[torch.dtype] = None, compress: Optional[int] = None):
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if wire not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"the gradient wire is None (each bucket's own dtype), torch.bfloat16 or torch.float16, "
                             f"got {wire}")
        if compress is not None and (wire is not None or compress < 1):
            raise ValueError(f"PowerSGD takes a rank >= 1 and no 16-bit wire, got rank {compress}, wire {wire}")
        check_one_device(p.device for p in params)
        self.comm = comm
        self.size = comm.Get_size()
        self.params = list(params)
        self.stats = CommStats()
        self.buckets = self._build(self.params, bucket_cap_mb * 2**20)
        self.compress = compress
        position = {id(p): index for index, p in enumerate(self.params)}
        for bucket in self.buckets:
            if compress is not None and bucket.buffer.is_floating_point():
                bucket.wire = PowerSGDSum(bucket.buffer, [p.shape for p in bucket.params], comm, compress,
                                          [position[id(p)] for p in bucket.params])
        if self.size > 1:
            for bucket in self.buckets:
                if bucket.buffer.is_cuda and mpi_tensor.transport_for(bucket.buffer, "iallreduce") == "staged":
                    bucket.mirror = HostMirror(bucket.buffer)
                if bucket.wire is not None:  # PowerSGD's factors are small: reduced from the device tensor
                    bucket.mirror = None
                elif wire is not None and bucket.buffer.is_floating_point():
                    bucket.wire = WireSum(bucket.buffer if bucket.mirror is None else bucket.mirror.host, comm, wire)
                elif out_of_place and not bucket.buffer.is_cuda:
                    bucket.source = torch.empty_like(bucket.buffer)
            if any(b.buffer.is_cuda for b in self.buckets) and not mpi_tensor.thread_multiple():
                raise RuntimeError("averaging CUDA gradients calls MPI from autograd's device thread, which needs "
                                   "MPI initialised with MPI_THREAD_MULTIPLE (mpi4py.rc.thread_level='multiple', "
                                   "the default)")
        self._copying: deque = deque()  # buckets whose device -> host copy is in flight, in launch order
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket.params}
        self._first_flag = [sum(len(b.params) for b in self.buckets[:index]) for index in range(len(self.buckets))]
        self._order = LaunchOrder([len(bucket.params) for bucket in self.buckets])
        self._active = False
        self._zeroed: set = set()       # parameters whose view begin() zero-filled (no gradient yet)
        self._accumulated: set = set()  # parameters that received a gradient since begin()
        self._counts = torch.zeros(3, dtype=torch.int64)  # samples, signature, signature squared
        self._counts_request: Optional[mpi_tensor.PendingOp] = None
        self._samples: Optional[int] = None
        self._weight = 1.0 / self.size
        self._used = torch.zeros(len(self.params), dtype=torch.int32)
        self._used_request: Optional[mpi_tensor.PendingOp] = None

    @property
    def launched_early(self) -> int:
        """Buckets started by :meth:`mark_ready` (overlapped with backward), since construction."""
        return self._order.early

    @staticmethod
    def _build(params: List[nn.Parameter], cap: float) -> List[_Bucket]:
        groups = [[params[index] for index in group] for group in assign_buckets(
            [p.numel() * p.element_size() for p in params], [(p.dtype, p.device) for p in params], cap)]
        buckets = []
        for group in groups:
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            views, offset = [], 0
            for p in group:
                views.append(buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            buckets.append(_Bucket(group, buffer, views))
        return buckets

    @property
    def active(self) -> bool:
        """Between :meth:`begin` and :meth:`finish`."""
        return self._active

    def begin(self, num_samples: Optional[int] = None, signature: int = 0) -> None:
        """Start a step: every ``.grad`` becomes a view into its bucket (zero-filled when
        it was None) and the sample counts' non-blocking Allreduce starts. Collective
        (non-blocking) over ``comm``."""
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self._complete_started()  # a step that never finished leaves nothing for this one to overwrite
        self._zeroed.clear()
        self._accumulated.clear()
        with torch.no_grad():
            for bucket in self.buckets:
                for p, view in zip(bucket.params, bucket.views):
                    if p.grad is None:
                        view.zero_()
                        self._zeroed.add(id(p))
                    elif p.grad.data_ptr() != view.data_ptr():
                        view.copy_(p.grad)
                    p.grad = view
                bucket.pending = None
                bucket.launched = bucket.completed = None
        self._order.reset()
        self._active = True
        self._samples = num_samples
        if self.size == 1:
            self._weight = 1.0
            return
        self._counts[0] = num_samples or 0
        self._counts[1] = signature
        self._counts[2] = signature * signature
        self._counts_request = mpi_tensor.iallreduce_(self._counts, self.comm)

    def note_accumulated(self, param: nn.Parameter) -> None:
        """``param`` received (part of) its gradient in this step (a post-accumulate hook);
        :meth:`mark_ready` notes it too. Local. A parameter neither noted nor holding a
        gradient from before :meth:`begin` counts as unused on this rank."""
        self._accumulated.add(id(param))

    def mark_ready(self, param: nn.Parameter) -> None:
        """``param``'s gradient for this step is final. Local; may start bucket Allreduces.

        Raises:
            RuntimeError: when ``param`` was already marked in this step (its
                gradient was accumulated twice, after its bucket may have been sent).
        """
        if not self._order.mark(self._bucket_of[id(param)], id(param)):
            self._drain()
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} received its gradient more than once in one backward "
                f"(shared across a reentrant activation checkpoint?); its bucket may already have been averaged. "
                f"Use torch.utils.checkpoint with use_reentrant=False, or do not share the parameter")
        self._accumulated.add(id(param))
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        for index in self._order.take(force):
            self._launch(index)
        self._start_copied(block=False)
        for bucket in self.buckets[:self._order.started]:  # let MPI progress (no progress thread assumed)
            if bucket.pending is not None and bucket.pending.test() and bucket.launched is not None \
                    and bucket.completed is None:
                bucket.completed = time.perf_counter()

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        with torch.no_grad():
            offset = self._first_flag[index]
            for position, (p, view) in enumerate(zip(bucket.params, bucket.views)):
                if p.grad is None:          # no gradient since zero_grad(set_to_none=True): contributes zeros
                    view.zero_()
                    used = False
                else:
                    used = id(p) in self._accumulated or id(p) not in self._zeroed
                    if p.grad.data_ptr() != view.data_ptr():
                        view.copy_(p.grad)  # .grad was replaced after begin (zero_grad between forward and backward)
                p.grad = view
                self._used[offset + position] = int(used)
            self._wait_counts()
            if self.size == 1 and bucket.wire is None:
                return
            if bucket.source is not None:
                torch.mul(bucket.buffer, self._weight, out=bucket.source)
            else:
                bucket.buffer.mul_(self._weight)
        if bucket.mirror is None:
            self._start_allreduce(bucket, bucket.buffer)
        else:
            bucket.mirror.download()
            self._copying.append(bucket)
            self._start_copied(block=False)

    def _start_allreduce(self, bucket: _Bucket, tensor: torch.Tensor) -> None:
        if events.active() is not None:
            bucket.launched = time.perf_counter()
        if isinstance(bucket.wire, PowerSGDSum):
            bucket.wire.start(self._weight)
            bucket.pending = bucket.wire
        elif bucket.wire is not None:
            bucket.wire.start()
            bucket.pending = bucket.wire
        else:
            bucket.pending = mpi_tensor.iallreduce_(tensor, self.comm, source=bucket.source)
        self.stats.bytes_sent += self._bytes(bucket)

    def _bytes(self, bucket: _Bucket) -> float:
        """Bytes this rank sends to reduce ``bucket``: a ring Allreduce's 2 (p-1)/p of it, or the wire's
        (PowerSGD's: 2 (p-1)/p of its factors and uncompressed gradients)."""
        if bucket.wire is not None:
            return bucket.wire.bytes_per_sum
        return 2.0 * (self.size - 1) / self.size * bucket.buffer.numel() * bucket.buffer.element_size()

    def _start_copied(self, block: bool) -> None:
        """Start the Allreduces of mirrored buckets whose host copy has landed, in launch
        order (all of them, waiting for each copy, when ``block``)."""
        while self._copying and (block or self._copying[0].mirror.ready()):
            bucket = self._copying.popleft()
            bucket.mirror.wait()  # the GPU finishing the gradients: compute, not communication
            self._start_allreduce(bucket, bucket.mirror.host)

    def _drain(self) -> None:
        """End a step that failed on every rank at the same point, leaving ``comm`` usable."""
        self._complete_started()

    def _complete_started(self) -> None:
        """End the step: start the Allreduces of buckets whose host copy was still in flight, then
        complete every request started and not completed (buckets, sample counts, usage flags), so
        every rank has completed the same operations and none is left for the next step to
        overwrite or drop. Collective only where a request is left, as the step was."""
        self._start_copied(block=True)
        self._wait_started(upload=False)
        for request in (self._counts_request, self._used_request):
            if request is not None:
                request.wait()
        self._counts_request = self._used_request = None
        self._active = False

    def _wait_started(self, upload: bool) -> None:
        """Wait for every bucket reduction started; ``upload``: copy mirrored results back to the device.
        In a sampled step each bucket's wait and its Allreduce (launch to completion) are events."""
        recorder = events.active()
        for bucket in self.buckets:  # a wire's or PowerSGD's second collectives, in bucket order on every rank
            if bucket.pending is not None and bucket.wire is not None:
                bucket.wire.gather()
        for index, bucket in enumerate(self.buckets):
            if bucket.pending is not None:
                begin = time.perf_counter() if recorder is not None else 0.0
                bucket.pending.wait()
                bucket.pending = None
                if recorder is not None and bucket.launched is not None:
                    end = time.perf_counter()
                    recorder.add("wait_bucket", begin, end, index=index)
                    recorder.add("allreduce", bucket.launched, bucket.completed or end, index=index,
                                 nbytes=self._bytes(bucket))
                if upload and bucket.mirror is not None:
                    bucket.mirror.upload()

    def _wait_counts(self) -> None:
        if self._counts_request is None:
            return
        begin = time.perf_counter()
        self._counts_request.wait()
        end = time.perf_counter()
        self.stats.wait_time += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("wait", begin, end)
        self._counts_request = None
        total, signatures, squares = (int(v) for v in self._counts)
        if self.size * squares != signatures * signatures:  # not all equal (zero variance iff equal)
            self._active = False
            raise ValueError("ranks disagree on which parameters require grad (requires_grad was changed on some "
                             "ranks only); change it the same way on every rank")
        if self._samples is None:
            self._weight = 1.0 / self.size
        elif total <= 0:
            raise RuntimeError("no rank had samples in this step; nothing to average")
        else:
            self._weight = self._samples / total

    def finish(self) -> None:
        """Start the buckets not started yet and wait for every reduction; then ``.grad``
        is the weighted mean (None for a parameter no rank had a gradient for).
        Collective over ``comm``."""
        if not self._active:
            return
        self._launch_ready(force=True)
        self._start_copied(block=True)
        self._wait_counts()  # the first bucket's launch waited for the counts; without buckets, here
        begin = time.perf_counter()
        if self.size > 1:
            self._used_request = mpi_tensor.iallreduce_(self._used, self.comm)
        self._wait_started(upload=True)
        if self._used_request is not None:
            self._used_request.wait()
            self._used_request = None
        end = time.perf_counter()
        self.stats.wait_time += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("wait", begin, end)
        self._active = False
        flat = [(p, bucket, index) for bucket in self.buckets for index, p in enumerate(bucket.params)]
        for (p, bucket, index), used in zip(flat, self._used.tolist()):
            if not used:
                p.grad = None
                if isinstance(bucket.wire, PowerSGDSum):
                    bucket.wire.keep_error(index)  # its approximation is not applied: the error keeps it

    def compress_state(self) -> Optional[dict]:
        """PowerSGD's warm starts and this rank's errors by reduced-parameter index (None without
        PowerSGD). Local."""
        if self.compress is None:
            return None
        state: dict = {}
        for bucket in self.buckets:
            if isinstance(bucket.wire, PowerSGDSum):
                state.update(bucket.wire.state_dict())
        return state

    def load_compress_state(self, state: dict) -> None:
        """Take :meth:`compress_state`'s warm starts and errors. Local."""
        for bucket in self.buckets:
            if isinstance(bucket.wire, PowerSGDSum):
                bucket.wire.load_state_dict(state)

    def abandon(self) -> None:
        """Forget a step whose backward never ran (a forward without backward). Local,
        except that it completes what the step started (the sample counts, any bucket)."""
        self._complete_started()


def average_buffers(module: nn.Module, comm: MPI.Intracomm) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ``comm``;
    other buffers are taken from rank 0. Collective over ``comm``: one flat Allreduce
    (and broadcast) per dtype, by :func:`~mpipar.comm.averaging.average_tensors`."""
    average_tensors(list(module.buffers()), comm)
