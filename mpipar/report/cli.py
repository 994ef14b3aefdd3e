"""``mpipar-report RUN [RUN ...] [-o OUTDIR] [--trace OUT.json]``: see where the time went.

Reads run directories (or their ``metrics.h5``) and writes ``OUTDIR/report.html``, one
self-contained page with the PNGs inlined, and the PNGs beside it. One run: loss and
accuracy, each rank's time split and memory (peak resident, and held parameters, gradients and
optimizer state where recorded), a step x rank heat map with the straggler, bytes sent,
the steps sampled with ``--trace-steps`` as a Gantt chart per rank; for a pipeline, its last
sampled step as measured beside the ideal schedule with the same stage times (bubbles shaded
and compared); for runs with point-to-point traffic, the rank x rank matrix of bytes sent. Several runs: each
of those, plus throughput and scaling efficiency against ranks and the time split side by
side. ``--trace OUT.json``: the sampled events as Chrome trace JSON, for
https://ui.perfetto.dev or chrome://tracing (several runs: one file each, OUT_<i>_<run>.json).
Works on finished runs, runs killed part-way and runs still going (whatever was flushed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

from mpipar.report import analysis, html, plots, trace
from mpipar.report import pipeline as pipeline_analysis
from mpipar.report.reader import Run, read_run

__all__ = ["build_report", "write_traces", "main"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "run"


def _run_section(run: Run, index: int, outdir: Path) -> html.Section:
    prefix = f"{index}_{_slug(run.name)}"
    straggler = analysis.find_straggler(run)
    fragments = [html.paragraph(f"{run.path}: strategy {run.strategy}, {run.world_size} ranks, "
                                f"{run.num_steps} steps, {len(run.epochs.get('test_accuracy', []))} epochs recorded."),
                 html.paragraph(analysis.straggler_sentence(run, straggler), "verdict"),
                 html.paragraph(analysis.comm_sentence(run), "verdict")]
    sizes = run.sizes()
    if len(set(sizes.tolist())) > 1:
        fragments.append(html.paragraph("Resumed on another number of ranks: " + ", ".join(
            f"{sizes[i - 1]} -> {sizes[i]} at step {i}" for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1])))
    if run.num_steps:
        split = analysis.time_split(run)
        sent = np.nansum(run.per_rank("bytes_sent"), axis=0)
        peaks = run.rank_peaks("max_rss_bytes")   # None in a file of an older mpipar
        rows = [[rank, *(f"{1000 * split[k][rank]:.2f}" for k in ("compute_time", "comm_time", "idle_time",
                                                                  "data_time", "step_time")),
                 f"{sent[rank] / 1e6:.2f}", *([] if peaks is None else [f"{peaks[rank] / 1e6:.1f}"])]
                for rank in range(len(split["step_time"]))]
        fragments.append(html.table(["rank", "compute ms", "comm ms", "idle ms", "data ms", "step ms",
                                     "MB sent", *([] if peaks is None else ["peak RSS MB"])], rows))
        fragments.append(html.paragraph(f"Means per step over {len(analysis.measured_steps(run))} steps "
                                        f"(the first left out as warm-up when there are more than 2); "
                                        f"throughput {analysis.throughput(run):.1f} samples/s."))
    figures = [(plots.loss_curve(run, outdir / f"{prefix}_loss.png"), "loss per step"),
               (plots.accuracy_curve(run, outdir / f"{prefix}_accuracy.png"), "test accuracy per epoch"),
               (plots.time_split_bars(run, outdir / f"{prefix}_time_split.png"), "time split per rank"),
               (plots.memory_bars(run, outdir / f"{prefix}_memory.png"), "memory per rank"),
               (plots.step_heatmap(run, outdir / f"{prefix}_heatmap.png", straggler), "step x rank heat map"),
               (plots.bytes_sent_bars(run, outdir / f"{prefix}_bytes_sent.png"), "bytes sent per rank"),
               (plots.step_gantt(run, outdir / f"{prefix}_gantt.png"), "sampled steps per rank")]
    fragments.extend(html.image_tag(png, alt) for png, alt in figures)
    fragments.extend(_predicted_fragments(run))
    fragments.append(html.paragraph(_events_sentence(run)))
    schedule = plots.pipeline_schedule(run, outdir / f"{prefix}_schedule.png")
    if schedule is not None:
        fragments.append(html.paragraph(_bubble_sentence(run), "verdict"))
        fragments.append(html.image_tag(schedule, "measured and ideal pipeline schedule"))
    p2p = plots.p2p_heatmap(run, outdir / f"{prefix}_p2p.png")
    if p2p is not None:
        fragments.append(html.paragraph("Point-to-point bytes over the run (evaluation included), rank x rank: "
                                        "rows send, columns receive."))
        fragments.append(html.image_tag(p2p, "point-to-point bytes, rank x rank"))
    return f"{run.name} ({run.strategy}, {run.world_size} ranks)", fragments


def _predicted_fragments(run: Run) -> list:
    """The cost model's prediction beside the measurement, for a run trained with ``--machine``."""
    rows = analysis.report_rows(run)
    if not rows:
        return []
    table = [[name, f"{predicted:.4f}", f"{measured:.4f}", f"{measured / predicted:.2f}" if predicted > 0 else "-"]
             for name, predicted, measured in rows]
    return [html.paragraph(f"Predicted by the cost model ({run.attrs.get('predicted_strategy', run.strategy)}, "
                           f"machine file {run.attrs.get('predicted_machine', '?')}) beside measured: medians "
                           f"over the steps after the first."),
            html.table(["quantity", "predicted", "measured", "measured / predicted"], table)]


