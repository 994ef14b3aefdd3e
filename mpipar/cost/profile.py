"""The layer profiler: each layer's forward and backward time and bytes on one micro-batch (torch, local)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn

from mpipar.models.skip import SaveSkip, SkipConsumer

__all__ = ["LayerProfile", "profile_layers", "counting_saved_bytes"]


@contextmanager
def counting_saved_bytes(exclude: Iterable[torch.Tensor]) -> Iterator[Dict[int, int]]:
    """Count what autograd saves for the backward inside the block: yields a dict storage -> bytes
    (tensors sharing storage with ``exclude``, e.g. the parameters, are not counted). Local."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


@dataclass(frozen=True)
class LayerProfile:
    """One layer on one micro-batch: seconds and bytes."""

    name: str
    forward_time: float
    backward_time: float
    param_bytes: int
    activation_bytes: int  # output of one micro-batch (what crosses a boundary after this layer)
    saved_bytes: int = 0  # what autograd keeps of one micro-batch for the backward (parameters not counted)

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


def _saved_bytes(layer: nn.Module, args: tuple) -> int:
    """Bytes autograd saves for the backward when ``layer(*args)`` runs (parameters not counted)."""
    with torch.enable_grad(), counting_saved_bytes(layer.parameters()) as seen:
        layer(*args)
    return sum(seen.values())


def profile_layers(module: nn.Sequential, sample: torch.Tensor, *, repeats: int = 7,
                   warmup: int = 1) -> List[LayerProfile]:
    """Time each layer's forward and backward on ``sample`` (one micro-batch). Local.

    Each layer runs on the previous layer's output (a skip consumer also on the skip
    its ``SaveSkip`` kept). Timing goes in rounds that visit every layer once, so a
    change in machine load hits all layers alike; the fastest of ``repeats`` rounds
    (after ``warmup``) is kept (load on a shared machine only ever adds time, and one
    preempted layer would otherwise skew the split). A layer computes its inputs' gradients only when an
    earlier layer has trainable parameters, as in the real backward pass (the first
    stage never differentiates the batch). Gradients come from
    ``torch.autograd.grad`` so ``.grad`` is untouched, and buffers (BatchNorm
    statistics) are restored.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    layers = list(module.named_children())
    try:
        inputs, outputs, needs_grad, trainable_before = [], [], [], False
        x = sample
        skips: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for _, layer in layers:
                args: Tuple[torch.Tensor, ...] = (x, skips.pop(layer.name)) if isinstance(layer, SkipConsumer) else (x,)
                inputs.append(tuple(arg.detach() for arg in args))
                needs_grad.append([trainable_before and arg.is_floating_point() for arg in args])
                trainable_before |= any(p.requires_grad for p in layer.parameters())
                if isinstance(layer, SaveSkip):
                    skips[layer.name] = x
                x = layer(*args)
                outputs.append(x)
        forward: List[List[float]] = [[] for _ in layers]
        backward: List[List[float]] = [[] for _ in layers]
        for run in range(warmup + repeats):
            for index, (_, layer) in enumerate(layers):
                args = tuple(arg.clone().requires_grad_(needs)  # layers may work in place
                             for arg, needs in zip(inputs[index], needs_grad[index]))
                begin = time.perf_counter()
                with torch.enable_grad():
                    y = layer(*args)
                middle = time.perf_counter()
                wrt = [arg for arg, needs in zip(args, needs_grad[index]) if needs]
                wrt += [p for p in layer.parameters() if p.requires_grad]
                if wrt and y.requires_grad:
                    torch.autograd.grad(y, wrt, grad_outputs=torch.ones_like(y), allow_unused=True)
                end = time.perf_counter()
                if run >= warmup:
                    forward[index].append(middle - begin)
                    backward[index].append(end - middle)
        profiles = []
        for index, (name, layer) in enumerate(layers):
            params = sum(p.numel() * p.element_size() for p in layer.parameters())
            y = outputs[index]
            args = tuple(arg.clone().requires_grad_(needs) for arg, needs in zip(inputs[index], needs_grad[index]))
            profiles.append(LayerProfile(name, min(forward[index]), min(backward[index]), params,
                                         y.numel() * y.element_size(), _saved_bytes(layer, args)))
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])
    return profiles
