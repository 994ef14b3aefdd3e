"""Datasets: IDX (MNIST/Fashion-MNIST) and HDF5 readers (streamed when large), and a learnable synthetic source."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from mpipar.data.arrays import ArrayDataset, DataSplits
from mpipar.data.streaming import H5Images, load_h5

__all__ = [
    "ArrayDataset",
    "read_idx",
    "load_idx_pair",
    "load_idx_dir",
    "load_h5",
    "synthetic",
    "resolve",
    "DataSplits",
    "H5Images",
    "FASHION_MNIST_DIRS",
]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_IDX_TYPES: Dict[int, np.dtype] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
                                  0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzipped or raw). Raises ValueError for a malformed or truncated file."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX data ({exc}); the file is corrupt or truncated") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                         f"holds {len(data) - header} bytes; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_pair(images_path, labels_path) -> ArrayDataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return ArrayDataset(torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64)))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {stem}[.gz]")


def load_idx_dir(directory) -> DataSplits:
    """MNIST-style directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    directory = Path(directory)
    train = load_idx_pair(_find(directory, "train-images-idx3-ubyte"), _find(directory, "train-labels-idx1-ubyte"))
    test = load_idx_pair(_find(directory, "t10k-images-idx3-ubyte"), _find(directory, "t10k-labels-idx1-ubyte"))
    train.compute_stats()
    return DataSplits(train, test.with_stats_of(train), f"IDX files in {directory}")


def synthetic(num_train: int = 6000, num_test: int = 1000, *, image_size: int = 28, channels: int = 1,
              num_classes: int = 10, seed: int = 0, noise: float = 0.35) -> DataSplits:
    """A seeded, deterministic and learnable image classification problem.

    Each class has a smooth random prototype image; samples are the prototype,
    randomly shifted by up to 2 pixels, plus Gaussian noise, quantised to uint8.
    """
    rng = np.random.default_rng([seed, 7919])
    coarse = rng.random((num_classes, channels, 7, 7))
    factor = -(-image_size // 7)
    prototypes = np.kron(coarse, np.ones((1, 1, factor, factor)))[:, :, :image_size, :image_size]

    def draw(n: int, stream: int) -> ArrayDataset:
        r = np.random.default_rng([seed, stream])
        labels = r.integers(0, num_classes, n)
        shifts = r.integers(-2, 3, size=(n, 2))
        images = prototypes[labels]
        for axis in (0, 1):
            for s in range(-2, 3):
                chosen = shifts[:, axis] == s
                images[chosen] = np.roll(images[chosen], s, axis=2 + axis)
        images = images + noise * r.standard_normal(images.shape)
        pixels = np.clip(images * 255.0, 0, 255).astype(np.uint8)
        return ArrayDataset(torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64)))

    train = draw(num_train, 1).compute_stats()
    test = draw(num_test, 2).with_stats_of(train)
    return DataSplits(train, test, f"synthetic data ({num_train} train / {num_test} test, "
                                   f"{channels}x{image_size}x{image_size}, {num_classes} classes, seed {seed})")


def resolve(spec: str, *, seed: int = 0, search_dirs: Optional[Tuple[str, ...]] = None) -> DataSplits:
    """Turn a ``--data`` value into train/test splits.

    ``fashion-mnist``: the IDX files in ``$MPIPAR_FASHION_MNIST`` or Debian's
    ``dataset-fashion-mnist`` location; ``synthetic``: :func:`synthetic`; any other
    value is a path to an IDX directory or an HDF5 file.

    Raises:
        FileNotFoundError: with instructions for getting the data.
    """
    if spec == "synthetic":
        return synthetic(seed=seed)
    if spec == "fashion-mnist":
        dirs = search_dirs or tuple(filter(None, [os.environ.get("MPIPAR_FASHION_MNIST")])) + FASHION_MNIST_DIRS
        for directory in dirs:
            if Path(directory, "train-images-idx3-ubyte.gz").exists() or \
                    Path(directory, "train-images-idx3-ubyte").exists():
                return load_idx_dir(directory)
        raise FileNotFoundError(
            f"Fashion-MNIST not found (looked in {', '.join(dirs)}). Get it with "
            f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point MPIPAR_FASHION_MNIST at a "
            f"directory holding the four IDX files, or run with '--data synthetic' to use generated data")
    path = Path(spec)
    if path.is_dir():
        return load_idx_dir(path)
    if path.is_file():
        return load_h5(path)
    raise FileNotFoundError(f"--data {spec}: no such file or directory (expected 'fashion-mnist', "
                            f"'synthetic', an IDX directory or an HDF5 file)")
