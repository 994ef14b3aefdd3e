"""A process grid of data-parallel x pipeline x tensor-parallel groups, from one communicator with Split,
laid out node by node."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Set, Tuple, cast

from mpi4py import MPI

from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import agree_on, collective_check

__all__ = ["ProcessGrid", "node_indices", "node_order", "spans_nodes"]


def node_indices(comm: MPI.Intracomm) -> List[int]:
    """The node of every rank of ``comm``, numbered in order of each node's lowest rank.

    Ranks share a node when MPI puts them in one ``COMM_TYPE_SHARED`` group (shared
    memory: the same host, or the same emulated host). Collective over ``comm`` (one
    split, one broadcast inside the node, one allgather); the same list on every rank.
    """
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        leader = shared.bcast(comm.Get_rank(), root=0)
    finally:
        shared.Free()
    leaders = collectives.allgather(comm, leader, "node of each rank")
    numbering = {first: index for index, first in enumerate(sorted(set(leaders)))}
    return [numbering[first] for first in leaders]


def spans_nodes(comm: MPI.Intracomm) -> bool:
    """Whether the ranks of ``comm`` are on more than one node. Collective over ``comm``
    (as :func:`node_indices`); the same answer on every rank; False on one rank."""
    return comm.Get_size() > 1 and len(set(node_indices(comm))) > 1


def node_order(nodes: Sequence[int]) -> List[int]:
    """The ranks node by node (each node's ranks in rank order): the grid's logical order.

    Pure. ``nodes[r]`` is rank ``r``'s node. Ranks already placed node by node (mpirun's
    and srun's default block placement) keep their order; ``--map-by node`` (round robin)
    is regrouped, so that consecutive logical ranks, which form tensor-parallel groups and
    then pipeline stages, share a node.
    """
    return sorted(range(len(nodes)), key=lambda rank: (nodes[rank], rank))


class ProcessGrid:
    """The ranks of ``comm`` as ``replicas`` pipelines of ``stages`` stages, each stage
    ``tp`` ranks that split its layers (tensor parallelism), laid out node by node.

    The ranks are first put in :func:`node_order` (node by node); the one at logical
    position ``(replica * stages + stage) * tp + t`` gets those coordinates. So
    tensor-parallel groups are consecutive ranks of one node (they talk at every layer),
    then pipeline stages, and data-parallel replicas go across nodes last (they talk
    once per step), as Megatron places them. With ranks placed node by node (the default
    of mpirun and srun) the logical position is the rank itself: with 4 ranks, 2 stages
    and ``tp=1``: pipelines {0, 1} and {2, 3}, data-parallel groups {0, 2} and {1, 3};
    with 8 ranks, 2 stages and ``tp=2``: tensor-parallel groups {0, 1}, {2, 3}, ...,
    pipelines {0, 2}, {1, 3}, {4, 6}, {5, 7}, data-parallel groups {0, 4}, {1, 5}, {2, 6},
    {3, 7}. Groups span nodes only where the ranks per node are not a multiple of the
    group's size: :meth:`describe` says so.

    Collective: every rank of ``comm`` constructs it with the same ``stages``, ``tp`` and
    ``nodes`` (checked) and calls :meth:`free` together. ``stages == size`` is one pipeline
    with data-parallel groups of size 1; ``stages == 1`` and ``tp == 1`` is pure data
    parallelism; on one node (or at size 1) the layout is the plain rank order.

    Args:
        comm: the whole job's communicator.
        stages: stages per pipeline.
        tp: ranks per stage.
        nodes: the node of every rank; by default :func:`node_indices` (shared memory).

    Attributes:
        pipeline_comm: this rank's pipeline (rank = stage).
        data_comm: the ranks at the same place in every replica (rank = replica).
        tp_comm: the ranks that split this rank's stage (rank = ``tp_rank``).
        stage, replica, tp_rank: this rank's coordinates.
        order: the ranks of ``comm`` in logical order (``order[position] = rank``).
        nodes: the node of every rank of ``comm``.

    Raises:
        ValueError: on every rank, when ``stages * tp`` is not a positive divisor of the
            size of ``comm``, or the values differ between ranks.
    """

    def __init__(self, comm: MPI.Intracomm, stages: int, tp: int = 1, *, nodes: Optional[Sequence[int]] = None):
        size = comm.Get_size()

        def check():
            for name, value in (("pipeline stages", stages), ("tensor-parallel ranks", tp)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if size % (stages * tp):
                group = stages * tp
                divisors = [d for d in range(1, size + 1) if size % d == 0]
                what = f"{stages} pipeline stages" if tp == 1 else f"{stages} stages x {tp} tensor-parallel ranks"
                raise ValueError(f"{what} do not divide the {size} processes into equal pipelines ({group} "
                                 f"ranks each); use a product in {divisors} or launch a multiple of {group} "
                                 f"processes")
            if nodes is not None and len(nodes) != size:
                raise ValueError(f"nodes names the node of {len(nodes)} ranks; the communicator has {size}")

        collective_check(comm, check, "process grid")
        agree_on(comm, "the process grid (stages, tensor-parallel ranks, nodes)",
                 (stages, tp, None if nodes is None else list(nodes)),
                 hint="pass the same --stages and --tp to every rank")
        self.nodes = list(nodes) if nodes is not None else node_indices(comm)
        self.order = node_order(self.nodes)
        self.hosts = collectives.allgather(comm, MPI.Get_processor_name(), "host of each rank")
        position = self.order.index(comm.Get_rank())
        self.stages, self.tp, self.replicas = stages, tp, size // (stages * tp)
        self.tp_rank, place = position % tp, position // tp
        self.stage, self.replica = place % stages, place // stages
        # an Intracomm's Split gives an Intracomm (mpi4py's stubs say Comm)
        self.pipeline_comm = cast(MPI.Intracomm, comm.Split(color=self.replica * tp + self.tp_rank, key=self.stage))
        self.data_comm = cast(MPI.Intracomm, comm.Split(color=self.stage * tp + self.tp_rank, key=self.replica))
        self.tp_comm = cast(MPI.Intracomm, comm.Split(color=place, key=self.tp_rank))

    def rank_of(self, replica: int, stage: int, tp_rank: int = 0) -> int:
        """The rank of ``comm`` at these coordinates."""
        return self.order[(replica * self.stages + stage) * self.tp + tp_rank]

    def coordinates(self) -> List[Tuple[int, int, int]]:
        """(replica, stage, tp rank) of every rank of ``comm``, by rank."""
        coordinates = [(0, 0, 0)] * len(self.order)
        for position, rank in enumerate(self.order):
            coordinates[rank] = (position // (self.tp * self.stages), (position // self.tp) % self.stages,
                                 position % self.tp)
        return coordinates

    def spans(self) -> dict:
        """How many tensor-parallel groups, pipelines and data-parallel groups span more than one node."""
        coordinates = self.coordinates()

        def spanning(key) -> int:
            groups: Dict[object, Set[int]] = {}
            for rank, coordinate in enumerate(coordinates):
                groups.setdefault(key(coordinate), set()).add(self.nodes[rank])
            return sum(len(members) > 1 for members in groups.values())

        return {"tp": spanning(lambda c: (c[0], c[1])), "pipeline": spanning(lambda c: (c[0], c[2])),
                "data": spanning(lambda c: (c[1], c[2]))}

    def metrics_attrs(self) -> dict:
        """The placement for the metrics file: (replica, stage, tp rank) of each rank
        (``MetricsWriter`` stores each rank's host as ``hosts``)."""
        return {"grid_coordinates": json.dumps(self.coordinates())}

    def describe(self) -> str:
        """Where every rank sits, node by node, and which groups cross nodes (one line per node)."""
        coordinates = self.coordinates()
        lines = []
        for node in sorted(set(self.nodes)):
            ranks = [rank for rank in self.order if self.nodes[rank] == node]
            places = ", ".join(f"{rank}=r{coordinates[rank][0]}s{coordinates[rank][1]}t{coordinates[rank][2]}"
                               for rank in ranks)
            lines.append(f"node {node} ({self.hosts[ranks[0]]}): {places}")
        spans = self.spans()
        crossing = [f"{count} {what} group(s)" for what, count in (("tensor-parallel", spans["tp"]),
                                                                   ("pipeline", spans["pipeline"])) if count]
        if crossing:
            lines.append("span nodes: " + ", ".join(crossing) + " (ranks per node not a multiple of the group)")
        return "placement (rank=replica,stage,tp): " + "; ".join(lines)

    def free(self) -> None:
        """Free the sub-communicators. Collective over the parent communicator's ranks."""
        for comm in (self.pipeline_comm, self.data_comm, self.tp_comm):
            if comm != MPI.COMM_NULL:
                comm.Free()
        self.pipeline_comm = self.data_comm = self.tp_comm = cast(MPI.Intracomm, MPI.COMM_NULL)  # freed

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __str__(self) -> str:
        split = f" of {self.tp} tensor-parallel ranks" if self.tp > 1 else ""
        return f"{self.replicas} pipeline(s) x {self.stages} stage(s){split}"
