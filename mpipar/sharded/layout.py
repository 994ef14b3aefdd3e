"""Pure: how the trainable parameters lie in flat per-dtype buffers, and which piece of each a rank owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["FlatLayout", "Piece", "Group"]


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in one rank's shard.

    Attributes:
        group: the dtype group (index into ``FlatLayout.groups``).
        param: the parameter's index in the layout's ``entries``.
        start, stop: the piece as elements of the flattened parameter.
        shard_offset: where the piece starts in the rank's shard of the group.
    """

    group: int
    param: int
    start: int
    stop: int
    shard_offset: int


@dataclass(frozen=True)
class Group:
    """One dtype's flat buffer: its parameters (indices into ``entries``, in order), where each
    starts, the elements they fill (``total``) and the padded length (a multiple of the ranks)."""

    dtype: str
    params: Tuple[int, ...]
    offsets: Tuple[int, ...]
    total: int
    padded: int
    ranks: int
    unit: Optional[int] = None

    @property
    def shard(self) -> int:
        """Elements of each rank's shard."""
        return self.padded // self.ranks


class FlatLayout:
    """The trainable parameters ``entries`` (``(name, numel, dtype)`` in model order) laid out in one
    flat buffer per dtype (dtypes in order of first appearance), each padded with zeros to a multiple
    of ``ranks``; rank r owns elements ``[r * shard, (r + 1) * shard)`` of every buffer. Entries
    ``(name, numel, dtype, unit)`` (ZeRO-3) get one buffer per unit and dtype.

    The layout depends on the ranks only through the padding, so a checkpoint's shards re-shard
    onto another number of ranks by concatenating them and cutting again. Pure.

    Raises:
        ValueError: ``ranks`` < 1 or an entry with fewer than 0 elements.
    """

    def __init__(self, entries: Sequence[Tuple[str, int, str]], ranks: int):
        if ranks < 1:
            raise ValueError(f"a layout needs at least one rank, got {ranks}")
        self.entries = [(str(name), int(numel), str(dtype), *(int(u) for u in unit))
                        for name, numel, dtype, *unit in entries]
        self.ranks = ranks
        by_dtype: dict = {}
        for index, (name, numel, *key) in enumerate(self.entries):
            if numel < 0:
                raise ValueError(f"parameter {name} has {numel} elements")
            by_dtype.setdefault(tuple(key), []).append(index)
        self.groups: List[Group] = []
        for (dtype, *unit), params in by_dtype.items():
            offsets, total = [], 0
            for index in params:
                offsets.append(total)
                total += self.entries[index][1]
            padded = max(ranks, -(-total // ranks) * ranks)
            self.groups.append(Group(dtype, tuple(params), tuple(offsets), total, padded, ranks, *unit))

    def pieces(self, rank: int) -> List[Piece]:
        """The pieces of parameters in ``rank``'s shards, group by group in flat order (empty
        parameters and padding have none)."""
        found = []
        for g, group in enumerate(self.groups):
            first, last = rank * group.shard, (rank + 1) * group.shard
            for index, offset in zip(group.params, group.offsets):
                numel = self.entries[index][1]
                begin, end = max(first, offset), min(last, offset + numel)
                if begin < end:
                    found.append(Piece(g, index, begin - offset, end - offset, begin - first))
        return found

    def counts(self, group: int, begin: int, end: int) -> List[int]:
        """How many elements of flat range ``[begin, end)`` of ``group`` fall in each rank's shard."""
        shard = self.groups[group].shard
        return [max(0, min(end, (r + 1) * shard) - max(begin, r * shard)) for r in range(self.ranks)]

    def describe(self) -> str:
        return "; ".join(f"{g.dtype}: {g.total:,} elements, {g.shard:,} per rank"
                         + (f" ({g.padded - g.total} padding)" if g.padded > g.total else "") for g in self.groups)
