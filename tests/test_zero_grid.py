"""ZeRO-1 on the grids (docs/sharded.md, Grids): a pipeline's and a tensor-parallel split's optimizer state sharded
over the replicas. In-process, float64: the grid with --zero 1 equals the same grid with --zero 0 (SGD with
momentum, AdamW; every tensor this rank holds, 1e-12), a resume on the same grid equals the straight run, a
pipeline resumed on another number of replicas re-shards and equals one process, and what cannot compose is
refused on every rank at start."""

import json

import h5py
import pytest
import torch
from mpi4py import MPI
from test_loop import BATCH, build_model, build_vit

from mpi_helpers import ROOT, assert_all_ranks, loop_session, run_mpi, shared_directory
from mpipar.data import synthetic
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import AgreedError
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.consolidate import find_checkpoint, read_rank
from mpipar.run.consolidate import main as consolidate_main
from mpipar.run.launch import StopRequest
from mpipar.run.loop import train
from mpipar.sharded.consolidate import grid_optimizer
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

STEPS = 4
EXACT = dict(rtol=0.0, atol=1e-12)  # the same averaged gradients, the same elementwise update
TOL = dict(rtol=1e-9, atol=1e-12)  # against one process: only the order of the sums differs


def grid(kind: str, size: int, zero: int):
    """(settings, samples per pipeline or group, replicas): 2 stages or 2 tensor-parallel ranks where the
    ranks are even (2 x size/2), else one stage or no split over every rank (size replicas)."""
    pair = 2 if size % 2 == 0 else 1
    replicas = size // pair
    if kind == "pipeline":
        return PipelineConfig(schedule="1f1b", microbatches=2, stages=pair, zero=zero), BATCH * pair, replicas
    return TensorParallelConfig(tp=pair, zero=zero), BATCH * pair, replicas


def build(kind, comm, settings, batch, run):
    model = build_vit() if kind == "vit" else build_model()
    if kind == "pipeline":
        model[3][0].bias.requires_grad_(False)  # a frozen parameter: neither sharded nor stepped
        return PipelineStrategy(comm, model, settings, batch_size=batch, state=run.state,
                                checkpoint=run.resumed_from, say=run.say)
    return TensorParallelStrategy(comm, model, settings, state=run.state)


def held(kind, strategy) -> dict:
    module = strategy.pipe.local_module if kind == "pipeline" else strategy.model
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def run_grid(comm, out, kind, zero, optimizer, steps=STEPS, stop_at_flush=False, resume=False):
    settings, batch, _ = grid(kind, comm.Get_size(), zero)
    run = loop_session(comm, out, batch, settings, resume=resume, max_steps=steps, flush_every=2,
                       checkpoint_every=2, optimizer=optimizer, momentum=0.9, weight_decay=0.01)
    if stop_at_flush:
        run.stop = StopRequest()
        run.stop.signal_name = "SIGUSR1"  # stop and save at the first flush (step 2)
    strategy = build(kind, comm, settings, batch, run)
    train(run, strategy, synthetic(600, 100, seed=0))
    return strategy, run


def own_file(comm, run) -> dict:
    """This rank's file of the run's latest checkpoint."""
    checkpoint = find_checkpoint(run)
    return read_rank(checkpoint, json.loads((checkpoint / "meta.json").read_text()), comm.Get_rank())


def compare(found: dict, expected: dict, tolerance: dict, what: str) -> list:
    if list(found) != list(expected):
        return [f"{what}: tensors {list(found)} instead of {list(expected)}"]
    return [f"{what} {name}: max difference {(found[name] - value).abs().max().item():.2e}"
            for name, value in expected.items() if not torch.allclose(found[name], value, **tolerance)]


@pytest.mark.mpi
@pytest.mark.parametrize("kind,optimizer,zero", [
    ("pipeline", "sgd", 1), ("pipeline", "adamw", 1), ("tensor", "sgd", 1), ("tensor", "adamw", 1), ("vit", "adamw", 1),
    ("tensor", "sgd", 2), ("vit", "adamw", 2)])
