"""A process grid of data-parallel x pipeline x tensor-parallel groups, from one communicator with Split."""

from __future__ import annotations

from mpi4py import MPI

from mpipar.diagnostics.agree import agree_on, collective_check

__all__ = ["ProcessGrid"]


class ProcessGrid:
    """The ranks of ``comm`` as ``replicas`` pipelines of ``stages`` stages, each stage
    ``tp`` ranks that split its layers (tensor parallelism).

    Rank ``(replica * stages + stage) * tp + t``: tensor-parallel groups are
    consecutive ranks (they talk at every layer, so they belong on one node), then
    pipeline stages, then replicas. Ranks holding the same stage and tensor-parallel
    index in every replica form a data-parallel group; those with the same replica and
    tensor-parallel index form a pipeline. With 4 ranks, 2 stages and ``tp=1``:
    pipelines {0, 1} and {2, 3}, data-parallel groups {0, 2} and {1, 3}; with 8 ranks,
    2 stages and ``tp=2``: tensor-parallel groups {0, 1}, {2, 3}, ..., pipelines {0, 2},
    {1, 3}, {4, 6}, {5, 7}, data-parallel groups {0, 4}, {1, 5}, {2, 6}, {3, 7}.

    Collective: every rank of ``comm`` constructs it with the same ``stages`` and ``tp``
    (checked) and calls :meth:`free` together. ``stages == size`` is one pipeline with
    data-parallel groups of size 1; ``stages == 1`` and ``tp == 1`` is pure data parallelism.

    Args:
        comm: the whole job's communicator.
        stages: stages per pipeline.
        tp: ranks per stage.

    Attributes:
        pipeline_comm: this rank's pipeline (rank = stage).
        data_comm: the ranks at the same place in every replica (rank = replica).
        tp_comm: the ranks that split this rank's stage (rank = ``tp_rank``).
        stage, replica, tp_rank: this rank's coordinates.

    Raises:
        ValueError: on every rank, when ``stages * tp`` is not a positive divisor of the
            size of ``comm``, or the values differ between ranks.
    """

    def __init__(self, comm: MPI.Intracomm, stages: int, tp: int = 1):
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

        collective_check(comm, check, "process grid")
        agree_on(comm, "the process grid (stages, tensor-parallel ranks)", (stages, tp),
                 hint="pass the same --stages and --tp to every rank")
        rank = comm.Get_rank()
        self.stages, self.tp, self.replicas = stages, tp, size // (stages * tp)
        self.tp_rank, position = rank % tp, rank // tp
        self.stage, self.replica = position % stages, position // stages
        self.pipeline_comm = comm.Split(color=self.replica * tp + self.tp_rank, key=self.stage)
        self.data_comm = comm.Split(color=self.stage * tp + self.tp_rank, key=self.replica)
        self.tp_comm = comm.Split(color=position, key=self.tp_rank)

    def free(self) -> None:
        """Free the sub-communicators. Collective over the parent communicator's ranks."""
        for comm in (self.pipeline_comm, self.data_comm, self.tp_comm):
            if comm != MPI.COMM_NULL:
                comm.Free()
        self.pipeline_comm = self.data_comm = self.tp_comm = MPI.COMM_NULL

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __str__(self) -> str:
        split = f" of {self.tp} tensor-parallel ranks" if self.tp > 1 else ""
        return f"{self.replicas} pipeline(s) x {self.stages} stage(s){split}"
