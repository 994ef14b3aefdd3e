"""Tensor parallelism inside pipeline stages, on the 3D grid (data x pipeline x tensor parallel): the loop on
N ranks equals the loop on one process over the whole batch (every shard against its slice of the unsplit
layers after several optimizer steps). At 4 ranks: 2 stages x 2 tensor-parallel ranks; at 1-3 ranks: one
stage split over all ranks; at 8 ranks (a serial test launching mpirun): 2 replicas x 2 stages x 2."""

import json

import h5py
import pytest
import torch
from mpi4py import MPI
from test_loop import BATCH, STEPS, TOL, build_model, serial_reference, session

from mpi_helpers import ROOT, assert_all_ranks, run_mpi, shared_directory
from mpipar.comm.topology import ProcessGrid, node_order
from mpipar.data import synthetic
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.loop import train
from mpipar.tensor_parallel.strategy import split_mlp


def grid_for(size: int) -> tuple:
    """(stages, tp) for ``size`` ranks: 2 x 2 (times replicas) where 4 divides it, else one stage."""
    return (2, 2) if size % 4 == 0 else (1, size)


def shard_problems(strategy: PipelineStrategy, reference: torch.nn.Module, tp_rank: int) -> list:
    """Every parallel block this rank runs against its slice of the reference's linear layers."""
    linears = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    blocks = [m for m in strategy.model if hasattr(m, "fc1")]
    held = {id(m) for stage in strategy.pipe.stages.values() for m in stage.module}
    problems, compared = [], 0
    for block, (fc1, fc2) in zip(blocks, zip(linears[::2], linears[1::2])):
        if id(block) not in held:
            continue
        rows = slice(tp_rank * block.fc1.out_per_rank, (tp_rank + 1) * block.fc1.out_per_rank)
        columns = slice(tp_rank * block.fc2.in_per_rank, (tp_rank + 1) * block.fc2.in_per_rank)
        for mine, theirs in [(block.fc1.weight, fc1.weight[rows]), (block.fc1.bias, fc1.bias[rows]),
                             (block.fc2.weight, fc2.weight[:, columns]), (block.fc2.bias, fc2.bias)]:
            compared += 1
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, **TOL):
                difference = (mine - theirs).abs().max().item() if mine.shape == theirs.shape else "shape"
                problems.append(f"block {blocks.index(block)}: {tuple(mine.shape)}, difference {difference}")
    if not compared:
        problems.append("no block held on this rank")
    return problems