def test_zero_on_a_grid_equals_the_grid_without_it(comm, mpi_tmp_path, kind, optimizer, zero):
    """Pipeline 2 stages x size/2 replicas (1 stage x 3 at 3 ranks) or tensor parallelism 2 x size/2 (an MLP,
    or a vision transformer: split heads, replicated norms, head and position embedding on the root):
    every tensor this rank holds after 4 steps, --zero 1 (or 2: the gradients reduce-scattered, summed in
    another order: 1e-9) against --zero 0; this rank's optimizer state is its shard's (smaller with replicas),
    and merged from every file it is the unsharded one."""
    directory = shared_directory(comm, mpi_tmp_path)
    plain, _ = run_grid(comm, directory / "plain", kind, 0, optimizer)
    sharded, _ = run_grid(comm, directory / "zero", kind, zero, optimizer)
    problems = compare(held(kind, sharded), held(kind, plain), EXACT if zero == 1 else TOL, "parameter")
    replicas = grid(kind, comm.Get_size(), 1)[2]
    position = (sharded.grid.stage, sharded.grid.tp_rank)  # the replicas of this position share its state
    files = [own_file(comm, directory / run) for run in ("plain", "zero")]
    elements = [sum(v.numel() for s in state["optimizer"]["state"].values() for v in s.values() if v.dim() >= 1)
                for state in files]
    together = sum(shard for where, (_, shard) in comm.allgather((position, elements)) if where == position)
    if together != elements[0] or (replicas > 1 and not 0 < elements[1] < elements[0]):
        problems.append(f"optimizer state: {elements[1]} elements here, {together} over the {replicas} replicas, "
                        f"{elements[0]} per replica without --zero")
    if kind == "pipeline":  # the files' pieces put together: each parameter's whole state, as --zero 0 holds it
        consolidated = []
        for run in ("plain", "zero"):  # mpipar-consolidate: the whole model and each parameter's optimizer state
            output = directory / f"{run}-model-{comm.Get_rank()}.pt"
            consolidate_main([str(directory / run), "-o", str(output)])
            consolidated.append(torch.load(output, weights_only=True))
        problems += compare(consolidated[1]["model"], consolidated[0]["model"], EXACT, "consolidated")
        merged = consolidated[1]["optimizer_by_name"]
        if merged.keys() != grid_optimizer(directory / "zero").keys():
            problems.append("mpipar-consolidate's optimizer state is not the files' pieces put together")
        for index, (name, param) in enumerate(zip(plain.parameter_names, plain.parameters())):
            for key, value in files[0]["optimizer"]["state"].get(index, {}).items():
                if value.dim() >= 1 and not torch.allclose(merged[name][key], value.reshape(-1), **EXACT):
                    problems.append(f"merged optimizer state {name} {key} differs")
            if not param.requires_grad and name in merged:
                problems.append(f"frozen {name} has optimizer state")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("kind,zero", [("pipeline", 1), ("tensor", 1), ("tensor", 2)])
def test_zero_grid_resumed_on_the_same_grid_equals_the_straight_run(comm, mpi_tmp_path, kind, zero):
    """Stopped at step 2 (each rank's file: its pieces' AdamW state and their layout), resumed on the
    same grid: after 4 steps every tensor equals the run that never stopped."""
    directory = shared_directory(comm, mpi_tmp_path)
    straight, _ = run_grid(comm, directory / "straight", kind, zero, "adamw")
    run_grid(comm, directory / "stopped", kind, zero, "adamw", stop_at_flush=True)
    resumed, run = run_grid(comm, directory / "stopped", kind, zero, "adamw", resume=True)
    problems = compare(held(kind, resumed), held(kind, straight), EXACT, "parameter")
    if run.state is None or run.state["step"] != 2 or "zero_shard" not in run.state:
        problems.append("did not resume at step 2 from a file with the shard layout")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("before,after", [((4, 2), (2, 2)), ((2, 2), (4, 2)), ((4, 2), (3, 1))])
