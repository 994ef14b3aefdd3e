"""HDF5 datasets read lazily: a rank reads only its samples, in sorted slabs, one thread reading ahead."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple, Union

import h5py
import numpy as np
import torch

from mpipar.data.arrays import STATS_SAMPLES, ArrayDataset, DataSplits, image_stats, make_batch
from mpipar.data.augment import Augmentation
from mpipar.data.prefetch import Prefetcher

__all__ = ["H5Images", "H5Rows", "slabs", "load_h5", "cache_limit_bytes", "PREFETCH_DEPTH", "CACHE_ENV"]

CACHE_ENV = "MPIPAR_DATA_CACHE_MB"
DEFAULT_CACHE_MB = 512
PREFETCH_DEPTH = 2


def cache_limit_bytes() -> int:
    """Files whose images take at most this many bytes are held in memory (``$MPIPAR_DATA_CACHE_MB``,
    default 512; 0 streams every file). Either way the batches are bitwise the same."""
    text = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB))
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"${CACHE_ENV} must be a number of MiB, got {text!r}") from None
    return int(megabytes * 2 ** 20)


def slabs(rows: np.ndarray, chunk_rows: int) -> List[Tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering the sorted, distinct ``rows``: neighbours
    join a range, and so do rows in the same chunk of ``chunk_rows`` (read once either way)."""
    if len(rows) == 0:
        return []
    rows = np.asarray(rows, dtype=np.int64)
    chunk = rows // max(1, chunk_rows)
    breaks = np.flatnonzero((np.diff(rows) > 1) & (np.diff(chunk) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(rows)]))
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class H5Rows:
    """Rows of datasets in one HDF5 file, opened on first use and read in slabs. Local.

    One lock: a prefetch thread and the main thread never read at once (h5py is not
    thread-safe). Pickles as its path (the file is opened again where it lands).
    """

    def __init__(self, path):
        self.path = Path(path)
        self._file = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _dataset(self, name: str) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[name]

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``dataset[rows]`` for sorted, distinct ``rows``, read as slabs."""
        with self._lock:
            dataset = self._dataset(name)
            chunk_rows = dataset.chunks[0] if dataset.chunks else 1
            parts = []
            for start, stop in slabs(rows, chunk_rows):
                slab = dataset[start:stop]
                wanted = rows[(rows >= start) & (rows < stop)] - start
                parts.append(slab if len(wanted) == stop - start else slab[wanted])
            if not parts:
                return np.empty((0,) + dataset.shape[1:], dtype=dataset.dtype)
            return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class H5Images:
    """Images and labels in an HDF5 file, rows ``[start, stop)``, read on demand.

    Behaves as :class:`~mpipar.data.arrays.ArrayDataset` (``batch``, ``stream``, ``len``,
    ``image_shape``, ``num_classes``) and gives bitwise the same batches; memory is what
    the batches in flight take, never the dataset. Local (each rank reads its own rows).
    """

    def __init__(self, rows: H5Rows, images: str, labels: str, start: int, stop: int, *, image_shape,
                 num_classes: int, mean: float = 0.0, std: float = 1.0, augment: Optional[Augmentation] = None,
                 prefetch: int = PREFETCH_DEPTH):
        self.rows, self.images_name, self.labels_name = rows, images, labels
        self.start, self.stop = start, stop
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.mean, self.std, self.augment, self.prefetch = mean, std, augment, prefetch

    def __len__(self) -> int:
        return self.stop - self.start

    def samples(self, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """Raw uint8 images (N, C, H, W) and int64 labels of ``indices``, in their order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must be in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        distinct, where = np.unique(indices, return_inverse=True)
        rows = distinct + self.start
        images = self.rows.read(self.images_name, rows).astype(np.uint8, copy=False)[where]
        labels = self.rows.read(self.labels_name, rows).astype(np.int64)[where]
        return torch.from_numpy(images.reshape((len(indices),) + self.image_shape)), torch.from_numpy(labels)

    def batch(self, indices, epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.samples(indices)
        return make_batch(images, labels, indices, mean=self.mean, std=self.std, augment=self.augment, epoch=epoch)

    def stream(self, batches, epoch: Optional[int] = None) -> Prefetcher:
        """The batches of ``batches`` (index arrays) in order, ``prefetch`` of them read ahead."""
        return Prefetcher(self, batches, epoch=epoch, depth=self.prefetch)

    def cached(self) -> ArrayDataset:
        """The same rows held in memory (one copy: filled in slabs of at most 64 MiB)."""
        images = torch.empty((len(self),) + self.image_shape, dtype=torch.uint8)
        labels = torch.empty(len(self), dtype=torch.int64)
        step = max(1, (64 << 20) // max(1, int(np.prod(self.image_shape))))
        for first in range(0, len(self), step):
            stop = min(first + step, len(self))
            images[first:stop], labels[first:stop] = self.samples(np.arange(first, stop))
        return ArrayDataset(images, labels, self.mean, self.std, self.augment)

    def with_stats_of(self, other) -> H5Images:
        """Normalise with another split's mean and std (the training split's)."""
        self.mean, self.std = other.mean, other.std
        return self


def _label_classes(rows: H5Rows, name: str, start: int, stop: int) -> int:
    """Largest label + 1, read in slabs of a million labels."""
    top = -1
    for first in range(start, stop, 1 << 20):
        top = max(top, int(rows.read(name, np.arange(first, min(first + (1 << 20), stop))).max()))
    return top + 1


def load_h5(path, holdout: float = 1 / 7, *, cache: Optional[bool] = None) -> DataSplits:
    """HDF5 file with datasets ``images`` (N,H,W or N,C,H,W, uint8) and ``labels`` (N,),
    and optionally ``test/images``, ``test/labels``. Without a test group the last
    ``holdout`` fraction is held out for testing.

    Normalisation: the file's ``mean`` and ``std`` attributes (the converters write them),
    else those of the first ``STATS_SAMPLES`` training images (one bounded read). ``cache``:
    hold the samples in memory (None: when the images take at most :func:`cache_limit_bytes`),
    else stream them (:class:`H5Images`). Local; raises ValueError for a bad file.
    """
    path = Path(path)
    rows = H5Rows(path)
    try:
        with h5py.File(path, "r") as f:
            for name in ("images", "labels"):
                if name not in f:
                    raise ValueError(f"{path}: missing dataset '{name}' (expected 'images' and 'labels')")
            shapes = {name: f[name].shape for name in ("images", "labels")}
            has_test = "test" in f
            if has_test:
                shapes.update({name: f[name].shape for name in ("test/images", "test/labels")})
            stats = (float(f.attrs["mean"]), float(f.attrs["std"])) if "mean" in f.attrs and "std" in f.attrs \
                else None
            image_bytes = sum(int(np.prod(shape)) for name, shape in shapes.items() if name.endswith("images"))
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read HDF5 ({exc}); the file is corrupt or truncated") from None
    count = shapes["images"][0]
    if count != shapes["labels"][0]:
        raise ValueError(f"{path}: {count} images but {shapes['labels'][0]} labels")
    image_shape = shapes["images"][1:]
    if len(image_shape) == 2:
        image_shape = (1,) + image_shape
    if len(image_shape) != 3:
        raise ValueError(f"{path}: images must be (N, H, W) or (N, C, H, W), got shape {shapes['images']}")
    if has_test:
        cut, note = count, ""
        test_parts = ("test/images", "test/labels", 0, shapes["test/images"][0])
        if shapes["test/images"][0] != shapes["test/labels"][0]:
            raise ValueError(f"{path}: {shapes['test/images'][0]} test images but {shapes['test/labels'][0]} labels")
    else:
        cut = count - max(1, int(count * holdout))
        if cut < 1:
            raise ValueError(f"{path}: {count} samples is too few to hold out a test split")
        test_parts = ("images", "labels", cut, count)
        note = f"; no test split in the file, last {count - cut} samples held out"
    if cut == 0 or test_parts[3] == test_parts[2]:
        raise ValueError("the dataset is empty")
    train: Union[H5Images, ArrayDataset]
    test: Union[H5Images, ArrayDataset]
    try:
        classes = max(_label_classes(rows, "labels", 0, cut), _label_classes(rows, *test_parts[1:]))
        train = H5Images(rows, "images", "labels", 0, cut, image_shape=image_shape, num_classes=classes)
        test = H5Images(rows, *test_parts, image_shape=image_shape, num_classes=classes)
        if stats is None:
            stats = image_stats(train.samples(np.arange(min(cut, STATS_SAMPLES)))[0])
            note += f"; normalised by the first {min(cut, STATS_SAMPLES)} images (no mean/std attributes)"
        train.mean, train.std = stats
        test.with_stats_of(train)
        held = image_bytes <= cache_limit_bytes() if cache is None else cache
        if held:
            train, test = train.cached(), test.cached()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read HDF5 ({exc}); the file is corrupt or truncated") from None
    rows.close()
    mode = "in memory" if held else f"streamed, {PREFETCH_DEPTH} batches read ahead"
    return DataSplits(train, test, f"HDF5 file {path} ({mode}){note}")
