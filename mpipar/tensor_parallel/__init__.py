"""Tensor ("true") model parallelism, Megatron-style: layers split inside, over a tensor-parallel communicator."""

from mpipar.registry import StrategySpec, register
from mpipar.tensor_parallel.attention import ParallelSelfAttention, ParallelTransformerBlock
from mpipar.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mpipar.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpipar.tensor_parallel.mappings import (
    copy_to_parallel,
    gather_from_parallel,
    reduce_from_parallel,
    scatter_to_parallel,
)
from mpipar.tensor_parallel.mlp import ParallelMLP
from mpipar.tensor_parallel.partition import shard_bounds, shard_size
from mpipar.tensor_parallel.random import ParallelDropout, TensorParallelRNG, split_dropout

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelMLP",
    "ParallelSelfAttention",
    "ParallelTransformerBlock",
    "vocab_parallel_cross_entropy",
    "copy_to_parallel",
    "reduce_from_parallel",
    "scatter_to_parallel",
    "gather_from_parallel",
    "shard_size",
    "shard_bounds",
    "TensorParallelRNG",
    "ParallelDropout",
    "split_dropout",
]

register(StrategySpec(
    name="tensor_parallel", package=__name__, settings="mpipar.tensor_parallel.strategy:TensorParallelConfig",
    checkpoint_key="tp", consolidate="mpipar.run.consolidate:merge_shards",
    predict="mpipar.tensor_parallel.prediction:predict", profiles="mpipar.tensor_parallel.profile:calibration_profiles",
    jobs=("mlp_tp.py", "vit_tp.py"),
    loop_cases=("tensor", "tensor_x_data")))
