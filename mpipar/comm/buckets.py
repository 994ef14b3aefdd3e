"""Which parameters share a gradient bucket (the one assignment the reducer and the cost model use), and when
each bucket starts (the one launch order of the reducer's Allreduces and ZeRO's reduce-scatters)."""

from __future__ import annotations

from typing import Hashable, Iterator, List, Sequence

__all__ = ["assign_buckets", "LaunchOrder"]


def assign_buckets(nbytes: Sequence[int], kinds: Sequence[Hashable], cap: float) -> List[List[int]]:
    """Group parameters into buckets, last parameter first (the order backward produces them). Pure.

    A parameter joins the current bucket while the bucket stays within ``cap`` bytes and
    holds parameters of the same kind (dtype and device); otherwise it starts a new one,
    so a parameter bigger than ``cap`` has a bucket of its own.

    Args:
        nbytes: each parameter's size in bytes, in the model's (forward) order.
        kinds: each parameter's (dtype, device) or any equality-comparable key.
        cap: the bucket size in bytes.

    Returns:
        Buckets in launch order, each the indices of its parameters in the order they
        were added (descending).
    """
    if len(nbytes) != len(kinds):
        raise ValueError(f"need a kind for each of the {len(nbytes)} parameters, got {len(kinds)}")
    groups: List[List[int]] = []
    size = 0
    for index in reversed(range(len(nbytes))):
        last = groups[-1] if groups else None
        if last and size + nbytes[index] <= cap and kinds[index] == kinds[last[0]]:
            last.append(index)
            size += nbytes[index]
        else:
            groups.append([index])
            size = nbytes[index]
    return groups


class LaunchOrder:
    """When buckets start: each once all its members are ready and every earlier bucket has started, so
    buckets start in list order on every rank whatever order their members become ready in. Local.

    The reducer's Allreduces and ZeRO's reduce-scatters both start through it: :meth:`mark` a member as
    its gradient becomes final, then start what :meth:`take` yields (in order); :meth:`reset` at each step.

    Args:
        sizes: the number of members of each bucket, in launch order.
    """

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.ready: List[set] = [set() for _ in self.sizes]
        self.started = 0  # buckets started this step: 0 .. started - 1
        self.early = 0    # buckets started by take(force=False) (during backward), since construction

    def reset(self) -> None:
        """A new step: no member ready, no bucket started."""
        for members in self.ready:
            members.clear()
        self.started = 0

    def mark(self, bucket: int, member: Hashable) -> bool:
        """Note ``member`` of ``bucket`` ready; False (and nothing noted) when it already was this step."""
        if member in self.ready[bucket]:
            return False
        self.ready[bucket].add(member)
        return True

    def take(self, force: bool) -> Iterator[int]:
        """The buckets to start now, in order: the next ones whose members are all ready (every one left
        when ``force``). A bucket counts as started once the caller asks for the next (an exception while
        starting it leaves it unstarted)."""
        while self.started < len(self.sizes) and (force or len(self.ready[self.started]) >= self.sizes[self.started]):
            yield self.started
            self.started += 1
            self.early += not force
