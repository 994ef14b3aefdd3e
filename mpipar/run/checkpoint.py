"""Checkpoints: written atomically with checksums, verified and loaded safely, the newest intact one resumed.

A checkpoint is a directory ``step-NNNNNNNNN/`` holding ``rank-R.pt`` files (rank 0's
only, or one per rank) and ``meta.json``, written last: format version, step, world
size, whether files are per rank, and every file's size and SHA-256. Files are read
with ``torch.load(weights_only=True)``: only tensors and plain Python values, which is
all mpipar stores, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple, cast

import numpy as np
import torch
from mpi4py import MPI

from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check, gather_checked
from mpipar.diagnostics.failure import agreed

__all__ = ["Checkpointer", "rng_state", "set_rng_state", "check_same_run", "read_state", "file_digest",
           "verify_file", "FREE_SETTINGS", "FORMAT"]

_NAME = re.compile(r"^step-(\d{9})$")
FORMAT = 2
"""Checkpoint format: 2 records files' sizes and SHA-256 in ``meta.json``; 1 (mpipar 0.1) did not."""

FREE_SETTINGS = frozenset({"threads", "log_every", "flush_every", "checkpoint_every", "out", "device",
                           "stages", "balance", "placement", "stage_memory_mb", "virtual_stages", "trace_steps",
                           "recompute"})
"""Settings a resumed run may change: they do not change the results (the layout of a pipeline
included: a checkpoint is re-laid out on the new placement; the device too: checkpoints load on
the CPU and move to wherever the model is; which steps' events are traced; activation recompute,
bitwise the same training)."""


