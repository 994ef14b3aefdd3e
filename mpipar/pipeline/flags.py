"""The command-line flags of the pipeline jobs, parsed once into typed values; the schedules from schedule.py."""

from __future__ import annotations

import argparse

from mpipar.pipeline.schedule import ASYNC_SCHEDULES, SCHEDULES
from mpipar.run.cli import rank_list

__all__ = ["add_pipeline_flags", "balance_flag"]

SCHEDULE_HELP = {
    "gpipe": "all forwards then all backwards",
    "1f1b": "bounded in-flight micro-batches",
    "naive": "one micro-batch at a time",
    "pipedream": "never flushes, an update per micro-batch, weight stashing",
    "2bw": "never flushes, an update per batch, two weight versions",
}


def balance_flag(text: str):
    """``even``, ``auto`` or layers per stage ``N,N,...`` (a tuple)."""
    return text if text in ("even", "auto") else rank_list(text)


def add_pipeline_flags(parser: argparse.ArgumentParser, *, schedule: str = "1f1b", microbatches: int = 4,
                       placement: str = None, stages: bool = True, asynchronous: bool = False) -> None:
    """The flags of the pipeline jobs: ``--schedule``, ``--microbatches``, ``--balance``
    (or ``--placement`` when ``placement`` gives its default) and ``--stages``.
    Placements and balances are parsed here, once, into tuples of ints. The schedules are
    ``SCHEDULES`` that train (not ``forward``); ``asynchronous`` also offers those that never
    flush (``ASYNC_SCHEDULES``)."""
    choices = [name for name in SCHEDULES if name in SCHEDULE_HELP
               and (asynchronous or name not in ASYNC_SCHEDULES)]
    parser.add_argument("--schedule", choices=choices, default=schedule,
                        help="; ".join(f"{name}: {SCHEDULE_HELP[name]}" for name in choices))
    parser.add_argument("--microbatches", type=int, default=microbatches,
                        help="micro-batches per batch (must divide it)")
    if placement is None:
        parser.add_argument("--balance", type=balance_flag, default="even",
                            help="even, auto (profiled), or layers per stage N,N,...")
    else:
        parser.add_argument("--placement", type=rank_list, default=rank_list(placement),
                            help=f"the rank of every layer (default {placement})")
    if stages:
        parser.add_argument("--stages", type=int, default=0,
                            help="ranks per pipeline (0: all ranks); the world size / stages pipelines are "
                                 "data-parallel replicas")
