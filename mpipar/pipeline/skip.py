"""Skip connections, re-exported from :mod:`mpipar.models.skip` (their home: models are built with them)."""

from mpipar.models.skip import *  # noqa: F401,F403
from mpipar.models.skip import __all__  # noqa: F401
