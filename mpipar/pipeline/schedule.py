"""The pipeline schedules, re-exported from :mod:`mpipar.pipeline_plan.schedule` (their home, which every layer
may import)."""

from mpipar.pipeline_plan.schedule import *  # noqa: F401,F403
from mpipar.pipeline_plan.schedule import __all__  # noqa: F401
