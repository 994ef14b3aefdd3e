"""Which parameters share a gradient bucket: the one assignment the reducer and the cost model use."""

from __future__ import annotations

from typing import Hashable, List, Sequence

__all__ = ["assign_buckets"]


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
