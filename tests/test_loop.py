"""The one training loop, run in-process: every strategy on N ranks equals the loop on one process on the
whole batch (parameters after several optimizer steps), and the loop's metrics and checkpoints are the same
shape for every strategy."""

import threading

import h5py
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import assert_all_ranks, float64_mlp, loop_session, shared_directory
from mpipar import models, registry
from mpipar.data import synthetic
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.config import TrainConfig
from mpipar.run.loop import train
from mpipar.run.session import Session
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

STEPS, BATCH = 3, 6  # BATCH: samples per rank (data parallel) or per rank of the pipeline's batch
RESUMED_STEPS = 8  # resume tests: stopped at step 2, then 6 steps with a learning rate that matters
SIZES = (784, 24, 16, 12, 10)  # float64 cast, Flatten + 4 layers: up to 6 stages
TOL = dict(rtol=1e-9, atol=1e-12)  # float64; only the order of the sums differs
LOOP_CASES = [case for spec in registry.specs() for case in spec.loop_cases]  # each strategy's, from its folder


def session(comm, out, batch_size, settings=None, steps=STEPS, resume=False):
    return loop_session(comm, out, batch_size, settings, resume=resume, max_steps=steps, flush_every=2,
                        checkpoint_every=2)


def build_model():
    return float64_mlp(SIZES, 7)


def serial_reference(directory, size, steps=STEPS):
    """The loop on one process (COMM_SELF) over the whole global batch of ``size`` ranks."""
    model = build_model()
    splits = synthetic(600, 100, seed=0)
    run = session(MPI.COMM_SELF, directory / f"serial-{MPI.COMM_WORLD.Get_rank()}", BATCH * size, steps=steps)
    train(run, DataParallelStrategy(model, MPI.COMM_SELF), splits)
    return model


