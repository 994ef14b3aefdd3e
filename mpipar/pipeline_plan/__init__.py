"""The pure pieces of a pipeline (no torch, no MPI): schedules, their registry, placements and balances.

Every layer may import this folder. A schedule is a :class:`~mpipar.pipeline_plan.kinds.ScheduleKind`
registered in its own module; the modules imported below register theirs, in this order (a new schedule adds
its module and one line here).
"""

from mpipar.pipeline_plan import flushing, interleaved, weight_stashing, zbv, zero_bubble  # noqa: F401  (registers them)
