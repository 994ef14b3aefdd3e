"""Benchmark: mpipar-report on a big run: 10,000 steps x 64 ranks (generated), with sampled events.

Usage:
    python benchmarks/bench_report.py
    python benchmarks/bench_report.py --steps 10000 --ranks 64 --traced 6 --rounds 3 --save benchmarks/results/x.md
    python benchmarks/bench_report.py --pipeline 8 --microbatches 16   # 64 ranks as 8 pipelines of 8 stages

Writes a metrics file in the layout ``MetricsWriter`` writes (every /steps field per step
and rank, epochs, and an /events table for --traced sampled steps: per rank the step, data,
train_step, optimizer, two waits and four buckets' Allreduce with their waits; with
``--pipeline S`` also each stage's forward and backward of --microbatches micro-batches in the
1F1B order and the /p2p rows between neighbouring stages, so the report adds the measured vs
ideal schedule and the rank x rank matrix), then times, each --rounds times (median, and the
range): reading it (``read_run``), the whole HTML report (``build_report``), each figure alone,
and the Chrome trace (``write_trace``). One process, no MPI.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from mpipar.diagnostics.events import NAMES, VOCABULARY  # noqa: E402
from mpipar.report import analysis, plots, trace  # noqa: E402
from mpipar.report import pipeline as pipeline_analysis  # noqa: E402
from mpipar.report.cli import build_report  # noqa: E402
from mpipar.report.reader import read_run  # noqa: E402


def generate(path: Path, steps: int, ranks: int, traced: int, seed: int = 0, stages: int = 0,
             microbatches: int = 8) -> None:
    """A data-parallel run's metrics file, rank 3 a straggler, the last ``traced`` of the first 30 steps sampled;
    with ``stages``, ranks / stages pipelines of ``stages`` stages (rank r: stage r % stages)."""
    rng = np.random.default_rng(seed)
    compute = 0.040 * (1 + 0.05 * rng.random((steps, ranks)))
    compute[:, 3 % ranks] *= 1.4
    data = np.full((steps, ranks), 0.002)
    wait = compute.max(1, keepdims=True) - compute + 0.004
    comm, idle = np.full((steps, ranks), 0.004), wait - 0.004
    step = data + compute + wait + 0.001
    loss = 2.3 * np.exp(-np.arange(steps) / 3000)[:, None] + 0.05 * rng.random((steps, ranks))
    with h5py.File(path, "w") as f:
        f.attrs.update(strategy="data_parallel", world_size=ranks, config=json.dumps({"generated": True}),
                       hosts=json.dumps([f"node{r // 8}" for r in range(ranks)]))
        if stages:
            f.attrs.update(strategy="pipeline_hybrid", schedule="1f1b", stages=stages, microbatches=microbatches,
                           placement=json.dumps(list(range(stages))))
            ideal = pipeline_analysis.ideal_timeline("1f1b", list(range(stages)), microbatches,
                                                     [(0.3 / microbatches / stages, 0.6 / microbatches / stages)]
                                                     * stages)
            activation = 2.0e5
            p2p = [(s, r, peer, float(microbatches * activation)) for s in range(steps // 50) for r in range(ranks)
                   for peer in (r - 1, r + 1) if 0 <= peer < ranks and peer // stages == r // stages]
            for column, values in zip(("step", "rank", "peer", "bytes"), zip(*p2p)):
                f[f"p2p/{column}"] = np.asarray(values)
        fields = dict(compute_time=compute, comm_time=comm, idle_time=idle, data_time=data, step_time=step,
                      bytes_sent=np.full((steps, ranks), 2.2e7), rank_loss=loss,
                      rank_samples=np.full((steps, ranks), 128))
        for name, values in fields.items():
            f.create_dataset(f"steps/{name}", data=values, maxshape=(None, None), chunks=(1024, ranks))
        f["steps/loss"] = fields["rank_loss"].mean(1)
        f["steps/samples"] = np.full(steps, 128 * ranks)
        f["steps/world_size"] = np.full(steps, ranks)
        f["steps/wall_clock"] = np.cumsum(step.max(1))
        epochs = 10
        f["epochs/epoch"] = np.arange(1, epochs + 1, dtype=np.float64)
        f["epochs/test_accuracy"] = np.linspace(0.5, 0.9, epochs)
        f["epochs/test_loss"] = np.linspace(1.5, 0.4, epochs)
        f["epochs/last_step"] = np.linspace(steps / epochs, steps, epochs)
        rows = []
        starts = np.concatenate([[0.0], np.cumsum(step.max(1))])
        for s in range(30 - traced, 30):
            for r in range(ranks):
                t0 = starts[s] + rng.random() * 1e-4
                d, c, w = data[s, r], compute[s, r], wait[s, r]
                rows += [(s, r, "step", t0, step[s, r]), (s, r, "data", t0, d), (s, r, "train_step", t0 + d, c + w),
                         (s, r, "wait", t0 + d + 0.3 * c, 0.0005), (s, r, "wait", t0 + d + c, w),
                         (s, r, "optimizer", t0 + d + c + w, 0.001)]
                for bucket in range(4):
                    launch = t0 + d + c * (0.4 + 0.15 * bucket)
                    done = t0 + d + c + w * (bucket + 1) / 4
                    rows += [(s, r, "allreduce", launch, done - launch),
                             (s, r, "wait_bucket", max(launch, t0 + d + c + w * bucket / 4), w / 4)]
                if stages:
                    rows += [(s, r, "forward" if span.kind == "F" else "backward", t0 + d + span.start,
                              (span.end - span.start) * (1 + 0.1 * rng.random()), span.microbatch, r % stages)
                             for span in ideal.rows[r % stages]]
        code = {name: i for i, name in enumerate(NAMES)}
        columns = {"step": [x[0] for x in rows], "rank": [x[1] for x in rows], "name": [code[x[2]] for x in rows],
                   "lane": [VOCABULARY[x[2]][0] for x in rows], "start": [x[3] for x in rows],
                   "duration": [x[4] for x in rows], "bytes": [5.5e6 if x[2] == "allreduce" else 0 for x in rows],
                   "peer": [-1] * len(rows), "index": [x[5] if len(x) > 5 else -1 for x in rows],
                   "stage": [x[6] if len(x) > 5 else -1 for x in rows]}
        for name, values in columns.items():
            f[f"events/{name}"] = np.asarray(values)
        f["events"].attrs.update(names=json.dumps(NAMES), levels=json.dumps([v[1] for v in VOCABULARY.values()]),
                                 lanes=json.dumps([v[0] for v in VOCABULARY.values()]),
                                 clock_offsets=rng.normal(0, 2e-5, ranks))


def timed(function, rounds):
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--traced", type=int, default=6, help="sampled steps with events")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", type=int, default=0, metavar="S",
                        help="ranks as pipelines of S stages (0: data parallel)")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step with --pipeline")
    parser.add_argument("--save", help="also write the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "big" / "metrics.h5"
        path.parent.mkdir()
        start = time.perf_counter()
        generate(path, args.steps, args.ranks, args.traced, stages=args.pipeline, microbatches=args.microbatches)
        generated = time.perf_counter() - start
        run = read_run(path)
        straggler = analysis.find_straggler(run)
        scale = analysis.scaling([run])
        rows = [("read_run", timed(lambda: read_run(path), args.rounds)),
                (f"build_report (HTML, {8 if args.pipeline else 6} figures)",
                 timed(lambda: build_report([path], tmp / "report"), args.rounds)),
                ("write_trace (Chrome JSON)", timed(lambda: trace.write_trace(run, tmp / "trace.json"), args.rounds))]
        figures = {"loss_curve": lambda p: plots.loss_curve(run, p),
                   "accuracy_curve": lambda p: plots.accuracy_curve(run, p),
                   "time_split_bars": lambda p: plots.time_split_bars(run, p),
                   "step_heatmap": lambda p: plots.step_heatmap(run, p, straggler),
                   "bytes_sent_bars": lambda p: plots.bytes_sent_bars(run, p),
                   "step_gantt": lambda p: plots.step_gantt(run, p),
                   "scaling_plot (1 run: none)": lambda p: plots.scaling_plot(scale, p)}
        if args.pipeline:
            figures.update(pipeline_schedule=lambda p: plots.pipeline_schedule(run, p),
                           p2p_heatmap=lambda p: plots.p2p_heatmap(run, p))
        rows += [(f"  {name}", timed(lambda f=f, n=name: f(tmp / f"{n[:12]}.png"), args.rounds))
                 for name, f in figures.items()]
        size_mb = path.stat().st_size / 1e6
        events = len(run.events["step"])
        trace_mb = (tmp / "trace.json").stat().st_size / 1e6
    layout = f", {args.ranks // args.pipeline} pipelines of {args.pipeline} stages x {args.microbatches} " \
        f"micro-batches" if args.pipeline else ""
    lines = [f"# bench_report: {args.steps} steps x {args.ranks} ranks{layout}, {args.traced} sampled steps",
             "",
             f"{platform.node()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
             f"numpy {np.__version__}, h5py {h5py.__version__}, matplotlib {plots.matplotlib.__version__}; "
             f"metrics.h5 {size_mb:.1f} MB ({events} events), trace JSON {trace_mb:.1f} MB, generated in "
             f"{generated:.1f} s; straggler found: rank {straggler.rank if straggler else None}. "
             f"Median of {args.rounds} rounds (min-max).",
             "", "| what | seconds |", "|---|---|"]
    lines += [f"| {name} | {median:.2f} ({low:.2f}-{high:.2f}) |" for name, (median, low, high) in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        Path(args.save).write_text(text)


if __name__ == "__main__":
    main()
