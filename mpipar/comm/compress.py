"""PowerSGD (Vogels et al. 2019): low-rank gradient compression with error feedback, one bucket at a time."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor

__all__ = ["parse_compress", "matrix_shape", "is_compressed", "check_powersgd_rank", "powersgd_elements",
           "initial_q", "orthonormalize_", "PowerSGDSum"]


def parse_compress(text: str) -> Optional[int]:
    """``--compress`` -> the PowerSGD rank (``"powersgd:4"`` -> 4), None for ``"none"``. Pure.
    Raises ValueError naming the flag and the accepted forms."""
    if text == "none":
        return None
    kind, _, rank = text.partition(":")
    if kind == "powersgd" and rank.isdigit() and int(rank) >= 1:
        return int(rank)
    raise ValueError(f"--compress must be none or powersgd:RANK with RANK an integer >= 1, got {text!r}")


def matrix_shape(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The (n, m) matrix a gradient of ``shape`` is compressed as (a conv weight (out, in, k, k) ->
    (out, in*k*k)); None for a vector or scalar. Pure."""
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


def is_compressed(shape: Sequence[int], rank: int) -> bool:
    """Whether PowerSGD at ``rank`` compresses a gradient of ``shape``: a matrix (n, m) whose factors
    (n + m) * rank are fewer elements than n * m; others are summed as they are. Pure."""
    nm = matrix_shape(shape)
    return nm is not None and (nm[0] + nm[1]) * rank < nm[0] * nm[1]


