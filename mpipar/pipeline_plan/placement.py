"""Which rank holds which layer of an ``nn.Sequential``, and the stages that follows.

A placement maps every layer to a rank. Any mapping is legal, contiguous or not:
``fc1, fc4 -> rank 0`` and ``fc2, fc3 -> rank 1`` gives three stages (maximal runs
of consecutive layers on one rank) and the activation travels 0 -> 1 -> 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

__all__ = ["Placement", "Segment", "even_balance"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def even_balance(layers: int, parts: int) -> List[int]:
    """Split ``layers`` into ``parts`` contiguous counts, earlier parts one larger.

    >>> even_balance(7, 3)
    [3, 2, 2]
    """
    if not (_is_int(parts) and parts >= 1):
        raise ValueError(f"cannot split layers into {parts!r} parts; need an int >= 1")
    if not (_is_int(layers) and layers >= parts):
        raise ValueError(
            f"cannot give each of {parts} ranks a layer of a model with {layers!r} layers; "
            f"use at most {layers} ranks or a model with more layers")
    base, extra = divmod(layers, parts)
    return [base + (1 if part < extra else 0) for part in range(parts)]


@dataclass(frozen=True)
class Segment:
    """Layers ``start:stop`` of the model, all on ``rank``: one pipeline stage."""

    rank: int
    start: int
    stop: int


@dataclass(frozen=True)
class Placement:
    """The rank of every layer, in model order.

    Args:
        ranks: ``ranks[i]`` is the rank that holds layer ``i``.

    Raises:
        ValueError: empty, or an entry that is not an int >= 0.
    """

    ranks: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not self.ranks:
            raise ValueError("a placement needs at least one layer")
        bad = [(layer, r) for layer, r in enumerate(self.ranks) if not (_is_int(r) and r >= 0)]
        if bad:
            raise ValueError(f"placement ranks must be ints >= 0; got (layer, rank) {bad}")

    @classmethod
    def from_balance(cls, balance: Sequence[int]) -> Placement:
        """Contiguous placement: rank ``r`` holds the next ``balance[r]`` layers.

        Raises:
            ValueError: an entry that is not an int >= 1.
        """
        balance = list(balance)
        bad = [(r, n) for r, n in enumerate(balance) if not (_is_int(n) and n >= 1)]
        if not balance or bad:
            raise ValueError(
                f"a balance lists how many layers each rank holds (ints >= 1), got {balance}; "
                f"e.g. [2, 3] puts layers 0-1 on rank 0 and 2-4 on rank 1")
        return cls(tuple(rank for rank, count in enumerate(balance) for _ in range(count)))

    @classmethod
    def even(cls, layers: int, size: int) -> Placement:
        """Contiguous placement of ``layers`` layers over ``size`` ranks, as even as counts allow."""
        return cls.from_balance(even_balance(layers, size))

    @classmethod
    def interleaved(cls, layers: int, size: int, chunks: int) -> Placement:
        """Megatron's placement of virtual stages: ``layers`` split as evenly as counts allow into ``size *
        chunks`` contiguous chunks, chunk ``c`` on rank ``c % size`` (each rank ``chunks`` non-adjacent ones;
        with one rank, a single stage)."""
        return cls.looped(even_balance(layers, size * chunks), size)

    @classmethod
    def looped(cls, balance: Sequence[int], size: int) -> Placement:
        """Chunk ``c`` of ``balance[c]`` consecutive layers on rank ``c % size`` (virtual stages).

        Raises:
            ValueError: a count that is not an int >= 1, or a number of chunks that ``size`` does not divide.
        """
        ranks = cls.from_balance(balance).ranks  # validates the counts
        if len(balance) % size:
            raise ValueError(f"{len(balance)} chunks cannot go round {size} ranks evenly; give a multiple of {size}")
        return cls(tuple(rank % size for rank in ranks))

    @classmethod
    def from_names(cls, names: Sequence[str], mapping: Mapping[str, int]) -> Placement:
        """Placement from ``{layer name: rank}`` for a Sequential whose layers are ``names``.

        Raises:
            ValueError: a layer without a rank, or a name that is not a layer.
        """
        names = list(names)
        missing = [name for name in names if name not in mapping]
        unknown = sorted(set(mapping) - set(names))
        if missing or unknown:
            raise ValueError(
                f"placement by name must give every layer a rank; missing {missing}, "
                f"unknown {unknown}; layers are {names}")
        return cls(tuple(mapping[name] for name in names))

    @property
    def num_layers(self) -> int:
        return len(self.ranks)

    @property
    def num_ranks(self) -> int:
        """The number of ranks the placement needs (highest rank + 1)."""
        return max(self.ranks) + 1

    @property
    def segments(self) -> Tuple[Segment, ...]:
        """The stages: maximal runs of consecutive layers on one rank, in model order."""
        segments, start = [], 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or self.ranks[layer] != self.ranks[start]:
                segments.append(Segment(self.ranks[start], start, layer))
                start = layer
        return tuple(segments)

    @property
    def stage_ranks(self) -> Tuple[int, ...]:
        """The rank of each stage."""
        return tuple(segment.rank for segment in self.segments)

    @property
    def is_contiguous(self) -> bool:
        """True when every rank holds one stage."""
        return len(self.segments) == len(set(self.ranks))

    def balance(self) -> List[int]:
        """Layers per stage."""
        return [segment.stop - segment.start for segment in self.segments]

    def validate(self, num_layers: int, world_size: int) -> None:
        """Check the placement against a model and a communicator size.

        Raises:
            ValueError: wrong number of layers, a rank outside ``[0, world_size)``,
                or a rank of the communicator that holds no layer.
        """
        if num_layers != self.num_layers:
            raise ValueError(
                f"placement covers {self.num_layers} layers but the model has {num_layers}; "
                f"give one rank per layer (or a balance summing to {num_layers})")
        outside = sorted({r for r in self.ranks if r >= world_size})
        if outside:
            raise ValueError(
                f"placement uses rank(s) {outside} but the communicator has {world_size} "
                f"process(es); run with {self.num_ranks} processes or change the placement")
        idle = sorted(set(range(world_size)) - set(self.ranks))
        if idle:
            raise ValueError(
                f"rank(s) {idle} of {world_size} hold no layer; run with {self.num_ranks} "
                f"processes, place layers on every rank, or split the communicator "
                f"(mpipar.comm.topology.ProcessGrid)")

    def __str__(self) -> str:
        parts = [f"{s.start}" if s.stop - s.start == 1 else f"{s.start}-{s.stop - 1}"
                 for s in self.segments]
        return " | ".join(f"layers {p} on rank {s.rank}" for p, s in zip(parts, self.segments))