@pytest.mark.mpi
@pytest.mark.parametrize("kind", LOOP_CASES)
def test_every_strategy_equals_the_loop_on_one_process(comm, mpi_tmp_path, kind):
    size, rank = comm.Get_size(), comm.Get_rank()
    if kind in ("hybrid", "tensor_x_data") and size % 2:
        pytest.skip("a grid of groups of 2 needs an even number of ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference(directory, size)

    model = build_model()
    splits = synthetic(600, 100, seed=0)
    if kind == "data_parallel":
        run = session(comm, directory / kind, BATCH)
        strategy = DataParallelStrategy(model, comm)
        held = range(len(model))
    elif kind.startswith("tensor"):
        settings = TensorParallelConfig(tp=size if kind == "tensor" else 2)
        replicas = size // settings.tp
        run = session(comm, directory / kind, BATCH * size // replicas, settings)
        strategy = TensorParallelStrategy(comm, model, settings, state=run.state)
        held = []  # the shards are compared below, gathered back into the unsplit layers
    else:
        assert kind in ("pipeline", "hybrid"), f"a registered loop case without its set-up here: {kind}"
        stages = size if kind == "pipeline" else 2
        settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages)
        replicas = size // stages
        run = session(comm, directory / kind, BATCH * size // replicas, settings)
        strategy = PipelineStrategy(comm, model, settings, batch_size=BATCH * size // replicas, state=run.state,
                                    say=run.say)
        held = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == rank % stages]
    stopped = train(run, strategy, splits)

    problems = [] if not stopped else ["stopped early"]
    if kind.startswith("tensor"):  # each shard against its slice of the unsplit layer
        position = rank % settings.tp
        blocks = [module for module in strategy.model if hasattr(module, "fc1")]
        linears = [module for module in reference.modules() if isinstance(module, torch.nn.Linear)]
        pairs = []
        for block, (fc1, fc2) in zip(blocks, zip(linears[::2], linears[1::2])):
            rows = slice(position * block.fc1.out_per_rank, (position + 1) * block.fc1.out_per_rank)
            columns = slice(position * block.fc2.in_per_rank, (position + 1) * block.fc2.in_per_rank)
            pairs += [(block.fc1.weight, fc1.weight[rows]), (block.fc1.bias, fc1.bias[rows]),
                      (block.fc2.weight, fc2.weight[:, columns]), (block.fc2.bias, fc2.bias)]
        for index, (mine, theirs) in enumerate(pairs):
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, **TOL):
                problems.append(f"shard {index}: {tuple(mine.shape)} vs {tuple(theirs.shape)}")
        if len(blocks) != 2:
            problems.append(f"{len(blocks)} tensor-parallel blocks, expected 2")
    for layer in held:
        for (name, mine), theirs in zip(model[layer].named_parameters(), reference[layer].parameters()):
            if not torch.allclose(mine, theirs, **TOL):
                problems.append(f"layer {layer} {name}: max difference {(mine - theirs).abs().max().item():.2e}")
    with h5py.File(directory / kind / "metrics.h5", "r") as f:  # rank 0 wrote it; every rank may read it
        shape, samples = f["steps/comm_time"].shape, f["steps/samples"][...].tolist()
        peak = f["steps/max_rss_bytes"][...] if "steps/max_rss_bytes" in f else None
    if shape != (STEPS, size) or samples != [BATCH * size] * STEPS:
        problems.append(f"metrics: per-rank shape {shape}, samples per step {samples}")
    if peak is None or peak.shape != (STEPS, size) or not (peak > 0).all() or (peak[1:] < peak[:-1]).any():
        problems.append(f"metrics: peak resident bytes per step and rank {peak}")  # > 0, never falling
    checkpoints = sorted(p.name for p in (directory / kind / "checkpoints").iterdir())
    if checkpoints != ["step-000000002", "step-000000003"]:
        problems.append(f"checkpoints {checkpoints}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("before,after", [(4, 2), (4, 3), (2, 4), (2, 1), (1, 3), (3, 2)])
def test_data_parallel_resumed_on_another_number_of_ranks_equals_one_process(comm, mpi_tmp_path, before, after):
    """Checkpoint on ``before`` ranks (a stop request at the first flush), resume on ``after``: the
    global batch is kept, so the run equals the loop on one process over the whole batch."""
    from mpipar.run.launch import StopRequest

    size, rank = comm.Get_size(), comm.Get_rank()
    if max(before, after) > size:
        pytest.skip(f"needs {max(before, after)} ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference(directory, before, RESUMED_STEPS)  # global batch BATCH * before
    model = build_model()
    splits = synthetic(600, 100, seed=0)
    out, stopped, resumed = directory / "run", None, None
    first = comm.Split(0 if rank < before else MPI.UNDEFINED, rank)
    if first != MPI.COMM_NULL:
        stop = StopRequest()
        stop.signal_name = "SIGUSR1"  # as if Slurm's warning came: stop and save at the first flush (step 2)
        run = session(first, out, BATCH, steps=RESUMED_STEPS)
        run.stop = stop
        stopped = train(run, DataParallelStrategy(model, first), splits)
        first.Free()
    comm.Barrier()
    second = comm.Split(0 if rank < after else MPI.UNDEFINED, rank)
    problems = []
    if second != MPI.COMM_NULL:
        model = build_model()
        run = session(second, out, BATCH, steps=RESUMED_STEPS, resume=True)
        resumed = run.state["step"]
        train(run, DataParallelStrategy(model, second), splits)
        second.Free()
        for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
            if not torch.allclose(mine, theirs, **TOL):
                problems.append(f"{name}: max difference {(mine - theirs).abs().max().item():.2e}")
        if resumed != 2:
            problems.append(f"resumed at step {resumed}")
    if rank < before and stopped is not True:
        problems.append("the first run did not stop at the stop request")
    if rank == 0:
        with h5py.File(out / "metrics.h5", "r") as f:
            sizes = f["steps/world_size"][...].tolist()
        if sizes != [before] * 2 + [after] * (RESUMED_STEPS - 2):
            problems.append(f"world sizes per step {sizes}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("before,after", [
    ((2, None), (1, None)),                        # 2 stages resumed as 1
    ((2, (0, 0, 0, 0, 1, 1)), (2, (0, 1, 1, 1, 1, 1))),  # another split on the same ranks
    ((3, None), (2, (1, 1, 0, 0, 1, 1))),                # fewer ranks, non-contiguous
    ((2, None), (4, None)),                        # more ranks
])
def test_pipeline_resumed_on_another_layout_equals_one_process(comm, mpi_tmp_path, before, after):
    """Checkpoint a pipeline on one layout (a stop request at the first flush), resume it on another:
    model and optimizer state are re-laid out by parameter name, and the run equals the loop on one
    process over the whole batch."""
    from mpipar.run.launch import StopRequest

    size, rank = comm.Get_size(), comm.Get_rank()
    if max(before[0], after[0]) > size:
        pytest.skip(f"needs {max(before[0], after[0])} ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference(directory, 2, RESUMED_STEPS)  # global batch 2 * BATCH: one pipeline's batch
    splits = synthetic(600, 100, seed=0)
    out, problems = directory / "run", []
    for phase, (ranks, placement) in enumerate((before, after)):
        group = comm.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
        if group != MPI.COMM_NULL:
            model = build_model()
            settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=ranks, placement=placement)
            run = session(group, out, 2 * BATCH, settings, steps=RESUMED_STEPS, resume=phase == 1)
            if phase == 0:
                run.stop = StopRequest()
                run.stop.signal_name = "SIGUSR1"  # stop and save at the first flush (step 2)
            strategy = PipelineStrategy(group, model, settings, batch_size=2 * BATCH, state=run.state,
                                        checkpoint=run.resumed_from, say=run.say)
            train(run, strategy, splits)
            if phase == 1:
                if run.state["step"] != 2:
                    problems.append(f"resumed at step {run.state['step']}")
                held = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == rank]
                for layer in held:
                    for (name, mine), theirs in zip(model[layer].named_parameters(), reference[layer].parameters()):
                        if not torch.allclose(mine, theirs, **TOL):
                            problems.append(f"layer {layer} {name}: {(mine - theirs).abs().max().item():.2e}")
            group.Free()
        comm.Barrier()
    assert_all_ranks(comm, not problems, "; ".join(problems))


