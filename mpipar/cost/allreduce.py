"""The Allreduce as an MPI library runs it: its algorithm's rounds, each priced on the links it crosses.

Pure Python. An algorithm is a list of rounds; in a round some ranks send a fraction of the buffer to a
partner (and, while reducing, add what they receive). A round takes as long as its slowest part: a
message inside a node (the ``within`` link's point-to-point cost), or a node's network link carrying
every message its ranks send to (or receive from) other nodes in that round (the ``across`` link's
cost of their sum: the ranks of a node share its link), plus the reduction of what was received
(``reduce_seconds_per_byte``). The algorithms are Open MPI's for the non-blocking Allreduce (libnbc),
which :class:`~mpipar.comm.reducer.GradientReducer` calls, and its choice among them is
:func:`open_mpi_nonblocking_choice`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["ALGORITHMS", "COLLECTIVES", "Round", "schedule", "rounds", "binomial_rounds",
           "open_mpi_nonblocking_choice", "allreduce_seconds", "collective_rounds", "collective_seconds"]

ALGORITHMS = ("binomial", "ring", "rabenseifner", "recursive_doubling")
# (fraction of the buffer per message, any message inside a node, most messages on one node's link, reduces)
Round = Tuple[float, bool, int, bool]


def _pof2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def binomial_rounds(p: int) -> int:
    """Rounds of the binomial tree on ``p`` ranks: ``ceil(log2 p)`` up, as many down."""
    return 2 * (p - 1).bit_length()


def _binomial(p: int) -> List[List[Tuple[int, int, float, bool]]]:
    """Reduce up a binomial tree to rank 0 (round r: rank v + 2^(r-1) sends to v, v a multiple of 2^r),
    then broadcast down it (round r: rank v < 2^r sends to v + 2^r); the whole buffer each time."""
    depth = (p - 1).bit_length()
    up = [[(v + (1 << (r - 1)), v, 1.0, True) for v in range(0, p, 1 << r) if v + (1 << (r - 1)) < p]
          for r in range(1, depth + 1)]
    down = [[(v, v + (1 << r), 1.0, False) for v in range(min(1 << r, p)) if v + (1 << r) < p]
            for r in range(depth)]
    return up + down


def _exchanges(pairs, fraction: float, reduce: bool):
    return [(a, b, fraction, reduce) for a, b in pairs] + [(b, a, fraction, reduce) for a, b in pairs]


def _partners(real: List[int], mask: int) -> List[Tuple[int, int]]:
    """The pairs of real ranks whose virtual ranks differ in ``mask``, each once."""
    return [(real[v], real[v ^ mask]) for v in range(len(real)) if v < v ^ mask]


def _fold(p: int):
    """Non-power-of-two ranks: the first ``2 * (p - p')`` ranks pair up (even, odd); returns the
    real rank of each of the ``p'`` remaining virtual ranks and the pairs."""
    pof2 = _pof2_floor(p)
    rem = p - pof2
    real = [2 * v if v < rem else v + rem for v in range(pof2)]
    return real, [(2 * i, 2 * i + 1) for i in range(rem)]


def _rabenseifner(p: int):
    """Reduce-scatter by recursive halving (distance 1, 2, 4, ... of the virtual ranks, half the window
    each time), then allgather by recursive doubling in reverse; non-powers of two fold the first
    ``2 (p - p')`` ranks in pairs first (half-buffer exchange, then the odd sends its half) and send
    them the result last."""
    real, pairs = _fold(p)
    pof2 = len(real)
    result = []
    if pairs:
        result += [_exchanges(pairs, 0.5, True), [(b, a, 0.5, False) for a, b in pairs]]
    masks = [1 << k for k in range(pof2.bit_length() - 1)]
    fractions = [0.5 ** (k + 1) for k in range(len(masks))]
    for mask, fraction in zip(masks, fractions):
        result.append(_exchanges(_partners(real, mask), fraction, True))
    for mask, fraction in reversed(list(zip(masks, fractions))):
        result.append(_exchanges(_partners(real, mask), fraction, False))
    if pairs:
        result.append([(a, b, 1.0, False) for a, b in pairs])
    return result


def _recursive_doubling(p: int):
    """Exchange the whole buffer with the virtual rank at distance 1, 2, 4, ...; non-powers of two fold
    the first ``2 (p - p')`` ranks first (odd sends to even) and send the odd ones the result last."""
    real, pairs = _fold(p)
    pof2 = len(real)
    result = [[(b, a, 1.0, True) for a, b in pairs]] if pairs else []
    for k in range(pof2.bit_length() - 1):
        result.append(_exchanges(_partners(real, 1 << k), 1.0, True))
    if pairs:
        result.append([(a, b, 1.0, False) for a, b in pairs])
    return result


def _ring(p: int):
    """Round k < p-1: rank i sends block (i - k) mod p to i + 1, which adds it in (reduce-scatter);
    then p-1 rounds passing the reduced blocks on (allgather). 1/p of the buffer per message."""
    step = [(i, (i + 1) % p, 1.0 / p) for i in range(p)]
    return [[(a, b, f, True) for a, b, f in step]] * (p - 1) + [[(a, b, f, False) for a, b, f in step]] * (p - 1)


_BUILDERS = {"binomial": _binomial, "ring": _ring, "rabenseifner": _rabenseifner,
             "recursive_doubling": _recursive_doubling}


def schedule(algorithm: str, p: int) -> List[List[Tuple[int, int, float, bool]]]:
    """The rounds of ``algorithm`` on ``p`` ranks: each a list of ``(source, destination, fraction of the
    buffer, whether the destination adds it in)``. Pure. Raises ValueError for an unknown algorithm."""
    if algorithm not in _BUILDERS:
        raise ValueError(f"unknown Allreduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    return [transfers for transfers in _BUILDERS[algorithm](p) if transfers] if p > 1 else []


@lru_cache(maxsize=4096)
def rounds(algorithm: str, nodes: Tuple[int, ...]) -> Tuple[Round, ...]:
    """The rounds of ``algorithm`` over ranks on ``nodes`` (``nodes[i]``: the node of the group's rank
    ``i``), each summarised as :data:`Round`. Pure; cached. Raises ValueError for an unknown algorithm."""
    p = len(nodes)
    if algorithm == "ring" and p > 1:  # every round alike: summarise one (2 (p-1) rounds of p messages)
        reduce_round = _summary(_ring(p)[0], nodes)
        return (reduce_round,) * (p - 1) + (reduce_round[:3] + (False,),) * (p - 1)
    return tuple(_summary(transfers, nodes) for transfers in schedule(algorithm, p))


def _summary(transfers, nodes) -> Round:
    crossing: Dict[Tuple[str, int], int] = {}
    inside = False
    for src, dst, _, _ in transfers:
        if nodes[src] == nodes[dst]:
            inside = True
        else:
            crossing[("out", nodes[src])] = crossing.get(("out", nodes[src]), 0) + 1
            crossing[("in", nodes[dst])] = crossing.get(("in", nodes[dst]), 0) + 1
    return (max(fraction for _, _, fraction, _ in transfers), inside, max(crossing.values(), default=0),
            any(reduce for _, _, _, reduce in transfers))


def open_mpi_nonblocking_choice(ranks: int, nbytes: float, in_place: bool) -> str:
    """The algorithm Open MPI 5's non-blocking Allreduce (libnbc, sum of floats) takes: a binomial tree
    below 4 ranks, below 64 KiB or in place; otherwise Rabenseifner's (read from its source,
    ``nbc_iallreduce.c``; checked against measurements in ``benchmarks/bench_cost_model.py``)."""
    if ranks < 4 or nbytes < 65536 or in_place:
        return "binomial"
    return "rabenseifner"


def allreduce_seconds(nbytes: float, nodes: Sequence[int], within, across=None, *,
                      reduce_seconds_per_byte: float = 0.0, algorithm: Optional[str] = None,
                      in_place: bool = True) -> float:
    """Seconds of an Allreduce of ``nbytes`` per rank over ranks on ``nodes`` (0 on one rank or no bytes).

    ``within``, ``across``: :class:`~mpipar.cost.machine.Link` inside a node and between nodes (their
    point-to-point costs); ``algorithm``: one of :data:`ALGORITHMS`, default Open MPI's choice for the
    non-blocking call (:func:`open_mpi_nonblocking_choice` with ``in_place``). Raises ValueError when
    the ranks span nodes and ``across`` is None.
    """
    if len(nodes) <= 1 or nbytes <= 0:
        return 0.0
    algorithm = algorithm or open_mpi_nonblocking_choice(len(nodes), nbytes, in_place)
    spans = len(set(nodes)) > 1
    if spans and across is None:
        raise ValueError("the ranks span nodes and nothing is known of the link across them (calibrate on "
                         "several nodes or describe one with --interconnect)")
    return _price(rounds(algorithm, tuple(nodes)), nbytes, within, across, reduce_seconds_per_byte)


def _price(summaries: Sequence[Round], nbytes: float, within, across, reduce_seconds_per_byte: float) -> float:
    """Each round as its slowest part (a message inside a node, or a node's share of its network link)
    plus the reduction of what was received."""
    total = 0.0
    for fraction, inside, flows, reduce in summaries:
        message = fraction * nbytes
        seconds = within.p2p_seconds(message) if inside else 0.0
        if flows:
            seconds = max(seconds, across.p2p_seconds(flows * message))
        total += seconds + (reduce_seconds_per_byte * message if reduce else 0.0)
    return total


COLLECTIVES = ("reduce_scatter", "allgather", "alltoall")


@lru_cache(maxsize=4096)
def collective_rounds(collective: str, nodes: Tuple[int, ...]) -> Tuple[Round, ...]:
    """The rounds of a reduce-scatter or all-gather as a ring (the Allreduce ring's first and second
    halves: ``p - 1`` rounds of ``1/p`` of the buffer, adding in or not), or an all-to-all as pairwise
    exchanges (round ``k``: rank ``i`` sends its ``1/p`` for ``i + k``), over ranks on ``nodes``.
    Pure; cached. Raises ValueError for another collective."""
    p = len(nodes)
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {COLLECTIVES}")
    if p <= 1:
        return ()
    if collective == "alltoall":
        return tuple(_summary([(i, (i + k) % p, 1.0 / p, False) for i in range(p)], nodes) for k in range(1, p))
    ring = rounds("ring", nodes)
    return ring[:p - 1] if collective == "reduce_scatter" else ring[p - 1:]


def collective_seconds(collective: str, nbytes: float, nodes: Sequence[int], within, across=None, *,
                       reduce_seconds_per_byte: float = 0.0) -> float:
    """Seconds of ``collective`` (:data:`COLLECTIVES`) of a buffer of ``nbytes`` (the whole buffer: a
    reduce-scatter's input, an all-gather's output, an all-to-all's send buffer) over ranks on ``nodes``,
    each round priced as :func:`allreduce_seconds` prices the Allreduce's. 0 on one rank or no bytes.
    Raises ValueError when the ranks span nodes and ``across`` is None."""
    if len(nodes) <= 1 or nbytes <= 0:
        return 0.0
    if len(set(nodes)) > 1 and across is None:
        raise ValueError("the ranks span nodes and nothing is known of the link across them (calibrate on "
                         "several nodes or describe one with --interconnect)")
    return _price(collective_rounds(collective, tuple(nodes)), nbytes, within, across, reduce_seconds_per_byte)