def rng_state() -> Dict[str, Any]:
    """This process's random number generator states (torch, numpy, random), as tensors and
    plain values (what ``weights_only`` loading accepts)."""
    name, keys, position, has_gauss, cached = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else {}
    return {"torch": torch.get_rng_state(), "random": random.getstate(), **cuda,
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s result (or a format-1 checkpoint's numpy state tuple)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")  # a GPU run's; a run resumed on other (or no) GPUs keeps its own seeds
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)
    random.setstate(state["random"])


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs: format-1 checkpoints stored numpy's RNG state as one."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _sync_directory(path: Path) -> None:
    """Flush a directory's entries (names created, renamed) to disk. Local. A file system that
    cannot sync directories (EINVAL) is left as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def file_digest(path) -> Dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def verify_file(path: Path, expected: Optional[Dict[str, Any]]) -> Optional[str]:
    """What is wrong with ``path`` against its ``meta.json`` entry, or None when it is intact.
    ``expected`` None (a format-1 checkpoint): only that the file exists is checked."""
    if not path.is_file():
        return f"{path.name} is missing"
    if expected is None:
        return None
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path.name} has {size} bytes, {expected['bytes']} were written (truncated or changed)"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path.name} does not match its SHA-256 checksum (damaged)"
    return None


def read_state(path) -> Dict[str, Any]:
    """Load a checkpoint file (or ``mpipar-consolidate``'s output) on the CPU with
    ``weights_only=True``, numpy arrays allowed (format-1 RNG states). Local.

    Raises:
        ValueError: the file holds objects other than tensors and plain values (it
            was not written by mpipar, or was altered); it is not unpickled, since that
            could run code.
    """
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # the allow-list: numpy arrays only
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise ValueError(f"{path} holds objects mpipar does not store{f' ({found})' if found else ''}; refusing "
                         f"to unpickle it, since that could run code") from None


def check_same_run(saved: dict, current: dict, free: Collection[str] = FREE_SETTINGS) -> None:
    """A checkpoint resumes only the run that wrote it: settings that change results must match.

    Args:
        saved: the configuration stored in the checkpoint.
        current: this run's configuration.
        free: settings allowed to differ (threads, logging, output directory...).

    Raises:
        ValueError: (an ``AgreedError``: printed once) naming every differing setting
            with both values, on one line. Local: call it on every rank with the
            same arguments (e.g. after ``agree_on`` the saved configuration).
    """
    differing = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
                 if k not in free and saved.get(k) != current.get(k)}
    if differing:
        raise agreed(ValueError)("the checkpoint was written with other settings: " + ", ".join(
            f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differing.items()) + "; resume with the same flags")


class Checkpointer:
    """Save, verify and find checkpoints under ``directory`` (``step-000000042/rank-R.pt``).

    A checkpoint is written into a temporary directory; every writer flushes its file
    to disk and records its size and SHA-256; rank 0 writes ``meta.json`` last and
    renames the directory into place only after every writer finished (then syncs
    the parent directory, so the rename survives a power loss), so a crash or
    a full disk while writing never spoils the checkpoints before it (a half-written
    one keeps its ``.tmp-`` name and is removed). :meth:`resume` verifies every file a
    rank needs and falls back to the newest intact checkpoint.

    Collective contract: :meth:`save`, :meth:`resume` and :meth:`load` are collective
    over ``comm``. With ``per_rank=False`` (data parallelism: replicas are identical)
    only rank 0 writes and every rank loads rank 0's file; with ``per_rank=True``
    (model/pipeline partitions) each rank writes and loads its own. Loading follows
    what the checkpoint's ``meta.json`` says, whatever ``per_rank`` is.

    Args:
        directory: where checkpoints live (created by rank 0).
        comm: the ranks that save together.
        per_rank: whether every rank's state differs.
        keep: how many complete checkpoints to keep (older ones are removed).
    """

    def __init__(self, directory, comm: MPI.Intracomm, *, per_rank: bool = False, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.comm = comm
        self.per_rank = per_rank
        self.keep = keep
        self.rank = comm.Get_rank()

    def _writes(self) -> bool:
        return self.per_rank or self.rank == 0

    @staticmethod
    def _file(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"rank-{rank}.pt"

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step``; returns its directory. Collective.

        Raises:
            OSError (an ``AgreedError``): on every rank when a rank could not write (full
                disk, permissions); the temporary directory is removed and the earlier
                checkpoints are untouched.
        """
        final = self.directory / f"step-{step:09d}"
        proposed = f"step-{step:09d}.tmp-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None
        tmp = self.directory / collectives.bcast(self.comm, proposed, "checkpoint name")

        def make_directory():
            if self.rank == 0:
                tmp.mkdir(parents=True, exist_ok=False)

        def write_state():
            if not self._writes():
                return None
            path = self._file(tmp, self.rank)
            try:
                with open(path, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as "unexpected pos"
                free = shutil.disk_usage(tmp).free
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                if free < 2**20:
                    raise OSError(errno.ENOSPC, f"No space left on device: writing {path} stopped with "
                                                f"{free} bytes free") from None
                raise OSError(f"writing {path} failed ({free / 2**20:.0f} MiB free): {exc}") from None
            return path.name, file_digest(path)

        def publish():
            if self.rank != 0:
                return
            meta = {"format": FORMAT, "step": step, "world_size": self.comm.Get_size(), "per_rank": self.per_rank,
                    "files": dict(written)}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _sync_directory(tmp)  # the rank files' and meta.json's names
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _sync_directory(self.directory)  # the rename: without it a power loss may undo it
            self._prune()

        try:
            collective_check(self.comm, make_directory, f"checkpoint {tmp}")
            written = [entry for entry in gather_checked(self.comm, write_state, f"checkpoint {final}") if entry]
            collective_check(self.comm, publish, f"checkpoint {final}")
        except Exception:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _steps(self) -> List[Tuple[int, Path]]:
        """Every ``step-N`` directory (complete or not), oldest first."""
        found = []
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                match = _NAME.match(entry.name)
                if match and entry.is_dir():
                    found.append((int(match.group(1)), entry))
        return sorted(found)

    def _prune(self) -> None:
        complete = [entry for _, entry in self._steps() if (entry / "meta.json").exists()]
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for entry in self.directory.iterdir():
            if ".tmp-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    def resume(self, explicit: Optional[Path] = None,
               warn: Callable[[str], None] = print) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        """The checkpoint to continue and this rank's state from it. Collective.

        Without ``explicit``: the newest checkpoint whose files are intact on every
        rank (sizes and checksums as ``meta.json`` records them) and load safely; each
        one skipped is named with what is wrong through ``warn`` (rank 0). ``(None,
        None)`` when there is no checkpoint at all. With ``explicit``: that one, or an
        error.

        Raises:
            ValueError (an ``AgreedError``): on every rank when checkpoints exist but
                none is intact (listing each with its problem; nothing is removed), or
                when ``explicit`` is damaged.

        A checkpoint of files per rank written by another number of ranks gives rank 0's
        state with ``state["relayout"] = True``: the strategy rebuilds its part from
        every rank's file (:func:`mpipar.run.consolidate.training_state`).
        """
        if explicit is not None:
            candidates = [Path(explicit)]
        else:
            listed = [str(entry) for _, entry in reversed(self._steps())] if self.rank == 0 else None
            candidates = [Path(entry) for entry in collectives.bcast(self.comm, listed, "checkpoints to resume")]
        skipped = []
        for checkpoint in candidates:
            state, problem = None, None
            try:
                state = self._read_verified(checkpoint)
            except _Damaged as damage:
                problem = str(damage)
            by_rank = collectives.allgather(self.comm, problem, "checkpoint verification")
            ranks = [rank for rank, p in enumerate(by_rank) if p]
            if not ranks:
                return checkpoint, state
            what = f"{checkpoint}: {by_rank[ranks[0]]} (rank{'s' if len(ranks) > 1 else ''} " \
                   f"{', '.join(map(str, ranks))})"
            if explicit is not None:
                raise agreed(ValueError)(f"--resume-from {what}")
            skipped.append(what)
            warn(f"checkpoint skipped, not intact: {what}")
        if skipped:
            raise agreed(ValueError)(f"no intact checkpoint in {self.directory} to resume from: "
                                     + "; ".join(skipped) + ". Nothing was removed; start a new run with another "
                                     "--out, or repair one and pass --resume-from")
        return None, None

    def _read_verified(self, checkpoint: Path) -> Dict[str, Any]:
        """This rank's state from ``checkpoint`` after checking its file. Local.
        Raises _Damaged for what a fallback can skip, ValueError (agreed by the
        caller's checks) for another world size."""
        try:
            meta = json.loads((checkpoint / "meta.json").read_text())
            files, per_rank, world_size = meta.get("files"), meta["per_rank"], meta["world_size"]
        except FileNotFoundError:
            raise _Damaged("meta.json is missing (the checkpoint was never completed)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _Damaged(f"meta.json is unreadable ({exc})") from None
        relayout = per_rank and world_size != self.comm.Get_size()  # another layout: rank 0's part as the state
        source = self._file(checkpoint, self.rank if per_rank and not relayout else 0)
        if files is not None and source.name not in files:
            raise _Damaged(f"{source.name} is not listed in meta.json")
        problem = verify_file(source, None if files is None else files[source.name])
        if problem:
            raise _Damaged(problem)
        try:
            state = read_state(source)
            if relayout:
                state["relayout"] = True  # the strategy rebuilds its part from every rank's file
            return state
        except ValueError as exc:
            raise _Damaged(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a format-1 file without checksum that does not load
            raise _Damaged(f"{source.name} does not load ({type(exc).__name__}: {exc})") from None

    def load(self, checkpoint: Path) -> Dict[str, Any]:
        """This rank's state from ``checkpoint`` (verified). Collective; raises on every rank
        when it is damaged or was written by another number of ranks."""
        state = self.resume(explicit=checkpoint)[1]
        assert state is not None  # an explicit checkpoint loads or raises
        return state


class _Damaged(Exception):
    """A checkpoint that cannot be used as it is on disk (a fallback may skip it)."""
