"""mpipar-report: reading runs, the straggler and scaling analysis, a self-contained HTML page."""

import base64
import io
import json
import re

import h5py
import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

from mpi_helpers import ROOT, run_mpi  # noqa: E402
from mpipar.report import analysis  # noqa: E402
from mpipar.report.cli import build_report, main  # noqa: E402
from mpipar.report.reader import read_run  # noqa: E402
from mpipar.run.summary import summarize  # noqa: E402

JOB = str(ROOT / "jobs" / "resnet_dp.py")


def write_metrics(path, ranks, steps=8, compute=None, epochs=2, samples_per_rank=16):
    """A metrics.h5 in the layout MetricsWriter writes, with chosen per-rank times (seconds)."""
    compute = np.full(ranks, 0.010) if compute is None else np.asarray(compute, dtype=np.float64)
    rng = np.random.default_rng(0)
    comp = compute[None, :] * (1 + 0.02 * rng.random((steps, ranks)))
    comm = np.full((steps, ranks), 0.002)
    data = np.full((steps, ranks), 0.001)
    step = comp.max(1, keepdims=True) + comm + data
    idle = step - comp - comm - data
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(strategy="data_parallel", world_size=ranks, config=json.dumps({"ranks": ranks}))
        per_rank = dict(compute_time=comp, comm_time=comm, idle_time=idle, data_time=data, step_time=step,
                        bytes_sent=np.full((steps, ranks), 1e6), rank_loss=np.ones((steps, ranks)),
                        rank_samples=np.full((steps, ranks), samples_per_rank))
        for key, values in per_rank.items():
            f[f"steps/{key}"] = values
        f["steps/loss"] = np.linspace(2.3, 1.5, steps)
        f["steps/samples"] = np.full(steps, samples_per_rank * ranks)
        f["steps/world_size"] = np.full(steps, ranks)
        f["steps/wall_clock"] = np.cumsum(step[:, 0])
        if epochs:
            f["epochs/epoch"] = np.arange(epochs, dtype=np.float64)
            f["epochs/test_accuracy"] = np.linspace(0.3, 0.6, epochs)
            f["epochs/test_loss"] = np.linspace(2.0, 1.2, epochs)
    return path


def images(report):
    """The report's <img> sources, each checked to be an inlined PNG with more than one colour."""
    text = report.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', text)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.reshape(-1, pixels.shape[-1]).std(0).max() > 0, "an image of one colour"
    return text, sources


