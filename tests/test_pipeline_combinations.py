"""The new schedules (interleaved 1F1B, zero-bubble, zbv) with the other pipeline features: each combination trains
like one process, or is refused at start on every rank.

Recompute (``full``, ``selective``): bitwise the run without it, and float64 at 1e-10 against the unsplit model.
bf16 autocast: a one-process autocast run within its rounding; ``--precision bf16|fp16`` through the loop within
``test_precision``'s tolerances. ``--zero 1`` on a 2-stage x 2-replica grid: one process (float64, 1e-9).
``--grad-wire bf16`` on replicas: the 1F1B run with the same wire (the 16-bit rounding is the wire's, checked by
its own tests). ``--compress``: pipelines refuse it. Skips across stages and tensor-parallel stages are in
``tests/test_pipeline_schedules.py``. Run at several sizes:
``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_combinations.py``.
"""


import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from test_pipeline_precision import autocast_problems, stage_parameters
from test_pipeline_schedules import awkward_pipeline, microbatches_for, train_against_reference
from test_precision import LOOP_BATCH, TOLERANCE, loop_mlp, loop_run, serial_loop
from test_recompute import differences, tiny_gpt, token_batch, vector_batch
from torch import nn

from mpi_helpers import assert_all_ranks, loop_session, shared_directory
from mpipar.diagnostics.failure import AgreedError
from mpipar.pipeline import Pipeline, Placement
from mpipar.run.recompute import apply_recompute

torch.set_num_threads(1)
STEPS = 3
NEW = ["interleaved", "zero-bubble", "zbv"]
# (schedule, chunks per rank): zero-bubble also on Megatron's looped placement; zbv two in a V
LAYOUTS = [("interleaved", 2), ("zero-bubble", 1), ("zero-bubble", 2), ("zbv", 2)]


def chunk_placement(schedule: str, layers: int, size: int, chunks: int) -> Placement:
    """The schedule's placement of ``chunks`` per rank: zbv's V, else Megatron's looped chunks."""
    return Placement.v_shape(layers, size) if schedule == "zbv" else Placement.interleaved(layers, size, chunks)


def dropout_blocks() -> nn.Sequential:
    """Eight blocks (up to 2 chunks on each of 4 ranks) with BatchNorm, dropout and a frozen bias."""
    torch.manual_seed(0)
    widths = [(5, 8)] + [(8, 8)] * 6 + [(8, 3)]
    model = nn.Sequential(*[nn.Sequential(nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.25),
                                          nn.Linear(16, n_out)) for n_in, n_out in widths]).double()
    model[1][0].bias.requires_grad_(False)
    return model


def recompute_run(comm, schedule: str, chunks: int, mode: str):
    """STEPS SGD steps of ``dropout_blocks`` (``mode``: none, full) or ``tiny_gpt`` (selective): losses, this
    rank's state, gradients and each stage's (saved bytes, recompute bytes)."""
    size = comm.Get_size()
    gpt = mode in ("selective", "plain-gpt")
    model = tiny_gpt() if gpt else dropout_blocks()
    microbatches = microbatches_for(size) if schedule == "interleaved" else 4
    if schedule == "zbv" and len(model) < 2 * size:
        pytest.skip(f"{len(model)} layers have no V of {2 * size} chunks")
    pipe = Pipeline(model, comm, chunk_placement(schedule, len(model), size, chunks) if len(model) >= size * chunks
                    else Placement.even(len(model), size), schedule=schedule, microbatches=microbatches,
                    loss_fn=F.cross_entropy)
    for stage in pipe.stages.values():
        if mode == "full":
            stage.recompute = True
        elif mode == "selective":
            apply_recompute(stage.module, mode, strict=False)
    optimizer = torch.optim.SGD([p for p in pipe.parameters() if p.requires_grad] or [torch.zeros(0)], lr=0.1,
                                momentum=0.9)
    torch.manual_seed(7)
    losses, grads = [], {}
    for number in range(STEPS):
        optimizer.zero_grad()
        inputs, targets = (token_batch if gpt else vector_batch)(number, 0, batch=2 * microbatches)
        losses.append(pipe.step(inputs, targets).loss)
        grads.update({f"{number}.{i}": p.grad.clone() for i, p in enumerate(pipe.parameters()) if p.grad is not None})
        optimizer.step()
    state = {f"{index}.{k}": v.clone() for index, stage in pipe.stages.items()
             for k, v in stage.module.state_dict().items()}
    memory = {index: (stage.saved_bytes, stage.recompute_bytes) for index, stage in pipe.stages.items()}
    return losses, {**state, **grads}, memory


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule,chunks", LAYOUTS)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_with_the_new_schedules_is_bitwise_the_run_without(schedule, chunks, mode):
    """Losses, gradients, parameters and BatchNorm statistics after 3 steps (dropout drawn again in the
    recompute) equal the run without recompute bitwise; under ``full`` a recompute saves what a micro-batch
    saved without it, and a micro-batch in flight keeps less (zero-bubble: from F to its I)."""
    comm = MPI.COMM_WORLD
    straight = recompute_run(comm, schedule, chunks, "none" if mode == "full" else "plain-gpt")
    recomputed = recompute_run(comm, schedule, chunks, mode)
    problems = [] if straight[0] == recomputed[0] else [f"losses {straight[0]} != {recomputed[0]}"]
    problems += [f"differ: {name}" for name in differences(straight[1], recomputed[1])]
    if straight[1].keys() != recomputed[1].keys():
        problems.append("gradients present differ")
    if mode == "full":
        for index, (saved, _) in straight[2].items():
            kept, again = recomputed[2][index]
            if again != saved or not kept < saved:
                problems.append(f"stage {index}: saved {saved} without; kept {kept}, recompute {again}")
    assert_all_ranks(comm, not problems, f"{schedule} x{chunks} {mode}: {problems}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule,chunks", LAYOUTS)
