"""The command-line flags of the pipeline jobs, parsed once into typed values; the schedules registered."""

from __future__ import annotations

import argparse
from typing import Optional

from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.pipeline_plan.schedule import FLUSHING_SCHEDULES, TRAIN_SCHEDULES
from mpipar.run.cli import rank_list

__all__ = ["add_pipeline_flags", "balance_flag"]


def balance_flag(text: str):
    """``even``, ``auto`` or layers per stage ``N,N,...`` (a tuple)."""
    return text if text in ("even", "auto") else rank_list(text)


def add_pipeline_flags(parser: argparse.ArgumentParser, *, schedule: str = "1f1b", microbatches: int = 4,
                       placement: Optional[str] = None, stages: bool = True, asynchronous: bool = False) -> None:
    """The flags of the pipeline jobs: ``--schedule``, ``--microbatches``, ``--balance``
    (or ``--placement`` when ``placement`` gives its default), ``--virtual-stages`` (when a schedule of virtual
    stages is offered) and ``--stages``.
    Placements and balances are parsed here, once, into tuples of ints. The schedules are
    the registered ones that train (``TRAIN_SCHEDULES``, not ``forward``); without
    ``asynchronous`` only those that flush (``FLUSHING_SCHEDULES``)."""
    choices = list(TRAIN_SCHEDULES if asynchronous else FLUSHING_SCHEDULES)
    parser.add_argument("--schedule", choices=choices, default=schedule,
                        help="; ".join(f"{name}: {schedule_kind(name).help}" for name in choices))
    parser.add_argument("--microbatches", type=int, default=microbatches,
                        help="micro-batches per batch (must divide it)")
    if placement is None:
        parser.add_argument("--balance", type=balance_flag, default="even",
                            help="even, auto (profiled), or layers per stage N,N,...")
    else:
        parser.add_argument("--placement", type=rank_list, default=rank_list(placement),
                            help=f"the rank of every layer (default {placement})")
    if any(schedule_kind(name).virtual for name in choices):
        parser.add_argument("--virtual-stages", type=int, default=1,
                            help="chunks per rank for --schedule interleaved (Megatron's virtual stages: the model "
                                 "in stages x V chunks, chunk c on rank c %% stages); 1: one stage per rank; "
                                 "zbv: always 2, in a V")
    if stages:
        parser.add_argument("--stages", type=int, default=0,
                            help="ranks per pipeline (0: all ranks); the world size / stages pipelines are "
                                 "data-parallel replicas")
