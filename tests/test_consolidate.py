"""mpipar-consolidate: a checkpoint of any strategy becomes the unsplit model's state dict.

Each job below trains briefly, evaluates and checkpoints at the epoch end; the
consolidated model, evaluated on one process, must give the job's own final test
accuracy and loss. Tensor parallelism is also checked in-process on N ranks: the
consolidated checkpoint equals the live model's shards gathered back, and the unsplit
model loaded from it computes the split model's outputs.
"""

import json

import h5py
import pytest
import torch
from mpi4py import MPI

import mpi_helpers
from mpi_helpers import ROOT, assert_all_ranks, run_mpi, shared_directory
from mpipar import models
from mpipar.data import synthetic
from mpipar.data.datasets import resolve
from mpipar.run.config import TrainConfig
from mpipar.run.consolidate import main, model_state
from mpipar.run.evaluate import evaluate
from mpipar.run.loop import train
from mpipar.run.session import Session
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

TINY = ("--data", "synthetic", "--batch-size", "16", "--threads", "1", "--epochs", "1", "--max-steps", "6")


def MLP(in_channels, num_classes, image_size):  # jobs/mlp_mp.py's model
    return models.mlp([in_channels * image_size ** 2, 256, 128, 100, num_classes])


@pytest.mark.launch
@pytest.mark.parametrize("job,ranks,args,make", [
    ("resnet_dp.py", 2, (), models.resnet_small),
    ("mlp_mp.py", 2, (), MLP),  # fc1, fc4 on rank 0; fc2, fc3 on rank 1
    ("resnet_pp.py", 4, ("--stages", "2", "--microbatches", "2"), models.resnet_small_fine),  # BatchNorm, 2 replicas
    ("mlp_tp.py", 2, (), models.image_mlp),  # every layer split over 2 ranks (replicas: the MPI test below)
])
def test_consolidated_model_reproduces_the_jobs_test_accuracy(tmp_path, job, ranks, args, make):
    out = tmp_path / "run"
    result = run_mpi(ranks, str(ROOT / "jobs" / job), *TINY, "--out", str(out), *args, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert main([str(out)]) == 0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["step"] == 6 and saved["config"]["batch_size"] == 16
    data = resolve("synthetic", seed=saved["config"]["seed"])
    channels, size, _ = data.train.image_shape
    model = make(in_channels=channels, num_classes=max(data.train.num_classes, data.test.num_classes),
                 image_size=size)
    model.load_state_dict(saved["model"])  # strict: every tensor present, none left over
    accuracy_expected, loss_expected = read_last_epoch(out / "metrics.h5")
    got = evaluate(model, data.test, MPI.COMM_SELF)
    assert got.accuracy == pytest.approx(accuracy_expected, abs=1e-12)
    assert got.loss == pytest.approx(loss_expected, rel=1e-5)


def read_last_epoch(path):
    with h5py.File(path, "r") as f:
        return float(f["epochs/test_accuracy"][-1]), float(f["epochs/test_loss"][-1])


def test_missing_checkpoint_or_rank_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no complete checkpoint at" in capsys.readouterr().err
    step = tmp_path / "checkpoints" / "step-000000003"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 3, "world_size": 2, "per_rank": true}')
    torch.save({"model": {"0.1.weight": torch.ones(1)}, "placement": [0, 1], "step": 3, "config": {}},
               step / "rank-0.pt")
    with pytest.raises(FileNotFoundError, match="rank-1.pt is missing"):
        model_state(tmp_path)