def _events_sentence(run: Run) -> str:
    steps = run.traced_steps
    if not len(steps):
        return ("No timed events in this run (train with --trace-steps FIRST-LAST to record some steps' data "
                "loading, forward and backward, bucket Allreduces and optimizer per rank).")
    offsets = np.asarray(run.event_attrs.get("clock_offsets", [0.0]), dtype=np.float64)
    shown = plots.gantt_steps(run)
    return (f"Timed events of {len(steps)} sampled steps ({steps[0]}-{steps[-1]}); the chart shows steps "
            f"{shown[0]}-{shown[-1]}. Clocks aligned to rank 0's (largest offset measured "
            f"{1e6 * np.abs(offsets).max():.1f} us). mpipar-report RUN --trace trace.json writes them for "
            f"Perfetto or chrome://tracing.")


def _bubble_sentence(run: Run) -> str:
    """Measured vs ideal bubble of the pipeline chart, in words."""
    measured = pipeline_analysis.measured_timeline(run)
    assert measured is not None  # called where the run's pipeline chart was drawn from its events
    ideal = pipeline_analysis.ideal_for_run(run)
    text = (f"Pipeline bubble of sampled step {int(run.traced_steps[-1])}: measured {measured.bubble:.3f} "
            f"(idle share of the ranks' time from the first forward to the last backward)")
    if ideal is None:
        return text + (f"; no ideal schedule drawn for {run.attrs.get('schedule')} (one step of an asynchronous "
                       f"schedule is a window of the pipeline, not the whole schedule).")
    times = pipeline_analysis.stage_times(run)
    assert times is not None  # the run has pipeline events (above)
    per_stage = ", ".join(f"{1000 * f:.2f}/{1000 * b:.2f}" for f, b in times)
    return text + (f"; ideal {ideal.bubble:.3f} ({run.attrs['schedule']} simulated with the measured mean forward/"
                   f"backward ms per micro-batch of each stage, {per_stage}, and free communication; "
                   f"{ideal.makespan * 1000:.1f} ms vs {measured.makespan * 1000:.1f} ms measured).")


def write_traces(paths: Sequence, out) -> List[Path]:
    """Each run's events as Chrome trace JSON: ``out`` for one run, else ``out``'s stem with
    ``_<i>_<run>`` added, one file per run. Returns the paths."""
    runs = [read_run(p) for p in paths]
    out = Path(out)
    if len(runs) == 1:
        return [trace.write_trace(runs[0], out)]
    return [trace.write_trace(run, out.with_name(f"{out.stem}_{i}_{_slug(run.name)}{out.suffix or '.json'}"))
            for i, run in enumerate(runs)]


def build_report(paths: Sequence, outdir) -> Path:
    """Read the runs, draw the figures and write ``outdir/report.html``; returns its path."""
    runs: List[Run] = [read_run(p) for p in paths]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sections: List[html.Section] = []
    if len(runs) > 1:
        scale = analysis.scaling(runs)
        rows = [[name, int(ranks), f"{rate:.1f}", f"{eff:.2f}"]
                for name, ranks, rate, eff in zip(scale.names, scale.ranks, scale.samples_per_s, scale.efficiency)]
        sections.append(("Across runs", [
            html.paragraph("Efficiency is samples/s per rank relative to the smallest run (1.00: linear scaling)."),
            html.table(["run", "ranks", "samples/s", "efficiency"], rows),
            html.image_tag(plots.scaling_plot(scale, outdir / "scaling.png"), "throughput and scaling efficiency"),
            html.image_tag(plots.time_split_by_run(runs, outdir / "time_split_by_run.png"), "time split per run")]))
    sections.extend(_run_section(run, i, outdir) for i, run in enumerate(runs))
    title = "mpipar report: " + ", ".join(run.name for run in runs)
    report = outdir / "report.html"
    report.write_text(html.page(title, sections), encoding="utf-8")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run directory or its metrics.h5")
    parser.add_argument("-o", "--out", default="report", help="output directory (default: ./report)")
    parser.add_argument("--trace", metavar="OUT.json",
                        help="also write the sampled events (--trace-steps) as Chrome trace JSON for Perfetto")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.runs, args.out)
        traces = write_traces(args.runs, args.trace) if args.trace else []
    except (OSError, KeyError) as exc:
        print(f"mpipar-report: error: {exc}", file=sys.stderr)
        return 1
    print(report)
    for path in traces:
        events = len(json.loads(path.read_text())["traceEvents"])
        print(path if events else f"{path} (empty: the run has no events; train with --trace-steps FIRST-LAST)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