def test_recompute_with_the_new_schedules_equals_the_unsplit_model(schedule, chunks):
    """Frozen, unused and tied parameters, ``full`` recompute, 3 SGD steps: float64, 1e-10 against one process."""
    comm = MPI.COMM_WORLD
    model, reference, pipe = awkward_pipeline(comm, chunk_placement(schedule, 12, comm.Get_size(), chunks), schedule)
    for stage in pipe.stages.values():
        stage.recompute = True
    train_against_reference(comm, pipe, model, reference, f"{schedule} recompute", STEPS)


# -- autocast --------------------------------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", NEW)
def test_bf16_new_schedules_equal_one_process_autocast(schedule):
    """4 stages on 2 ranks (interleaved: 2 chunks each; zero-bubble too; zbv in a V, its stages 1 and 2 on rank 1
    handing over in memory in bf16 too) under bf16 autocast, 2 steps: loss and every gradient within 1e-6 of a
    one-process autocast run over the same micro-batches, activations in bf16."""
    world = MPI.COMM_WORLD
    placement = Placement.v_shape(9, 2) if schedule == "zbv" else Placement((0, 0, 1, 1, 0, 0, 1, 1, 1))
    problems = autocast_problems(world, 2, placement, schedule)  # stages 0 2 | 1 3 (zbv: 0 3 | 1 2)
    assert_all_ranks(world, not problems, "; ".join(problems))


def schedule_settings(schedule: str, stages: int, **more):
    from mpipar.pipeline.config import PipelineConfig

    return PipelineConfig(schedule=schedule, microbatches=stages if schedule == "interleaved" else 2,
                          stages=stages, virtual_stages=2 if schedule == "interleaved" else 1, **more)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", NEW)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_loop_under_autocast_with_the_new_schedules_equals_one_process(comm, mpi_tmp_path, schedule,
                                                                            precision):
    """``--precision bf16|fp16`` (fp16: the loop's loss scaling) with 2 stages (replicated at 4 ranks): the
    parameters after 3 steps within the precision's tolerance of the one-process loop on the whole batch."""
    from mpipar.data import synthetic
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train

    size = comm.Get_size()
    stages = 2 if size % 2 == 0 else size
    if schedule in ("interleaved", "zbv") and stages == 3:
        pytest.skip("the loop's 5-layer MLP has no 3 x 2 chunks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, precision)
    settings = schedule_settings(schedule, stages)
    batch_size = LOOP_BATCH * stages
    run = loop_run(comm, directory / "pp", batch_size, precision, settings)
    strategy = PipelineStrategy(comm, loop_mlp(), settings, batch_size=batch_size, state=run.state, say=run.say)
    train(run, strategy, synthetic(600, 100, seed=0))
    theirs = dict(reference.named_parameters())
    problems = [f"{name}: {(p - theirs[name]).abs().max():.2e}" for name, p in stage_parameters(strategy.pipe).items()
                if not torch.allclose(p, theirs[name], rtol=0, atol=TOLERANCE[precision])]
    assert_all_ranks(comm, not problems, "; ".join(problems))


# -- replicas: ZeRO-1, the 16-bit wire, compression ------------------------------------------------------------


def grid_run(comm, directory, schedule: str, *, zero: int = 0, grad_wire: str = "fp32", placement=None):
    """The loop with 2 stages x (size / 2) replicas, AdamW, 4 steps: the model, this rank's layers, the
    placement (``placement``: a rank per layer, else the schedule's own)."""
    from test_loop import BATCH, build_model

    from mpipar.data import synthetic
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train

    settings = schedule_settings(schedule, 2, zero=zero, placement=placement)
    batch_size = 2 * BATCH  # per pipeline; the global batch is 2 BATCH x replicas
    run = loop_session(comm, directory, batch_size, settings, max_steps=4, flush_every=2, checkpoint_every=2,
                       optimizer="adamw", weight_decay=0.01, grad_wire=grad_wire)
    model = build_model()
    strategy = PipelineStrategy(comm, model, settings, batch_size=batch_size, state=run.state, say=run.say,
                                grad_wire=grad_wire)
    train(run, strategy, synthetic(600, 100, seed=0))
    mine = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == strategy.grid.stage]
    return model, mine, strategy.placement.ranks