@pytest.mark.mpi
@pytest.mark.parametrize("tp", ["all", 2])
def test_tensor_parallel_checkpoint_consolidates_to_the_gathered_model(comm, mpi_tmp_path, tp):
    """A few loop steps of the job's MLP split over ``tp`` ranks (the rest replicas), checkpointed
    per rank: the merged checkpoint is the live model's full_state_dict under the unsplit model's
    names, bit for bit, and the unsplit model loaded from it gives the split model's outputs."""
    size = comm.Get_size()
    if tp == size:
        pytest.skip(f"tp {tp} on {size} ranks: the same as 'all'")
    tp = size if tp == "all" else tp
    if size % tp or 256 % tp or 100 % tp:  # the job's hidden sizes
        pytest.skip(f"tp {tp} on {size} ranks: not a layout of the job's MLP")
    directory = shared_directory(comm, mpi_tmp_path) / f"tp{tp}"
    splits = synthetic(200, 50, seed=0)
    config = TrainConfig(data="synthetic", epochs=1, max_steps=3, batch_size=8, lr=0.05, threads=1,
                         out=str(directory), model="mlp", flush_every=2, log_every=0, checkpoint_every=0)
    run = Session(comm, config, settings=TensorParallelConfig(tp=tp))
    torch.manual_seed(3)
    unsplit = models.image_mlp(**splits.model_shape)
    strategy = TensorParallelStrategy(comm, unsplit, run.settings, state=run.state)
    strategy.finish = lambda *args: None  # keep the groups for the gather and forward below
    train(run, strategy, splits)

    linears = [name for name, module in unsplit.named_modules() if isinstance(module, torch.nn.Linear)]
    blocks = [module for module in strategy.model if hasattr(module, "fc1")]
    gathered = {}  # collective over each tensor-parallel group
    for index, block in enumerate(blocks):
        for key, value in block.full_state_dict().items():
            layer, tensor = key.split(".")
            gathered[f"{linears[2 * index + (layer == 'fc2')]}.{tensor}"] = value

    merged, info = model_state(directory)
    problems = [] if info["tp"] == tp and info["step"] == 3 else [f"info {info}"]
    if strategy.stats.take().wait_time:  # the final evaluation's Allreduces are no next step's communication
        problems.append("the evaluation left its communication time for the next step")
    if merged.keys() != gathered.keys():
        problems.append(f"names {sorted(merged)} vs gathered {sorted(gathered)}")
    problems += [f"{name} differs" for name in gathered if name in merged and not torch.equal(merged[name],
                                                                                             gathered[name])]
    consolidated = models.image_mlp(**splits.model_shape)
    consolidated.load_state_dict(merged)  # strict
    images = splits.test.batch(list(range(16)))[0]
    with torch.no_grad():
        expected, got = strategy.model(images), consolidated(images)  # forward: collective over the group
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
        problems.append(f"outputs differ by up to {(got - expected).abs().max().item():.2e}")
    strategy.grid.free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


def test_tensor_parallel_shards_merge_along_their_cut_dropping_padding(tmp_path):
    """Hand-written rank files of tp 2: a column-parallel weight padded from 5 to 6 rows, a
    row-parallel weight cut by columns and its bias whole on both ranks."""
    step = tmp_path / "checkpoints" / "step-000000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "world_size": 2, "per_rank": True}))
    column, row = torch.arange(15.0).reshape(5, 3), torch.arange(12.0).reshape(2, 6)
    padded = torch.cat([column, torch.zeros(1, 3)])
    layout = {"1.fc1.weight": {"name": "1.0.weight", "dim": 0, "size": 5},
              "1.fc2.weight": {"name": "2.weight", "dim": 1, "size": 6},
              "1.fc2.bias": {"name": "2.bias", "dim": None, "size": 2}}
    for tp_rank in range(2):
        shard = {"1.fc1.weight": padded[3 * tp_rank:3 * tp_rank + 3],
                 "1.fc2.weight": row[:, 3 * tp_rank:3 * tp_rank + 3], "1.fc2.bias": torch.ones(2)}
        torch.save({"model": shard, "tp": 2, "tp_rank": tp_rank, "tp_layout": layout, "step": 4, "config": {}},
                   step / f"rank-{tp_rank}.pt")
    merged, info = model_state(tmp_path)
    assert info["tp"] == 2 and list(merged) == ["1.0.weight", "2.weight", "2.bias"]
    assert torch.equal(merged["1.0.weight"], column) and torch.equal(merged["2.bias"], torch.ones(2))
    assert torch.equal(merged["2.weight"], row)

    torch.save({"model": {}, "tp": 2, "tp_rank": 0, "tp_layout": layout, "step": 4, "config": {}},
               step / "rank-1.pt")  # a second "rank 0"
    with pytest.raises(ValueError, match="rank 1 was written as tensor-parallel rank 0 of 2"):
        model_state(tmp_path)
    torch.save({"model": {}, "tp": 2, "step": 4, "config": {}}, step / "rank-0.pt")  # before tp_layout existed
    with pytest.raises(ValueError, match="without 'tp_layout'"):
        model_state(tmp_path)


# -- local SGD and the parameter server, in-process -----------------------------------------------------------

def float64_mlp():
    return mpi_helpers.float64_mlp([784, 16, 10], 5)


