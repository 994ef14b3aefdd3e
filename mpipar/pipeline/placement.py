"""Placements, re-exported from :mod:`mpipar.pipeline_plan.placement` (their home, which every layer may import)."""

from mpipar.pipeline_plan.placement import *  # noqa: F401,F403
from mpipar.pipeline_plan.placement import __all__  # noqa: F401
