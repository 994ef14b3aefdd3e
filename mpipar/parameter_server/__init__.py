"""Asynchronous and synchronous training through parameter servers: a strategy of the one training loop."""

from mpipar.parameter_server.config import ParameterServerConfig
from mpipar.parameter_server.strategy import ParameterServerStrategy
from mpipar.registry import StrategySpec, register

__all__ = ["ParameterServerConfig", "ParameterServerStrategy"]

register(StrategySpec(
    name="parameter_server", package=__name__, settings="mpipar.parameter_server.config:ParameterServerConfig",
    checkpoint_key="parameter_server", consolidate="mpipar.run.consolidate:whole_model",  # rank 0: a server
    jobs=("resnet_ps.py",)))
