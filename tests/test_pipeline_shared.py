"""A parameter shared by several pipeline stages (a GPT's tied embedding and LM head) trains as in the
unsplit model: its gradient is summed over the stages that hold it, and its copies stay equal.

The main model is Hugging Face's GPT-2 (``transformers``; skipped where it is not installed), cut by
hand into embeddings, two blocks and final norm + head, as the issue reported it; a GPT-style model
built from torch.nn pieces ties its head the same way (one Parameter in two layers) and runs
everywhere. Run at 1, 2, 3 and 4 ranks.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.topology import ProcessGrid
from mpipar.diagnostics.failure import AgreedError
from mpipar.pipeline import Pipeline, Placement

TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the summation order differs
VOCAB, WIDTH, TOKENS, BATCH = 23, 8, 6, 8
torch.set_num_threads(1)


class GPT2Embeddings(nn.Module):
    """Token and position embeddings of a Hugging Face GPT-2 (its own modules)."""

    def __init__(self, gpt):
        super().__init__()
        self.wte, self.wpe = gpt.transformer.wte, gpt.transformer.wpe

    def forward(self, ids):
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class GPT2Block(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden):
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


class GPT2Head(nn.Module):
    """Final norm and the LM head, whose weight Hugging Face ties to the token embedding."""

    def __init__(self, gpt):
        super().__init__()
        self.ln_f, self.lm_head = gpt.transformer.ln_f, gpt.lm_head

    def forward(self, hidden):
        return self.lm_head(self.ln_f(hidden))


def hf_gpt2() -> nn.Sequential:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=WIDTH, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(config).double()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied, as every GPT-style model by default
    return nn.Sequential(GPT2Embeddings(gpt), *(GPT2Block(block) for block in gpt.transformer.h), GPT2Head(gpt))


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Parameter(0.1 * torch.randn(TOKENS, WIDTH))

    def forward(self, ids):
        return self.tokens(ids) + self.positions[:ids.shape[1]]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, hidden):
        return hidden + self.down(F.gelu(self.up(self.norm(hidden))))


class Head(nn.Module):
    def __init__(self, embedding: Embedding):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = embedding.tokens.weight  # tied, the way Hugging Face ties it

    def forward(self, hidden):
        return self.out(self.norm(hidden))


def torch_gpt() -> nn.Sequential:
    torch.manual_seed(0)
    embedding = Embedding()
    return nn.Sequential(embedding, Block(), Block(), Head(embedding)).double()


MODELS = {"hf_gpt2": hf_gpt2, "torch_gpt": torch_gpt}


def token_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_batch(step: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (batch, TOKENS + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def placements(size: int) -> dict:
    """Placements of the 4 layers that use every rank of ``size``: the tied ends on different ranks
    (``apart``, ``reversed``) or on one rank as two stages (``sandwich``)."""
    return {1: {"apart": (0, 0, 0, 0)},
            2: {"apart": (0, 0, 1, 1), "sandwich": (0, 1, 1, 0), "reversed": (1, 1, 0, 0)},
            3: {"apart": (0, 1, 1, 2), "sandwich": (0, 1, 2, 0), "reversed": (2, 1, 1, 0)},
            4: {"apart": (0, 1, 2, 3), "reversed": (3, 2, 1, 0)}}[size]


def gradient_problems(pipe, model, reference, what):
    """This rank's parameters against the reference's: gradients and values (every copy)."""
    problems = []
    local = {id(p) for p in pipe.parameters()}
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if id(param) not in local:
            continue
        if param.grad is None or not torch.allclose(param.grad, ref.grad, **TOL):
            error = float("nan") if param.grad is None else (param.grad - ref.grad).abs().max().item()
            problems.append(f"{what}: grad of {name} differs by {error:.2e}")
        if not torch.allclose(param, ref, **TOL):
            problems.append(f"{what}: {name} differs by {(param - ref).abs().max().item():.2e}")
    return problems


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("placement_name", ["apart", "sandwich", "reversed"])
def test_tied_gpt_pipeline_trains_as_the_unsplit_model(kind, schedule, placement_name, device):
    """Three SGD steps (momentum): loss, every gradient and every parameter (on each holder of the
    tied weight) equal the unsplit model's."""
    comm = MPI.COMM_WORLD
    placement = placements(comm.Get_size()).get(placement_name)
    if placement is None:
        pytest.skip(f"no {placement_name} placement on {comm.Get_size()} ranks")
    model = MODELS[kind]().to(device)
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, Placement(placement), schedule=schedule, microbatches=4, loss_fn=token_loss)
    params = list(pipe.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    problems = []
    for step in range(3):
        ids, targets = (tensor.to(device) for tensor in token_batch(step))
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        expected = token_loss(reference(ids), targets)
        expected.backward()
        result = pipe.step(ids if pipe.holds_first_stage else None, targets if pipe.holds_last_stage else None)
        if abs(result.loss - expected.item()) > 1e-12:
            problems.append(f"step {step}: loss {result.loss} vs {expected.item()}")
        problems += gradient_problems(pipe, model, reference, f"step {step}")
        optimizer.step()
        reference_optimizer.step()
    problems += gradient_problems(pipe, model, reference, "after 3 steps")
    assert_all_ranks(comm, not problems, f"{kind} {schedule} {placement}: {problems[:4]}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("placement_name", ["apart", "sandwich"])
def test_tied_gpt_pipelines_with_replicas_equal_one_process(stages, placement_name):
    """Pipelines replicated over the rest of the ranks, the replicas' gradients reduced during the
    last backward (one parameter per bucket): two steps equal one process on the global batch."""
    comm = MPI.COMM_WORLD
    if comm.Get_size() % stages:
        pytest.skip(f"{stages} stages do not divide {comm.Get_size()} ranks")
    placement = placements(stages).get(placement_name)
    if placement is None:
        pytest.skip(f"no {placement_name} placement of {stages} stages")
    grid = ProcessGrid(comm, stages)
    model = torch_gpt()
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, grid.pipeline_comm, Placement(placement), schedule="1f1b", microbatches=2,
                    loss_fn=token_loss)
    averager = ReplicaAverager(pipe.local_module, grid.data_comm, bucket_cap_mb=1e-6)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    share = BATCH // grid.replicas if BATCH % grid.replicas == 0 else 2
    global_batch = share * grid.replicas
    problems = []
    for step in range(2):
        ids, targets = token_batch(step, global_batch)
        mine = slice(grid.replica * share, (grid.replica + 1) * share)
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        averager.begin_step(num_samples=share)
        pipe.step(ids[mine], targets[mine], before_last_backward=averager.stage_finishing)
        averager.average()
        token_loss(reference(ids), targets).backward()
        problems += gradient_problems(pipe, model, reference, f"step {step}")
        optimizer.step()
        reference_optimizer.step()
    problems += gradient_problems(pipe, model, reference, "after 2 steps")
    grid.free()
    assert_all_ranks(comm, not problems, f"{stages} stages {placement}: {problems[:4]}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
@pytest.mark.parametrize("placement_name", ["apart", "sandwich"])
def test_asynchronous_schedule_refuses_a_weight_shared_across_stages(schedule, placement_name):
    """Asynchronous schedules update each stage on its own: a weight tied across two stages (on two
    ranks, or on one) is refused on every rank, naming it and its stages."""
    comm = MPI.COMM_WORLD
    placement = placements(comm.Get_size()).get(placement_name)
    if placement is None:
        pytest.skip(f"no {placement_name} placement on {comm.Get_size()} ranks")
    with pytest.raises(AgreedError) as error:
        Pipeline(torch_gpt(), comm, Placement(placement), schedule=schedule, microbatches=4, loss_fn=token_loss)
    message = str(error.value)
    last = len(Placement(placement).segments) - 1
    assert_all_ranks(comm, all(part in message for part in ("0.tokens.weight", "3.out.weight", f"stages 0 and {last}",
                                                              schedule)), message)


@pytest.mark.mpi(min_size=1)
def test_asynchronous_schedule_runs_a_weight_tied_within_one_stage():
    """The whole tied model as one stage (on COMM_SELF, every rank): 2BW builds and steps it."""
    model = torch_gpt()
    ids, targets = token_batch(0)
    expected = token_loss(model(ids), targets).item()  # the first batch runs on the initial weights
    pipe = Pipeline(model, MPI.COMM_SELF, (0, 0, 0, 0), schedule="2bw", microbatches=4, loss_fn=token_loss)
    pipe.bind_optimizer(torch.optim.SGD(pipe.parameters(), lr=0.1))
    result = pipe.step(ids, targets)
    pipe.drain()
    tied = model[0].tokens.weight is model[3].out.weight
    assert_all_ranks(MPI.COMM_WORLD, tied and abs(result.loss - expected) < 1e-12,
                     f"loss {result.loss} vs {expected}, tied {tied}")


# -- checkpoints: the loop, stopped and resumed; consolidation --------------------------------------------------

class ToFloat64(nn.Module):
    """The data's float32 images as float64, so the comparisons can be tight."""

    def forward(self, images):
        return images.double()


def tied_mlp() -> nn.Sequential:
    """An image MLP (6 layers) whose layers 3 and 4 share one weight matrix."""
    from mpipar import models

    torch.manual_seed(7)
    model = nn.Sequential(ToFloat64(), *models.mlp([784, 16, 16, 16, 10])).double()
    model[4][0].weight = model[3][0].weight
    return model


def loop_session(comm, out, settings=None, resume=False, batch_size=12, steps=6):
    from mpipar.run.config import TrainConfig
    from mpipar.run.session import Session

    config = TrainConfig(data="synthetic", epochs=1, max_steps=steps, batch_size=batch_size, lr=0.05, threads=1,
                         out=str(out), model="mlp", flush_every=2, log_every=0, checkpoint_every=2)
    return Session(comm, config, settings=settings, resume=resume)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("after", [(2, (0, 0, 0, 0, 1, 1)), (2, (0, 0, 0, 1, 1, 1))])
def test_tied_pipeline_checkpoint_resumes_and_consolidates(comm, mpi_tmp_path, after):
    """A pipeline with the tied weight on both ranks, stopped at step 2: its checkpoint consolidates to
    the unsplit model (strict load, one value under both names), and resumed on the same layout or with
    the tied layers in one stage (re-laid out by name), the run equals the loop on one process."""
    from pathlib import Path

    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.consolidate import model_state
    from mpipar.run.launch import StopRequest
    from mpipar.run.loop import train

    rank = comm.Get_rank()
    directory = Path(comm.bcast(str(mpi_tmp_path) if rank == 0 else None, root=0))
    splits = synthetic(600, 100, seed=0)
    reference = tied_mlp()
    train(loop_session(MPI.COMM_SELF, directory / f"serial-{rank}"), DataParallelStrategy(reference, MPI.COMM_SELF),
          splits)
    out, problems = directory / "run", []
    for phase, (ranks, placement) in enumerate(((2, (0, 0, 0, 0, 1, 1)), after)):
        group = comm.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
        if group != MPI.COMM_NULL:
            model = tied_mlp()
            settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=ranks, placement=placement)
            run = loop_session(group, out, settings, resume=phase == 1)
            if phase == 0:
                run.stop = StopRequest()
                run.stop.signal_name = "SIGUSR1"  # stop and save at the first flush (step 2)
            strategy = PipelineStrategy(group, model, settings, batch_size=12, state=run.state,
                                        checkpoint=run.resumed_from, say=lambda line: None)
            train(run, strategy, splits)
            if phase == 0 and rank == 0:
                merged, _ = model_state(out)
                unsplit = tied_mlp()
                unsplit.load_state_dict(merged)  # strict
                if not torch.equal(merged["3.0.weight"], merged["4.0.weight"]):
                    problems.append("the consolidated copies of the tied weight differ")
            if phase == 1:
                held = {id(p) for p in strategy.parameters()}
                for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
                    if id(mine) in held and not torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12):
                        problems.append(f"{name}: {(mine - theirs).abs().max().item():.2e}")
                if model[4][0].weight is not model[3][0].weight:
                    problems.append("the resumed model is no longer tied")
            group.Free()
        comm.Barrier()
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


def test_consolidation_takes_a_shared_parameter_once_from_its_first_stage(tmp_path):
    """Hand-written rank files of [0, 0, 1, 1] whose copies of the tied weight differ (as a run before the
    sum wrote them): both names get stage 0's copy."""
    import json

    from mpipar.run.consolidate import model_state

    step = tmp_path / "checkpoints" / "step-000000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "world_size": 2, "per_rank": True}))
    first, last = torch.ones(VOCAB, WIDTH), torch.zeros(VOCAB, WIDTH)
    shared = [["0.tokens.weight", "3.out.weight"]]
    for rank, model in enumerate([{"0.0.tokens.weight": first}, {"0.3.out.weight": last}]):
        torch.save({"model": model, "placement": [0, 0, 1, 1], "shared_parameters": shared, "step": 4},
                   step / f"rank-{rank}.pt")
    merged, _ = model_state(tmp_path)
    assert torch.equal(merged["0.tokens.weight"], first) and torch.equal(merged["3.out.weight"], first)
