"""A process grid of pipeline x data-parallel groups, from one communicator with Split."""

from __future__ import annotations

from mpi4py import MPI

from mpipar.diagnostics.agree import agree_on, collective_check

__all__ = ["ProcessGrid"]


class ProcessGrid:
    """The ranks of ``comm`` as ``replicas`` pipelines of ``stages`` ranks each.

    Consecutive ranks form a pipeline (neighbouring stages usually share a node,
    where their point-to-point traffic is cheapest); ranks holding the same
    pipeline position in every replica form a data-parallel group. With 4 ranks
    and 2 stages: pipelines {0, 1} and {2, 3}, data-parallel groups {0, 2} and {1, 3}.

    Collective: every rank of ``comm`` constructs it with the same ``stages``
    (checked) and calls :meth:`free` together. ``stages == size`` is one pipeline
    with data-parallel groups of size 1; ``stages == 1`` is pure data parallelism.

    Args:
        comm: the whole job's communicator.
        stages: ranks per pipeline.

    Attributes:
        pipeline_comm: this rank's pipeline (rank = position in the pipeline).
        data_comm: the ranks at the same position in every replica (rank = replica).
        stage: this rank's position in its pipeline. replica: its pipeline's index.

    Raises:
        ValueError: on every rank, when ``stages`` is not a positive divisor of the
            size of ``comm`` or differs between ranks.
    """

    def __init__(self, comm: MPI.Intracomm, stages: int):
        size = comm.Get_size()

        def check():
            if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1 or size % stages:
                divisors = [d for d in range(1, size + 1) if size % d == 0]
                raise ValueError(f"{stages!r} pipeline stages do not divide the {size} processes into equal "
                                 f"pipelines; use stages in {divisors} or launch a multiple of {stages} processes")

        collective_check(comm, check, "process grid")
        agree_on(comm, "the number of pipeline stages", stages, hint="pass the same --stages to every rank")
        rank = comm.Get_rank()
        self.stages, self.replicas = stages, size // stages
        self.stage, self.replica = rank % stages, rank // stages
        self.pipeline_comm = comm.Split(color=self.replica, key=self.stage)
        self.data_comm = comm.Split(color=self.stage, key=self.replica)

    def free(self) -> None:
        """Free both sub-communicators. Collective over the parent communicator's ranks."""
        for comm in (self.pipeline_comm, self.data_comm):
            if comm != MPI.COMM_NULL:
                comm.Free()
        self.pipeline_comm = self.data_comm = MPI.COMM_NULL

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __str__(self) -> str:
        return f"{self.replicas} pipeline(s) x {self.stages} stage(s)"
