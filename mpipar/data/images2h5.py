"""``mpipar-images2h5 DIR out.h5``: class-per-folder JPEG/PNG images into mpipar's streamed HDF5 layout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mpipar.data.convert import finish_h5, write_split

__all__ = ["images_to_h5", "main", "EXTENSIONS"]

EXTENSIONS = (".jpg", ".jpeg", ".png")
BLOCK = 1024  # images decoded and written at a time


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("mpipar-images2h5 needs Pillow: pip install 'mpipar[images]' (or pip install pillow)") \
            from None
    return Image


def _classes(directory: Path) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """Sorted class folders and every image file in them with its label."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (expected one folder per class of images)")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((directory / name).iterdir()) if path.suffix.lower() in EXTENSIONS]
    if not files:
        raise ValueError(f"{directory}: no {'/'.join(EXTENSIONS)} images in class folders "
                         f"(expected {directory}/CLASS/IMAGE.jpg)")
    return classes, files


def _open(Image, path: Path):
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:  # Pillow raises several types for a bad or truncated file
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    return image


def _shape_and_mode(Image, files, size: Optional[int]) -> Tuple[Tuple[int, int], str]:
    """The common (width, height) and mode ('L' when every image is grey, else 'RGB'); checks
    the files' headers only."""
    sizes: Dict[Tuple[int, int], Path] = {}  # (width, height) -> the first file of that size
    grey = True
    for path, _ in files:
        try:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path)
                grey = grey and image.mode in ("1", "L", "I;16", "I", "F")
        except Exception as exc:
            raise ValueError(f"{path}: cannot read image ({exc})") from None
    if size is None and len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise ValueError(f"images of different sizes: {first} is {a[0]}x{a[1]}, {second} is {b[0]}x{b[1]}; "
                         f"pass --size N to resize every image to NxN")
    return ((size, size) if size is not None else next(iter(sizes))), "L" if grey else "RGB"


def images_to_h5(directory, out_path, *, size: Optional[int] = None, test_fraction: float = 0.1,
                 seed: int = 0) -> Path:
    """Convert ``directory/CLASS/*.{jpg,png}`` to ``out_path``: labels by sorted class name (stored as
    the ``classes`` attribute), ``test_fraction`` of each class held out as ``test/``, the training
    images in a seeded shuffled order (so the first ones are a fair sample for the statistics),
    chunked and compressed. ``size``: resize every image to size x size (else all must match)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if size is not None and size < 1:
        raise ValueError(f"--size must be positive, got {size}")
    Image = _pillow()
    directory, out_path = Path(directory), Path(out_path)
    classes, files = _classes(directory)
    (width, height), mode = _shape_and_mode(Image, files, size)
    rng = np.random.default_rng([seed, 2])
    labels = np.array([label for _, label in files])
    test = np.zeros(len(files), dtype=bool)
    for label in range(len(classes)):
        members = np.flatnonzero(labels == label)
        test[rng.choice(members, int(round(len(members) * test_fraction)), replace=False)] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = np.flatnonzero(test)
    if len(train_order) == 0:
        raise ValueError(f"{directory}: no training images left after holding out {test_fraction:.0%}")
    shape = (height, width) if mode == "L" else (3, height, width)

    def blocks(order):
        for first in range(0, len(order), BLOCK):
            chosen = order[first:first + BLOCK]
            pixels = np.empty((len(chosen),) + shape, dtype=np.uint8)
            for row, index in enumerate(chosen):
                image = _open(Image, files[index][0]).convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
                pixels[row] = array if mode == "L" else array.transpose(2, 0, 1)
            yield pixels, labels[chosen]

    def write(f):
        write_split(f, "", len(train_order), shape, blocks(train_order))
        if len(test_order):
            write_split(f, "test/", len(test_order), shape, blocks(test_order))
        f.attrs["classes"] = json.dumps(classes)
        f.attrs["source"] = str(directory.resolve())

    return finish_h5(out_path.with_name(out_path.name + ".tmp"), out_path, write)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", help="one folder per class, each holding .jpg/.jpeg/.png images")
    parser.add_argument("out", help="HDF5 file to write")
    parser.add_argument("--size", type=int, default=None, help="resize every image to SIZE x SIZE "
                        "(needed when the images' sizes differ)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of each class held out as test/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the stored order")
    args = parser.parse_args(argv)
    try:
        path = images_to_h5(args.directory, args.out, size=args.size, test_fraction=args.test_fraction,
                            seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"mpipar-images2h5: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
