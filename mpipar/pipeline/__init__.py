"""Layer-partitioned model parallelism and pipeline parallelism over MPI Send/Recv."""

from .executor import Pipeline, StepResult
from .partition import auto_balance, balance_by_time, profile_layers
from .placement import Placement, Segment, even_balance
from .replicas import ReplicaAverager
from .schedule import SCHEDULES, Schedule
from .stage import Stage, TensorSpec
from .timing import StepTimes, measured_bubble

__all__ = ["Pipeline", "StepResult", "Placement", "Segment", "even_balance", "Schedule", "SCHEDULES",
           "Stage", "TensorSpec", "StepTimes", "measured_bubble",
           "ReplicaAverager", "auto_balance", "balance_by_time", "profile_layers"]
