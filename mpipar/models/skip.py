"""Skip connections inside an ``nn.Sequential``: a tensor saved by one layer and used by a later one, on any stage.

A residual branch or a U-Net skip is two marker layers in a :class:`SkipSequential`:

    SkipSequential(
        SaveSkip("block1"),                                 # keeps its input as skip tensor "block1"
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        AddSkip("block1"),                                  # x + skip ("block1")
        nn.ReLU())

Run whole, the model equals the same network written with a ``forward`` that adds the
branch. Cut into pipeline stages, the layers between the two markers may land on any
stages: :class:`~mpipar.pipeline.Pipeline` sends the skip tensor straight from the
saving stage's rank to the using stage's rank (and its gradient back), or hands it over
in memory when both stages sit on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union, cast

import torch
from torch import nn

__all__ = ["SaveSkip", "SkipConsumer", "AddSkip", "CatSkip", "SkipSequential", "SkipEdge", "find_skips"]


class SaveSkip(nn.Module):
    """Keeps its input as skip tensor ``name`` for a later :class:`SkipConsumer`; passes it on unchanged."""

    def __init__(self, name: str):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a skip needs a non-empty string name, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return repr(self.name)


class SkipConsumer(nn.Module):
    """A layer that combines its input ``x`` with skip tensor ``name`` saved by an earlier :class:`SaveSkip`.

    Subclasses define ``forward(x, skip)``; :class:`SkipSequential` passes the skip.
    """

    def __init__(self, name: str):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a skip needs a non-empty string name, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return repr(self.name)


class AddSkip(SkipConsumer):
    """``x + shortcut(skip)``: a residual connection.

    Args:
        name: the skip saved by a :class:`SaveSkip` earlier in the model.
        shortcut: a module applied to the skip first (a strided 1x1 convolution and
            BatchNorm when the block changes shape); default identity.
    """

    def __init__(self, name: str, shortcut: Optional[nn.Module] = None):
        super().__init__(name)
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.shortcut(skip)


class CatSkip(SkipConsumer):
    """``torch.cat([x, skip], dim)``: a U-Net skip (channels joined, ``dim=1``)."""

    def __init__(self, name: str, dim: int = 1):
        super().__init__(name)
        self.dim = dim

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, skip], self.dim)

    def extra_repr(self) -> str:
        return f"{self.name!r}, dim={self.dim}"


class SkipSequential(nn.Sequential):
    """An ``nn.Sequential`` whose layers may save (:class:`SaveSkip`) and use (:class:`SkipConsumer`) skips.

    ``forward(x, skips=None)`` runs the layers in order: a ``SaveSkip`` puts its input
    into ``skips`` under its name, a consumer takes its skip out. Called with one
    argument the model is self-contained (every skip is saved and used inside it).
    A slice of it (a pipeline stage: ``model[a:b]`` is again a ``SkipSequential``)
    finds the skips saved before it in ``skips`` and leaves there the ones it saves
    for later stages.
    """

    def forward(self, x: torch.Tensor, skips: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        skips = {} if skips is None else skips
        for layer in self:
            if isinstance(layer, SaveSkip):
                skips[layer.name] = x
            elif isinstance(layer, SkipConsumer):
                if layer.name not in skips:
                    raise ValueError(f"layer {type(layer).__name__}({layer.name!r}) uses skip {layer.name!r} "
                                     f"which no earlier layer saved; add SaveSkip({layer.name!r}) before it")
                x = layer(x, skips.pop(layer.name))
                continue
            x = layer(x)
        return x


@dataclass(frozen=True)
class SkipEdge:
    """Skip ``name``, saved by layer ``producer`` and used by layer ``consumer`` (indices in the model)."""

    name: str
    producer: int
    consumer: int


def find_skips(module: nn.Sequential) -> Tuple[SkipEdge, ...]:
    """The skips of ``module``, in the order they are saved.

    Raises:
        TypeError: skip layers in a plain ``nn.Sequential`` (it cannot pass skips).
        ValueError: skip layers nested inside another layer, a name saved twice, a
            skip used before (or without) being saved, or saved and never used.
    """
    layers = list(module.named_children())
    markers = [index for index, (_, layer) in enumerate(layers) if isinstance(layer, (SaveSkip, SkipConsumer))]
    nested = [name for name, layer in layers if not isinstance(layer, (SaveSkip, SkipConsumer)) and any(
        isinstance(inner, (SaveSkip, SkipConsumer)) for inner in layer.modules())]
    if nested:
        raise ValueError(f"layers {nested} contain skip layers; SaveSkip and skip consumers must be direct "
                         f"children of the SkipSequential (flatten the nested Sequential)")
    if not markers:
        return ()
    if not isinstance(module, SkipSequential):
        raise TypeError(f"{type(module).__name__} has skip layers (SaveSkip, AddSkip, CatSkip) but cannot pass "
                        f"skips between them; build the model as mpipar.pipeline.SkipSequential")
    saved: Dict[str, int] = {}
    edges: List[SkipEdge] = []
    for index in markers:
        layer = cast(Union[SaveSkip, SkipConsumer], layers[index][1])  # what the markers are
        if isinstance(layer, SaveSkip):
            if layer.name in saved or any(edge.name == layer.name for edge in edges):
                raise ValueError(f"skip {layer.name!r} is saved twice (layer {index}); give every skip its own name")
            saved[layer.name] = index
        elif layer.name not in saved:
            raise ValueError(f"layer {index} uses skip {layer.name!r} which no earlier layer saved; add "
                             f"SaveSkip({layer.name!r}) before it")
        else:
            edges.append(SkipEdge(layer.name, saved.pop(layer.name), index))
    if saved:
        raise ValueError(f"skips {sorted(saved)} are saved (layers {sorted(saved.values())}) but never used; "
                         f"add a consumer (AddSkip, CatSkip) after each or remove the SaveSkip")
    return tuple(sorted(edges, key=lambda edge: edge.producer))
