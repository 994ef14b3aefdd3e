"""How a layer's features are split over a tensor-parallel group, and the agreed check of the full layers."""

from __future__ import annotations

from typing import Dict, Tuple

from mpi4py import MPI
from torch import nn

from mpipar.diagnostics.agree import gather_checked
from mpipar.diagnostics.failure import agreed

__all__ = ["shard_size", "shard_bounds", "agree_on_linears"]


def shard_size(features: int, size: int, *, pad: bool = False, what: str = "layer") -> int:
    """The number of features each of ``size`` ranks holds.

    The rule: features are split into ``size`` equal, contiguous shards, rank r holding
    ``[r * shard, (r + 1) * shard)``. A count that ``size`` does not divide is refused,
    unless ``pad`` is set: then the count is padded up to the next multiple of ``size``
    (``shard = ceil(features / size)``) and the last shards end in padding features
    that are not part of the model (a rank may hold padding only). Pure; no communication.

    Args:
        features: the unsplit layer's feature count.
        size: the tensor-parallel group's size.
        pad: pad instead of refusing an uneven split.
        what: names the layer and the dimension in the error message.

    Returns:
        The features per rank, padding included.

    Raises:
        ValueError: when ``size`` does not divide ``features`` and ``pad`` is False.
    """
    if size < 1:
        raise ValueError(f"{what}: the tensor-parallel size must be >= 1, got {size}")
    if features % size and not pad:
        raise ValueError(
            f"{what}: {features} features cannot be split evenly over {size} tensor-parallel ranks "
            f"({features} = {features // size} x {size} + {features % size}); use a multiple of {size}")
    return -(-features // size)


def shard_bounds(features: int, size: int, rank: int, *, pad: bool = False) -> Tuple[int, int]:
    """``(start, stop)``: the real (unpadded) features rank ``rank`` holds, ``stop - start`` of them
    (fewer than :func:`shard_size` only in a padded split; ``start == stop`` for padding only)."""
    shard = shard_size(features, size, pad=pad)
    start = min(rank * shard, features)
    return start, min(start + shard, features)


def agree_on_linears(comm: MPI.Intracomm, linears: Dict[str, nn.Linear], what: str) -> Dict[str, Tuple[int, int]]:
    """Check that every rank was given ``nn.Linear`` layers of the same shapes.

    Collective over ``comm``: every rank calls it together, with the same names in
    ``linears`` (one small allgather; at size 1 it only checks the types). Values are
    not compared: building from the same seed or checkpoint is the caller's part.

    Args:
        comm: the tensor-parallel group.
        linears: name -> the full, unsplit layer.
        what: names the caller in error messages.

    Returns:
        name -> ``(in_features, out_features)``, the same on every rank.

    Raises:
        TypeError: on every rank, when some rank's layer is not an ``nn.Linear``.
        ValueError: on every rank, naming each rank's shapes, when they differ.
    """

    def shapes() -> Dict[str, Tuple[int, int]]:
        for name, layer in linears.items():
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(layer).__name__}")
        return {name: (layer.in_features, layer.out_features) for name, layer in linears.items()}

    every_rank = gather_checked(comm, shapes, what)
    if any(found != every_rank[0] for found in every_rank):
        listed = "; ".join(f"rank {rank}: " + ", ".join(f"{name} {i}->{o}" for name, (i, o) in found.items())
                           for rank, found in enumerate(every_rank))
        raise agreed(ValueError)(f"{what}: the ranks were given layers of different shapes ({listed}); "
                                 f"build the full layers identically on every rank")
    return every_rank[0]
