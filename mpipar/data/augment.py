"""Random crop with padding and horizontal flip, each sample's draw a pure function of (seed, epoch, sample)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Augmentation", "sample_keys"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters neighbouring inputs."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices) -> np.ndarray:
    """One uint64 per sample, a pure function of ``(seed, epoch, index)`` (no RNG state)."""
    base = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return _mix(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


@dataclass(frozen=True)
class Augmentation:
    """Pad by ``padding`` pixels (value 0), crop back at a random offset, flip half the samples.

    The same sample in the same epoch gets the same crop and flip whichever rank reads it, in
    whichever batch, so a resumed or re-sharded run is bitwise the run never interrupted.
    """

    seed: int
    padding: int = 4

    def __post_init__(self):
        if self.padding < 0:
            raise ValueError(f"augmentation padding must be >= 0, got {self.padding}")

    def draws(self, epoch: int, indices) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row offsets, column offsets (0..2*padding) and flips (bool) of these samples."""
        keys = sample_keys(self.seed, epoch, indices)
        span = np.uint64(2 * self.padding + 1)
        rows = (keys % span).astype(np.int64)
        columns = ((keys >> np.uint64(20)) % span).astype(np.int64)
        flips = ((keys >> np.uint64(40)) & np.uint64(1)).astype(bool)
        return rows, columns, flips

    def apply(self, images: torch.Tensor, indices, epoch: int) -> torch.Tensor:
        """``images`` (N, C, H, W) of samples ``indices``, cropped and flipped (a new tensor)."""
        rows, columns, flips = self.draws(epoch, indices)
        height, width = images.shape[-2:]
        pad = self.padding
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        out = torch.stack([padded[i, :, r:r + height, c:c + width]
                           for i, (r, c) in enumerate(zip(rows.tolist(), columns.tolist()))]) \
            if len(images) else images.clone()
        if flips.any():
            chosen = torch.from_numpy(np.flatnonzero(flips))
            out[chosen] = out[chosen].flip(-1)
        return out
