"""``mpipar-idx2h5``: convert MNIST-style IDX files into mpipar's HDF5 layout; the writer every image converter uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import h5py
import numpy as np

from mpipar.data.arrays import STATS_SAMPLES, ArrayDataset, image_stats
from mpipar.data.datasets import load_idx_dir

__all__ = ["idx_to_h5", "write_split", "chunk_rows", "finish_h5", "main", "COMPRESSION"]

COMPRESSION = "lzf"  # h5py's built-in filter: a streamed read decompresses at memory speed
CHUNK_BYTES = 1 << 15  # a streamed sample costs one chunk's read: small chunks, little waste


def chunk_rows(row_shape) -> int:
    """Rows per chunk: about 32 KiB of them (a random sample's read costs one chunk)."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape))))


def write_split(f: h5py.File, prefix: str, count: int, image_shape, blocks: Iterable, dtype=np.uint8) -> None:
    """``{prefix}images`` (count, *image_shape) uint8 and ``{prefix}labels`` (count,) uint8/16, chunked and
    compressed, filled from ``blocks`` of ``(images, labels)`` in order (never all in memory)."""
    rows = chunk_rows(image_shape)
    images = f.create_dataset(prefix + "images", (count,) + tuple(image_shape), dtype=dtype,
                              chunks=(min(rows, max(count, 1)),) + tuple(image_shape), compression=COMPRESSION)
    label_type = np.uint8
    written, labels = 0, np.zeros(count, dtype=np.int64)
    for block_images, block_labels in blocks:
        images[written:written + len(block_images)] = block_images
        labels[written:written + len(block_labels)] = block_labels
        written += len(block_images)
    if written != count:
        raise ValueError(f"{count} samples announced but {written} written")
    if count and labels.max() > 255:
        label_type = np.uint16
    f.create_dataset(prefix + "labels", data=labels.astype(label_type))


def finish_h5(tmp: Path, out_path: Path, write: Callable[[h5py.File], None]) -> Path:
    """Run ``write`` on a new file ``tmp``; add the training images' ``mean``/``std`` (those of the
    first ``STATS_SAMPLES``, the rule of files without them), then rename it to ``out_path``.
    On any error the half-written file is removed."""
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
            if "images" in f:
                f.attrs["mean"], f.attrs["std"] = image_stats(f["images"][:STATS_SAMPLES])
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def idx_to_h5(idx_dir, out_path) -> Path:
    """Write ``images``/``labels`` (train) and ``test/images``/``test/labels`` to ``out_path``."""
    splits = load_idx_dir(idx_dir)
    out_path = Path(out_path)

    def write(f: h5py.File, source: Optional[str] = str(Path(idx_dir).resolve())) -> None:
        for prefix, split in (("", splits.train), ("test/", splits.test)):
            assert isinstance(split, ArrayDataset)  # IDX files load into memory
            images = split.images.squeeze(1).numpy()
            write_split(f, prefix, len(images), images.shape[1:], [(images, split.labels.numpy())])
        f.attrs["source"] = source

    return finish_h5(out_path.with_name(out_path.name + ".tmp"), out_path, write)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("idx_dir", help="directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    parser.add_argument("out", help="HDF5 file to write")
    args = parser.parse_args(argv)
    try:
        path = idx_to_h5(args.idx_dir, args.out)
    except (OSError, ValueError) as exc:
        print(f"mpipar-idx2h5: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
