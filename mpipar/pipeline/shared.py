"""Parameters used by the layers of several pipeline stages (a tied embedding and LM head): their gradients summed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple, cast

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.pipeline.placement import Placement

__all__ = ["SharedParameter", "SharedGradients", "check_shared", "find_shared"]


@dataclass(frozen=True)
class SharedParameter:
    """One trainable parameter that the layers of several stages use (the same ``nn.Parameter`` object).

    Attributes:
        names: its names in the whole model, one per layer that uses it (``"0.wte.weight"``, ``"3.lm_head.weight"``).
        stages: the stages that use it.
        ranks: the ranks of those stages (one when one rank holds them all).
    """

    names: Tuple[str, ...]
    stages: Tuple[int, ...]
    ranks: Tuple[int, ...]

    def __str__(self) -> str:
        stages = ", ".join(map(str, self.stages[:-1])) + f" and {self.stages[-1]}"
        ranks = ", ".join(map(str, self.ranks))
        return f"{' = '.join(self.names)} (stages {stages}; rank{'s' if len(self.ranks) > 1 else ''} {ranks})"


def find_shared(module: nn.Sequential, placement: Placement) -> Tuple[SharedParameter, ...]:
    """The trainable parameters that layers of more than one stage of ``placement`` use, in model
    order. Local and pure: every rank builds the whole model, so identity is seen the same everywhere."""
    stage_of = [index for index, s in enumerate(placement.segments) for _ in range(s.start, s.stop)]
    uses: Dict[int, Tuple[List[str], List[int]]] = {}
    for layer, (key, child) in enumerate(zip(module._modules, module)):  # a module placed twice counts twice
        for name, param in child.named_parameters(prefix=key):
            if param.requires_grad:
                names, stages = uses.setdefault(id(param), ([], []))
                names.append(name)
                stages.append(stage_of[layer])
    return tuple(SharedParameter(tuple(names), tuple(sorted(set(stages))),
                                 tuple(sorted({placement.stage_ranks[s] for s in stages})))
                 for names, stages in uses.values() if len(set(stages)) > 1)


class SharedGradients:
    """Sums the gradient of each parameter shared by stages on several ranks over those ranks, as
    Megatron-LM does for its embedding group; every holder then applies the same update, so the
    copies stay equal.

    Collective contract: every rank of ``comm`` constructs it with the same model and placement; the
    constructor splits ``comm`` once per distinct set of holder ranks and broadcasts each shared
    parameter from its first holder (the copies start equal). :meth:`reduce` is called by every rank
    after each step's backward; ranks that hold no shared parameter return at once. Nothing is shared
    across ranks at size 1 or when one rank holds every user of a parameter (autograd sums its uses).

    Args:
        module: the whole model (every rank's copy).
        placement: the pipeline's placement.
        comm: the pipeline's communicator.
    """

    def __init__(self, module: nn.Sequential, placement: Placement, comm: MPI.Intracomm):
        self.shared = find_shared(module, placement)
        rank = comm.Get_rank()
        self.local = [module.get_parameter(s.names[0]) for s in self.shared if rank in s.ranks]  # this rank's
        self._groups: List[Tuple[MPI.Intracomm, List[nn.Parameter]]] = []
        for ranks in dict.fromkeys(s.ranks for s in self.shared if len(s.ranks) > 1):  # in order, each once
            group = cast(MPI.Intracomm, comm.Split(0 if rank in ranks else MPI.UNDEFINED, rank))  # or COMM_NULL
            if group == MPI.COMM_NULL:
                continue
            params = [module.get_parameter(s.names[0]) for s in self.shared if s.ranks == ranks]
            with torch.no_grad():
                for param in params:
                    mpi_tensor.bcast_(param.data, group, 0)
            self._groups.append((group, params))

    def reduce(self) -> None:
        """Sum each shared parameter's gradient over its holders (in place). Collective over the holders."""
        for group, params in self._groups:
            for param in params:
                if param.grad is None:  # a holder whose stages did not use it this step
                    param.grad = torch.zeros_like(param)
                mpi_tensor.allreduce_(param.grad, group)

    def free(self) -> None:
        """Free the holders' communicators. Local."""
        for group, _ in self._groups:
            group.Free()
        self._groups = []


def check_shared(module: nn.Sequential, placement: Placement, schedule) -> None:
    """Refuse a parameter shared across stages under an asynchronous schedule, which updates each stage
    on its own (the copies would drift apart). Local and pure; raise it on every rank together.

    Raises:
        ValueError: naming the parameter, its stages and the way out.
    """
    shared = find_shared(module, placement) if schedule.is_async else ()
    if shared:
        raise ValueError(f"the {schedule.name} schedule updates each stage with its own gradient, so a parameter "
                         f"used by several stages would train as diverging copies: {'; '.join(map(str, shared))}; "
                         f"use gpipe or 1f1b, or place the layers that use it in one stage")
