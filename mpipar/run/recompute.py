"""Activation recompute (``--recompute``): which units of a model are checkpointed, and how they replay."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from mpipar.run.config import RECOMPUTES

__all__ = ["RECOMPUTES", "recompute_units", "apply_recompute", "remove_recompute", "replaying_buffers",
           "scratch_buffers", "nothing_saved", "check_strategy_recompute"]

# RECOMPUTES (``--recompute``): none: nothing recomputed; full: every unit (a transformer block, else each
# entry of an ``nn.Sequential``; a pipeline stage's whole forward per micro-batch); selective: only the
# attention core of each transformer block (Megatron's selective recompute).

Replay = Callable[[Callable], Callable]
"""Wraps a unit's forward so that its second call (the recompute) replays what the first drew, e.g.
:meth:`~mpipar.tensor_parallel.random.TensorParallelRNG.recomputable`."""


def recompute_units(model: nn.Module, mode: str, *, strict: bool = True) -> List[nn.Module]:
    """The modules of ``model`` that ``mode`` checkpoints. Local, pure. A module declares its kind in a
    class attribute ``recompute_unit``: ``"block"`` (a transformer block) or ``"attention"`` (an attention
    core); ``nn.MultiheadAttention`` counts as an attention core (its projections are recomputed with it:
    it is one call).

    ``full``: the blocks; a model without blocks: the entries of an ``nn.Sequential``. ``selective``: the
    attention cores. ``none``: nothing.

    Raises:
        ValueError: naming the mode, when the model has no such unit (a ``selective`` model without
            attention, a ``full`` model that is neither a transformer nor an ``nn.Sequential``) and
            ``strict`` (else: none, e.g. a pipeline stage of a model checked whole).
    """
    if mode not in RECOMPUTES:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTES)}, got {mode!r}")
    if mode == "none":
        return []
    if mode == "selective":
        units = [m for m in model.modules() if _kind(m) == "attention"]
        if not units and strict:
            raise ValueError(f"--recompute selective recomputes the attention core of transformer blocks, and "
                             f"this {type(model).__name__} has no attention; use --recompute full (each entry "
                             f"or block) or none")
        return units
    units = [m for m in model.modules() if _kind(m) == "block"]
    if units:
        return units
    if isinstance(model, nn.Sequential) and len(model):
        return list(model)
    if not strict:
        return []
    raise ValueError(f"--recompute full checkpoints each transformer block, or each entry of an nn.Sequential; "
                     f"this {type(model).__name__} is neither: use --recompute none")


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return getattr(type(module), "recompute_unit", None)


def apply_recompute(model: nn.Module, mode: str, *, reentrant: bool = False,
                    replay: Optional[Replay] = None, strict: bool = True) -> List[nn.Module]:
    """Checkpoint each of :func:`recompute_units` ``(model, mode)`` in place: while gradients are enabled its
    forward runs through ``torch.utils.checkpoint(use_reentrant=False)``, or with ``reentrant`` through
    mpipar's reentrant checkpoint (a nested backward, bitwise), so the backward keeps only its inputs and
    recomputes the rest. The recompute is bitwise the forward: the RNG state is restored, buffers
    (BatchNorm statistics) are not updated twice (:func:`replaying_buffers`), and ``replay`` (if given)
    wraps the forward of each call, e.g. a tensor-parallel group's split-stream replay. State-dict names
    are unchanged. Local: communicating
    units (a tensor-parallel block's Allreduces) repeat their collectives in the backward, in the
    order autograd reaches them, the same on every rank. Returns the units. Raises as
    :func:`recompute_units`, and ValueError for ``reentrant`` units sharing parameters with the rest.
    """
    units = recompute_units(model, mode, strict=strict)
    if reentrant:
        _check_not_shared(model, units)
    remove_recompute(model)
    for unit in units:
        unit.forward = _Checkpointed(unit, reentrant, replay)
    return units


def _check_not_shared(model: nn.Module, units: List[nn.Module]) -> None:
    """Raise ValueError when a unit shares a parameter with the rest of the model (tied weights): the
    reentrant kind would accumulate its gradient in two backwards, after the first may have been sent."""
    for unit in units:
        inside = {id(m) for m in unit.modules()}
        own = {id(p) for p in unit.parameters()}
        for name, module in model.named_modules():
            if id(module) not in inside and any(id(p) in own for p in module.parameters(recurse=False)):
                raise ValueError(f"reentrant recompute: a {type(unit).__name__} unit shares a parameter with "
                                 f"{name or 'the model'} outside it, whose gradient the reentrant kind would "
                                 f"accumulate in two backwards; use the non-reentrant kind (the default)")


def remove_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_recompute`: every unit of ``model`` runs its own forward again. Local."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Checkpointed):
            del module.forward


@contextlib.contextmanager
def scratch_buffers(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module``'s buffers are copies, dropped on leaving: a recompute's BatchNorm updates
    its running statistics once more into them, and the buffers stay as the forward left them (they are
    not written, so no tensor a backward saved changes version). Local."""
    owners = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    for owner, name, buffer in owners:
        owner._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for owner, name, buffer in owners:
            owner._buffers[name] = buffer


def replaying_buffers(function: Callable, module: nn.Module) -> Callable:
    """``function`` whose second and later calls (recomputes) run on :func:`scratch_buffers` of ``module``:
    a BatchNorm's running statistics are updated once, by the forward, as without recompute. Local."""
    calls: list = []

    def run(*args, **kwargs):
        if not calls:
            calls.append(True)
            return function(*args, **kwargs)
        with scratch_buffers(module):
            return function(*args, **kwargs)

    return run


class _Checkpointed:
    """A unit's forward through a checkpoint, set as the unit's instance ``forward``."""

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
        if self.reentrant and any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(kwargs)):
            raise TypeError(f"reentrant recompute: a {type(unit).__name__} unit got a keyword input that needs a "
                            f"gradient, which the reentrant kind cannot pass on; pass it positionally, or use the "
                            f"non-reentrant kind (the default)")

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
        if self.reentrant:
            return _ReentrantCheckpoint.apply(function, *distinct)
        return checkpoint(function, *distinct, use_reentrant=False)


