"""jobs/resnet_dp.py end to end on a few ranks: metrics file contents and bad input."""

import json

import h5py
import numpy as np
import pytest
import torch

from mpi_helpers import ROOT, run_mpi

JOB = str(ROOT / "jobs" / "resnet_dp.py")
TINY = ("--data", "synthetic", "--batch-size", "16", "--threads", "1", "--flush-every", "3")


@pytest.mark.launch
@pytest.mark.parametrize("ranks", [2, 3])
def test_resnet_dp_writes_every_metric(tmp_path, ranks):
    out = tmp_path / "run"
    result = run_mpi(ranks, JOB, *TINY, "--max-steps", "7", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "samples/s" in result.stdout and "final test accuracy" in result.stdout
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["strategy"] == "data_parallel" and f.attrs["world_size"] == ranks
        assert f.attrs["device"] == "cpu" and "cuda_aware" not in f.attrs  # auto, on a machine without GPUs
        config = json.loads(f.attrs["config"])
        assert config["max_steps"] == 7 and config["batch_size"] == 16
        for key in ("mpi_library", "torch_version", "mpi4py_version", "mpipar_version", "hosts"):
            assert key in f.attrs
        assert f["steps/loss"].shape == (7,) and f["steps/samples"][0] == 16 * ranks
        for key in ("compute_time", "comm_time", "idle_time", "bytes_sent"):
            values = f[f"steps/{key}"][...]
            assert values.shape == (7, ranks) and np.isfinite(values).all() and (values >= 0).all()
        assert (f["steps/compute_time"][...] > 0).all() and (f["steps/bytes_sent"][...] > 0).all()
        parts = sum(f[f"steps/{key}"][...] for key in ("compute_time", "comm_time", "idle_time", "data_time"))
        assert np.allclose(parts, f["steps/step_time"][...], rtol=1e-6, atol=1e-9)  # the split adds up
        for key in ("train_loss", "test_loss", "test_accuracy", "wall_time"):
            assert f[f"epochs/{key}"].shape == (1,)
        assert 0 <= f["epochs/test_accuracy"][0] <= 1


def run_bad(tmp_path, *args, ranks=2, env=None):
    result = run_mpi(ranks, JOB, *TINY, "--max-steps", "2", *args, timeout=120, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    return output


@pytest.mark.launch
@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "--batch-size must be positive"),
    ("--epochs", "-1", "--epochs must be positive"),
    ("--lr", "0", "--lr must be positive"),
    ("--max-steps", "0", "--max-steps must be at least 1"),
    ("--data", "/nonexistent/data.h5", "no such file or directory"),
])
def test_bad_input_is_one_clear_message(tmp_path, flag, value, message):
    output = run_bad(tmp_path, flag, value, "--out", str(tmp_path / "run"))
    assert output.count(message) == 1, output


@pytest.mark.launch
def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.h5").write_bytes(b"earlier run")
    output = run_bad(tmp_path, "--out", str(out))
    assert "holds an earlier run" in output
    assert (out / "metrics.h5").read_bytes() == b"earlier run"


@pytest.mark.launch
def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = run_bad(tmp_path, "--out", str(blocker / "run"))
    assert "output directory" in output
    output = run_bad(tmp_path, "--out", str(blocker))
    assert output.count(f"--out {blocker} is a file, not a directory") == 1, output
    assert blocker.read_text() == "x"  # nothing destroyed


@pytest.mark.launch
def test_world_size_must_match_the_launch(tmp_path):
    output = run_bad(tmp_path, "--out", str(tmp_path / "run"), env={"MPIPAR_EXPECTED_WORLD_SIZE": "3"})
    assert "MPI world size is 2 but the launch asked for 3" in output