def test_zero1_pipeline_resumed_on_another_number_of_replicas_equals_one_process(comm, mpi_tmp_path, before,
                                                                                 after):
    """(ranks, stages) before and after: a --zero 1 pipeline stopped at step 2 and resumed on another number of
    replicas (and stages) puts each parameter's optimizer state together from every rank's pieces and cuts it
    into the new ones; the global batch is kept, so the run equals the loop on one process (AdamW, 8 steps)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if max(before[0], after[0]) > size:
        pytest.skip(f"needs {max(before[0], after[0])} ranks")
    steps = 8
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference_adamw(directory, 2 * BATCH, steps)
    out, problems = directory / "run", []
    for phase, (ranks, stages) in enumerate((before, after)):
        group = comm.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
        if group != MPI.COMM_NULL:
            settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages, zero=1)
            batch = 2 * BATCH // (before[0] // before[1])  # the global batch 2 BATCH, kept by the resume
            run = loop_session(group, out, batch, settings, resume=phase == 1, max_steps=steps, flush_every=2,
                               checkpoint_every=2, optimizer="adamw", weight_decay=0.01)
            if phase == 0:
                run.stop = StopRequest()
                run.stop.signal_name = "SIGUSR1"
            model = build_model()
            strategy = PipelineStrategy(group, model, settings, batch_size=batch, state=run.state,
                                        checkpoint=run.resumed_from, say=run.say)
            train(run, strategy, synthetic(600, 100, seed=0))
            if phase == 1:
                if run.state["step"] != 2:
                    problems.append(f"resumed at step {run.state['step']}")
                mine = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == strategy.grid.stage]
                for layer in mine:
                    for (name, found), expected in zip(model[layer].named_parameters(),
                                                       reference[layer].parameters()):
                        if not torch.allclose(found, expected, **TOL):
                            problems.append(f"layer {layer} {name}: {(found - expected).abs().max().item():.2e}")
            group.Free()
        comm.Barrier()
    assert_all_ranks(comm, not problems, "; ".join(problems))


def serial_reference_adamw(directory, batch, steps):
    """The loop on one process over the global batch ``batch``, AdamW (as the resumed runs)."""
    from mpipar.data_parallel.strategy import DataParallelStrategy

    model = build_model()
    run = loop_session(MPI.COMM_SELF, directory / f"serial-{MPI.COMM_WORLD.Get_rank()}", batch, max_steps=steps,
                       flush_every=2, checkpoint_every=2, optimizer="adamw", weight_decay=0.01)
    train(run, DataParallelStrategy(model, MPI.COMM_SELF), synthetic(600, 100, seed=0))
    return model


@pytest.mark.parametrize("make,named", [
    (lambda: PipelineConfig(stages=2, zero=2), "--zero 1"),
    (lambda: PipelineConfig(stages=2, zero=3), "--zero 0"),
    (lambda: PipelineConfig(schedule="pipedream", stages=2, microbatches=2, zero=1), "1f1b"),
    (lambda: TensorParallelConfig(tp=2, zero=3), "--tp 1"),
])
def test_combinations_that_do_not_compose_are_refused_naming_what_is_allowed(make, named):
    with pytest.raises(ValueError, match=named):
        make()


@pytest.mark.mpi
def test_a_refused_combination_is_one_error_on_every_rank(comm):
    """As a job builds its settings (``Session.from_args``): the refusal is raised on every rank together."""
    with pytest.raises(AgreedError, match="--zero 3"):
        collective_check(comm, lambda: PipelineConfig(stages=1, zero=3), "configuration")
    assert_all_ranks(comm, comm.allreduce(1) == comm.Get_size(), "the communicator after the refusal")


@pytest.mark.mpi
def test_tensor_parallel_checkpoint_resumed_with_another_zero_is_refused_on_every_rank(comm, mpi_tmp_path):
    """A --zero 0 tensor-parallel state given to a --zero 1 strategy (the loop's settings check aside): refused at
    construction on every rank, naming the flag."""
    settings, batch, _ = grid("tensor", comm.Get_size(), 1)
    state = {"model": {}, "grid_order": list(range(comm.Get_size()))}
    with pytest.raises(AgreedError, match="same --zero"):
        TensorParallelStrategy(comm, build_model(), settings, state=state)
    assert_all_ranks(comm, comm.allreduce(1) == comm.Get_size(), "the communicator after the refusal")


@pytest.mark.mpi
@pytest.mark.parametrize("split,zero", [(True, 1), (True, 2), (False, 2)])
def test_gpt_lm_with_zero_equals_it_without(comm, mpi_tmp_path, split, zero):
    """jobs/gpt_lm.py's strategies, in-process (a GPT whose head is tied to its embedding, AdamW): --zero 1 and 2
    on tensor parallelism (2 x size/2; no split at odd sizes) and --zero 2 without --tp (ShardedStrategy) equal
    the same layout with --zero 0, every tensor this rank holds after 3 steps."""
    from test_gpt_lm import BATCH as WINDOWS
    from test_gpt_lm import SEQ, job, tiny_gpt

    from mpipar.sharded import ShardedConfig

    gpt_lm = job()
    tp = 2 if comm.Get_size() % 2 == 0 else 1
    layouts = [TensorParallelConfig(tp=tp), TensorParallelConfig(tp=tp, zero=zero)] if split else \
        [None, ShardedConfig(zero)]
    directory = shared_directory(comm, mpi_tmp_path)
    trained = []
    for index, settings in enumerate(layouts):
        run = loop_session(comm, directory / f"gpt-{index}", WINDOWS, settings, max_steps=3, optimizer="adamw",
                           weight_decay=0.01)
        strategy = gpt_lm.build_strategy(comm, tiny_gpt(), run)
        train(run, strategy, gpt_lm.token_data(comm, "synthetic", SEQ, seed=0))
        trained.append({name: t.detach().clone() for name, t in strategy.model.state_dict().items()})
    problems = compare(trained[1], trained[0], EXACT if zero == 1 else TOL, "parameter")
    assert_all_ranks(comm, not problems, "; ".join(problems))


def test_gpt_lm_settings_route_zero_by_layout():
    """--zero 1-3 without --tp and --stages is ShardedStrategy's; with them, 0 or 1 (refused naming what is allowed)."""
    import argparse

    from test_gpt_lm import job

    from mpipar.sharded import ShardedConfig

    gpt_lm = job()

    def args(**flags):
        defaults = dict(stages=1, tp=1, zero=0, schedule="1f1b", microbatches=2, balance="even", grad_wire="fp32",
                        virtual_stages=1)
        return argparse.Namespace(**{**defaults, **flags})

    assert gpt_lm.settings_of(args(zero=3), 4) == ShardedConfig(3)
    assert gpt_lm.settings_of(args(tp=2, zero=1), 4) == TensorParallelConfig(tp=2, zero=1)
    assert gpt_lm.settings_of(args(stages=2, zero=1), 4).zero == 1
    assert gpt_lm.settings_of(args(), 4) is None
    with pytest.raises(ValueError, match="--tp 1"):
        gpt_lm.settings_of(args(tp=2, zero=3), 4)
    assert gpt_lm.settings_of(args(zero=2, grad_wire="bf16"), 4) == ShardedConfig(2)  # a 16-bit reduce-scatter


@pytest.mark.launch
def test_resnet_pp_with_zero1_on_two_stages_x_two_replicas(tmp_path):
    """The job end to end (a ResNet with BatchNorm, AdamW): each rank's AdamW state is half of what its stage's
    two moments take without sharding (two replicas), recorded per step and rank."""
    out = tmp_path / "run"
    result = run_mpi(4, str(ROOT / "jobs" / "resnet_pp.py"), "--data", "synthetic", "--batch-size", "16",
                     "--threads", "1", "--max-steps", "3", "--stages", "2", "--balance", "even", "--zero", "1",
                     "--optimizer", "adamw", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["zero"] == 1 and f.attrs["replicas"] == 2
        params, state = f["steps/param_bytes"][-1], f["steps/optimizer_bytes"][-1]
    assert (params > 0).all() and (state >= params).all() and (state < 1.05 * params).all(), (params, state)
