"""jobs/mlp_mp.py, jobs/resnet_pp.py (alone and --stages hybrid) end to end: metrics and bad input."""

import json

import h5py
import numpy as np
import pytest

from mpi_helpers import ROOT, run_mpi

TINY = ("--data", "synthetic", "--batch-size", "16", "--threads", "1", "--flush-every", "2", "--epochs", "1")


@pytest.mark.launch
@pytest.mark.parametrize("job,ranks,args,stages,schedule,replicas", [
    ("mlp_mp.py", 2, (), 2, "naive", 1),
    ("mlp_mp.py", 4, ("--schedule", "1f1b", "--microbatches", "4"), 2, "1f1b", 2),
    ("resnet_pp.py", 3, ("--schedule", "gpipe", "--microbatches", "4", "--balance", "auto"), 3, "gpipe", 1),
    ("resnet_pp.py", 4, ("--stages", "2", "--microbatches", "2"), 2, "1f1b", 2),
    ("resnet_pp.py", 2, ("--schedule", "zbv", "--microbatches", "4", "--balance", "auto"), 2, "zbv", 1),
])
def test_pipeline_job_writes_metrics_with_the_bubble(tmp_path, job, ranks, args, stages, schedule, replicas):
    out = tmp_path / "run"
    result = run_mpi(ranks, str(ROOT / "jobs" / job), *TINY, "--max-steps", "5", "--out", str(out), *args,
                     timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pipeline bubble: measured" in result.stdout and "final test accuracy" in result.stdout
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["world_size"] == ranks and f.attrs["schedule"] == schedule
        assert f.attrs["microbatches"] == json.loads(f.attrs["config"])["microbatches"]
        assert f.attrs["replicas"] == replicas
        assert 0 <= f.attrs["bubble_ideal"] < 1 and 0 <= f.attrs["bubble_measured"] < 1
        assert 0 <= f.attrs["bubble_bound"] < 1  # the schedule with the measured stage times
        assert f["steps/loss"].shape == (5,) and f["steps/samples"][0] == 16 * replicas
        for key in ("compute_time", "comm_time", "idle_time", "step_time", "activation_bytes"):
            values = f[f"steps/{key}"][...]
            assert values.shape == (5, ranks) and np.isfinite(values).all() and (values >= 0).all()
        assert (f["steps/compute_time"][...] > 0).all()
        parts = sum(f[f"steps/{key}"][...] for key in ("compute_time", "comm_time", "idle_time", "data_time"))
        assert np.allclose(parts, f["steps/step_time"][...], rtol=1e-6, atol=1e-9)  # the split adds up
        assert (f["steps/bytes_sent"][...] > 0).all()  # every stage sends activations or gradients
        assert f["steps/bubble_measured"].shape == (5,)
    if "--balance" in args:
        assert "predicted ms  measured ms" in result.stdout
    if schedule == "zbv":  # two stages per rank in a V: rank 1's adjacent chunks kept apart by a boundary
        with h5py.File(out / "metrics.h5", "r") as f:
            assert f.attrs["stages"] == 4 and f.attrs["virtual_stages"] == 2 and len(json.loads(
                f.attrs["stage_boundaries"])) == 1


@pytest.mark.launch
@pytest.mark.parametrize("job,ranks,args,message", [
    ("resnet_pp.py", 2, ("--batch-size", "10", "--microbatches", "4"), "does not split into 4 equal"),
    ("resnet_pp.py", 3, ("--stages", "2"), "2 pipeline stages do not divide the 3 processes"),
    ("mlp_mp.py", 2, ("--placement", "0,0,1"), "covers 3 layers but the model has 5"),
    ("mlp_mp.py", 2, ("--placement", "0,0,2,2,0"), "--placement must give a rank in 0..1 to every layer"),
    ("resnet_pp.py", 2, ("--balance", "2,9"), "covers 11 layers but the model has 30"),  # resnet-small-fine
    ("resnet_pp.py", 2, ("--model", "resnet-small", "--balance", "2,9"), "covers 11 layers but the model has 5"),
    ("resnet_pp.py", 2, ("--stage-memory-mb", "0.01"), "keeps every stage within 0.0 MiB"),
    ("resnet_pp.py", 2, ("--schedule", "foo"), "invalid choice: 'foo'"),  # argparse: rank 0 says it
    ("resnet_pp.py", 2, ("--schedule", "zbv", "--virtual-stages", "3"), "leave out --virtual-stages"),
])
def test_bad_pipeline_input_is_one_clear_message(tmp_path, job, ranks, args, message):
    result = run_mpi(ranks, str(ROOT / "jobs" / job), *TINY, "--max-steps", "2", "--out", str(tmp_path / "r"),
                     *args, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert output.count(message) == 1, output


@pytest.mark.launch
def test_async_pipeline_job_records_staleness_and_stash(tmp_path):
    """resnet_pp.py --schedule 2bw (never flushes): per step and rank the stash and the staleness of the
    updates, the table of every update, a drain (checkpoint) in the middle, the bubble fields."""
    out = tmp_path / "run"
    result = run_mpi(2, str(ROOT / "jobs" / "resnet_pp.py"), *TINY, "--max-steps", "5", "--out", str(out),
                     "--schedule", "2bw", "--microbatches", "2", "--model", "resnet-small", "--balance", "even",
                     "--checkpoint-every", "3", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pipeline bubble: measured" in result.stdout and "final test accuracy" in result.stdout
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["schedule"] == "2bw" and f.attrs["bubble_ideal"] == 0.0
        assert json.loads(f.attrs["staleness_per_stage"]) == [1, 1]
        assert json.loads(f.attrs["weight_versions_per_stage"]) == [2, 2]
        assert f["steps/loss"].shape == (5,) and np.isfinite(f["steps/loss"][...]).all()
        assert (f["steps/samples"][...] == 16).all()  # counted once, on the last stage's rank
        versions, stash = f["steps/weight_versions"][...], f["steps/stash_bytes"][...]
        assert versions.shape == (5, 2) and versions.max() == 2 and (stash[1:] > 0).all()
        # the first window's micro-batches on stage 0 see the newest weights: they run on them, no copy
        assert stash[0, 0] < stash[1, 0]
        # updates (of 2 micro-batches) in each step's window: stage 1 applies batch k's in step k, stage 0 one
        # window later, except the ones that the drains at the checkpoint (after step 3) and the end apply
        assert f["steps/updates"][...].T.tolist() == [[0, 2, 2, 0, 2], [2] * 5]
        table = f["pipeline_updates"]
        # 5 batches x 2 micro-batches x 2 stages; batch 0 applied to version 0, later ones with staleness 1
        assert sorted(zip(table["stage"][...], table["microbatch"][...])) == [(s, g) for s in (0, 1)
                                                                              for g in range(10)]
        staleness = table["staleness"][...]
        assert (staleness == (table["microbatch"][...] >= 2)).all()
        assert table["staleness_histogram"][...].tolist() == [4, 16]
        assert 0 <= f.attrs["bubble_measured"] < 1 and len(json.loads(f.attrs["peak_stash_bytes_per_rank"])) == 2