@pytest.mark.mpi
def test_tensor_parallel_stages_equal_the_loop_on_one_process(comm, mpi_tmp_path):
    size = comm.Get_size()
    stages, tp = grid_for(size)
    replicas = size // (stages * tp)
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference(directory, size)
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages, tp=tp)
    batch = BATCH * size // replicas
    run = session(comm, directory / "grid", batch, settings)
    strategy = PipelineStrategy(comm, build_model(), settings, batch_size=batch, state=run.state, say=run.say,
                                split_layers=split_mlp)
    tp_rank = strategy.grid.tp_rank
    stopped = train(run, strategy, synthetic(600, 100, seed=0))
    problems = (["stopped early"] if stopped else []) + shard_problems(strategy, reference, tp_rank)
    with h5py.File(directory / "grid" / "metrics.h5", "r") as f:
        samples, tp_attr = f["steps/samples"][...].tolist(), int(f.attrs["tp"])
    if samples != [BATCH * size] * STEPS or tp_attr != tp:
        problems.append(f"metrics: samples per step {samples}, tp {tp_attr}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


def grid_problems(comm, grid: ProcessGrid, stages: int, tp: int) -> list:
    """The sub-communicators against the grid's coordinates: the rank at logical position
    ``(replica * stages + stage) * tp + t`` of ``grid.order`` has those coordinates."""
    rank, order = comm.Get_rank(), grid.order
    position = (grid.replica * stages + grid.stage) * tp + grid.tp_rank
    base = (grid.replica * stages + grid.stage) * tp
    expected = {"position": rank,
                "tp": [order[base + t] for t in range(tp)],
                "pipeline": [order[(grid.replica * stages + s) * tp + grid.tp_rank] for s in range(stages)],
                "data": [order[(r * stages + grid.stage) * tp + grid.tp_rank] for r in range(grid.replicas)],
                "coordinates": (grid.replica, grid.stage, grid.tp_rank)}
    found = {"position": order[position], "tp": grid.tp_comm.allgather(rank),
             "pipeline": grid.pipeline_comm.allgather(rank), "data": grid.data_comm.allgather(rank),
             "coordinates": tuple(grid.coordinates()[rank])}
    return [f"{key}: {found[key]} instead of {expected[key]}" for key in expected if found[key] != expected[key]]


@pytest.mark.mpi
def test_grid_coordinates_and_groups(comm):
    """On one node the logical order is the rank order: rank (replica * stages + stage) * tp + t."""
    stages, tp = grid_for(comm.Get_size())
    with ProcessGrid(comm, stages, tp=tp) as grid:
        problems = grid_problems(comm, grid, stages, tp)
        if grid.order != list(range(comm.Get_size())) and len(set(grid.nodes)) == 1:
            problems.append(f"one node, yet the order is {grid.order}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


def test_node_order_groups_ranks_node_by_node():
    assert node_order([0, 0, 1, 1]) == [0, 1, 2, 3]                 # block placement: unchanged
    assert node_order([0, 1, 0, 1]) == [0, 2, 1, 3]                 # mpirun --map-by node: regrouped
    assert node_order([0, 1, 2, 0, 1, 2]) == [0, 3, 1, 4, 2, 5]
    assert node_order([1, 0, 0, 1]) == [1, 2, 0, 3]


@pytest.mark.mpi
def test_tensor_parallel_groups_stay_inside_a_node(comm):
    """On the real nodes (COMM_TYPE_SHARED): with as many ranks on every node, a multiple of the
    group size, each tensor-parallel group shares one node, whatever the placement (across
    emulated nodes, tests/test_multinode.py runs this file under mpirun --map-by node too)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    per_node, node_leader = node.Get_size(), node.bcast(comm.Get_rank(), root=0)
    node.Free()
    sizes = set(comm.allgather(per_node))
    tp = per_node if len(sizes) == 1 else 1
    with ProcessGrid(comm, 1, tp=tp) as grid:
        leaders = grid.tp_comm.allgather(node_leader)
        problems = grid_problems(comm, grid, 1, tp)
        if len(set(leaders)) != 1 or grid.spans()["tp"]:
            problems.append(f"tensor-parallel group of {tp} spans nodes with leaders {leaders}; order {grid.order}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
def test_round_robin_nodes_keep_tensor_parallel_groups_inside_a_node(comm):
    """Ranks dealt to nodes round robin (as ``--map-by node`` does): the grid regroups them so that
    tensor-parallel groups (and, where they fit, pipelines) stay inside a node and replicas cross nodes."""
    size = comm.Get_size()
    nodes = [rank % 2 for rank in range(size)]
    per_node = [nodes.count(node) for node in (0, 1)]
    tp = per_node[1] if per_node[0] == per_node[1] else 1  # a node's ranks form one group when they can
    stages = 1
    with ProcessGrid(comm, stages, tp=tp, nodes=nodes) as grid:
        problems = grid_problems(comm, grid, stages, tp)
        members = grid.tp_comm.allgather(comm.Get_rank())
        if len({nodes[rank] for rank in members}) != 1:
            problems.append(f"tensor-parallel group {members} spans nodes {[nodes[r] for r in members]}")
        spans = grid.spans()
        if spans["tp"] != 0 or (grid.replicas > 1 and tp > 1 and spans["data"] != grid.tp):
            problems.append(f"spans {spans}")
        attrs = grid.metrics_attrs()
        if len(json.loads(attrs["grid_coordinates"])) != size or "node 1" not in grid.describe():
            problems.append(f"attrs {attrs}, description {grid.describe()}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_a_grid_that_does_not_divide_the_world_is_refused_on_every_rank(comm):
    size = comm.Get_size()
    with pytest.raises(ValueError, match=rf"2 stages x {size + 1} tensor-parallel ranks do not divide the {size}"):
        ProcessGrid(comm, 2, tp=size + 1)


@pytest.mark.mpi(min_size=2)
def test_tp_stages_refuse_auto_balance_on_every_rank(comm):
    settings = PipelineConfig(microbatches=1, stages=1, tp=comm.Get_size(), balance="auto")
    with pytest.raises(ValueError, match="--balance auto profiles the layers on one rank"):
        PipelineStrategy(comm, build_model(), settings, batch_size=4, split_layers=split_mlp)


@pytest.mark.launch
@pytest.mark.skipif(MPI.COMM_WORLD.Get_size() > 1, reason="launches its own 8 ranks")
def test_eight_ranks_data_x_pipeline_x_tensor_parallel():
    """2 replicas x 2 stages x 2 tensor-parallel ranks, on 8 processes, against one process."""
    result = run_mpi(8, "-m", "pytest", "--only-mpi", "-q", "-p", "no:cacheprovider", "-x",
                     str(ROOT / "tests" / "test_tp_grid.py"), "-k", "equal_the_loop or coordinates", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.mpi(min_size=2)
def test_pipeline_busy_leaves_out_the_tensor_parallel_allreduces(comm):
    """The busy time the pipeline's bubble is measured from is the stages' compute without their blocking
    tensor-parallel Allreduces (those are waits), as the step's compute time is."""
    stages, tp = grid_for(comm.Get_size())
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages, tp=tp)
    batch = BATCH * 2
    strategy = PipelineStrategy(comm, build_model(), settings, batch_size=batch, say=lambda _: None,
                                split_layers=split_mlp)
    data = synthetic(600, 100, seed=0).train
    problems = []
    for step in range(2):
        record = strategy.train_step(data.batch(list(range(step * batch, (step + 1) * batch))))
        busy = record.extra["pipeline_busy"]
        if not record.wait_time > 0 or busy != record.compute_time:
            problems.append(f"step {step}: pipeline busy {busy}, compute {record.compute_time}, "
                            f"waits {record.wait_time}")
    strategy.grid.free()
    assert_all_ranks(comm, not problems, "; ".join(problems))
