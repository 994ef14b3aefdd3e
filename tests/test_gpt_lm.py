"""jobs/gpt_lm.py: the GPT language model through the one loop, data parallel, at --tp 2 and at --stages 2,
equal to the same model on one process (float64); its causal, tied model; its refusals; one launch."""

import importlib
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpi_helpers import ROOT, assert_all_ranks, assert_comm_still_usable, loop_session, run_mpi, shared_directory
from mpipar.diagnostics.agree import collective_check
from mpipar.models.gpt import gpt
from mpipar.pipeline.config import PipelineConfig
from mpipar.run.evaluate import evaluate
from mpipar.run.loop import train
from mpipar.tensor_parallel.strategy import TensorParallelConfig, full_state_dict

STEPS, BATCH, SEQ = 3, 4, 8  # BATCH: windows per data-parallel replica per step
TOL = dict(rtol=1e-9, atol=1e-12)  # float64; only the order of the sums differs
torch.set_num_threads(1)


def job():
    """jobs/gpt_lm.py as a module (its folder on the path, as when it runs), with less synthetic text."""
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        module = importlib.import_module("gpt_lm")
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    module.SYNTHETIC_TOKENS = (20_000, 2_000)  # train, validation bytes: 10 times more windows than 6 steps take
    return module


def tiny_gpt():
    torch.manual_seed(3)
    return gpt(width=16, layers=2, heads=4, seq_len=SEQ, hidden=32).double()


def run_job(comm, out, settings, *, resume=False, stop=None, **config):
    """The job's strategy for ``settings`` over ``comm``, trained by the loop (``STEPS`` steps unless
    ``config`` says otherwise) on ``BATCH`` windows of synthetic text per replica; returns (whether a
    stop ended it, :func:`trained_state` taken before the strategy frees its groups)."""
    gpt_lm = job()
    session = loop_session(comm, out, BATCH, settings, resume=resume, **{"max_steps": STEPS, **config})
    if stop is not None:
        session.stop = stop
    strategy = gpt_lm.build_strategy(comm, tiny_gpt(), session)
    state, finish = {}, strategy.finish

    def finish_after_taking_the_state(*args):
        state.update(trained_state(strategy, settings, comm))
        finish(*args)

    strategy.finish = finish_after_taking_the_state
    return train(session, strategy, gpt_lm.token_data(comm, "synthetic", SEQ, seed=0)), state


def validation_loss(out) -> float:
    with h5py.File(Path(out) / "metrics.h5", "r") as f:  # rank 0 wrote it; every rank may read it
        return float(f["epochs/test_loss"][-1])


def trained_state(strategy, settings, comm):
    """{name: tensor} of the unsplit model's parameters this rank can compare (all but a pipeline's
    other stages), gathered back from tensor-parallel shards. Collective over the strategy's groups."""
    if settings is None:
        return {name: p.detach() for name, p in strategy.model.named_parameters()}
    if isinstance(settings, TensorParallelConfig):
        return full_state_dict(strategy.model)
    stage = comm.Get_rank() % settings.stages
    state = {}
    for layer, owner in enumerate(strategy.placement.ranks):
        if owner == stage:
            state.update({f"{layer}.{name}": value for name, value in full_state_dict(strategy.model[layer]).items()})
    return state


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["data_parallel", "tp2", "stages2"])
def test_gpt_lm_equals_the_same_model_on_one_process(comm, mpi_tmp_path, kind):
    """3 SGD steps of the job's strategy on synthetic text: every parameter (tied embedding included)
    and the validation loss equal the loop on one process over the whole global batch."""
    size = comm.Get_size()
    group = {"data_parallel": 1, "tp2": 2, "stages2": 2}[kind]
    if size % group:
        pytest.skip(f"{kind} needs a multiple of {group} ranks")
    settings = {"data_parallel": None, "tp2": TensorParallelConfig(tp=2),
                "stages2": PipelineConfig(schedule="1f1b", microbatches=2, stages=2)}[kind]
    replicas = size // group
    directory = shared_directory(comm, mpi_tmp_path)
    stopped, state = run_job(comm, directory / kind, settings)
    loss = validation_loss(directory / kind)

    gpt_lm = job()
    reference_session = loop_session(MPI.COMM_SELF, directory / f"serial-{kind}-{comm.Get_rank()}", BATCH * replicas,
                                     max_steps=STEPS)
    reference_strategy = gpt_lm.build_strategy(MPI.COMM_SELF, tiny_gpt(), reference_session)
    train(reference_session, reference_strategy, gpt_lm.token_data(MPI.COMM_SELF, "synthetic", SEQ, seed=0))
    reference = dict(reference_strategy.model.named_parameters())
    with h5py.File(Path(reference_session.out) / "metrics.h5", "r") as f:
        reference_loss = float(f["epochs/test_loss"][-1])

    problems = ["stopped early"] if stopped else []
    problems += [f"{name}: " + (f"max difference {(value - reference[name]).abs().max().item():.2e}"
                               if value.shape == reference[name].shape else f"shape {tuple(value.shape)}")
                for name, value in state.items() if name in reference
                and (value.shape != reference[name].shape or not torch.allclose(value, reference[name], **TOL))]
    missing = sorted(set(reference) - set(state)) if settings is None or isinstance(settings, TensorParallelConfig) \
        else []
    if missing:
        problems.append(f"not compared: {missing}")
    if not math.isclose(loss, reference_loss, rel_tol=1e-9):
        problems.append(f"validation loss {loss!r}, one process {reference_loss!r}")
    assert_all_ranks(comm, not problems and bool(state), f"{kind}: " + "; ".join(problems))


