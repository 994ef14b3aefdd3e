"""ZeRO-3's units: each unit's parameters all-gathered before its forward and its backward, freed after."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from mpi4py import MPI
from torch import nn
from torch.utils._pytree import tree_flatten

from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import CommStats

__all__ = ["UnitGather", "assign_units"]


def _candidates(module: nn.Module) -> List[nn.Module]:
    """``module``'s direct children, a container without a forward (``ModuleList``, ``ModuleDict``) replaced by
    its own candidates."""
    found: List[nn.Module] = []
    for child in module.children():
        found += _candidates(child) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
    return found


def assign_units(module: nn.Module, units: Optional[Sequence[nn.Module]]) -> Tuple[List[nn.Module], dict]:
    """The units (``units``, or ``module``'s direct children, a ``ModuleList``'s or ``ModuleDict``'s entries
    in its place) that hold trainable parameters, and ``{id(parameter): unit index}``. The trainable
    parameters in none of them (e.g. a position embedding on the root module) form the *root unit*,
    ``module`` itself, first in the list (gathered for the whole forward and backward); so do, with the
    default units, those shared by two children (a tied embedding and head), as FSDP keeps a shared
    parameter in the unit of a common ancestor. Local and deterministic.

    Raises:
        ValueError: a trainable parameter in two of the ``units`` given (tied across units), with the names
            and a hint.
    """
    candidates = _candidates(module) if units is None else list(units)
    holders = Counter(id(p) for unit in candidates for p in unit.parameters() if p.requires_grad)
    shared = {key for key, count in holders.items() if count > 1} if units is None else set()
    owner: dict = {}
    kept: List[nn.Module] = []
    for unit in candidates:
        trainable = [p for p in unit.parameters() if p.requires_grad and id(p) not in shared]
        if not trainable:
            continue
        for p in trainable:
            if id(p) in owner:
                names = [name for name, q in module.named_parameters(remove_duplicate=False) if q is p]
                raise ValueError(f"ZeRO-3: parameter {' = '.join(names)} is shared by two units ({owner[id(p)]} "
                                 f"and {len(kept)}); a unit is gathered alone, so tie parameters within one unit "
                                 f"(put both users in one child module), or pass units= without the modules that "
                                 f"share it (their parameters then join the root unit, gathered for the whole step)")
            owner[id(p)] = len(kept)
        kept.append(unit)
    outside = [p for p in module.parameters() if p.requires_grad and id(p) not in owner]
    if outside:
        owner = {key: index + 1 for key, index in owner.items()}
        owner.update((id(p), 0) for p in outside)
        kept.insert(0, module)
    return kept, owner


class UnitGather:
    """The parameters of ``units`` gathered around their forward and backward, in a fixed order.

    Unit u's parameters are views into ``flats[g]`` for its groups g (``unit_groups[u]``) while it is
    gathered; between uses those buffers hold no storage, the parameters are empty (a read fails
    cleanly) and this rank keeps only ``shards[g]``. The all-gathers
    follow one static sequence on every rank, whatever the model runs: forward, units 0, 1, ...,
    n - 1 (unit u + 1 started before unit u computes: prefetch), the last unit kept for the
    backward; backward, n - 2, ..., 0 (unit u - 1 started before unit u's backward). A unit a rank
    skips is gathered in its turn all the same, and freed when the sequence ends. A unit is freed
    after its forward (all but the last) and once all its gradients are accumulated (:meth:`done`).
    With ``rooted``, unit 0 is the root module (the parameters in no other unit): gathered first, in its
    forward pre-hook, with unit 1 prefetched, and kept through the forward and the backward until its
    gradients are all in; the backward sequence then ends at unit 1 (n - 2, ..., 1).

    Collective contract: every rank calls :meth:`begin_forward`, runs the forward, :meth:`end_forward`
    and :meth:`settle` together; the gathers run on ``comm`` (a communicator of their own, so their
    order never interleaves with the gradients' reduce-scatters; ``progress`` is called before each unit's
    backward to test those). Size 1: copies.
    """

    def __init__(self, units: List[nn.Module], unit_groups: List[List[int]], params_of: List[List[nn.Parameter]],
                 flats: List[torch.Tensor], shards: List[torch.Tensor], comm: MPI.Intracomm, calls: list,
                 stats: CommStats, progress: Callable[[], None] = lambda: None, rooted: bool = False):
        self.first = 1 if rooted else 0  # the first unit gathered again for the backward (a root unit stays)
        self.units, self.unit_groups, self.flats, self.shards = units, unit_groups, flats, shards
        self.comm, self.calls, self.stats, self.progress = comm, calls, stats, progress
        self.views = [[(p, p.data) for g in groups for p in params_of[g]] for groups in unit_groups]
        self.empty = [[p.data.new_empty(0) for p, _ in views] for views in self.views]
        count = len(units)
        self.pending: List[Optional[list]] = [None] * count
        self.allocated = [False] * count
        self.ran = [False] * count
        self.phase: Optional[str] = None  # "forward", "backward" or None (hooks idle)
        self.forward_next, self.backward_next = 0, count - 2
        for index, unit in enumerate(units):
            unit.register_forward_pre_hook(lambda module, args, index=index: self._before_forward(index))
            unit.register_forward_hook(lambda module, args, output, index=index: self._after_forward(index, output))

    def free(self, unit: int) -> None:
        """Complete the unit's gather if started and release its full buffers. Local."""
        self.wait(unit)
        for g in self.unit_groups[unit]:
            self.flats[g].untyped_storage().resize_(0)
        for (p, _), empty in zip(self.views[unit], self.empty[unit]):
            p.data = empty
        self.allocated[unit] = False

    def free_all(self) -> None:
        for unit in range(len(self.units)):
            self.free(unit)

    def _start(self, unit: int) -> None:
        ops = []
        for g in self.unit_groups[unit]:
            flat = self.flats[g]
            flat.untyped_storage().resize_(flat.numel() * flat.element_size())
            ops.append(mpi_tensor.iallgather_(flat, self.shards[g], self.comm))
            nbytes = flat.numel() * flat.element_size()
            self.calls.append(("allgather", nbytes))
            self.stats.bytes_sent += (self.comm.Get_size() - 1) / self.comm.Get_size() * nbytes
        for p, view in self.views[unit]:
            p.data = view
        self.pending[unit] = ops
        self.allocated[unit] = True

    def wait(self, unit: int) -> None:
        if self.pending[unit] is not None:
            begin = time.perf_counter()
            for op in self.pending[unit]:
                op.wait()
            self.stats.wait_time += time.perf_counter() - begin
            self.pending[unit] = None

    def gather_all(self) -> None:
        """Gather every unit now (outside a step's sequence). Collective."""
        for unit in range(len(self.units)):
            self._start(unit)
        for unit in range(len(self.units)):
            self.wait(unit)

    # -- the sequence -------------------------------------------------------------

    def begin_forward(self) -> None:
        self.settle()
        self.phase, self.forward_next, self.ran = "forward", 0, [False] * len(self.units)

    def _before_forward(self, unit: int) -> None:
        if self.phase != "forward":
            return
        if self.ran[unit]:
            raise RuntimeError(f"ZeRO-3: unit {unit} ({type(self.units[unit]).__name__}) ran twice in one forward; "
                               f"each unit is gathered once per forward: pass units= without it (its parameters "
                               f"then join the root unit, gathered for the whole step)")
        while self.forward_next <= min(unit + 1, len(self.units) - 1):  # this unit and the next (prefetch)
            self._start(self.forward_next)
            self.forward_next += 1
        self.wait(unit)

    def _after_forward(self, unit: int, output) -> None:
        if self.phase != "forward":
            return
        self.ran[unit] = True
        if unit < self.first:  # the root unit: whole until its gradients are in
            return
        if unit != len(self.units) - 1:
            self.free(unit)
        if torch.is_grad_enabled():
            for tensor in tree_flatten(output)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda grad, unit=unit: self._before_backward(unit))

    def end_forward(self) -> None:
        """Gather the units the forward did not reach (all ranks gather all), free all but the last."""
        while self.forward_next < len(self.units):
            self._start(self.forward_next)
            self.forward_next += 1
        for unit in range(self.first, len(self.units) - 1):
            self.free(unit)
        self.phase, self.backward_next = "backward", len(self.units) - 2

    def _before_backward(self, unit: int) -> None:
        if self.phase != "backward":
            return
        self.progress()  # the gradients' reduce-scatters in flight: a completed one frees its unit's gradient
        while self.backward_next >= max(unit - 1, self.first):  # this unit and the one before (prefetch)
            self._start(self.backward_next)
            self.backward_next -= 1
        if not self.allocated[unit]:
            raise RuntimeError(f"ZeRO-3: unit {unit} ({type(self.units[unit]).__name__}) is needed again after its "
                               f"gradients were complete (a second backward?); one backward per forward")
        self.wait(unit)

    def done(self, unit: int) -> None:
        """All of the unit's gradients are accumulated: its parameters are not needed again this step."""
        if self.phase == "backward":
            self.free(unit)

    def settle(self) -> None:
        """Finish the step's sequence (the gathers no rank has reached yet) and free every unit. Collective."""
        if self.phase == "forward":
            self.end_forward()
        if self.phase == "backward":
            while self.backward_next >= self.first:
                self._start(self.backward_next)
                self.backward_next -= 1
        self.free_all()
        self.phase = None
