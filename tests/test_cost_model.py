"""The cost model against hand-computable cases, the machine file, the planner, calibration and a job's predictions."""

import h5py
import pytest
from cost_helpers import MiB, linear_link, machine_of, profile_of

from mpi_helpers import ROOT, assert_all_ranks, run_mpi
from mpipar.comm.buckets import assign_buckets
from mpipar.cost import (
    Band,
    LayerCost,
    Layout,
    Link,
    Machine,
    ModelProfile,
    fit_bands,
    interconnect,
    plan,
    predict_data_parallel,
    predict_pipeline,
    predict_tensor_parallel,
    tensor_parallel_allreduces,
)
from mpipar.cost.plan import format_plan
from mpipar.pipeline.schedule import Schedule


def test_machine_file_round_trips(tmp_path):
    profile = ModelProfile("m", {8: (LayerCost("a", 1e-3, 2e-3, (400, 40), 1024, 2048),),
                                 32: (LayerCost("a", 3e-3, 5e-3, (400, 40), 4096, 8192),)}, {8: 4e-3, 32: 9e-3})
    link = Link((Band(4096, 1e-6, 1e-10), Band(None, 5e-6, 2e-10)), (Band(None, 2e-6, 3e-10),), 4, "shared memory")
    machine = Machine(link, interconnect("10gbe"), {"m": profile}, ranks=4, ranks_per_node=2, host="h", date="d")
    assert Machine.load(machine.save(tmp_path / "machine.json")) == machine


def test_a_damaged_machine_file_is_one_clear_error(tmp_path):
    path = tmp_path / "machine.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the machine file .*mpipar-calibrate"):
        Machine.load(path)


def test_fit_recovers_alpha_and_beta_per_band():
    sizes = [2**k for k in range(3, 27)]
    truth = {4096: (2e-6, 1e-10), 65535: (5e-6, 2e-10), MiB: (1e-5, 1.5e-10), 16 * MiB: (4e-5, 3e-10),
             None: (2e-4, 4e-10)}
    band_of = [next(edge for edge in truth if edge is None or n <= edge) for n in sizes]
    seconds = [truth[edge][0] + truth[edge][1] * n for edge, n in zip(band_of, sizes)]
    fitted = fit_bands(sizes, seconds)
    assert [band.max_bytes for band in fitted] == list(truth)
    for band in fitted:
        assert band.alpha == pytest.approx(truth[band.max_bytes][0], rel=1e-6, abs=1e-12)
        assert band.beta == pytest.approx(truth[band.max_bytes][1], rel=1e-6)
    # the ring Allreduce's scales: 4 ranks, t = 6 alpha + 1.5 n beta
    ring = fit_bands(sizes, [6 * 3e-6 + 1.5 * n * 2e-10 for n in sizes], scale_alpha=6, scale_beta=1.5)
    assert all(b.alpha == pytest.approx(3e-6, rel=1e-6) and b.beta == pytest.approx(2e-10, rel=1e-6) for b in ring)
    link = Link(ring, ring, 4)
    assert link.allreduce_seconds(MiB, 8) == pytest.approx(14 * 3e-6 + 14 / 8 * MiB * 2e-10, rel=1e-6)
    assert link.allreduce_seconds(MiB, 1) == 0.0


@pytest.mark.parametrize("text,bandwidth,latency", [("1gbit,1ms", 1e9, 1e-3), ("100gbit,2us", 100e9, 2e-6),
                                                     ("ib-hdr", 200e9, 1.5e-6)])
def test_interconnect_descriptions(text, bandwidth, latency):
    link = interconnect(text)
    assert link.p2p_seconds(1e6) == pytest.approx(latency + 8e6 / bandwidth)


def test_interconnect_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="--interconnect must be one of .*'1gbit,1ms'"):
        interconnect("fast")


def test_bucket_assignment_is_the_reducers():
    from mpi4py import MPI

    from mpipar.comm.reducer import GradientReducer
    from mpipar.models import resnet_small

    params = list(resnet_small().parameters())
    for cap_mb in (0.01, 0.1, 25.0):
        reducer = GradientReducer(params, MPI.COMM_SELF, bucket_cap_mb=cap_mb)
        index = {id(p): i for i, p in enumerate(params)}
        assert [[index[id(p)] for p in bucket.params] for bucket in reducer.buckets] == assign_buckets(
            [p.numel() * p.element_size() for p in params], [p.dtype for p in params], cap_mb * MiB)