def loop_session(comm, out, settings, steps, checkpoint_every):
    session = mpi_helpers.loop_session(comm, out, 6, settings, max_steps=steps, flush_every=2,
                                       checkpoint_every=checkpoint_every)
    session.checkpoints.keep = 3  # steps 2, 4 and the epoch end's
    return session


def capture_at_checkpoints(strategy, take):
    """Wrap ``strategy.state_dict`` (collective, like the loop's save) so that ``take()`` runs at every
    checkpoint; returns the list of what it took, one entry per checkpoint in order."""
    taken, original = [], strategy.state_dict

    def state_dict():
        state = original()
        taken.append(take())
        return state

    strategy.state_dict = state_dict
    return taken


def state_problems(merged, expected, what, **tolerance):
    if merged.keys() != expected.keys():
        return [f"{what}: names {sorted(merged)} vs {sorted(expected)}"]
    close = (lambda a, b: torch.allclose(a, b, **tolerance)) if tolerance else torch.equal
    return [f"{what}: {name} differs" for name in expected if not close(merged[name], expected[name])]


@pytest.mark.mpi
def test_local_sgd_checkpoints_consolidate_to_the_average_of_the_ranks_models(comm, mpi_tmp_path):
    """Local SGD without averages until the epoch end (``sync_every`` 0): the checkpoints of steps 2
    and 4 hold each rank's own model, and consolidate to their sample-weighted average (what the next
    average makes, computed live by ``average_tensors``); the epoch end's holds the average, every rank's
    model bit for bit."""
    from copy import deepcopy

    from mpipar.comm.averaging import average_tensors
    from mpipar.local_sgd import LocalSGDConfig, LocalSGDStrategy

    directory = shared_directory(comm, mpi_tmp_path) / "local"
    settings = LocalSGDConfig(sync_every=0)
    run = loop_session(comm, directory, settings, steps=5, checkpoint_every=2)
    model = float64_mlp()
    strategy = LocalSGDStrategy(model, comm, settings, state=run.state)

    def average():  # collective over comm (every rank has the same steps since the last average)
        copy = deepcopy(model)
        if strategy.steps_since_average:
            average_tensors([*(p for p in copy.parameters() if p.requires_grad), *copy.buffers()], comm,
                            weight=strategy.samples_since_average)
        return copy.state_dict()

    averages = capture_at_checkpoints(strategy, average)
    train(run, strategy, synthetic(300, 50, seed=0))
    problems = [] if len(averages) == 3 else [f"{len(averages)} checkpoints, expected 3"]
    for step, expected in zip((2, 4), averages):
        try:
            merged, info = model_state(directory / "checkpoints" / f"step-{step:09d}")
        except ValueError as exc:
            problems.append(f"step {step}: {exc}")
            continue
        problems += state_problems(merged, expected, f"step {step}", rtol=1e-12, atol=1e-15)
    try:
        merged, info = model_state(directory)
        problems += state_problems(merged, model.state_dict(), "epoch end")
        problems += [] if info["step"] == 5 else [f"info {info}"]
        float64_mlp().load_state_dict(merged)  # strict
    except ValueError as exc:
        problems.append(f"epoch end: {exc}")
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))


@pytest.mark.mpi(min_size=2)
def test_parameter_server_checkpoints_consolidate_to_the_servers_weights(comm, mpi_tmp_path):
    """One server, the other ranks asynchronous workers: every checkpoint (steps 2 and 4, the epoch end)
    consolidates to the weights every rank holds when it is written, bit for bit."""
    from mpipar.parameter_server import ParameterServerConfig, ParameterServerStrategy

    directory = shared_directory(comm, mpi_tmp_path) / "ps"
    settings = ParameterServerConfig(mode="async")
    run = loop_session(comm, directory, settings, steps=5, checkpoint_every=2)
    model = float64_mlp()
    strategy = ParameterServerStrategy(comm, model, settings, batch_size=6, weight_decay=0.0)
    weights = capture_at_checkpoints(strategy, lambda: {name: value.clone()
                                                        for name, value in model.state_dict().items()})
    train(run, strategy, synthetic(300, 50, seed=0))
    problems = [] if len(weights) == 3 else [f"{len(weights)} checkpoints, expected 3"]
    for name, expected in zip(("step-000000002", "step-000000004", "step-000000005"), weights):
        try:
            merged, _ = model_state(directory / "checkpoints" / name)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        problems += state_problems(merged, expected, name)
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))
