"""The tensor-parallel MLP block: a column-parallel layer, an activation, a row-parallel layer."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm.reducer import CommStats
from mpipar.diagnostics.failure import agreed
from mpipar.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpipar.tensor_parallel.partition import agree_on_linears

__all__ = ["ParallelMLP"]


class ParallelMLP(nn.Module):
    """``fc2(activation(fc1(x)))`` with the hidden features split over ``comm``.

    ``fc1`` is column-parallel and ``fc2`` row-parallel, so the hidden activation stays
    split: the block communicates exactly one Allreduce forward (``fc2``'s partial
    sums) and one backward (the input gradient, overlapped with ``fc1``'s weight
    gradient), both of the input's / output's size. The activation must be
    element-wise. Both layers share one :class:`CommStats`, ``self.stats``.

    Collective contract: every rank of ``comm`` builds the block together from full
    layers of the same shapes and values, then runs forward and backward together on
    replicated inputs of the same shape. Size 1: the unsplit block, no communication.

    Args:
        fc1: the full first layer (hidden = ``fc1.out_features``; split by its outputs).
        fc2: the full second layer (``fc2.in_features`` must equal the hidden size).
        comm: the tensor-parallel group.
        activation: an element-wise module between the two (default: a new ``nn.GELU()``).
        stats: where the time blocked in MPI and the bytes sent accumulate.

    Raises:
        TypeError: on every rank, when some rank's layer is not an ``nn.Linear``.
        ValueError: on every rank, naming the sizes, when the shapes differ between ranks,
            ``fc1``'s outputs do not match ``fc2``'s inputs, or p does not divide the hidden size.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, comm: MPI.Intracomm, activation: Optional[nn.Module] = None, *,
                 stats: Optional[CommStats] = None):
        super().__init__()
        shapes = agree_on_linears(comm, {"fc1": fc1, "fc2": fc2}, "ParallelMLP")
        if shapes["fc1"][1] != shapes["fc2"][0]:
            raise agreed(ValueError)(
                f"ParallelMLP: fc1 has {shapes['fc1'][1]} outputs but fc2 has {shapes['fc2'][0]} inputs "
                f"(fc1 {shapes['fc1'][0]}->{shapes['fc1'][1]}, fc2 {shapes['fc2'][0]}->{shapes['fc2'][1]})")
        self.stats = CommStats() if stats is None else stats
        self.fc1 = ColumnParallelLinear(fc1, comm, gather_output=False, stats=self.stats)
        self.activation = nn.GELU() if activation is None else activation
        self.fc2 = RowParallelLinear(fc2, comm, input_is_parallel=True, stats=self.stats)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The full output on every rank. Collective over the group (one Allreduce each way)."""
        return self.fc2(self.activation(self.fc1(input)))

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsplit block's ``fc1.*`` and ``fc2.*`` tensors on every rank. Collective over the group."""
        return {f"{name}.{key}": value for name in ("fc1", "fc2")
                for key, value in getattr(self, name).full_state_dict().items()}