class _ReentrantCheckpoint(torch.autograd.Function):
    """``torch.utils.checkpoint``'s reentrant kind (the recompute and its backward run as a nested backward
    inside the outer one, so parameters get their gradients there), made bitwise: the forward runs in grad
    mode with nothing saved (torch's runs under ``no_grad``, where some kernels choose differently), and the
    inputs' gradients are handed on as autograd made them (torch's hands on the leaves' ``.grad``, whose
    memory layout can differ and so change the order of a later reduction, e.g. a bias gradient's)."""

    @staticmethod
    def forward(ctx, function, *inputs):
        ctx.function = function
        ctx.rng = _rng_snapshot(inputs)
        ctx.autocast = _autocast_snapshot()
        ctx.save_for_backward(*inputs)
        with torch.enable_grad(), nothing_saved():
            outputs = function(*_leaves(inputs))
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)

    @staticmethod
    def backward(ctx, *grads):
        leaves = _leaves(ctx.saved_tensors)
        taken: List[Optional[torch.Tensor]] = [None] * len(leaves)
        for index, leaf in enumerate(leaves):
            if leaf.requires_grad:
                leaf.register_hook(lambda grad, index=index: taken.__setitem__(index, grad))
        cpu_state, cuda_states = ctx.rng
        with torch.random.fork_rng(devices=list(cuda_states)):
            torch.set_rng_state(cpu_state)
            for device, state in cuda_states.items():
                torch.cuda.set_rng_state(state, device)
            with contextlib.ExitStack() as stack:
                for device_type, dtype, enabled in ctx.autocast:
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
                with torch.enable_grad():
                    outputs = ctx.function(*leaves)
        pairs = [(out, grad) for out, grad in zip(pytree.tree_leaves(outputs), grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, *taken)


def _leaves(inputs) -> list:
    return [t.detach().requires_grad_(t.requires_grad) for t in inputs]


def _rng_snapshot(inputs) -> tuple:
    """The CPU generator's state, and each CUDA device's the inputs are on."""
    devices = sorted({t.device.index or 0 for t in inputs if t.device.type == "cuda"})
    return torch.get_rng_state(), {device: torch.cuda.get_rng_state(device) for device in devices}


def _autocast_snapshot() -> list:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)) for kind in kinds]


def nothing_saved():
    """Inside the block autograd saves nothing for the backward: a forward that runs as with its graph
    kept (grad mode: the same kernels), whose graph is never back-propagated. Local."""
    return torch.autograd.graph.saved_tensors_hooks(_drop, _dropped)


def _drop(tensor: torch.Tensor) -> None:
    return None


def _dropped(_: None) -> torch.Tensor:
    raise RuntimeError("a recomputed forward's first graph is never back-propagated")


def check_strategy_recompute(mode: str, strategy) -> None:
    """Raise ValueError when ``strategy`` cannot train with ``--recompute mode``: it lists what it takes in
    ``recomputes`` (absent: ``("none",)``). Local (the same on every rank)."""
    if mode not in RECOMPUTES:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTES)}, got {mode!r}")
    offered = tuple(getattr(strategy, "recomputes", ("none",)))
    if mode not in offered:
        raise ValueError(f"{strategy.name} cannot train with --recompute {mode} (it takes {', '.join(offered)}); "
                         f"use --recompute none, or a data-parallel, pipeline or tensor-parallel strategy")
