"""The pure parts of ``bench_pipeline.py``: which schedules run, on which layout of the model's chunks, the skips
a torch stage carries, and the best-of summary over rounds (no MPI, no torch; tested in
``tests/test_bench_pipeline.py``)."""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.pipeline_plan.placement import Segment
from mpipar.pipeline_plan.schedule import Schedule

__all__ = ["MPIPAR", "TORCH", "COUNTERPARTS", "LAYOUTS", "chunk_ranks", "segments", "layer_ranks", "chosen",
           "mpipar_schedule", "carried_skips", "Best", "best_per_round"]

LAYOUTS = ("stages", "looped", "v")  # one chunk per rank; V chunks per rank, chunk c on rank c % p; torch's V shape

# mpipar's flushing schedules and the layout each runs on. A new one is a row here (and its torch counterparts a
# row of COUNTERPARTS); bench_pipeline places chunks with Placement.chunked, which keeps the V's two adjacent
# chunks on rank p-1 two stages
MPIPAR: Dict[str, str] = {"gpipe": "stages", "1f1b": "stages", "interleaved": "looped", "zero-bubble": "stages",
                          "zbv": "v"}

# torch.distributed.pipelining's schedules: (class name, layout); those whose class is missing from the installed
# torch are left out by name
TORCH: Dict[str, Tuple[str, str]] = {
    "gpipe": ("ScheduleGPipe", "stages"),
    "1f1b": ("Schedule1F1B", "stages"),
    "interleaved": ("ScheduleInterleaved1F1B", "looped"),
    "looped-bfs": ("ScheduleLoopedBFS", "looped"),
    "zero-bubble": ("ScheduleInterleavedZeroBubble", "stages"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}

# an mpipar schedule's torch counterparts (paired ratios on the same split)
COUNTERPARTS: Dict[str, Tuple[str, ...]] = {
    "gpipe": ("gpipe",), "1f1b": ("1f1b",), "interleaved": ("interleaved",), "zero-bubble": ("zero-bubble", "zbv"),
    "zbv": ("zbv", "dualpipev")}


def chosen(schedule: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(mpipar schedules, torch schedules) that ``--schedule`` runs: one and its counterparts, or with ``best``
    every one of both tables."""
    if schedule == "best":
        return tuple(MPIPAR), tuple(TORCH)
    if schedule not in MPIPAR:
        raise ValueError(f"unknown --schedule {schedule!r}; choose one of {[*MPIPAR, 'best']}")
    return (schedule,), COUNTERPARTS.get(schedule, ())


def chunk_ranks(layout: str, size: int, virtual_stages: int = 1) -> Tuple[int, ...]:
    """The rank of each chunk, in model order: ``stages`` ``0..p-1``; ``looped`` ``p V`` chunks, chunk ``c`` on
    rank ``c % p`` (Megatron); ``v`` ``2 p`` chunks, rank ``r`` holding chunks ``r`` and ``2p - 1 - r`` (torch's
    ZB-V: rank 0 holds the first and the last)."""
    if size < 1:
        raise ValueError(f"need at least one rank, got {size}")
    if layout == "stages":
        return tuple(range(size))
    if layout == "looped":
        return tuple(chunk % size for chunk in range(size * virtual_stages))
    if layout == "v":
        return tuple(min(chunk, 2 * size - 1 - chunk) for chunk in range(2 * size))
    raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")


def segments(balance: Sequence[int], ranks: Sequence[int]) -> Tuple[Segment, ...]:
    """Chunk ``c``: the next ``balance[c]`` layers, on ``ranks[c]`` (adjacent chunks on one rank stay two)."""
    if len(balance) != len(ranks) or any(count < 1 for count in balance):
        raise ValueError(f"need a layer count >= 1 for each of {len(ranks)} chunks, got {list(balance)}")
    result, start = [], 0
    for count, rank in zip(balance, ranks):
        result.append(Segment(rank, start, start + count))
        start += count
    return tuple(result)


def layer_ranks(chunks: Sequence[Segment]) -> Tuple[int, ...]:
    """The rank of every layer (what ``mpipar.pipeline.Placement`` takes)."""
    return tuple(chunk.rank for chunk in chunks for _ in range(chunk.start, chunk.stop))


def mpipar_schedule(name: str, size: int, virtual_stages: int, microbatches: int) -> Union[Schedule, str]:
    """mpipar's ``name`` on its layout over ``size`` ranks, or why it cannot run (e.g. interleaved needs whole
    groups of ``size`` micro-batches)."""
    ranks = chunk_ranks(MPIPAR[name], size, virtual_stages)
    try:
        return Schedule(name, len(ranks), microbatches,
                        virtual_stages=len(ranks) // size if schedule_kind(name).virtual else 1)
    except ValueError as error:
        return str(error)


def carried_skips(stage_of_layer: Sequence[int], skips: Sequence[Tuple[str, int, int]]
                  ) -> List[Tuple[List[str], List[str]]]:
    """For each stage, (skips it takes as extra inputs, skips it gives as extra outputs): a skip (name, producer
    layer, consumer layer) crosses every cut from its producer's stage to its consumer's, so a stage between the
    two takes it and gives it on unchanged (how torch's stages, which pass only tensors between neighbours, carry
    it)."""
    stages = max(stage_of_layer) + 1
    crossing = [[name for name, producer, consumer in skips
                 if stage_of_layer[producer] <= cut < stage_of_layer[consumer]] for cut in range(stages - 1)]
    return [(crossing[stage - 1] if stage else [], crossing[stage] if stage < stages - 1 else [])
            for stage in range(stages)]


class Best(NamedTuple):
    """Per round, the fastest variant's time and name; and how often each variant was the fastest."""

    seconds: List[float]
    names: List[str]

    def wins(self) -> List[Tuple[str, int]]:
        """(variant, rounds it was fastest), most often first."""
        return Counter(self.names).most_common()


def best_per_round(seconds: Mapping[str, Sequence[float]], names: Optional[Sequence[str]] = None) -> Best:
    """The minimum over ``names`` (default: all) of ``seconds[name][round]`` in every round, and who had it."""
    names = list(seconds) if names is None else list(names)
    if not names:
        raise ValueError("best of no variants")
    rounds = {len(seconds[name]) for name in names}
    if len(rounds) != 1:
        raise ValueError(f"variants have different numbers of rounds: {sorted(rounds)}")
    winners = [min(names, key=lambda name: seconds[name][index]) for index in range(rounds.pop())]
    return Best([seconds[name][index] for index, name in enumerate(winners)], winners)