def test_dp_one_bucket_does_not_overlap():
    # 4 layers, forward 1 s, backward 2 s each, one 1 MiB parameter each; one bucket of 4 MiB
    profile = profile_of([(1.0, 2.0, [MiB], 0, 0)] * 4)
    # 2 ranks: Open MPI's non-blocking Allreduce is a binomial tree, the bucket up then down: 2 n beta = 1 s per MiB
    link = linear_link(0.0, 0.5 / MiB)
    layout = Layout(2, 1)
    p = predict_data_parallel(profile, 8, layout, machine_of(profile, across=link), bucket_mb=4)
    assert layout.dp_across()
    assert p.compute == pytest.approx(12.0) and p.exposed_comm == pytest.approx(4.0) and p.step == pytest.approx(16.0)


def test_dp_buckets_smaller_than_backward_expose_only_the_last():
    profile = profile_of([(1.0, 2.0, [MiB], 0, 0)] * 4)
    link = linear_link(0.0, 0.25 / MiB)  # each 1 MiB bucket: 0.5 s, shorter than the next layer's backward
    p = predict_data_parallel(profile, 8, Layout(2, 1), machine_of(profile, across=link), bucket_mb=1)
    assert p.exposed_comm == pytest.approx(0.5) and p.step == pytest.approx(12.5)
    assert "4% of the step is exposed Allreduce on test link" in p.why()
    # within one node the shared-memory link (free here) is used
    assert predict_data_parallel(profile, 8, Layout(2, 2), machine_of(profile, across=link)).exposed_comm == 0


def test_dp_buckets_longer_than_backward_queue_up():
    profile = profile_of([(1.0, 2.0, [MiB], 0, 0)] * 4)
    link = linear_link(0.0, 1.5 / MiB)  # each bucket 3 s (up and down the tree), a layer's backward 2 s: they queue
    p = predict_data_parallel(profile, 8, Layout(2, 1), machine_of(profile, across=link), bucket_mb=1)
    # buckets ready at 6, 8, 10, 12; the network runs 6-9, 9-12, 12-15, 15-18
    assert p.exposed_comm == pytest.approx(6.0) and p.step == pytest.approx(18.0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8), (3, 5)])
def test_pipeline_equal_stages_match_the_closed_form(schedule, stages, microbatches):
    profile = profile_of([(1.0, 2.0, [1000], 100, 10)] * stages)
    p = predict_pipeline(profile, 8 * microbatches, Layout(stages, stages, pp=stages), machine_of(profile),
                         microbatches=microbatches, schedule=schedule)
    assert p.bubble == pytest.approx((stages - 1) / (microbatches + stages - 1))
    assert p.bubble == pytest.approx(Schedule(schedule, stages, microbatches).ideal_bubble)
    assert p.step == pytest.approx(3.0 * (microbatches + stages - 1)) and p.p2p == 0
    in_flight = microbatches if schedule == "gpipe" else stages
    assert p.memory_bytes == 3 * 1000 + in_flight * 10


def test_gpipe_messages_add_two_transfers_per_boundary():
    stages, microbatches = 3, 4
    profile = profile_of([(1.0, 2.0, [1000], MiB, 0)] * stages)
    link = linear_link(0.25, 0.0)  # every message across nodes: 0.25 s
    p = predict_pipeline(profile, 8 * microbatches, Layout(stages, 1, pp=stages), machine_of(profile, across=link),
                         microbatches=microbatches, schedule="gpipe")
    assert p.step == pytest.approx(3.0 * (microbatches + stages - 1) + 2 * (stages - 1) * 0.25)
    assert p.p2p == pytest.approx(2 * (stages - 1) * 0.25)


def test_pipeline_replicas_average_each_stage():
    profile = profile_of([(1.0, 2.0, [MiB], 0, 0)] * 2)
    link = linear_link(0.0, 0.5 / MiB)  # 2 replicas: each stage's 1 MiB up and down a binomial tree, 1 s
    p = predict_pipeline(profile, 16, Layout(4, 2, pp=2), machine_of(profile, across=link), microbatches=2)
    assert p.layout.dp == 2 and p.layout.dp_across() and not p.layout.boundary_across(0)
    assert p.exposed_comm == pytest.approx(1.0) and p.step == pytest.approx(3.0 * 3 + 1.0)


def test_layout_places_ranks_as_the_process_grid():
    layout = Layout(8, 4, pp=2, tp=2)
    assert layout.dp == 2 and layout.rank(1, 1, 1) == 7
    assert not layout.tp_across() and not layout.boundary_across(0) and layout.dp_across()
    with pytest.raises(ValueError, match="is not 8 ranks"):
        Layout(8, 4, dp=3, pp=2)


