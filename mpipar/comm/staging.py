"""Host mirrors of device buffers for non-blocking collectives, copied without stalling the GPU.

MPI reduces host memory here (no MPI reduces device memory in a non-blocking
collective, see :mod:`mpipar.comm.cuda_aware`). A :class:`HostMirror` keeps one pinned
host buffer for the life of its device buffer (no allocation per step), copies
device -> host on a side stream that first waits for the work already queued on the
producer's stream (so the copy sees the finished gradients), and records an event
that the caller polls: the CPU never blocks in the middle of backward, and the GPU
keeps computing while earlier buckets are copied and reduced. The copy back goes on
the consumer's current stream, so later kernels (the optimizer) are ordered after it.

Ordering across steps: the next download waits (on its side stream) for everything
queued on the producer's stream before it, the previous upload included, so a
pinned buffer is never overwritten while it is still being read.
"""

from __future__ import annotations

import torch

__all__ = ["HostMirror"]


class HostMirror:
    """A pinned host copy of ``device_tensor`` (a contiguous CUDA tensor). Local; not thread-safe.

    Use: :meth:`download` (non-blocking), then :meth:`ready` (poll) or :meth:`wait`
    before MPI touches :attr:`host`; after MPI is done, :meth:`upload`.
    """

    _side_streams: dict = {}  # one copy stream per device, shared by every mirror on it

    def __init__(self, device_tensor: torch.Tensor):
        if not (device_tensor.is_cuda and device_tensor.is_contiguous()):
            raise ValueError("HostMirror needs a contiguous CUDA tensor")
        self.device_tensor = device_tensor
        self.host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype, pin_memory=True)
        device = device_tensor.device
        if device not in HostMirror._side_streams:
            HostMirror._side_streams[device] = torch.cuda.Stream(device=device)
        self._stream = HostMirror._side_streams[device]
        self._copied = torch.cuda.Event()

    def download(self) -> None:
        """Queue the device -> host copy after the work already queued on the current stream."""
        self._stream.wait_stream(torch.cuda.current_stream(self.device_tensor.device))
        with torch.cuda.stream(self._stream):
            self.host.copy_(self.device_tensor, non_blocking=True)
            self._copied.record(self._stream)

    def ready(self) -> bool:
        """True once :attr:`host` holds the downloaded values (non-blocking)."""
        return self._copied.query()

    def wait(self) -> None:
        """Block until :attr:`host` holds the downloaded values."""
        self._copied.synchronize()

    def upload(self) -> None:
        """Queue the host -> device copy on the current stream."""
        with torch.cuda.device(self.device_tensor.device):
            self.device_tensor.copy_(self.host, non_blocking=True)
