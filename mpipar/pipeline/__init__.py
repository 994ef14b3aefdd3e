"""Layer-partitioned model parallelism and pipeline parallelism over MPI Send/Recv.

The names below load on first use (PEP 562). The pure pieces (schedules, placements, balances) live in
:mod:`mpipar.pipeline_plan`, skip connections in :mod:`mpipar.models.skip`, the layer profiler in
:mod:`mpipar.cost.profile`; ``pipeline.schedule``, ``pipeline.placement`` and ``pipeline.skip`` re-export them.
"""

from mpipar._lazy import lazy_getattr
from mpipar.registry import StrategySpec, register

_LAZY = {name: (module, name) for module, names in {
    "mpipar.comm.replicas": ["ReplicaAverager"],
    "mpipar.pipeline.executor": ["Pipeline", "StepResult"],
    "mpipar.pipeline.partition": ["auto_balance"],
    "mpipar.pipeline_plan.balance": ["balance_by_time"],
    "mpipar.cost.profile": ["profile_layers"],
    "mpipar.pipeline_plan.placement": ["Placement", "Segment", "even_balance"],
    "mpipar.pipeline_plan.schedule": ["SCHEDULES", "Schedule"],
    "mpipar.models.skip": ["AddSkip", "CatSkip", "SaveSkip", "SkipConsumer", "SkipSequential", "find_skips"],
    "mpipar.pipeline.stage": ["Stage", "TensorSpec"],
    "mpipar.pipeline.timing": ["StepTimes", "measured_bubble"],
}.items() for name in names}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr("mpipar.pipeline", _LAZY, globals())

register(StrategySpec(
    name="pipeline", package=__name__, settings="mpipar.pipeline.config:PipelineConfig", checkpoint_key="placement",
    consolidate="mpipar.run.consolidate:merge_stages", predict="mpipar.pipeline.prediction:predict",
    jobs=("mlp_mp.py", "resnet_pp.py", "mlp_tp.py"), loop_cases=("pipeline", "hybrid"), aliases=("pipeline_hybrid",),
    consolidate_optimizer="mpipar.pipeline.strategy:full_optimizer"))