def test_tensor_parallel_counts():
    assert tensor_parallel_allreduces(4) == (8, 8)  # ViT blocks: attention and MLP pairs
    assert tensor_parallel_allreduces(2, "mlp") == (2, 2)
    link = linear_link(1e-3, 0.0)
    p = predict_tensor_parallel(8.0, Layout(4, 4, tp=4), link, allreduces=16, allreduce_bytes=1000)
    assert p.compute == pytest.approx(2.0) and p.exposed_comm == pytest.approx(16 * 6 * 1e-3)
    assert predict_tensor_parallel(8.0, Layout(1, 1, tp=1), link, allreduces=16, allreduce_bytes=1000).step == 8.0


def test_plan_prefers_pipelines_for_a_big_model_on_a_slow_network():
    # 4 layers of 64 MiB parameters each and tiny activations
    profile = profile_of([(0.01, 0.02, [64 * MiB], 1024, 1024)] * 4, name="big", sizes=(1, 64))
    machine = machine_of(profile, across=interconnect("1gbit,1ms"))
    rows = plan(machine, "big", 16, 4, 1)
    assert rows[0].prediction.layout.pp == 4 and rows[-1].prediction.strategy == "DP"
    assert rows[0].extrapolated  # a described interconnect: predictions
    text = format_plan(rows, model="big", batch_size=16, ranks=4, ranks_per_node=1)
    assert "exposed Allreduce on 1gbit,1ms" in text and "bubble" in text


def test_plan_prefers_data_parallelism_on_a_fast_network():
    # small parameters, large activations: pipelines pay the bubble and the messages, DP almost nothing
    profile = profile_of([(0.01, 0.02, [4096], 64 * MiB, 1024)] * 4, name="small", sizes=(1, 64))
    machine = machine_of(profile, across=interconnect("ib-ndr"))
    rows = plan(machine, "small", 16, 1024, 8)
    assert rows[0].prediction.strategy == "DP" and rows[0].extrapolated
    assert "PREDICTIONS" in format_plan(rows, model="small", batch_size=16, ranks=1024, ranks_per_node=8)


def test_plan_cli_needs_a_link_across_nodes(tmp_path, capsys):
    from mpipar.cost.plan import main

    profile = profile_of([(0.01, 0.02, [4096], 1024, 1024)] * 2, name="small")
    path = machine_of(profile).save(tmp_path / "machine.json")
    with pytest.raises(SystemExit, match="no link across nodes .*--interconnect"):
        main(["--model", "small", "--ranks", "8", "--ranks-per-node", "4", "--machine", str(path)])
    main(["--model", "small", "--ranks", "8", "--ranks-per-node", "4", "--machine", str(path),
          "--interconnect", "10gbe", "--batch-size", "8"])
    assert "PREDICTIONS" in capsys.readouterr().out


@pytest.mark.mpi(min_size=2)
def test_calibrate_quick_measures_every_rank_alike(comm, mpi_tmp_path):
    from mpipar.cost.calibrate import calibrate

    machine, raw = calibrate(comm, microbatch_sizes=(2, 4), quick=True, say=lambda *_: None)
    path = machine.save(mpi_tmp_path / f"machine-{comm.Get_rank()}.json")
    loaded = Machine.load(path)
    ok = (loaded == machine and machine.ranks == comm.Get_size() and machine.within.p2p_seconds(2**16) > 0
          and machine.profile("resnet-small").sizes == (2, 4) and len(raw["within"]["p2p_seconds"]) > 4)
    assert_all_ranks(comm, ok, f"calibration: {machine.within}")
    assert_all_ranks(comm, comm.allgather(machine.within) == [machine.within] * comm.Get_size(), "links differ")
    # PowerSGD's product rate: measured on every rank, the median agreed, and kept by the file
    agreed = comm.allgather(machine.matmul_flops) == [machine.matmul_flops] * comm.Get_size()
    assert_all_ranks(comm, agreed and machine.matmul_flops > 0 and loaded.matmul_flops == machine.matmul_flops,
                     f"matmul_flops {machine.matmul_flops}")


