"""Activation recompute (``--recompute``) trains bitwise as without it: data parallelism (both checkpoint
kinds), pipeline stages (flushing and asynchronous schedules), tensor parallelism with split-region dropout;
and refuses what it cannot do on every rank.

Run at several sizes: ``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_recompute.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_helpers import assert_all_ranks, assert_comm_still_usable, loop_session, shared_directory
from mpipar.models.gpt import gpt
from mpipar.models.vit import VisionTransformer
from mpipar.run.recompute import apply_recompute, recompute_units, remove_recompute

torch.set_num_threads(1)
STEPS = 3
SEQ = 8


def dropout_mlp() -> nn.Sequential:
    """An MLP with BatchNorm (buffers a recompute must not update twice), dropout (masks it must draw
    again) and a frozen layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 16),
                          nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model[4].weight.requires_grad_(False)
    return model


def tied_mlp() -> nn.Sequential:
    """Two entries share a weight: each is its own checkpointed unit under ``full``."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3)).double()
    model[4].weight = model[2].weight
    return model


def wide_blocks() -> nn.Sequential:
    """Four blocks (a pipeline of up to 4 stages takes whole blocks) that widen 4 times inside, with
    BatchNorm, dropout and a frozen bias: a stage's activations are much larger than its input."""
    torch.manual_seed(0)
    widths = [(5, 16), (16, 16), (16, 16), (16, 3)]
    model = nn.Sequential(*[nn.Sequential(nn.Linear(n_in, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Dropout(0.25),
                                          nn.Linear(64, n_out)) for n_in, n_out in widths]).double()
    model[1][0].bias.requires_grad_(False)
    return model


def tiny_gpt() -> nn.Sequential:
    torch.manual_seed(1)
    return gpt(width=16, layers=2, heads=4, seq_len=SEQ, hidden=32).double()


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(2)
    return VisionTransformer(1, 3, 8, patch_size=4, dim=8, depth=2, heads=2, hidden=16).double()


def vector_batch(step: int, rank: int, batch: int = 6):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(batch, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (batch,),
                                                                                         generator=generator)


def token_batch(step: int, rank: int, batch: int = 4):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    tokens = torch.randint(0, 256, (batch, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def image_batch(step: int, rank: int, batch: int = 4):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(batch, 1, 8, 8, generator=generator, dtype=torch.float64), torch.randint(0, 3, (batch,),
                                                                                               generator=generator)


MODELS = {"mlp": (dropout_mlp, vector_batch), "tied": (tied_mlp, vector_batch), "gpt": (tiny_gpt, token_batch),
          "vit": (tiny_vit, image_batch)}


def differences(first: dict, second: dict) -> list:
    return [name for name in first if not torch.equal(first[name], second[name])]


# -- which units ---------------------------------------------------------------------------------------


def test_units_are_blocks_entries_or_attention_cores_and_names_do_not_change():
    gpt_model, mlp = tiny_gpt(), dropout_mlp()
    names = list(gpt_model.state_dict())
    assert [type(u).__name__ for u in recompute_units(gpt_model, "full")] == ["TransformerBlock"] * 2
    assert [type(u).__name__ for u in recompute_units(gpt_model, "selective")] == ["MultiheadAttention"] * 2
    assert recompute_units(mlp, "full") == list(mlp) and recompute_units(mlp, "none") == []
    assert len(recompute_units(tiny_vit(), "full")) == 2
    apply_recompute(gpt_model, "full")
    assert list(gpt_model.state_dict()) == names
    remove_recompute(gpt_model)
    assert all("forward" not in module.__dict__ for module in gpt_model.modules())
    with pytest.raises(ValueError, match="selective recomputes the attention core.*has no attention"):
        recompute_units(mlp, "selective")
    with pytest.raises(ValueError, match="neither"):
        recompute_units(nn.Linear(2, 2), "full")
    with pytest.raises(ValueError, match="--recompute must be one of none, full, selective, got 'some'"):
        recompute_units(mlp, "some")
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares a parameter with 2 outside it.*non-reentrant"):
        apply_recompute(tied, "full", reentrant=True)
    apply_recompute(tied, "full")  # the non-reentrant kind accumulates it once


class GatedBlock(nn.Module):
    """A unit (``recompute_unit``) with a keyword input."""

    recompute_unit = "block"

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3).double()

    def forward(self, x, *, gate):
        return self.linear(x) * gate


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_keyword_inputs_reach_the_unit_and_their_gradients_come_back(reentrant):
    """A keyword input is passed to the recompute too; one needing a gradient gets it bitwise (non-reentrant)
    or is refused with the way out (reentrant, which passes only positional inputs' gradients)."""
    def run(recompute):
        torch.manual_seed(0)
        model = nn.Sequential(GatedBlock())
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        gate = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
        if recompute:
            apply_recompute(model, "full", reentrant=reentrant)
        model[0](x, gate=gate).square().sum().backward()
        return [x.grad, gate.grad, model[0].linear.weight.grad]

    if reentrant:
        with pytest.raises(TypeError, match="keyword input that needs a gradient.*pass it positionally"):
            run(True)
        return
    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_under_bf16_autocast_is_bitwise(mode, reentrant):
    """``--precision bf16`` with recompute: the recompute runs under the forward's autocast state, so two
    steps of a GPT end with the parameters of the run without recompute, bitwise."""
    def run(recompute):
        model = tiny_gpt().float()
        if recompute:
            apply_recompute(model, mode, reentrant=reentrant)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            optimizer.zero_grad()
            tokens, targets = token_batch(step, 0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                F.cross_entropy(model(tokens).float(), targets).backward()
            optimizer.step()
        return model.state_dict()

    assert not differences(run(False), run(True))


# -- data parallelism ------------------------------------------------------------------------------------


def data_parallel_run(comm, kind: str, mode: str, reentrant: bool):
    """STEPS steps of DataParallelStrategy with ``--recompute mode``: the losses, the state (parameters and
    buffers) and the last gradients."""
    from mpipar.data_parallel.strategy import DataParallelStrategy

    build, batches = MODELS[kind]
    strategy = DataParallelStrategy(build(), comm, reentrant_recompute=reentrant, bucket_mb=0.001)
    if mode != "none":
        strategy.bind_recompute(mode)
    optimizer = torch.optim.SGD([p for p in strategy.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    torch.manual_seed(7)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        losses.append(strategy.train_step(batches(step, comm.Get_rank())).loss)
        optimizer.step()
    grads = {name: p.grad.clone() for name, p in strategy.model.named_parameters() if p.grad is not None}
    return losses, {k: v.clone() for k, v in strategy.model.state_dict().items()}, grads


@pytest.mark.mpi
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("kind, mode", [("mlp", "full"), ("tied", "full"), ("gpt", "full"), ("gpt", "selective"),
                                        ("vit", "full"), ("vit", "selective")])
def test_data_parallel_recompute_is_bitwise_the_run_without(comm, kind, mode, reentrant):
    """Losses, parameters, buffers and gradients after 3 steps (small buckets: many launched during the
    backward, inside the recompute's nested backward for the reentrant kind) equal the run without
    recompute bitwise. A weight tied across two units is reduced once (non-reentrant: one accumulation) or
    refused up front (reentrant: it would be accumulated in two nested backwards)."""
    if kind == "tied" and reentrant:
        with pytest.raises(ValueError, match="shares a parameter"):
            data_parallel_run(comm, kind, mode, reentrant)
        assert_comm_still_usable(comm)
        return
    straight = data_parallel_run(comm, kind, "none", False)
    recomputed = data_parallel_run(comm, kind, mode, reentrant)
    problems = []
    if straight[0] != recomputed[0]:
        problems.append(f"losses {straight[0]} != {recomputed[0]}")
    problems += [f"state {name}" for name in differences(straight[1], recomputed[1])]
    problems += [f"grad {name}" for name in differences(straight[2], recomputed[2])]
    if straight[2].keys() != recomputed[2].keys():
        problems.append(f"gradients of {sorted(straight[2])} vs {sorted(recomputed[2])}")
    assert_all_ranks(comm, not problems, f"{kind} {mode}: {problems}")


@pytest.mark.mpi
def test_the_loop_binds_recompute_and_trains_bitwise(comm, mpi_tmp_path):
    """``--recompute full`` through the loop (TrainConfig, agreed check, bind, announce) gives the
    parameters and metrics of the run without it, and is stored as a free setting."""
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    models = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.25),
                              nn.Linear(16, 10))
        run = loop_session(comm, directory / mode, 8, max_steps=STEPS, recompute=mode)
        strategy = DataParallelStrategy(model, comm)
        train(run, strategy, synthetic(200, 50, seed=0))
        models[mode] = {k: v.clone() for k, v in model.state_dict().items()}
        recomputed = [u for u in model.modules() if "forward" in u.__dict__]
        assert_all_ranks(comm, bool(recomputed) == (mode == "full"), f"{mode}: {len(recomputed)} units checkpointed")
    different = differences(models["none"], models["full"])
    assert_all_ranks(comm, not different, f"differ: {different}")


# -- pipelines -------------------------------------------------------------------------------------------


def pipeline_run(comm, schedule: str, recompute: bool, microbatches: int = 4):
    """STEPS steps of a Pipeline over ``comm`` (every rank a stage), the stages recomputing or not: the
    losses, this rank's parameters and buffers, the stages' saved and recompute bytes and the step's
    activation bytes."""
    from mpipar.pipeline import Pipeline, Placement
    from mpipar.pipeline.schedule import ASYNC_SCHEDULES

    model = wide_blocks()
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule=schedule,
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    for stage in pipe.stages.values():
        stage.recompute = recompute
    optimizer = torch.optim.SGD([p for p in pipe.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    asynchronous = schedule in ASYNC_SCHEDULES
    if asynchronous:
        pipe.bind_optimizer(optimizer)
    torch.manual_seed(7)
    losses, activation_bytes = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        result = pipe.step(*vector_batch(step, 0, batch=4 * microbatches))
        losses.append(result.loss)
        activation_bytes.append(result.activation_bytes)
        if not asynchronous:
            optimizer.step()
    if asynchronous:
        pipe.drain()
    state = {f"{index}.{k}": v.clone() for index, stage in pipe.stages.items()
             for k, v in stage.module.state_dict().items()}
    memory = {index: (stage.saved_bytes, stage.recompute_bytes, stage.peak_in_flight)
              for index, stage in pipe.stages.items()}
    return losses, state, memory, activation_bytes


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_pipeline_stage_recompute_is_bitwise_and_keeps_one_microbatch(comm, schedule):
    """Each stage's forward per micro-batch recomputed in its backward: losses, parameters and buffers
    after 3 steps equal the run without recompute bitwise. Memory, measured by autograd's saved-tensor
    hooks: a recompute saves what one micro-batch saved without recompute; a micro-batch in flight keeps
    only its input, so the stashed activations fall from one micro-batch's per micro-batch in flight
    (4 under GPipe) to about one."""
    straight = pipeline_run(comm, schedule, False)
    recomputed = pipeline_run(comm, schedule, True)
    problems = []
    if straight[0] != recomputed[0] and not all(a != a and b != b for a, b in zip(straight[0], recomputed[0])):
        problems.append(f"losses {straight[0]} != {recomputed[0]}")
    problems += [f"state {name}" for name in differences(straight[1], recomputed[1])]
    for index, (saved, _, in_flight) in straight[2].items():
        kept, recompute_bytes, recomputed_in_flight = recomputed[2][index]
        if recompute_bytes != saved or in_flight != recomputed_in_flight or not kept < saved:
            problems.append(f"stage {index}: saved {saved} x {in_flight} in flight without recompute; kept {kept} "
                            f"x {recomputed_in_flight}, recompute {recompute_bytes}")
    one_microbatch = sum(saved for saved, _, _ in straight[2].values())
    if schedule == "gpipe" and not (straight[3][-1] == 4 * one_microbatch and recomputed[3][-1] < 2 * one_microbatch):
        problems.append(f"activation bytes {straight[3][-1]} without recompute, {recomputed[3][-1]} with; one "
                        f"micro-batch saves {one_microbatch}")
    assert_all_ranks(comm, not problems, f"{schedule}: {problems}")


@pytest.mark.mpi
def test_pipeline_strategy_binds_full_and_selective(comm):
    """PipelineStrategy: ``full`` recomputes every local stage; ``selective`` checkpoints the attention of
    the blocks on this rank's stages (none on a stage without attention); a model without attention is
    refused for ``selective``."""
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy

    size = comm.Get_size()
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=size)
    strategy = PipelineStrategy(comm, tiny_gpt(), settings, batch_size=4, say=lambda _: None)
    strategy.bind_recompute("full")
    full = all(stage.recompute for stage in strategy.pipe.stages.values())
    strategy.bind_recompute("selective")
    attention = [m for stage in strategy.pipe.stages.values() for m in stage.module.modules()
                 if isinstance(m, nn.MultiheadAttention) and "forward" in m.__dict__]
    every = comm.allreduce(len(attention))
    strategy.grid.free()
    mlp = PipelineStrategy(comm, dropout_mlp(), settings, batch_size=4, say=lambda _: None)
    with pytest.raises(ValueError, match="no attention"):
        mlp.bind_recompute("selective")
    mlp.grid.free()
    assert_all_ranks(comm, full and every == 2, f"full on every stage {full}; {every} attention modules checkpointed")


# -- tensor parallelism ----------------------------------------------------------------------------------


def dropout_blocks(comm, rng):
    """Two ParallelTransformerBlocks whose attention drops probabilities (split regions: each rank its own
    mask from ``rng``) and an ``nn.Dropout`` between them (replicated: the same mask on every rank)."""
    from mpipar.tensor_parallel.attention import ParallelTransformerBlock

    torch.manual_seed(3)
    heads = 2 * comm.Get_size()
    blocks = []
    for _ in range(2):
        width = 4 * heads
        attention = nn.MultiheadAttention(width, heads, dropout=0.3, batch_first=True).double()
        blocks += [ParallelTransformerBlock(attention, nn.Linear(width, 2 * width).double(),
                                            nn.Linear(2 * width, width).double(), nn.LayerNorm(width).double(),
                                            nn.LayerNorm(width).double(), comm, rng=rng), nn.Dropout(0.2)]
    return nn.Sequential(*blocks)


def tensor_parallel_blocks_run(comm, mode: str, reentrant: bool):
    from mpipar.tensor_parallel.random import TensorParallelRNG

    rng = TensorParallelRNG(comm, 11)
    model = dropout_blocks(comm, rng)
    if mode != "none":
        apply_recompute(model, mode, reentrant=reentrant, replay=rng.recomputable)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(5)
    width = 8 * comm.Get_size()
    for step in range(STEPS):
        x = torch.randn(2, 5, width, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x.requires_grad_()).square().mean().backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, rng.state_dict()["cpu"]


@pytest.mark.mpi
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_tensor_parallel_blocks_with_dropout_recompute_bitwise(comm, mode, reentrant):
    """Blocks split over the group, dropout inside the split attention and between blocks: with their
    split-stream draws replayed (``rng.recomputable``) and their Allreduces repeated in the backward,
    every rank's shards after 3 steps equal the run without recompute bitwise, and the split stream ends
    where it does without recompute."""
    straight, straight_stream = tensor_parallel_blocks_run(comm, "none", False)
    recomputed, recomputed_stream = tensor_parallel_blocks_run(comm, mode, reentrant)
    problems = [f"state {name}" for name in differences(straight, recomputed)]
    if not torch.equal(straight_stream, recomputed_stream):
        problems.append("the split stream moved on differently")
    assert_all_ranks(comm, not problems, f"{mode}: {problems}")


def tensor_parallel_strategy_run(comm, mode: str, tp: int):
    from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

    strategy = TensorParallelStrategy(comm, tiny_gpt(), TensorParallelConfig(tp=tp), seed=0)
    if mode != "none":
        strategy.bind_recompute(mode)
    optimizer = torch.optim.SGD(strategy.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        losses.append(strategy.train_step(token_batch(step, strategy.replica)).loss)
        optimizer.step()
    state = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    strategy.grid.free()
    return losses, state


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_tensor_parallel_strategy_recompute_is_bitwise(comm, mode):
    """TensorParallelStrategy on a GPT (groups of 2 ranks where the size allows, replicated over the rest)
    with ``bind_recompute``: losses and shards after 3 steps equal the run without recompute bitwise."""
    tp = 2 if comm.Get_size() % 2 == 0 else 1
    straight = tensor_parallel_strategy_run(comm, "none", tp)
    recomputed = tensor_parallel_strategy_run(comm, mode, tp)
    problems = [f"state {name}" for name in differences(straight[1], recomputed[1])]
    if straight[0] != recomputed[0]:
        problems.append(f"losses {straight[0]} != {recomputed[0]}")
    assert_all_ranks(comm, not problems, f"tp {tp} {mode}: {problems}")


@pytest.mark.mpi(min_size=2)
def test_tensor_parallel_recompute_repeats_the_forward_allreduces(comm):
    """Bytes a rank sends in one step of a GPT split over all ranks (one group, no replicas to reduce): a
    block's 2 forward and 2 backward Allreduces without recompute; ``full`` repeats forward ones in the
    backward (the reentrant kind both,
    the non-reentrant one those before its last saved tensor: torch stops a recompute there, on every rank
    alike); ``selective`` recomputes the attention core, which communicates nothing."""
    from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

    tp = comm.Get_size()
    if tp not in (2, 4):
        pytest.skip("the GPT's 4 heads split over 2 or 4 ranks")
    sent = {}
    for mode, reentrant in (("none", False), ("full", False), ("full", True), ("selective", False)):
        strategy = TensorParallelStrategy(comm, tiny_gpt(), TensorParallelConfig(tp=tp), seed=0)
        apply_recompute(strategy.model, mode, replay=strategy.rng.recomputable, reentrant=reentrant)
        sent[mode, reentrant] = strategy.train_step(token_batch(0, strategy.replica)).bytes_sent
        strategy.grid.free()
    plain = sent["none", False]
    ok = (sent["full", True] == 1.5 * plain and plain < sent["full", False] < 1.5 * plain
          and sent["selective", False] == plain)
    assert_all_ranks(comm, ok, f"tensor-parallel bytes sent: {sent}")


# -- the job ---------------------------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("kind, mode", [("data_parallel", "selective"), ("tp2", "full"), ("stages2", "full"),
                                        ("stages2", "selective")])
def test_the_gpt_job_takes_the_flag_in_each_strategy(comm, mpi_tmp_path, kind, mode):
    """jobs/gpt_lm.py's strategies through the loop with ``recompute=mode`` (the flag's TrainConfig field):
    every parameter this rank holds equals the run without recompute bitwise."""
    from test_gpt_lm import run_job

    from mpipar.pipeline.config import PipelineConfig
    from mpipar.tensor_parallel.strategy import TensorParallelConfig

    group = {"data_parallel": 1, "tp2": 2, "stages2": 2}[kind]
    if comm.Get_size() % group:
        pytest.skip(f"{kind} needs a multiple of {group} ranks")
    settings = {"data_parallel": None, "tp2": TensorParallelConfig(tp=2),
                "stages2": PipelineConfig(schedule="1f1b", microbatches=2, stages=2)}[kind]
    directory = shared_directory(comm, mpi_tmp_path)
    _, straight = run_job(comm, directory / "none", settings)
    _, recomputed = run_job(comm, directory / mode, settings, recompute=mode)
    different = [name for name in straight if not torch.equal(straight[name], recomputed[name])]
    assert_all_ranks(comm, bool(straight) and straight.keys() == recomputed.keys() and not different,
                     f"{kind} {mode}: {different}")


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.mpi
def test_recompute_a_strategy_cannot_do_is_refused_on_every_rank(comm, mpi_tmp_path):
    """Local SGD takes no recompute, an MLP has no attention for ``selective``: one AgreedError on every
    rank from the loop, before the first step, and the communicator still works."""
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.diagnostics.failure import AgreedError
    from mpipar.local_sgd.config import LocalSGDConfig
    from mpipar.local_sgd.strategy import LocalSGDStrategy
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    run = loop_session(comm, directory / "local_sgd", 8, max_steps=1, recompute="full")
    with pytest.raises(AgreedError, match=r"local_sgd cannot train with --recompute full \(it takes none\)"):
        train(run, LocalSGDStrategy(model, comm, LocalSGDConfig()), synthetic(100, 20, seed=0))
    run.watchdog.stop()
    run = loop_session(comm, directory / "selective", 8, max_steps=1, recompute="selective")
    with pytest.raises(AgreedError, match="selective recomputes the attention core"):
        train(run, DataParallelStrategy(model, comm), synthetic(100, 20, seed=0))
    run.watchdog.stop()
    assert_comm_still_usable(comm)


def test_flag_reaches_the_config_and_is_a_free_setting():
    from mpipar.run.checkpoint import FREE_SETTINGS
    from mpipar.run.cli import train_config, training_parser
    from mpipar.run.config import TrainConfig

    parser = training_parser("doc", out="runs/x", batch_help="per rank")
    config = train_config(parser.parse_args(["--recompute", "selective"]), threads=1, model="mlp")
    assert config.recompute == "selective" and config.to_dict()["recompute"] == "selective"
    assert "recompute" not in train_config(parser.parse_args([]), threads=1, model="mlp").to_dict()
    assert "recompute" in FREE_SETTINGS
    with pytest.raises(ValueError, match="--recompute must be one of none, full, selective"):
        TrainConfig(recompute="all")
    with pytest.raises(SystemExit):
        parser.parse_args(["--recompute", "all"])


def test_every_strategy_declares_what_it_recomputes():
    """The strategies that recompute bind it; the others take only ``none`` (the loop refuses the rest)."""
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.local_sgd.strategy import LocalSGDStrategy
    from mpipar.parameter_server.strategy import ParameterServerStrategy
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.sharded.strategy import ShardedStrategy
    from mpipar.tensor_parallel.strategy import TensorParallelStrategy

    for takes in (DataParallelStrategy, PipelineStrategy, TensorParallelStrategy):
        assert takes.recomputes == ("none", "full", "selective") and hasattr(takes, "bind_recompute")
    for refuses in (LocalSGDStrategy, ParameterServerStrategy, ShardedStrategy):
        assert getattr(refuses, "recomputes", ("none",)) == ("none",)