def layer_differences(model, reference, layers, tolerance) -> list:
    return [f"layer {layer} {name}: {(found - expected).abs().max().item():.2e}" for layer in layers
            for (name, found), expected in zip(model[layer].named_parameters(), reference[layer].parameters())
            if not torch.allclose(found, expected, **tolerance)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", NEW)
def test_zero1_grid_with_the_new_schedules_equals_one_process(comm, mpi_tmp_path, schedule):
    """``--zero 1`` on 2 stages x 2 replicas (4 ranks; 2 stages x 1 at 2-3): each stage's AdamW state sharded
    over its replicas; 4 steps equal the loop on one process over the global batch (float64, 1e-9)."""
    from test_zero_grid import TOL, serial_reference_adamw

    size = comm.Get_size()
    ranks = 4 if size >= 4 else 2
    directory = shared_directory(comm, mpi_tmp_path)
    group = comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED)
    problems = []
    if group != MPI.COMM_NULL:
        from test_loop import BATCH

        reference = serial_reference_adamw(directory, 2 * BATCH * (ranks // 2), 4)
        model, mine, _ = grid_run(group, directory / "zero", schedule, zero=1)
        problems = layer_differences(model, reference, mine, TOL)
        group.Free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("schedule", NEW)
def test_bf16_wire_on_replicas_with_the_new_schedules_equals_1f1b(comm, mpi_tmp_path, schedule):
    """``--grad-wire bf16`` on 2 stages x 2 replicas: the new schedule's run equals 1F1B's on the same placement
    with the same wire (float64, 1e-9: the schedules differ only in the order of float64 sums, which the wire's
    rounding to bf16 does not see)."""
    group = comm.Split(0 if comm.Get_rank() < 4 else MPI.UNDEFINED)
    directory = shared_directory(comm, mpi_tmp_path)
    problems = []
    if group != MPI.COMM_NULL:
        model, mine, placement = grid_run(group, directory / "new", schedule, grad_wire="bf16")
        baseline, _, _ = grid_run(group, directory / "1f1b", "1f1b", grad_wire="bf16", placement=placement)
        problems = layer_differences(model, baseline, mine, dict(rtol=1e-9, atol=1e-12))
        group.Free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", NEW)
def test_compress_with_a_pipeline_is_refused_on_every_rank(comm, mpi_tmp_path, schedule):
    """``--compress powersgd:2`` with a pipeline (replicas or not): one error on every rank before the first
    step, naming what takes it."""
    from test_loop import build_model

    from mpipar.data import synthetic
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train

    settings = schedule_settings(schedule, 2 if comm.Get_size() % 2 == 0 else comm.Get_size())
    run = loop_session(comm, shared_directory(comm, mpi_tmp_path) / "c", 12, settings, max_steps=2,
                       compress="powersgd:2")
    strategy = PipelineStrategy(comm, build_model(), settings, batch_size=12, state=run.state, say=run.say)
    with pytest.raises(AgreedError, match="cannot take --compress powersgd:2"):
        train(run, strategy, synthetic(600, 100, seed=0))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", NEW)
def test_the_loop_binds_recompute_with_the_new_schedules_bitwise(comm, mpi_tmp_path, schedule):
    """``--recompute full`` through the loop (``PipelineStrategy.bind_recompute``), 2 stages (replicated at 4
    ranks), 3 steps: this rank's parameters equal the run without recompute bitwise."""
    from test_loop import BATCH, build_model

    from mpipar.data import synthetic
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train

    stages = 2 if comm.Get_size() % 2 == 0 else comm.Get_size()
    if schedule in ("interleaved", "zbv") and stages == 3:
        pytest.skip("the loop's model has no 3 x 2 chunks")
    directory = shared_directory(comm, mpi_tmp_path)
    settings = schedule_settings(schedule, stages)
    models = {}
    for mode in ("none", "full"):
        run = loop_session(comm, directory / mode, BATCH * stages, settings, max_steps=STEPS, recompute=mode)
        model = build_model()
        strategy = PipelineStrategy(comm, model, settings, batch_size=BATCH * stages, state=run.state, say=run.say)
        train(run, strategy, synthetic(600, 100, seed=0))
        recomputing = all(stage.recompute for stage in strategy.pipe.stages.values())
        models[mode] = ({name: p.detach().clone() for name, p in stage_parameters(strategy.pipe).items()},
                        recomputing)
    problems = differences(models["none"][0], models["full"][0])
    if models["none"][1] or not models["full"][1]:
        problems.append(f"recompute bound: none {models['none'][1]}, full {models['full'][1]}")
    assert_all_ranks(comm, not problems, f"{schedule}: {problems}")