@pytest.mark.launch
def test_report_of_a_real_two_rank_run(tmp_path):
    """A real run whose rank 1 is made a straggler by the test switch (0.3 s more compute per step):
    the report names it."""
    run_dir = tmp_path / "run"
    result = run_mpi(2, JOB, "--data", "synthetic", "--batch-size", "16", "--threads", "1", "--max-steps", "6",
                     "--out", str(run_dir), env={"MPIPAR_SLOW_RANK": "1:0.3"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = summarize(run_dir / "metrics.h5")
    assert "run: data_parallel on 2 ranks" in summary and "final test accuracy" in summary
    assert main([str(run_dir), "-o", str(tmp_path / "report")]) == 0
    report = tmp_path / "report" / "report.html"
    text, sources = images(report)
    assert len(sources) == 6                        # loss, accuracy, time split, memory, heat map, bytes sent
    assert "data_parallel" in text and "2 ranks" in text and "Communication took" in text
    assert "Rank 1 was the straggler" in text and "Rank 0 was" not in text
    assert len(list((tmp_path / "report").glob("*.png"))) == 6


def test_a_run_killed_before_its_first_epoch(tmp_path):
    run = read_run(write_metrics(tmp_path / "killed" / "metrics.h5", ranks=2, steps=3, epochs=0))
    assert run.num_steps == 3 and run.epochs == {}
    text, sources = images(build_report([tmp_path / "killed"], tmp_path / "report"))
    assert len(sources) == 4                        # no accuracy yet
    empty = tmp_path / "empty" / "metrics.h5"       # killed before the first flush: attributes only
    empty.parent.mkdir()
    with h5py.File(empty, "w") as f:
        f.attrs.update(strategy="pipeline", world_size=4, config="{}")
    text, sources = images(build_report([empty], tmp_path / "report2"))
    assert sources == [] and "No steps recorded yet." in text


def test_memory_per_rank_beside_time(tmp_path):
    """/steps/max_rss_bytes (peak resident bytes, never falling) and a sharded run's held bytes: the
    summary names the largest peak and its rank, the report tabulates each rank's peak beside its
    time and draws memory per rank; a file without them (an older mpipar) has neither."""
    path = write_metrics(tmp_path / "memory" / "metrics.h5", ranks=3, steps=4)
    peaks = np.array([100e6, 300e6, 200e6])
    with h5py.File(path, "a") as f:
        f["steps/max_rss_bytes"] = np.linspace(0.5, 1.0, 4)[:, None] * peaks[None, :]
        for key, mb in (("param_bytes", 4e6), ("grad_bytes", 2e6), ("optimizer_bytes", 8e6)):
            f[f"steps/{key}"] = np.full((4, 3), mb)
    run = read_run(path)
    assert run.rank_peaks("max_rss_bytes").tolist() == peaks.tolist() and run.rank_peaks("absent") is None
    assert "peak resident memory: max 300.0 MB on rank 1 (per rank MB: [100. 300. 200.])" in summarize(path)
    report = build_report([path], tmp_path / "report")
    text, sources = images(report)
    assert len(sources) == 6 and 'alt="memory per rank"' in text and "peak RSS MB" in text, len(sources)
    assert "<td>300.0</td>" in text and (tmp_path / "report" / "0_memory_memory.png").exists()
    old = write_metrics(tmp_path / "old" / "metrics.h5", ranks=2)
    assert read_run(old).rank_peaks("max_rss_bytes") is None and "peak resident" not in summarize(old)
    text, sources = images(build_report([old], tmp_path / "report_old"))
    assert len(sources) == 5 and "memory per rank" not in text and "peak RSS MB" not in text


def test_straggler_is_named(tmp_path):
    slow = read_run(write_metrics(tmp_path / "slow" / "metrics.h5", ranks=4, compute=[0.01, 0.02, 0.01, 0.01]))
    straggler = analysis.find_straggler(slow)
    assert straggler is not None and straggler.rank == 1 and straggler.measure == "compute_time"
    assert straggler.slower_by == pytest.approx(1.0, abs=0.1)
    text, _ = images(build_report([slow.path], tmp_path / "report"))
    sentence = analysis.straggler_sentence(slow, straggler)
    assert sentence.startswith("Rank 1 was the straggler") and "above the median" in sentence
    assert sentence in text
    split = analysis.time_split(slow)
    assert split["compute_time"][1] > 1.9 * split["compute_time"][0]
    assert split["idle_time"][0] > split["idle_time"][1]  # the others wait for rank 1


def test_no_straggler_when_ranks_are_equal(tmp_path):
    even = read_run(write_metrics(tmp_path / "even" / "metrics.h5", ranks=4))
    assert analysis.find_straggler(even) is None
    text, _ = images(build_report([even.path], tmp_path / "report"))
    assert "was the straggler" not in text and "No straggler" in text


def test_scaling_across_runs(tmp_path):
    one = write_metrics(tmp_path / "one" / "metrics.h5", ranks=1, compute=[0.010])
    two = write_metrics(tmp_path / "two" / "metrics.h5", ranks=2, compute=[0.010, 0.010])
    scale = analysis.scaling([read_run(two), read_run(one)])
    assert scale.ranks.tolist() == [1, 2] and scale.efficiency[0] == pytest.approx(1.0)
    assert scale.samples_per_s[1] > scale.samples_per_s[0] and 0.5 < scale.efficiency[1] <= 1.0
    report = build_report([tmp_path / "two", tmp_path / "one"], tmp_path / "report")
    text, sources = images(report)
    assert (tmp_path / "report" / "scaling.png").stat().st_size > 2000
    assert (tmp_path / "report" / "time_split_by_run.png").exists()
    assert len(sources) == 2 + 5 + 5 and "Across runs" in text


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("microbatches", [1, 3, 4])
def test_ideal_pipeline_timeline_is_the_schedules_simulation(stages, microbatches):
    """The ideal chart is the schedule simulated: equal stage times give GPipe's and 1F1B's
    (S-1)/(M+S-1) and the naive schedule's (S-1)/S, each stage's row in the schedule's order
    (GPipe: every forward before any backward; 1F1B: S-1-s warm-up forwards on stage s); unequal
    times on a non-contiguous placement give placement_bubble's number."""
    from mpipar.pipeline.schedule import Schedule, placement_bubble
    from mpipar.report import pipeline

    ranks = list(range(stages))
    equal = [(1.0, 2.0)] * stages
    for name, bubble in (("gpipe", (stages - 1) / (microbatches + stages - 1)),
                         ("1f1b", (stages - 1) / (microbatches + stages - 1)), ("naive", (stages - 1) / stages)):
        timeline = pipeline.ideal_timeline(name, ranks, microbatches, equal)
        assert timeline.bubble == pytest.approx(bubble, abs=1e-12), name
        for stage, spans in timeline.rows.items():
            order = [(s.kind, s.microbatch) for s in spans]
            assert order == Schedule(name, stages, microbatches).compute_order(stage)
            assert all(a.end <= b.start + 1e-12 for a, b in zip(spans, spans[1:]))
    gpipe = pipeline.ideal_timeline("gpipe", ranks, microbatches, equal)
    assert gpipe.makespan == pytest.approx(3.0 * (microbatches + stages - 1))
    uneven = [(0.5 + s, 1.0 + 0.3 * s) for s in range(3)]
    placed = pipeline.ideal_timeline("1f1b", [0, 1, 0], microbatches, uneven)
    assert set(placed.rows) == {0, 1}
    assert placed.bubble == pytest.approx(placement_bubble(Schedule("1f1b", 3, microbatches), [0, 1, 0], uneven))
    assert pipeline.stage_ranks_of([0, 0, 1, 1, 0]) == [0, 1, 0]


@pytest.mark.parametrize("ranks", [2, 3])
def test_ideal_timeline_of_the_new_schedules(ranks):
    """Interleaved 1F1B on Megatron's placement (2 chunks per rank, read off the placement) and zero-bubble
    (I and W spans, half a backward each): the papers' bubbles at unit costs, each rank's row in its order."""
    from mpipar.pipeline.schedule import Schedule
    from mpipar.report import pipeline

    m = 2 * ranks
    looped = [stage % ranks for stage in range(2 * ranks)]
    interleaved = pipeline.ideal_timeline("interleaved", looped, m, [(1.0, 1.0)] * (2 * ranks))
    assert interleaved.bubble == pytest.approx((ranks - 1) / (2 * m + ranks - 1))
    assert {s.kind for spans in interleaved.rows.values() for s in spans} == {"F", "B"}
    zero = pipeline.ideal_timeline("zero-bubble", list(range(ranks)), m, [(1.0, 2.0)] * ranks)
    assert zero.bubble == pytest.approx((ranks - 1) / (3 * m + ranks - 1))
    for rank, spans in zero.rows.items():
        assert [(s.kind, s.microbatch) for s in spans] == Schedule("zero-bubble", ranks, m).compute_order(rank)
        assert all(s.end - s.start == pytest.approx(1.0) for s in spans)


def test_point_to_point_matrix_and_heat_map(tmp_path):
    """/p2p rows (one per rank, peer and flush) add up to the rank x rank matrix, drawn as a heat
    map for runs that have them; a run without them has neither."""
    path = write_metrics(tmp_path / "pp" / "metrics.h5", ranks=3)
    with h5py.File(path, "a") as f:
        rows = [(3, 0, 1, 100.0), (3, 1, 0, 40.0), (3, 1, 2, 100.0), (3, 2, 1, 40.0), (7, 0, 1, 100.0),
                (7, 1, 2, 100.0)]
        for column, values in zip(("step", "rank", "peer", "bytes"), zip(*rows)):
            f[f"p2p/{column}"] = np.asarray(values)
    run = read_run(path)
    assert run.p2p_matrix().tolist() == [[0, 200, 0], [40, 0, 200], [0, 40, 0]]
    text, sources = images(build_report([path], tmp_path / "report"))
    assert len(sources) == 6 and "rank x rank" in text and (tmp_path / "report" / "0_pp_p2p.png").exists()
    plain = read_run(write_metrics(tmp_path / "dp" / "metrics.h5", ranks=2))
    assert plain.p2p_matrix() is None


def test_predicted_beside_measured(tmp_path):
    """A run trained with --machine stores predicted_* attributes: the report puts them beside the
    measured medians (here compute 0.010-0.0102 s per step, step ~0.013 s), with the ratio."""
    path = write_metrics(tmp_path / "predicted" / "metrics.h5", ranks=2)
    with h5py.File(path, "a") as f:
        f.attrs.update(predicted_strategy="data_parallel", predicted_step_seconds=0.02,
                       predicted_compute_seconds=0.01, predicted_bubble=0.0, predicted_machine="machine.json")
    text, _ = images(build_report([path.parent], tmp_path / "report"))
    assert "Predicted by the cost model (data_parallel, machine file machine.json)" in text
    rows = re.findall(r"<tr><td>(step s|compute s)</td><td>([0-9.]+)</td><td>([0-9.]+)</td><td>([0-9.]+)</td>", text)
    found = {name: (float(p), float(m), float(r)) for name, p, m, r in rows}
    assert found["step s"][0] == 0.02 and 0.012 < found["step s"][1] < 0.014 and found["step s"][2] < 0.75
    assert found["compute s"][0] == 0.01 and 0.0099 < found["compute s"][1] < 0.0103
    plain = build_report([write_metrics(tmp_path / "plain" / "metrics.h5", ranks=2).parent], tmp_path / "r2")
    assert "Predicted by the cost model" not in plain.read_text()


@pytest.mark.launch
@pytest.mark.parametrize("job,args,strategy", [
    ("mlp_tp.py", ("--tp", "2"), "tensor_parallel"),
    ("mlp_mp.py", (), "pipeline"),  # layers placed 0 | 1 | 1 | 0: model parallelism through the pipeline
    ("resnet_dp.py", ("--sync-every", "2"), "local_sgd"),
], ids=["tensor_parallel", "model_parallel", "local_sgd"])
def test_report_of_each_strategy(tmp_path, job, args, strategy):
    """A small real run of each strategy not covered above (data parallel, pipelines and the parameter
    server are in tests/test_trace.py) gives a report whose images are all real PNGs, with the sampled
    steps drawn."""
    run_dir = tmp_path / "run"
    result = run_mpi(2, str(ROOT / "jobs" / job), "--data", "synthetic", "--batch-size", "16", "--threads", "1",
                     "--max-steps", "4", "--trace-steps", "1-2", "--out", str(run_dir), *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text, sources = images(build_report([run_dir], tmp_path / "report"))
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        recorded = str(f.attrs["strategy"])
    assert recorded == strategy and f"({strategy}, 2 ranks)" in text, (recorded, text[:500])
    assert len(sources) >= 5 and "Timed events of 2 sampled steps" in text, len(sources)
