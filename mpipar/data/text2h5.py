"""``mpipar-text2h5 FILES... out.h5``: UTF-8 text into byte tokens, split into train and validation by document."""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import h5py
import numpy as np

from mpipar.data.convert import COMPRESSION, finish_h5

__all__ = ["text_to_h5", "main", "VOCAB_SIZE"]

VOCAB_SIZE = 256  # a token is a byte of the UTF-8 text
CHUNK_TOKENS = 1 << 16


def _documents(paths: Sequence, separator: Optional[str]) -> List[bytes]:
    """Each file (or each ``separator``-separated part of it) as UTF-8 bytes; refuses empty or non-UTF-8 text."""
    documents = []
    for path in map(Path, paths):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            text = codecs.decode(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
        parts = text.split(separator) if separator else [text]
        parts = [part for part in parts if part.strip()]
        if not parts:
            raise ValueError(f"{path}: empty text (nothing but whitespace)")
        documents += [part.encode("utf-8") for part in parts]
    return documents


def _write_tokens(f: h5py.File, group: str, documents: List[bytes]) -> None:
    tokens = np.frombuffer(b"".join(documents), dtype=np.uint8)
    f.create_dataset(f"{group}/tokens", data=tokens, chunks=(min(CHUNK_TOKENS, len(tokens)),),
                     compression=COMPRESSION)
    f.create_dataset(f"{group}/documents", data=np.cumsum([0] + [len(d) for d in documents], dtype=np.int64))


def text_to_h5(paths: Sequence, out_path, *, validation_fraction: float = 0.1, separator: Optional[str] = None,
               seed: int = 0) -> Path:
    """Write ``train/tokens`` and ``validation/tokens`` (1-D uint8, chunked, compressed; ``documents``:
    each document's start offset) to ``out_path``. A document is a file, or with ``separator`` each
    part of a file between separators; ``validation_fraction`` of the documents (at least one, chosen
    by ``seed``) go to validation, whole."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
    if not paths:
        raise ValueError("no text files given")
    documents = _documents(paths, separator)
    if len(documents) < 2:
        raise ValueError(f"{len(documents)} document: a split by document needs at least 2; give more files "
                         f"or --separator (e.g. a blank line, $'\\n\\n')")
    rng = np.random.default_rng([seed, 3])
    held = set(rng.choice(len(documents), max(1, int(round(len(documents) * validation_fraction))),
                          replace=False).tolist())
    if len(held) == len(documents):
        held.pop()
    out_path = Path(out_path)

    def write(f):
        _write_tokens(f, "train", [d for i, d in enumerate(documents) if i not in held])
        _write_tokens(f, "validation", [d for i, d in enumerate(documents) if i in held])
        f.attrs["vocab_size"], f.attrs["tokenizer"] = VOCAB_SIZE, "utf-8 bytes"
        f.attrs["sources"] = [str(Path(p).resolve()) for p in paths]

    return finish_h5(out_path.with_name(out_path.name + ".tmp"), out_path, write)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, then the HDF5 file to write")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="share of documents held out")
    parser.add_argument("--separator", default=None,
                        help="split each file into documents at this text (default: a file is a document)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice")
    args = parser.parse_args(argv)
    if len(args.files) < 2:
        parser.error("give at least one text file and the output file")
    *inputs, out = args.files
    try:
        path = text_to_h5(inputs, out, validation_fraction=args.validation_fraction, separator=args.separator,
                          seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"mpipar-text2h5: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