@pytest.mark.launch
def test_nan_loss_stops_with_the_step_and_keeps_metrics(tmp_path):
    out = tmp_path / "run"
    result = run_mpi(2, JOB, *TINY, "--max-steps", "40", "--lr", "1e12", "--out", str(out), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "the loss became" in output and "at step" in output, output
    with h5py.File(out / "metrics.h5", "r") as f:
        assert len(f["steps/loss"]) >= 1 and not np.isfinite(f["steps/loss"][-1])


TP_JOB = str(ROOT / "jobs" / "mlp_tp.py")


@pytest.mark.launch
@pytest.mark.parametrize("ranks,tp", [(2, 2), (4, 2)])
def test_mlp_tp_trains_with_split_layers_and_writes_metrics(tmp_path, ranks, tp):
    out = tmp_path / "run"
    result = run_mpi(ranks, TP_JOB, *TINY, "--max-steps", "5", "--epochs", "1", "--tp", str(tp), "--out", str(out),
                     timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"every linear layer split over {tp} ranks" in result.stdout and "final test accuracy" in result.stdout
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["strategy"] == "tensor_parallel" and f.attrs["tp"] == tp
        assert f.attrs["replicas"] == ranks // tp
        assert f["steps/samples"][0] == 16 * (ranks // tp)  # each group's batch counted once
        assert (f["steps/bytes_sent"][...] > 0).all()  # every rank all-reduces its layers' sums
        assert sorted(p.name for p in (out / "checkpoints" / "step-000000005").glob("rank-*.pt")) == \
            [f"rank-{r}.pt" for r in range(ranks)]


@pytest.mark.launch
def test_mlp_tp_refuses_a_split_the_layers_cannot_take(tmp_path):
    result = run_mpi(3, TP_JOB, *TINY, "--max-steps", "2", "--out", str(tmp_path / "run"), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert output.count("cannot be split evenly over 3 tensor-parallel ranks") == 1, output


def step_losses(out):
    with h5py.File(out / "metrics.h5", "r") as f:
        return f["steps/loss"][...]


@pytest.mark.launch
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resnet_dp_on_gpus_equals_the_cpu_run_and_resumes_on_the_cpu(tmp_path):
    """2 ranks on the GPU (sharing one if there is only one) train like 2 ranks on the CPU
    (float32, summation orders differ), record the CUDA-aware decision, and their checkpoint
    resumes with --device cpu."""
    steps = ("--max-steps", "6", "--checkpoint-every", "3")
    fp32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # cuDNN convolutions use TF32 by default: compare float32 with float32
    gpu = run_mpi(2, JOB, *TINY, *steps, "--device", "cuda", "--out", str(tmp_path / "gpu"), timeout=300, env=fp32)
    assert gpu.returncode == 0, gpu.stdout + gpu.stderr
    assert "GPU tensors:" in gpu.stdout
    cpu = run_mpi(2, JOB, *TINY, *steps, "--device", "cpu", "--out", str(tmp_path / "cpu"), timeout=300)
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    np.testing.assert_allclose(step_losses(tmp_path / "gpu"), step_losses(tmp_path / "cpu"), rtol=2e-3)
    with h5py.File(tmp_path / "gpu" / "metrics.h5", "r") as f:
        assert f.attrs["device"] == "cuda" and "MPIX_Query_cuda_support" in f.attrs["cuda_aware_reason"] \
            or "MPIPAR_CUDA_AWARE" in f.attrs["cuda_aware_reason"]
    gpu_losses = step_losses(tmp_path / "gpu")
    resumed = run_mpi(2, JOB, *TINY, *steps, "--device", "cpu", "--resume-from",
                      str(tmp_path / "gpu" / "checkpoints" / "step-000000003"), "--out", str(tmp_path / "gpu"),
                      timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    np.testing.assert_allclose(step_losses(tmp_path / "gpu"), gpu_losses, rtol=2e-3)  # steps 3-5 again, on the CPU


VIT_JOB = str(ROOT / "jobs" / "vit_tp.py")


@pytest.mark.launch
def test_vit_tp_trains_with_split_blocks_and_writes_metrics(tmp_path):
    out = tmp_path / "run"
    result = run_mpi(2, VIT_JOB, *TINY, "--max-steps", "4", "--epochs", "1", "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model: vit-tiny" in result.stdout and "final test accuracy" in result.stdout, result.stdout
    assert "every block's attention heads and MLP split (embeddings, norms and head replicated) over 2 ranks" \
        in result.stdout, result.stdout
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["strategy"] == "tensor_parallel" and f.attrs["tp"] == 2 and f.attrs["replicas"] == 1
        assert f.attrs["model"] == "vit-tiny"
        assert f["steps/loss"].shape == (4,) and np.isfinite(f["steps/loss"][...]).all()
        assert (f["steps/samples"][...] == 16).all()  # the group's batch counted once
        assert (f["steps/bytes_sent"][...] > 0).all()  # every block all-reduces its partial sums
        assert f["epochs/test_accuracy"].shape == (1,) and 0 <= f["epochs/test_accuracy"][0] <= 1
    assert sorted(p.name for p in (out / "checkpoints" / "step-000000004").glob("rank-*.pt")) == \
        ["rank-0.pt", "rank-1.pt"]


@pytest.mark.launch
def test_vit_tp_refuses_a_tp_size_the_ranks_cannot_take(tmp_path):
    result = run_mpi(2, VIT_JOB, *TINY, "--max-steps", "2", "--tp", "3", "--out", str(tmp_path / "run"), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert output.count("--tp 3 does not divide the 2 ranks into equal tensor-parallel groups") == 1, output
