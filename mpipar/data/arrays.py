"""Samples in memory (``ArrayDataset``), train/test splits, and the one batch recipe every dataset shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple, Union, cast

import numpy as np
import torch

from mpipar.data.augment import Augmentation
from mpipar.data.prefetch import Prefetcher

if TYPE_CHECKING:
    from mpipar.data.streaming import H5Images

__all__ = ["ArrayDataset", "DataSplits", "ImageDataset", "image_stats", "make_batch", "STATS_SAMPLES"]

STATS_SAMPLES = 10000  # normalisation statistics: over the first this many training samples


def image_stats(images) -> Tuple[float, float]:
    """Mean and standard deviation of uint8 ``images`` scaled to [0, 1] (std 0 becomes 1)."""
    scaled = torch.as_tensor(images).float() / 255.0
    return float(scaled.mean()), float(scaled.std()) or 1.0


def make_batch(images: torch.Tensor, labels: torch.Tensor, indices, *, mean: float, std: float,
               augment: Optional[Augmentation] = None, epoch: Optional[int] = None):
    """``(images, labels)`` for the model from uint8 ``images`` (N, C, H, W) of samples ``indices``:
    augmented when ``augment`` and ``epoch`` are given, scaled to [0, 1], normalised."""
    if augment is not None and epoch is not None:
        images = augment.apply(images, indices, epoch)
    return images.float().div_(255.0).sub_(mean).div_(std), labels


@dataclass
class ArrayDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64, held in memory.

    ``batch(indices, epoch=None)`` returns float images normalised by ``mean``/``std`` and
    labels, ready for the model; with ``augment`` set and an ``epoch``, augmented first.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: float = 0.0
    std: float = 1.0
    augment: Optional[Augmentation] = None

    def __post_init__(self):
        if self.images.dim() == 3:
            self.images = self.images.unsqueeze(1)
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) == 0:
            raise ValueError("the dataset is empty")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return cast(Tuple[int, int, int], tuple(self.images.shape[1:]))

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def batch(self, indices, epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return make_batch(self.images.index_select(0, index), self.labels.index_select(0, index), indices,
                          mean=self.mean, std=self.std, augment=self.augment, epoch=epoch)

    def stream(self, batches, epoch: Optional[int] = None) -> Prefetcher:
        """The batches of ``batches`` (index arrays) in order; in memory, no reading ahead."""
        return Prefetcher(self, batches, epoch=epoch, depth=0)

    def with_stats_of(self, other) -> ArrayDataset:
        """Normalise with another split's mean and std (the training split's)."""
        self.mean, self.std = other.mean, other.std
        return self

    def compute_stats(self) -> ArrayDataset:
        """Mean and std over the first :data:`STATS_SAMPLES` samples."""
        self.mean, self.std = image_stats(self.images[:STATS_SAMPLES])
        return self


ImageDataset = Union[ArrayDataset, "H5Images"]  # in memory, or streamed from an HDF5 file


@dataclass
class DataSplits:
    train: ImageDataset
    test: ImageDataset
    description: str

    @property
    def model_shape(self) -> dict:
        """``in_channels``, ``num_classes`` and ``image_size``: what a model for this data is built with."""
        channels, size, _ = self.train.image_shape
        return {"in_channels": channels, "num_classes": max(self.train.num_classes, self.test.num_classes),
                "image_size": size}
