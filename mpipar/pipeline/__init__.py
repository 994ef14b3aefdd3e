"""Layer-partitioned model parallelism and pipeline parallelism over MPI Send/Recv."""

from mpipar.comm.replicas import ReplicaAverager
from mpipar.pipeline.executor import Pipeline, StepResult
from mpipar.pipeline.partition import auto_balance, balance_by_time, profile_layers
from mpipar.pipeline.placement import Placement, Segment, even_balance
from mpipar.pipeline.schedule import SCHEDULES, Schedule
from mpipar.pipeline.skip import AddSkip, CatSkip, SaveSkip, SkipConsumer, SkipSequential, find_skips
from mpipar.pipeline.stage import Stage, TensorSpec
from mpipar.pipeline.timing import StepTimes, measured_bubble

__all__ = ["Pipeline", "StepResult", "Placement", "Segment", "even_balance", "Schedule", "SCHEDULES",
           "Stage", "TensorSpec", "StepTimes", "measured_bubble",
           "SaveSkip", "AddSkip", "CatSkip", "SkipConsumer", "SkipSequential", "find_skips",
           "ReplicaAverager", "auto_balance", "balance_by_time", "profile_layers"]
