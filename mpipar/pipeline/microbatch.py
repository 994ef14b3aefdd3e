"""Splitting a batch into equal micro-batches, and joining outputs back."""

from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["check_microbatches", "split", "join"]


def check_microbatches(batch_size: int, microbatches: int) -> int:
    """Validate a split and return the micro-batch size.

    Equal micro-batches make the mean of the micro-batch losses equal the
    full-batch mean loss, so the accumulated gradients equal the full-batch ones.

    Raises:
        ValueError: ``microbatches`` below 1, or not dividing ``batch_size``.
    """
    if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
        raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}")
    if batch_size < microbatches or batch_size % microbatches:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"a batch of {batch_size} samples does not split into {microbatches} equal "
            f"micro-batches; use a batch size divisible by {microbatches} (drop the last "
            f"partial batch) or microbatches in {divisors}")
    return batch_size // microbatches


def split(batch: torch.Tensor, microbatches: int) -> List[torch.Tensor]:
    """Split ``batch`` along dim 0 into ``microbatches`` equal views."""
    size = check_microbatches(batch.shape[0], microbatches)
    return list(batch.split(size))


def join(microbatches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate micro-batch outputs along dim 0."""
    return torch.cat(list(microbatches))
