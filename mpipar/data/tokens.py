"""Token datasets (``mpipar-text2h5``): windows of ``seq_len + 1`` tokens, streamed, starts set by (seed, epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import h5py
import numpy as np
import torch

from mpipar.data.augment import sample_keys
from mpipar.data.prefetch import Prefetcher
from mpipar.data.streaming import PREFETCH_DEPTH, H5Rows

__all__ = ["TokenWindows", "TokenSplits", "load_tokens"]


class TokenWindows:
    """The windows of a 1-D token array (``{split}/tokens`` of an HDF5 file), read on demand.

    Sample ``i`` of an epoch is the ``seq_len + 1`` tokens from ``phase + i * seq_len``, where the
    phase (``0 <= phase < seq_len``) is a pure function of ``(seed, epoch)`` (0 without an epoch:
    evaluation), so every epoch sees other cuts of the text and a resumed run the same ones.
    ``len()`` is the same every epoch. ``batch(indices, epoch)`` gives ``(inputs, targets)``, both
    (N, seq_len) int64, targets shifted by one. Local; behaves as the image datasets for the loop's
    sharding and :meth:`stream`.
    """

    def __init__(self, rows: H5Rows, name: str, count: int, seq_len: int, *, seed: int = 0,
                 vocab_size: int = 256, prefetch: int = PREFETCH_DEPTH):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if count < 2 * seq_len:
            raise ValueError(f"{rows.path}:{name}: {count} tokens is too few for windows of {seq_len} + 1 "
                             f"(needs {2 * seq_len}); use a shorter sequence or more text")
        self.rows, self.name, self.count, self.seq_len = rows, name, count, seq_len
        self.seed, self.vocab_size, self.prefetch = seed, vocab_size, prefetch

    def __len__(self) -> int:
        return self.count // self.seq_len - 1  # every window fits at every phase

    def phase(self, epoch: Optional[int]) -> int:
        """Where this epoch's first window starts."""
        return 0 if epoch is None else int(sample_keys(self.seed, epoch, [-1])[0] % np.uint64(self.seq_len))

    def starts(self, indices, epoch: Optional[int] = None) -> np.ndarray:
        """Token offsets of windows ``indices`` in ``epoch``."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window indices must be in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        return self.phase(epoch) + indices * self.seq_len

    def batch(self, indices, epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        positions = self.starts(indices, epoch)[:, None] + np.arange(self.seq_len + 1)
        distinct, where = np.unique(positions.ravel(), return_inverse=True)
        windows = self.rows.read(self.name, distinct).astype(np.int64)[where].reshape(positions.shape)
        tokens = torch.from_numpy(windows)
        return tokens[:, :-1], tokens[:, 1:]

    def stream(self, batches, epoch: Optional[int] = None) -> Prefetcher:
        """The batches of ``batches`` (index arrays) in order, ``prefetch`` of them read ahead."""
        return Prefetcher(self, batches, epoch=epoch, depth=self.prefetch)


@dataclass
class TokenSplits:
    train: TokenWindows
    validation: TokenWindows
    description: str

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size


def load_tokens(path, seq_len: int, *, seed: int = 0) -> TokenSplits:
    """The ``train`` and ``validation`` windows of a token file. Local; raises ValueError for a bad file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for name in ("train/tokens", "validation/tokens"):
                if name not in f:
                    raise ValueError(f"{path}: missing dataset '{name}' (write token files with mpipar-text2h5)")
                if f[name].ndim != 1 or f[name].dtype not in (np.uint8, np.uint16):
                    raise ValueError(f"{path}:{name}: expected a 1-D uint8 or uint16 token array, got "
                                     f"{f[name].dtype} of shape {f[name].shape}")
            counts = {name: f[name].shape[0] for name in ("train/tokens", "validation/tokens")}
            vocab = int(f.attrs.get("vocab_size", 256 if f["train/tokens"].dtype == np.uint8 else 65536))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read HDF5 ({exc}); the file is corrupt or truncated") from None
    rows = H5Rows(path)
    train = TokenWindows(rows, "train/tokens", counts["train/tokens"], seq_len, seed=seed, vocab_size=vocab)
    validation = TokenWindows(rows, "validation/tokens", counts["validation/tokens"], seq_len, seed=seed,
                              vocab_size=vocab)
    return TokenSplits(train, validation, f"token file {path} ({counts['train/tokens']:,} train / "
                                          f"{counts['validation/tokens']:,} validation tokens, streamed, "
                                          f"windows of {seq_len} + 1)")