def test_validation_loss_is_the_mean_over_tokens():
    """The evaluation of a language model counts each token: its loss is the mean next-token
    cross-entropy (not the sum over a window), its accuracy the share of tokens predicted."""
    model = tiny_gpt()
    windows = job().token_data(MPI.COMM_SELF, "synthetic", SEQ, seed=0).test
    result = evaluate(model, windows, MPI.COMM_SELF)
    with torch.no_grad():
        inputs, targets = windows.batch(range(len(windows)))
        logits = model(inputs)
        expected = F.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(1) == targets).double().mean().item()
    assert result.samples == targets.numel()
    assert math.isclose(result.loss, expected, rel_tol=1e-9), (result.loss, expected)
    assert math.isclose(result.accuracy, accuracy, rel_tol=1e-9), (result.accuracy, accuracy)


def test_the_gpt_is_causal_and_its_head_is_tied():
    model = tiny_gpt()
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    logits, other = model(ids), model(changed)
    assert logits.shape == (2, 256, SEQ)
    assert torch.equal(logits[:, :, :5], other[:, :, :5]), "a token sees a later one"
    assert not torch.allclose(logits[:, :, 5:], other[:, :, 5:])
    assert model[-1].weight is model[0].tokens.weight
    names = [name for name, p in model.named_parameters() if p is model[0].tokens.weight]
    assert names == ["0.tokens.weight"], names  # one parameter, counted once


@pytest.mark.mpi(min_size=2)
def test_refused_settings_are_one_error_on_every_rank(comm, mpi_tmp_path):
    size = comm.Get_size()
    gpt_lm = job()
    args = gpt_lm.parser(comm.Get_rank()).parse_args(["--width", "18", "--heads", "4"])
    with pytest.raises(ValueError, match=r"--heads 4 does not divide --width 18"):
        collective_check(comm, lambda: gpt(width=args.width, heads=args.heads), "the model's sizes")
    with pytest.raises(ValueError, match=rf"{size} tensor-parallel ranks cannot split this transformer's blocks"):
        session = loop_session(comm, shared_directory(comm, mpi_tmp_path) / "refused", BATCH,
                               TensorParallelConfig(tp=size))
        model = gpt(width=4 * (size + 1), layers=1, heads=size + 1, seq_len=SEQ, hidden=4 * size)
        gpt_lm.build_strategy(comm, model, session)
    assert_comm_still_usable(comm)


@pytest.mark.mpi(min_size=2)
def test_an_asynchronous_pipeline_refuses_the_tied_weight(comm, mpi_tmp_path):
    """pipedream updates each stage on its own: the embedding and the tied head on different stages
    would drift apart, so it is refused on every rank, naming the parameter."""
    settings = PipelineConfig(schedule="pipedream", microbatches=4, stages=comm.Get_size())
    session = loop_session(comm, shared_directory(comm, mpi_tmp_path) / "pipedream", BATCH, settings, max_steps=1)
    with pytest.raises(ValueError, match=r"0\.tokens\.weight = .*weight .*stages 0"):
        job().build_strategy(comm, tiny_gpt(), session)
    assert_comm_still_usable(comm)


@pytest.mark.launch
def test_gpt_lm_trains_on_a_text_file(tmp_path):
    """The README's quick start in small: mpipar-text2h5 on two stdlib sources, then 2 ranks, 4 steps."""
    import sysconfig

    from mpipar.data.text2h5 import text_to_h5

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokens = text_to_h5([stdlib / "this.py", stdlib / "bisect.py", stdlib / "colorsys.py"], tmp_path / "text.h5")
    result = run_mpi(2, str(ROOT / "jobs" / "gpt_lm.py"), "--data", str(tokens), "--max-steps", "4",
                     "--batch-size", "4", "--seq-len", "32", "--width", "32", "--layers", "2", "--out",
                     str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        assert f["steps/loss"].shape[0] == 4
        assert f.attrs["task"] == "language model"
        loss = f["epochs/test_loss"][-1]
    assert 0 < loss < math.log(256) + 1
    assert f"validation: {loss:.4f} nats per token = {loss / math.log(2):.4f} bits per byte" in result.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["data_parallel", "tp2", "stages2"])
