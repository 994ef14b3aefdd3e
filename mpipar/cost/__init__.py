"""The cost model: a machine file of measured message and layer costs, step-time predictions, and the planner."""

from mpipar.cost.machine import Band, LayerCost, Link, Machine, ModelProfile, fit_bands, interconnect
from mpipar.cost.memory import Memory, activation_memory, state_memory
from mpipar.cost.model import (
    Layout,
    Prediction,
    predict_data_parallel,
    predict_pipeline,
    predict_tensor_parallel,
    tensor_parallel_allreduces,
)
from mpipar.cost.options import TrainingOptions
from mpipar.cost.plan import plan
from mpipar.cost.run import format_rows, predict_run, report_rows
from mpipar.cost.sharded import predict_sharded
from mpipar.cost.tensor import TensorPrediction, predict_tensor_grid, profile_name, tensor_degrees

__all__ = ["Band", "Link", "LayerCost", "ModelProfile", "Machine", "fit_bands", "interconnect", "Layout",
           "Prediction", "predict_data_parallel", "predict_pipeline", "predict_tensor_parallel",
           "tensor_parallel_allreduces", "plan", "predict_run", "report_rows", "format_rows",
           "TensorPrediction", "predict_tensor_grid", "profile_name", "tensor_degrees", "Memory", "state_memory",
           "activation_memory", "TrainingOptions", "predict_sharded"]