def check_powersgd_rank(shapes: Sequence[Sequence[int]], rank: int) -> None:
    """Raise ValueError when PowerSGD at ``rank`` would compress none of ``shapes`` (the rank is larger
    than every layer allows), naming the largest rank that compresses one. Pure."""
    if rank < 1:
        raise ValueError(f"--compress powersgd:RANK needs RANK >= 1, got {rank}")
    if any(is_compressed(shape, rank) for shape in shapes):
        return
    matrices = [(int(shape[0]), int(math.prod(shape[1:]))) for shape in shapes if len(shape) >= 2]
    if not matrices:
        raise ValueError(f"--compress powersgd:{rank}: the model has no matrix-shaped gradient to compress; "
                         f"use --compress none")
    most = max((n * m - 1) // (n + m) for n, m in matrices)
    largest = max(matrices, key=lambda nm: (nm[0] * nm[1] - 1) // (nm[0] + nm[1]))
    raise ValueError(f"--compress powersgd:{rank}: the rank is larger than any layer allows (rank r compresses an "
                     f"n x m gradient only when (n+m) r < n m; the largest, {largest[0]} x {largest[1]}, takes "
                     f"r <= {most}); " + (f"use powersgd:{most} or lower" if most >= 1 else "use --compress none"))


def powersgd_elements(shapes: Sequence[Sequence[int]], rank: int) -> int:
    """Elements one rank contributes per step for gradients of ``shapes``: (n + m) * rank per compressed
    matrix, numel for every other gradient. Pure. Bytes sent (ring estimate): ``2 (p-1)/p`` times this
    times the element size."""
    total = 0
    for shape in shapes:
        total += (shape[0] + int(math.prod(shape[1:]))) * rank if is_compressed(shape, rank) else int(math.prod(shape))
    return total


def initial_q(m: int, rank: int, index: int, dtype: torch.dtype) -> torch.Tensor:
    """The warm-start Q (m x rank) of the ``index``-th reduced parameter before its first step: standard
    normal from a generator seeded with ``index``, so the same on every rank. Pure."""
    generator = torch.Generator().manual_seed(0x5D0 + index)
    return torch.randn(m, rank, generator=generator, dtype=torch.float64).to(dtype)


def orthonormalize_(matrix: torch.Tensor) -> torch.Tensor:
    """Replace the columns of ``matrix`` (n x r, n >= r) in place by an orthonormal basis of their span:
    the Q of a Householder QR (one LAPACK call; stable when the warm start makes the columns nearly
    parallel; columns that are dependent or zero still give orthonormal ones, no NaN). Deterministic:
    the same input, library and thread count give the same bits (every rank computes it from the same
    summed P). Local."""
    return matrix.copy_(torch.linalg.qr(matrix).Q)


class PowerSGDSum:
    """The PowerSGD-approximated sum over ``comm`` of a flat bucket of gradients, with error feedback.

    The bucket ``tensor`` holds this rank's weighted gradients ``w_k g_k`` (``w_k = m_k / sum m``),
    laid out as ``shapes`` one after another. For each gradient :func:`is_compressed` at ``rank``
    (viewed as an n x m matrix), with this rank's error ``e_k`` (zero at first) and the warm start
    ``Q`` (:func:`initial_q`, then the previous step's):

    1. ``M_k = w_k g_k + e_k``; ``P = sum_k M_k Q`` (first Allreduce, which also carries the
       uncompressed gradients, summed as they are);
    2. ``P`` orthonormalised (:func:`orthonormalize_`); ``Q = sum_k M_k^T P`` (second Allreduce);
    3. the bucket gets ``P Q^T`` (the projection of ``sum_k M_k`` onto P's columns) and
       ``e_k = M_k - w_k P Q^T``, so ``sum_k e_k`` is exactly what the sum did not deliver.

    Everything is linear in ``sum_k M_k`` but the orthonormalisation of an already summed ``P``, so the
    result depends on the ranks' gradients and errors only through their sums: p ranks follow the run of
    one process on the whole batch. Each rank sends ``2 (p-1)/p`` (ring estimate) of
    ``sum (n+m) rank + uncompressed elements`` (:func:`powersgd_elements`), ``bytes_per_sum``.

    Use (as :class:`~mpipar.comm.wire.WireSum`): :meth:`start` (weight ``w_k``), :meth:`test`,
    :meth:`gather` (starts the second Allreduce), :meth:`wait`.

    Collective contract: :meth:`start` and :meth:`gather` each start a non-blocking Allreduce on ``comm``
    (:meth:`gather` none when nothing is compressed); every rank starts them, and its other collectives
    on ``comm``, in the same order, with the same ``shapes`` and ``rank``. Size 1 runs the same algorithm.

    Args:
        tensor: the contiguous flat bucket (its dtype is the factors' and the error's).
        shapes: the gradients' shapes, in bucket order.
        comm: the group to sum over.
        rank: the PowerSGD rank r.
        indices: each gradient's index among the reduced parameters (names it in :meth:`state_dict`,
            seeds its warm start); default ``0, 1, ...``.
    """

    def __init__(self, tensor: torch.Tensor, shapes: Sequence[Sequence[int]], comm: MPI.Intracomm, rank: int,
                 indices: Optional[Sequence[int]] = None):
        if rank < 1 or not tensor.is_floating_point() or not tensor.is_contiguous() or tensor.dim() != 1:
            raise ValueError(f"PowerSGDSum compresses a flat contiguous floating-point bucket at rank >= 1, got "
                             f"{tensor.dtype} {tuple(tensor.shape)}, rank {rank}")
        self.tensor, self.comm, self.rank, self.size = tensor, comm, rank, comm.Get_size()
        self.shapes = [tuple(shape) for shape in shapes]
        self.indices = list(range(len(shapes)) if indices is None else indices)
        self.matrices: List[Tuple[int, torch.Tensor]] = []   # (index in bucket, the n x m view of tensor)
        self.plain: List[Tuple[torch.Tensor, slice]] = []    # uncompressed views and their place in `first`
        offset, p_size, plain_size, q_size = 0, 0, 0, 0
        layout: List[Tuple[int, torch.Tensor, Optional[int], int]] = []
        for index, shape in enumerate(self.shapes):
            numel = int(math.prod(shape))
            view = tensor[offset:offset + numel]
            offset += numel
            if is_compressed(shape, rank):
                n, m = int(shape[0]), numel // int(shape[0])
                layout.append((index, view.view(n, m), p_size, q_size))
                p_size, q_size = p_size + n * rank, q_size + m * rank
            else:
                layout.append((index, view, None, plain_size))
                plain_size += numel
        if offset != tensor.numel():
            raise ValueError(f"the shapes cover {offset} elements of a bucket of {tensor.numel()}")
        self.first = torch.zeros(p_size + plain_size, dtype=tensor.dtype, device=tensor.device)
        self.second = torch.zeros(q_size, dtype=tensor.dtype, device=tensor.device)  # the Q's: the warm starts
        self.p: List[torch.Tensor] = []  # transposed, r x n and r x m: skinny products run 5-15x faster
        self.q: List[torch.Tensor] = []
        self.error: List[torch.Tensor] = []
        for index, view, p_at, at in layout:
            if p_at is None:
                self.plain.append((view, slice(p_size + at, p_size + at + view.numel())))
                continue
            n, m = view.shape
            self.matrices.append((index, view))
            self.p.append(self.first[p_at:p_at + n * rank].view(rank, n))
            self.q.append(self.second[at:at + m * rank].view(rank, m))
            self.q[-1].copy_(initial_q(m, rank, self.indices[index], tensor.dtype).t())
            self.error.append(torch.zeros(n, m, dtype=tensor.dtype, device=tensor.device))
        self.weight = 1.0
        self.bytes_per_sum = 2.0 * (self.size - 1) / self.size * (self.first.numel() + self.second.numel()) \
            * tensor.element_size()
        self._first: Optional[mpi_tensor.PendingOp] = None
        self._second: Optional[mpi_tensor.PendingOp] = None
        self._stage = "done"  # started -> gathering -> done

    def start(self, weight: float = 1.0) -> None:
        """Add the error to this rank's weighted gradients (``weight``: its ``w_k``), multiply by the warm
        starts and start the first Allreduce (the P's and the uncompressed gradients). Collective
        (non-blocking)."""
        self.weight = weight
        with torch.no_grad():
            for (_, view), p, q, error in zip(self.matrices, self.p, self.q, self.error):
                view.add_(error)
                error.copy_(view)                 # the error holds M_k until the approximation is known
                torch.matmul(q, view.t(), out=p)  # P^T = Q^T M_k^T
            for view, place in self.plain:
                self.first[place].copy_(view.view(-1))
        self._stage = "started"
        self._second = None
        self._first = mpi_tensor.iallreduce_(self.first, self.comm)

    def test(self) -> bool:
        """Progress; True once the sum is in ``tensor``. Local."""
        if self._stage == "done":
            return True
        if self._stage == "started":
            assert self._first is not None  # posted by start()
            self._first.test()
            return False
        if self._second is None or self._second.test():
            self._complete()
        return self._stage == "done"

    def gather(self) -> None:
        """Wait for the first Allreduce, orthonormalise the P's, compute ``M_k^T P`` and start the second
        Allreduce (once per :meth:`start`; none when nothing is compressed). Collective (non-blocking)."""
        if self._stage != "started":
            return
        assert self._first is not None  # posted by start()
        self._first.wait()
        with torch.no_grad():
            for view, place in self.plain:
                view.view(-1).copy_(self.first[place])
            for (_, view), p, q in zip(self.matrices, self.p, self.q):
                orthonormalize_(p.t())
                torch.matmul(p, view, out=q)      # Q^T = P^T M_k
        self._stage = "gathering"
        if self.matrices:
            self._second = mpi_tensor.iallreduce_(self.second, self.comm)

    def wait(self) -> torch.Tensor:
        """Complete both Allreduces (starting the second if :meth:`gather` was not called); returns ``tensor``."""
        self.gather()
        if self._stage == "gathering":
            if self._second is not None:
                self._second.wait()
            self._complete()
        return self.tensor

    def _complete(self) -> None:
        with torch.no_grad():
            for (index, view), p, q, error in zip(self.matrices, self.p, self.q, self.error):
                torch.matmul(p.t(), q, out=view)
                error.sub_(view, alpha=self.weight)
                if not bool(q.any()):  # a zero sum (no gradient anywhere) would stall the power iteration
                    q.copy_(initial_q(view.shape[1], self.rank, self.indices[index], q.dtype).t())
        self._stage = "done"

    def keep_error(self, index: int) -> None:
        """The ``index``-th gradient of the bucket was dropped (no rank used its parameter): its
        approximation was not applied, so this rank's error goes back to ``M_k``. Local."""
        for (position, view), error in zip(self.matrices, self.error):
            if position == index:
                error.add_(view, alpha=self.weight)

    def state_dict(self) -> Dict[int, dict]:
        """This rank's warm starts (m x r) and errors (n x m) by reduced-parameter index (copies)."""
        return {self.indices[index]: {"q": q.t().detach().cpu().clone(), "error": error.detach().cpu().clone()}
                for (index, _), q, error in zip(self.matrices, self.q, self.error)}

    def load_state_dict(self, state: Dict[int, dict]) -> None:
        """Take warm starts and errors from :meth:`state_dict`'s form (missing entries stay). Local."""
        with torch.no_grad():
            for (index, _), q, error in zip(self.matrices, self.q, self.error):
                entry = state.get(self.indices[index])
                if entry is not None:
                    q.copy_(entry["q"].t())
                    error.copy_(entry["error"])
