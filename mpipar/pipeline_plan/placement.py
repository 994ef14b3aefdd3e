"""Which rank holds which layer of an ``nn.Sequential``, and the stages that follows.

A placement maps every layer to a rank. Any mapping is legal, contiguous or not:
``fc1, fc4 -> rank 0`` and ``fc2, fc3 -> rank 1`` gives three stages (maximal runs
of consecutive layers on one rank) and the activation travels 0 -> 1 -> 0. Explicit
``boundaries`` cut a run on one rank into several stages (ZB-V's V: chunks ``p - 1`` and ``p``
both on rank ``p - 1``); the activation then passes between them in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

__all__ = ["Placement", "Segment", "even_balance", "v_ranks"]


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


def v_ranks(size: int) -> Tuple[int, ...]:
    """The rank of each of ``2 size`` chunks in a V: down the ranks and back up (ZB-V).

    >>> v_ranks(3)
    (0, 1, 2, 2, 1, 0)
    """
    if not (_is_int(size) and size >= 1):
        raise ValueError(f"a V placement needs a number of ranks >= 1 (an int), got {size!r}")
    return tuple(range(size)) + tuple(reversed(range(size)))


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
        boundaries: layers that start a stage although the layer before is on the same rank (each in
            ``1 .. len(ranks) - 1``); a boundary between two ranks is one anyway and is dropped, so equal
            stages give equal placements.

    Raises:
        ValueError: empty, an entry that is not an int >= 0, or a boundary that is not a layer after the first.
    """

    ranks: Tuple[int, ...]
    boundaries: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        if not self.ranks:
            raise ValueError("a placement needs at least one layer")
        bad = [(layer, r) for layer, r in enumerate(self.ranks) if not (_is_int(r) and r >= 0)]
        if bad:
            raise ValueError(f"placement ranks must be ints >= 0; got (layer, rank) {bad}")
        cuts = tuple(self.boundaries)
        wrong = [b for b in cuts if not (_is_int(b) and 1 <= b < len(self.ranks))]
        if wrong:
            raise ValueError(f"stage boundaries are the first layers of stages, ints in 1..{len(self.ranks) - 1} "
                             f"for {len(self.ranks)} layers; got {wrong} in {list(cuts)}")
        object.__setattr__(self, "boundaries", tuple(sorted(b for b in set(cuts)
                                                            if self.ranks[b] == self.ranks[b - 1])))

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
        return cls.chunked(balance, range(len(balance)))

    @classmethod
    def chunked(cls, balance: Sequence[int], chunk_ranks: Sequence[int]) -> Placement:
        """Chunk ``c`` of ``balance[c]`` consecutive layers on rank ``chunk_ranks[c]``, every chunk a stage
        (adjacent chunks on one rank too: a boundary between them).

        Raises:
            ValueError: a count that is not an int >= 1, or not one rank per chunk.
        """
        balance, chunk_ranks = list(balance), list(chunk_ranks)
        bad = [(c, n) for c, n in enumerate(balance) if not (_is_int(n) and n >= 1)]
        if not balance or bad:
            raise ValueError(
                f"a balance lists how many layers each chunk holds (ints >= 1), got {balance}; "
                f"e.g. [2, 3] puts layers 0-1 in the first chunk and 2-4 in the second")
        if len(chunk_ranks) != len(balance):
            raise ValueError(f"{len(balance)} chunks need as many ranks, got {len(chunk_ranks)}: {chunk_ranks}")
        starts = [sum(balance[:c]) for c in range(1, len(balance))]
        return cls(tuple(rank for rank, count in zip(chunk_ranks, balance) for _ in range(count)), tuple(starts))

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
        if len(balance) % size:
            raise ValueError(f"{len(balance)} chunks cannot go round {size} ranks evenly; give a multiple of {size}")
        return cls(cls.chunked(balance, [chunk % size for chunk in range(len(balance))]).ranks)  # runs merge

    @classmethod
    def v_shape(cls, layers: int, size: int) -> Placement:
        """ZB-V's placement: ``layers`` split as evenly as counts allow into ``2 size`` chunks, rank ``r``
        holding chunks ``r`` and ``2 size - 1 - r`` (:func:`v_ranks`); the two chunks of rank ``size - 1``
        are adjacent and stay two stages (a boundary between them)."""
        return cls.chunked(even_balance(layers, 2 * size), v_ranks(size))

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
        """The stages: maximal runs of consecutive layers on one rank, cut at the :attr:`boundaries`, in model
        order."""
        segments, start = [], 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or self.ranks[layer] != self.ranks[start] or layer in self.boundaries:
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
