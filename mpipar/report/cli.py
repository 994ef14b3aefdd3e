"""``mpipar-report RUN [RUN ...] [-o OUTDIR]``: see where the time went.

Reads run directories (or their ``metrics.h5``) and writes ``OUTDIR/report.html``, one
self-contained page with the PNGs inlined, and the PNGs beside it. One run: loss and
accuracy, each rank's time split, a step x rank heat map with the straggler, bytes sent.
Several runs: each of those, plus throughput and scaling efficiency against ranks and the
time split side by side.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

from mpipar.report import analysis, html, plots
from mpipar.report.reader import Run, read_run

__all__ = ["build_report", "main"]


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
        rows = [[rank, *(f"{1000 * split[k][rank]:.2f}" for k in ("compute_time", "comm_time", "idle_time",
                                                                  "data_time", "step_time")),
                 f"{sent[rank] / 1e6:.2f}"] for rank in range(len(split["step_time"]))]
        fragments.append(html.table(["rank", "compute ms", "comm ms", "idle ms", "data ms", "step ms",
                                     "MB sent"], rows))
        fragments.append(html.paragraph(f"Means per step over {len(analysis.measured_steps(run))} steps "
                                        f"(the first left out as warm-up when there are more than 2); "
                                        f"throughput {analysis.throughput(run):.1f} samples/s."))
    figures = [(plots.loss_curve(run, outdir / f"{prefix}_loss.png"), "loss per step"),
               (plots.accuracy_curve(run, outdir / f"{prefix}_accuracy.png"), "test accuracy per epoch"),
               (plots.time_split_bars(run, outdir / f"{prefix}_time_split.png"), "time split per rank"),
               (plots.step_heatmap(run, outdir / f"{prefix}_heatmap.png", straggler), "step x rank heat map"),
               (plots.bytes_sent_bars(run, outdir / f"{prefix}_bytes_sent.png"), "bytes sent per rank")]
    fragments.extend(html.image_tag(png, alt) for png, alt in figures)
    return f"{run.name} ({run.strategy}, {run.world_size} ranks)", fragments


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
    args = parser.parse_args(argv)
    try:
        report = build_report(args.runs, args.out)
    except (OSError, KeyError) as exc:
        print(f"mpipar-report: error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