@pytest.mark.launch
def test_calibrate_cli_quick_writes_a_machine_file(tmp_path):
    out = tmp_path / "machine.json"
    result = run_mpi(2, "-m", "mpipar.cost.calibrate", "--quick", "--microbatch-sizes", "2,4", "--out", str(out),
                     timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    machine = Machine.load(out)
    assert machine.ranks == 2 and machine.profile("resnet-small").num_layers == 5


@pytest.mark.launch
def test_a_job_with_machine_stores_its_prediction(tmp_path):
    from mpipar.cost.calibrate import profile_model

    profile = profile_model("resnet-small", (4, 8), repeats=1)
    machine = Machine(linear_link(5e-6, 1e-10, "shared memory"), None, {"resnet-small": profile}, 2, 2)
    path = machine.save(tmp_path / "machine.json")
    out = tmp_path / "run"
    result = run_mpi(2, str(ROOT / "jobs" / "resnet_dp.py"), "--data", "synthetic", "--batch-size", "8",
                     "--max-steps", "3", "--threads", "1", "--machine", str(path), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "predicted (" in result.stdout and "predicted vs measured" in result.stdout  # at start and at the end
    with h5py.File(out / "metrics.h5", "r") as f:
        assert f.attrs["predicted_strategy"] == "DP" and f.attrs["predicted_shape"] == "2 x 1 x 1"
        assert f.attrs["predicted_step_seconds"] > 0 and f.attrs["predicted_compute_seconds"] > 0
    from mpipar.cost import report_rows

    rows = dict((name, (predicted, measured)) for name, predicted, measured in report_rows(out / "metrics.h5"))
    assert rows["step s"][0] > 0 and rows["step s"][1] > 0


def test_predict_run_reads_the_jobs_settings():
    from mpipar.cost import predict_run
    from mpipar.pipeline.config import PipelineConfig

    profile = profile_of([(1.0, 2.0, [1000], 100, 10)] * 4, sizes=(2,))
    machine = machine_of(profile)
    pipeline, _ = predict_run(machine, model="toy", batch_size=8, bucket_mb=25, ranks=2, ranks_per_node=2,
                              settings=PipelineConfig(schedule="gpipe", microbatches=4, stages=2, balance="even"))
    assert pipeline.strategy == "PP" and pipeline.bubble == pytest.approx(1 / 5)
    dp, _ = predict_run(machine, model="toy", batch_size=8, bucket_mb=25, settings=None, ranks=2, ranks_per_node=2)
    assert dp.strategy == "DP" and dp.step == pytest.approx(4 * 12.0)  # one calibrated size: in proportion
    none, why = predict_run(machine, model="toy", batch_size=8, bucket_mb=25, settings=None, ranks=4,
                            ranks_per_node=2)
    assert none is None and "--interconnect" in why
    none, why = predict_run(machine, model="other", batch_size=8, bucket_mb=25, settings=None, ranks=2,
                            ranks_per_node=2)
    assert none is None and "mpipar-calibrate --model other" in why


@pytest.mark.parametrize("ranks,chunks,microbatches", [(2, 2, 4), (4, 2, 8), (3, 3, 6)])
def test_interleaved_pipeline_prediction_is_megatrons_bubble(ranks, chunks, microbatches):
    """Equal chunks of one layer each (forward 1, backward 1 per micro-batch), free messages: the bubble is
    (p-1)/(V m + p-1); a rank's memory is its chunks' parameters and the activations they hold at once."""
    profile = profile_of([(1.0, 1.0, [1000], 100, 10)] * (ranks * chunks))
    p = predict_pipeline(profile, 8 * microbatches, Layout(ranks, ranks, pp=ranks), machine_of(profile),
                         microbatches=microbatches, schedule="interleaved", virtual_stages=chunks)
    assert p.bubble == pytest.approx((ranks - 1) / (chunks * microbatches + ranks - 1))
    assert p.step == pytest.approx(2.0 * (chunks * microbatches + ranks - 1)) and p.p2p == 0
    plan = Schedule("interleaved", ranks * chunks, microbatches, virtual_stages=chunks)
    rank_0 = range(0, ranks * chunks, ranks)  # its chunks: the most in flight
    assert p.memory_bytes == 3 * 1000 * chunks + 10 * sum(plan.max_in_flight(s) for s in rank_0)


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8)])
def test_zero_bubble_prediction_is_the_papers_bubble(stages, microbatches):
    """Forward 1, backward 2 (input and weight halves 1 each): ZB-H1's (p-1)/(3m + p-1); a stage holds
    min(p, m) micro-batches until their W."""
    profile = profile_of([(1.0, 2.0, [1000], 100, 10)] * stages)
    p = predict_pipeline(profile, 8 * microbatches, Layout(stages, stages, pp=stages), machine_of(profile),
                         microbatches=microbatches, schedule="zero-bubble")
    assert p.bubble == pytest.approx((stages - 1) / (3 * microbatches + stages - 1))
    assert p.step == pytest.approx(3.0 * microbatches + stages - 1)
    assert p.memory_bytes == 3 * 1000 + min(stages, microbatches) * 10
