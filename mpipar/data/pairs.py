"""Samples of any kind in memory: ``(inputs, targets)`` tensors, inputs a tensor or a dict of keyword inputs."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from mpipar.data.arrays import DataSplits
from mpipar.data.prefetch import Prefetcher

__all__ = ["TensorPairs", "tensor_splits"]

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]


class TensorPairs:
    """``inputs`` (a tensor, or a dict of tensors: a model's keyword inputs) and ``targets``, sample
    ``i`` being row ``i`` of each; used as they are (no normalisation). Local.

    ``batch(indices, epoch=None)`` returns ``(inputs, targets)`` of those samples, the batch
    layout of :class:`~mpipar.data_parallel.strategy.DataParallelStrategy`.

    Raises:
        ValueError: when the tensors do not hold the same number of samples, or none.
    """

    def __init__(self, inputs: Inputs, targets: torch.Tensor):
        columns = inputs if isinstance(inputs, dict) else {"inputs": inputs}
        counts = {name: len(value) for name, value in {**columns, "targets": targets}.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"inputs and targets must hold the same number of samples, got {counts}")
        if counts["targets"] == 0:
            raise ValueError("the dataset is empty")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices, epoch: Optional[int] = None) -> Tuple[Inputs, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        inputs = ({name: value.index_select(0, index) for name, value in self.inputs.items()}
                  if isinstance(self.inputs, dict) else self.inputs.index_select(0, index))
        return inputs, self.targets.index_select(0, index)

    def stream(self, batches, epoch: Optional[int] = None) -> Prefetcher:
        """The batches of ``batches`` (index arrays) in order; in memory, no reading ahead."""
        return Prefetcher(self, batches, epoch=epoch, depth=0)


def tensor_splits(train: Tuple[Inputs, torch.Tensor], test: Tuple[Inputs, torch.Tensor]) -> DataSplits:
    """The :class:`DataSplits` of ``(inputs, targets)`` pairs of tensors, for the training loop. Local."""
    train_set, test_set = TensorPairs(*train), TensorPairs(*test)
    return DataSplits(train_set, test_set,  # type: ignore[arg-type]  # the loop reads batch, stream and len
                      f"tensors ({len(train_set)} train / {len(test_set)} test samples)")
