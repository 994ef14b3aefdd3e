"""Layer-partitioned model parallelism and pipeline parallelism over MPI Send/Recv.

The names below load on first use (PEP 562): ``mpipar.pipeline.schedule`` (pure) can be imported,
e.g. by ``mpipar-report``, without torch or MPI.
"""

from mpipar._lazy import lazy_getattr
from mpipar.registry import StrategySpec, register

_LAZY = {name: (module, name) for module, names in {
    "mpipar.comm.replicas": ["ReplicaAverager"],
    "mpipar.pipeline.executor": ["Pipeline", "StepResult"],
    "mpipar.pipeline.partition": ["auto_balance", "balance_by_time", "profile_layers"],
    "mpipar.pipeline.placement": ["Placement", "Segment", "even_balance"],
    "mpipar.pipeline.schedule": ["SCHEDULES", "Schedule"],
    "mpipar.pipeline.skip": ["AddSkip", "CatSkip", "SaveSkip", "SkipConsumer", "SkipSequential", "find_skips"],
    "mpipar.pipeline.stage": ["Stage", "TensorSpec"],
    "mpipar.pipeline.timing": ["StepTimes", "measured_bubble"],
}.items() for name in names}

__all__ = list(_LAZY)
__getattr__ = lazy_getattr("mpipar.pipeline", _LAZY, globals())

register(StrategySpec(
    name="pipeline", package=__name__, settings="mpipar.pipeline.config:PipelineConfig", checkpoint_key="placement",
    consolidate="mpipar.run.consolidate:merge_stages", predict="mpipar.pipeline.prediction:predict",
    jobs=("mlp_mp.py", "resnet_pp.py", "mlp_tp.py"), loop_cases=("pipeline", "hybrid"), aliases=("pipeline_hybrid",)))
