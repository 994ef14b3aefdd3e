"""``mpipar-idx2h5``: convert MNIST-style IDX files into mpipar's HDF5 layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py

from mpipar.data.datasets import load_idx_dir

__all__ = ["idx_to_h5", "main"]


def idx_to_h5(idx_dir, out_path) -> Path:
    """Write ``images``/``labels`` (train) and ``test/images``/``test/labels`` to ``out_path``."""
    splits = load_idx_dir(idx_dir)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("images", data=splits.train.images.squeeze(1).numpy(), compression="gzip")
        f.create_dataset("labels", data=splits.train.labels.numpy().astype("uint8"))
        f.create_dataset("test/images", data=splits.test.images.squeeze(1).numpy(), compression="gzip")
        f.create_dataset("test/labels", data=splits.test.labels.numpy().astype("uint8"))
        f.attrs["source"] = str(Path(idx_dir).resolve())
    tmp.replace(out_path)
    return out_path


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
