"""mpipar-consolidate: a checkpoint of any strategy becomes the unsplit model's state dict.

Each job below trains briefly, evaluates and checkpoints at the epoch end; the
consolidated model, evaluated on one process, must give the job's own final test
accuracy and loss.
"""

import h5py
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, run_mpi
from mpipar import models
from mpipar.data.datasets import resolve
from mpipar.run.consolidate import main, model_state
from mpipar.run.evaluate import evaluate

TINY = ("--data", "synthetic", "--batch-size", "16", "--threads", "1", "--epochs", "1", "--max-steps", "6")


def MLP(in_channels, num_classes, image_size):  # jobs/mlp_mp.py's model
    return models.mlp([in_channels * image_size ** 2, 256, 128, 100, num_classes])


@pytest.mark.parametrize("job,ranks,args,make", [
    ("resnet_dp.py", 2, (), models.resnet_small),
    ("mlp_mp.py", 2, (), MLP),  # fc1, fc4 on rank 0; fc2, fc3 on rank 1
    ("resnet_pp.py", 4, ("--stages", "2", "--microbatches", "2"), models.resnet_small),  # BatchNorm, 2 replicas
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
