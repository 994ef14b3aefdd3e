"""Asynchronous and synchronous training through parameter servers: a strategy of the one training loop."""

from mpipar.parameter_server.config import ParameterServerConfig
from mpipar.parameter_server.strategy import ParameterServerStrategy

__all__ = ["ParameterServerConfig", "ParameterServerStrategy"]