def test_gpt_lm_stopped_and_resumed_is_the_straight_run(comm, mpi_tmp_path, kind):
    """Slurm's warning on the last rank stops the run at the next flush with a checkpoint (then the job
    requeues itself); resumed, it ends with the straight run's parameters and losses, bit for bit."""
    from mpipar.run.launch import StopRequest

    size = comm.Get_size()
    group = {"data_parallel": 1, "tp2": 2, "stages2": 2}[kind]
    if size % group:
        pytest.skip(f"{kind} needs a multiple of {group} ranks")
    settings = {"data_parallel": None, "tp2": TensorParallelConfig(tp=2),
                "stages2": PipelineConfig(schedule="1f1b", microbatches=2, stages=2)}[kind]
    directory = shared_directory(comm, mpi_tmp_path) / f"resume-{kind}"

    def run(out, **how):
        return run_job(comm, out, settings, max_steps=6, flush_every=2, **how)

    _, straight = run(directory / "straight")
    stop = StopRequest()
    if comm.Get_rank() == size - 1:
        stop.signal_name = "SIGUSR1"  # as if Slurm's warning came to this rank only
    stopped, _ = run(directory / "interrupted", stop=stop)
    _, resumed = run(directory / "interrupted", resume=True)
    with h5py.File(directory / "straight" / "metrics.h5", "r") as a, \
            h5py.File(directory / "interrupted" / "metrics.h5", "r") as b:
        losses = (a["steps/loss"][...].tolist(), b["steps/loss"][...].tolist(), a["epochs/test_loss"][...].tolist(),
                  b["epochs/test_loss"][...].tolist())
    problems = [] if stopped else ["the stop request did not stop the run"]
    problems += [f"{name} differs" for name in straight if not torch.equal(straight[name], resumed.get(name))]
    if sorted(straight) != sorted(resumed) or not straight:
        problems.append(f"parameters {sorted(straight)} vs {sorted(resumed)}")
    if losses[0] != losses[1] or losses[2] != losses[3]:
        problems.append(f"losses {losses}")
    assert_all_ranks(comm, not problems, f"{kind}: " + "; ".join(problems))


def test_the_report_plots_validation_loss_and_bits_per_byte(tmp_path, monkeypatch):
    from mpipar.report import plots
    from mpipar.report.reader import Run

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    run = Run(tmp_path / "metrics.h5", attrs={"task": "language model"},
              epochs={"epoch": np.array([1, 2]), "test_loss": np.array([2.0, 1.5]),
                      "test_accuracy": np.array([0.3, 0.4])})
    assert plots.accuracy_curve(run, tmp_path / "curve.png") == tmp_path / "curve.png"
    axes = drawn[0].axes
    assert axes[0].get_ylabel() == "validation loss (nats per token)"
    assert axes[0].lines[0].get_ydata().tolist() == [2.0, 1.5]
    assert [child.get_ylabel() for child in axes[0].child_axes] == ["bits per byte"]


@pytest.mark.mpi(min_size=2)
def test_auto_balance_profiles_the_gpt_on_rank_0(comm, mpi_tmp_path):
    """--stages 2 --balance auto: rank 0 profiles the layers on token windows and every rank gets the
    same 2-stage placement of the 4 layers, the tied ends on different stages."""
    if comm.Get_size() % 2:
        pytest.skip("2 stages need an even number of ranks")
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=2, balance="auto")
    session = loop_session(comm, shared_directory(comm, mpi_tmp_path) / "auto", BATCH, settings, max_steps=1)
    strategy = job().build_strategy(comm, tiny_gpt(), session)
    placement = list(strategy.placement.ranks)
    session.watchdog.stop()
    everywhere = comm.allgather(placement)
    assert_all_ranks(comm, all(p == everywhere[0] for p in everywhere) and len(placement) == 4
                     and placement[0] != placement[-1], f"placements {everywhere}")


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["data_parallel", "tp2", "stages2"])
def test_the_grad_wire_reaches_every_strategy_of_the_job(comm, mpi_tmp_path, monkeypatch, kind):
    """``--grad-wire bf16``: the job's strategy sums its (replicas') gradient buckets on the 16-bit wire."""
    import mpipar.comm.reducer as reducer

    size = comm.Get_size()
    group = {"data_parallel": 1, "tp2": 2, "stages2": 2}[kind]
    if size % group or size // group < 2:
        pytest.skip(f"{kind} needs 2 or more replicas of {group} ranks (one replica reduces nothing)")
    settings = {"data_parallel": None, "tp2": TensorParallelConfig(tp=2),
                "stages2": PipelineConfig(schedule="1f1b", microbatches=2, stages=2)}[kind]
    dtypes = []

    class Recorded(reducer.WireSum):
        def __init__(self, buffer, group_comm, wire):
            dtypes.append(wire)
            super().__init__(buffer, group_comm, wire)

    monkeypatch.setattr(reducer, "WireSum", Recorded)
    directory = shared_directory(comm, mpi_tmp_path)
    run_job(comm, directory / kind, settings, max_steps=1, grad_wire="bf16")
    assert_all_ranks(comm, bool(dtypes) and all(d == torch.bfloat16 for d in dtypes), f"{kind}: wires {dtypes}")
