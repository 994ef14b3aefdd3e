"""Activation recompute (``--recompute``): which units of a model are checkpointed, and how they replay."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpipar.run.config import RECOMPUTES

__all__ = ["RECOMPUTES", "recompute_units", "apply_recompute", "remove_recompute", "replaying_buffers",
           "check_strategy_recompute"]

# RECOMPUTES (``--recompute``): none: nothing recomputed; full: every unit (a transformer block, else each
# entry of an ``nn.Sequential``; a pipeline stage's whole forward per micro-batch); selective: only the
# attention core of each transformer block (Megatron's selective recompute).

Replay = Callable[[Callable], Callable]
"""Wraps a unit's forward so that its second call (the recompute) replays what the first drew, e.g.
:meth:`~mpipar.tensor_parallel.random.TensorParallelRNG.recomputable`."""


def recompute_units(model: nn.Module, mode: str) -> List[nn.Module]:
    """The modules of ``model`` that ``mode`` checkpoints. Local, pure. A module declares its kind in a
    class attribute ``recompute_unit``: ``"block"`` (a transformer block) or ``"attention"`` (an attention
    core); ``nn.MultiheadAttention`` counts as an attention core (its projections are recomputed with it:
    it is one call).

    ``full``: the blocks; a model without blocks: the entries of an ``nn.Sequential``. ``selective``: the
    attention cores. ``none``: nothing.

    Raises:
        ValueError: naming the mode, when the model has no such unit (a ``selective`` model without
            attention, a ``full`` model that is neither a transformer nor an ``nn.Sequential``).
    """
    if mode not in RECOMPUTES:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTES)}, got {mode!r}")
    if mode == "none":
        return []
    if mode == "selective":
        units = [m for m in model.modules() if _kind(m) == "attention"]
        if not units:
            raise ValueError(f"--recompute selective recomputes the attention core of transformer blocks, and "
                             f"this {type(model).__name__} has no attention; use --recompute full (each entry "
                             f"or block) or none")
        return units
    units = [m for m in model.modules() if _kind(m) == "block"]
    if units:
        return units
    if isinstance(model, nn.Sequential) and len(model):
        return list(model)
    raise ValueError(f"--recompute full checkpoints each transformer block, or each entry of an nn.Sequential; "
                     f"this {type(model).__name__} is neither: use --recompute none")


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return getattr(type(module), "recompute_unit", None)


def apply_recompute(model: nn.Module, mode: str, *, reentrant: bool = False,
                    replay: Optional[Replay] = None) -> List[nn.Module]:
    """Checkpoint each of :func:`recompute_units` ``(model, mode)`` in place: its forward runs through
    ``torch.utils.checkpoint`` (``use_reentrant=reentrant``) while gradients are enabled, so the
    backward keeps only its inputs and recomputes the rest. The recompute is bitwise the forward: the
    RNG state is restored (``checkpoint``'s own), buffers (BatchNorm statistics) are put back after it
    (:func:`replaying_buffers`), and ``replay`` (if given) wraps the forward of each call, e.g. a
    tensor-parallel group's split-stream replay. State-dict names are unchanged. Local: communicating
    units (a tensor-parallel block's Allreduces) repeat their collectives in the backward, in the
    order autograd reaches them, the same on every rank. Returns the units. Raises as
    :func:`recompute_units`.
    """
    units = recompute_units(model, mode)
    remove_recompute(model)
    for unit in units:
        unit.forward = _Checkpointed(unit, reentrant, replay)  # type: ignore[method-assign]
    return units


def remove_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_recompute`: every unit of ``model`` runs its own forward again. Local."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Checkpointed):
            del module.forward


def replaying_buffers(function: Callable, module: nn.Module) -> Callable:
    """``function`` whose second and later calls (recomputes) leave ``module``'s buffers as they found
    them: a BatchNorm's running statistics are updated once, by the forward, as without recompute. The
    recompute updates copies, put in the buffers' places for its duration (the buffers themselves are
    not written, so no tensor the backward saved changes version). Local."""
    calls: list = []

    def run(*args, **kwargs):
        if not calls:
            calls.append(True)
            return function(*args, **kwargs)
        owners = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
        for owner, name, buffer in owners:
            owner._buffers[name] = buffer.clone()
        try:
            return function(*args, **kwargs)
        finally:
            for owner, name, buffer in owners:
                owner._buffers[name] = buffer

    return run


class _Checkpointed:
    """A unit's forward through ``torch.utils.checkpoint``, set as the unit's instance ``forward`` (a
    plain object, so ``copy.deepcopy`` of the model maps it onto the copied unit)."""

    def __init__(self, unit: nn.Module, reentrant: bool, replay: Optional[Replay]):
        self.unit, self.reentrant, self.replay = unit, reentrant, replay

    def __call__(self, *args, **kwargs):
        unit = self.unit
        forward = type(unit).forward.__get__(unit)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if self.reentrant and not any(isinstance(t, torch.Tensor) and t.requires_grad
                                      for t in pytree.tree_leaves((args, kwargs))):
            return forward(*args, **kwargs)  # a reentrant checkpoint would give its parameters no gradient

        # Each distinct tensor passed once (a reentrant checkpoint detaches every argument apart, and
        # nn.MultiheadAttention takes another path when query, key and value are no longer one tensor);
        # keyword and non-tensor inputs by closure (the reentrant kind takes no keywords).
        distinct: List[torch.Tensor] = []
        where: List[int] = []  # per argument: its place in ``distinct``, or -1 (not a tensor)
        for a in args:
            if not isinstance(a, torch.Tensor):
                where.append(-1)
                continue
            found = next((i for i, seen in enumerate(distinct) if seen is a), None)
            if found is None:
                found = len(distinct)
                distinct.append(a)
            where.append(found)

        def function(*tensors):
            return forward(*[a if w == -1 else tensors[w] for a, w in zip(args, where)], **kwargs)

        function = replaying_buffers(function, unit)
        if self.replay is not None:
            function = self.replay(function)
        return checkpoint(function, *distinct, use_reentrant=self.reentrant)


def check_strategy_recompute(mode: str, strategy) -> None:
    """Raise ValueError when ``strategy`` cannot train with ``--recompute mode``: it lists what it takes in
    ``recomputes`` (absent: ``("none",)``). Local (the same on every rank)."""
    if mode not in RECOMPUTES:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTES)}, got {mode!r}")
    offered = tuple(getattr(strategy, "recomputes", ("none",)))
    if mode not in offered:
        raise ValueError(f"{strategy.name} cannot train with --recompute {mode} (it takes {', '.join(offered)}); "
                         f"use --recompute none, or a data-parallel, pipeline or tensor-parallel strategy")