def build_vit():
    """A float64 vision transformer whose heads (12) and hidden features (24) split over 1 to 4 ranks."""
    torch.manual_seed(7)
    return models.VisionTransformer(1, 10, 28, patch_size=7, dim=24, depth=2, heads=12, hidden=24).double()


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["tensor", "tensor_x_data"])
def test_vision_transformer_tensor_parallel_equals_the_loop_on_one_process(comm, mpi_tmp_path, kind):
    """The ViT with every block split (tp = world size; or tp 2 x data-parallel replicas on 4 ranks) through
    the loop equals the unsplit ViT through the loop on one process over the whole batch, after several
    optimizer steps: every tensor this rank holds against the same cut of the serial result (the
    loop frees the strategy's groups at its end, so the serial model is cut over a new group)."""
    from mpipar.comm.reducer import CommStats
    from mpipar.tensor_parallel.strategy import split_vit

    size, rank = comm.Get_size(), comm.Get_rank()
    if kind == "tensor_x_data" and (size % 2 or size < 4):
        pytest.skip("groups of 2 replicated needs an even number of ranks, at least 4")
    directory = shared_directory(comm, mpi_tmp_path)
    splits = synthetic(600, 100, seed=0)
    reference = build_vit()
    serial = session(MPI.COMM_SELF, directory / f"serial-vit-{rank}", BATCH * size)
    train(serial, DataParallelStrategy(reference, MPI.COMM_SELF), splits)

    settings = TensorParallelConfig(tp=size if kind == "tensor" else 2)
    replicas = size // settings.tp
    run = session(comm, directory / kind, BATCH * size // replicas, settings)
    strategy = TensorParallelStrategy(comm, build_vit(), settings, state=run.state)
    stopped = train(run, strategy, splits)
    group = comm.Split(rank // settings.tp, rank)
    expected = split_vit(reference, group, CommStats()).state_dict()
    group.Free()
    held = strategy.model.state_dict()
    problems = [] if not stopped else ["stopped early"]
    if list(held) != list(expected):
        problems.append(f"keys {list(held)}")
    problems += [f"{name}: max difference {(held[name] - value).abs().max().item():.2e}"
                 for name, value in expected.items()
                 if name in held and not torch.allclose(held[name], value, **TOL)]
    with h5py.File(directory / kind / "metrics.h5", "r") as f:
        shape, samples = f["steps/comm_time"].shape, f["steps/samples"][...].tolist()
        peak = f["steps/max_rss_bytes"][...] if "steps/max_rss_bytes" in f else None
    if shape != (STEPS, size) or samples != [BATCH * size] * STEPS:
        problems.append(f"metrics: per-rank shape {shape}, samples per step {samples}")
    if peak is None or peak.shape != (STEPS, size) or not (peak > 0).all() or (peak[1:] < peak[:-1]).any():
        problems.append(f"metrics: peak resident bytes per step and rank {peak}")  # > 0, never falling
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_async_pipeline_stopped_where_the_drain_makes_optimizer_state_resumes_bitwise(comm, mpi_tmp_path, schedule):
    """An asynchronous pipeline (one stage per rank) stopped after its first step: the checkpoint's drain
    applies the first update of the early stages, creating their momentum buffers, which the checkpoint
    must hold; the resumed run ends bitwise where the uninterrupted one does."""
    from mpipar.run.launch import StopRequest

    size, rank = comm.Get_size(), comm.Get_rank()
    directory = shared_directory(comm, mpi_tmp_path)
    splits = synthetic(600, 100, seed=0)
    settings = PipelineConfig(schedule=schedule, microbatches=4, stages=size)
    runs = {}
    for name, phases in (("straight", [False]), ("stopped", [False, True])):
        for resume in phases:
            config = TrainConfig(data="synthetic", epochs=1, max_steps=4, batch_size=8, lr=0.05, threads=1,
                                 out=str(directory / name), model="mlp", flush_every=1, log_every=0)
            run = Session(comm, config, settings=settings, resume=resume)
            if name == "stopped" and not resume:
                run.stop = StopRequest()
                run.stop.signal_name = "SIGUSR1"  # stop and save at the first flush (step 1)
            model = build_model()
            strategy = PipelineStrategy(comm, model, settings, batch_size=8, state=run.state, say=run.say)
            train(run, strategy, splits)
            runs[name] = model, strategy
    (straight, strategy), (resumed, _) = runs["straight"], runs["stopped"]
    held = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == rank]
    problems = [f"layer {layer} {name}: {(mine - theirs).abs().max().item():.2e}" for layer in held
                for (name, mine), theirs in zip(resumed[layer].named_parameters(), straight[layer].parameters())
                if not torch.equal(mine, theirs)]
    assert_all_ranks(comm, not problems, f"{schedule} on {size} ranks: " + "; ".join(problems))


class FailingOnStepTwo(DataParallelStrategy):
    """Data parallel whose second ``train_step`` raises."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def train_step(self, batch):
        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("step 2 fails")
        return super().train_step(batch)


def test_a_step_that_raises_leaves_no_prefetch_thread(tmp_path):
    """train() raises the step's error, and the epoch's reader (reading ahead in a thread) is closed."""
    from mpipar.data.prefetch import Prefetcher

    splits = synthetic(600, 100, seed=0)
    dataset = splits.train
    dataset.stream = lambda batches, epoch=None: Prefetcher(dataset, batches, epoch=epoch, depth=2)
    before = set(threading.enumerate())
    run = session(MPI.COMM_SELF, tmp_path, BATCH, steps=5)
    with pytest.raises(RuntimeError, match="step 2 fails"):
        train(run, FailingOnStepTwo(build_model(), MPI.COMM_SELF), splits)
    run.watchdog.stop()
    left = [thread.name for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert left == [], f"threads left running after train() raised: {left}"
