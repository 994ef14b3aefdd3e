"""The report's figures, drawn with matplotlib's Agg backend (no display) and saved as PNGs.

Each function takes runs (and analysis results) and a path, writes one PNG and returns the
path, or returns None when the run has nothing to draw (e.g. no epochs yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpipar.report import analysis  # noqa: E402
from mpipar.report import pipeline as pipeline_analysis  # noqa: E402
from mpipar.report.reader import TIME_FIELDS, Run  # noqa: E402

__all__ = ["loss_curve", "accuracy_curve", "time_split_bars", "memory_bars", "step_heatmap", "bytes_sent_bars",
           "scaling_plot", "time_split_by_run", "step_gantt", "gantt_steps", "pipeline_schedule", "p2p_heatmap"]

COLOURS = {"compute_time": "#4c72b0", "comm_time": "#dd8452", "idle_time": "#c44e52", "data_time": "#55a868"}
HELD = {"param_bytes": ("parameters", "#8172b3"), "grad_bytes": ("gradients", "#937860"),
        "optimizer_bytes": ("optimizer state", "#da8bc3")}
LABELS = {"compute_time": "compute", "comm_time": "communication", "idle_time": "idle (waiting)",
          "data_time": "data loading"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curve(run: Run, path: Path) -> Optional[Path]:
    if run.num_steps == 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(run.num_steps), run.steps["loss"], marker="." if run.num_steps < 50 else None)
    ax.set(xlabel="step", ylabel="training loss", title=f"{run.name}: loss per step")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_curve(run: Run, path: Path) -> Optional[Path]:
    """Test accuracy per epoch; for a language model (attribute ``task``), validation loss and bits
    per byte (the loss in nats over ln 2: a token is a byte) instead."""
    accuracy = run.epochs.get("test_accuracy")
    if accuracy is None or len(accuracy) == 0:
        return None
    epochs = run.epochs.get("epoch", np.arange(len(accuracy)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if run.attrs.get("task") == "language model":
        loss = np.asarray(run.epochs["test_loss"], dtype=np.float64)
        ax.plot(epochs, loss, marker="o")
        ax.set(xlabel="epoch", ylabel="validation loss (nats per token)",
               title=f"{run.name}: validation loss and bits per byte")
        bits = ax.secondary_yaxis("right", functions=(lambda nats: nats / np.log(2), lambda b: b * np.log(2)))
        bits.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        return _save(fig, path)
    ax.plot(epochs, accuracy, marker="o")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"{run.name}: test accuracy per epoch")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _stacked(ax, positions, split, labels=True):
    bottom = np.zeros(len(positions))
    for name in TIME_FIELDS:
        values = np.nan_to_num(np.asarray(split[name], dtype=np.float64))
        ax.bar(positions, values, bottom=bottom, color=COLOURS[name], label=LABELS[name] if labels else None)
        bottom += values


def time_split_bars(run: Run, path: Path) -> Optional[Path]:
    if run.num_steps == 0:
        return None
    split = analysis.time_split(run)
    ranks = np.arange(len(split["step_time"]))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(ranks) + 3), 3.5))
    _stacked(ax, ranks, split)
    ax.set(xlabel="rank", ylabel="mean s per step", title=f"{run.name}: where each rank's time went")
    ax.set_xticks(ranks)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def memory_bars(run: Run, path: Path) -> Optional[Path]:
    """Per rank: its peak resident memory, and beside it the parameter, gradient and optimizer bytes it
    held (their largest over the run, stacked) where the strategy recorded them; None without either."""
    peaks = run.rank_peaks("max_rss_bytes")
    held = {name: values for name in HELD if (values := run.rank_peaks(name)) is not None}
    if peaks is None and not held:
        return None
    ranks = np.arange(len(peaks) if peaks is not None else len(next(iter(held.values()))))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(ranks) + 3), 3.5))
    width = 0.4 if peaks is not None and held else 0.8
    if peaks is not None:
        ax.bar(ranks - (width / 2 if held else 0), np.nan_to_num(peaks) / 1e6, width, color="#8c8c8c",
               label="peak resident")
    bottom = np.zeros(len(ranks))
    for name, values in held.items():
        label, colour = HELD[name]
        values = np.nan_to_num(values) / 1e6
        ax.bar(ranks + (width / 2 if peaks is not None else 0), values, width, bottom=bottom, color=colour,
               label=f"{label} held")
        bottom += values
    ax.set(xlabel="rank", ylabel="MB", title=f"{run.name}: memory per rank")
    ax.set_xticks(ranks)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def step_heatmap(run: Run, path: Path, straggler: Optional[analysis.Straggler]) -> Optional[Path]:
    if run.num_steps == 0:
        return None
    measure = straggler.measure if straggler is not None else "step_time"
    values = run.per_rank(measure)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * values.shape[1] + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(values.T * 1000), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"{measure.replace('_', ' ')} (ms)")
    title = f"{run.name}: {measure.replace('_', ' ')} per step and rank"
    if straggler is not None:
        title += f"\nstraggler: rank {straggler.rank}, {100 * straggler.slower_by:.0f}% slower"
    ax.set(xlabel="step", ylabel="rank", title=title)
    if values.shape[1] <= 16:
        ax.set_yticks(np.arange(values.shape[1]))
    return _save(fig, path)


def bytes_sent_bars(run: Run, path: Path) -> Optional[Path]:
    if run.num_steps == 0:
        return None
    sent = np.nansum(run.per_rank("bytes_sent"), axis=0) / 1e6
    ranks = np.arange(len(sent))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(ranks) + 3), 3.5))
    ax.bar(ranks, sent, color=COLOURS["comm_time"])
    ax.set(xlabel="rank", ylabel="MB sent (whole run)", title=f"{run.name}: bytes sent per rank")
    ax.set_xticks(ranks)
    return _save(fig, path)


def scaling_plot(scaling: analysis.Scaling, path: Path) -> Optional[Path]:
    if len(scaling.ranks) < 2:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(scaling.ranks, scaling.samples_per_s, marker="o", label="measured")
    left.plot(scaling.ranks, scaling.samples_per_s[0] * scaling.ranks / scaling.ranks[0], ls="--", color="grey",
              label="linear")
    left.set(xlabel="ranks", ylabel="samples/s", title="throughput")
    left.legend(fontsize="small")
    right.plot(scaling.ranks, scaling.efficiency, marker="o")
    right.axhline(1.0, ls="--", color="grey")
    right.set(xlabel="ranks", ylabel="efficiency", title="scaling efficiency vs the smallest run",
              ylim=(0, max(1.1, float(np.nanmax(scaling.efficiency, initial=1.0)) * 1.1)))
    for ax in (left, right):
        ax.set_xticks(scaling.ranks)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def time_split_by_run(runs: Sequence[Run], path: Path) -> Optional[Path]:
    runs = [r for r in runs if r.num_steps]
    if len(runs) < 2:
        return None
    means = [{k: np.nanmean(v) for k, v in analysis.time_split(r).items()} for r in runs]
    positions = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs) + 3), 3.8))
    _stacked(ax, positions, {k: [m[k] for m in means] for k in TIME_FIELDS})
    ax.set_xticks(positions, [f"{r.name}\n({r.world_size} ranks)" for r in runs], fontsize="small")
    ax.set(ylabel="mean s per step (mean over ranks)", title="where the time went, per run")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


EVENT_COLOURS = {"step": "#e6e6e6", "data": COLOURS["data_time"], "shard_data": COLOURS["data_time"],
                 "train_step": COLOURS["compute_time"], "optimizer": "#8172b3", "apply": "#8172b3",
                 "wait": COLOURS["idle_time"], "server_wait": COLOURS["idle_time"], "wait_bucket": "#8c2d2f",
                 "exchange": COLOURS["comm_time"], "pull": "#b35806", "receive_push": COLOURS["comm_time"],
                 "reply": "#b35806", "allreduce": COLOURS["comm_time"], "push": COLOURS["comm_time"],
                 "forward": "#64b5cd", "backward": COLOURS["compute_time"], "recv_activation": COLOURS["idle_time"],
                 "recv_grad": COLOURS["idle_time"], "send_activation": COLOURS["comm_time"],
                 "send_grad": COLOURS["comm_time"], "recv_skip": COLOURS["idle_time"],
                 "recv_skip_grad": COLOURS["idle_time"], "send_skip": "#b35806", "send_skip_grad": "#b35806",
                 "update": "#8172b3", "wait_sends": "#8c2d2f", "tp_allreduce": COLOURS["comm_time"],
                 "tp_gather": COLOURS["comm_time"], "window_get": "#b35806", "window_accumulate": COLOURS["comm_time"]}
GANTT_STEPS = 4


def gantt_steps(run: Run, steps: int = GANTT_STEPS) -> np.ndarray:
    """The steps the Gantt chart shows: the first sampled one and those right after it, at most
    ``steps`` (a resumed run's later samples are left to the trace)."""
    traced = run.traced_steps[:steps]
    breaks = np.flatnonzero(np.diff(traced) != 1)
    return traced[:breaks[0] + 1] if len(breaks) else traced


def step_gantt(run: Run, path: Path, steps: int = GANTT_STEPS) -> Optional[Path]:
    """Up to ``steps`` consecutive sampled steps as a Gantt chart, a row per rank on the run's one clock:
    the step (grey), its data / train_step / optimizer, the waits and exchanges inside them
    (narrower), and transfers in flight (a thin bar under the row)."""
    events = run.events
    if not len(events.get("step", [])):
        return None
    names, levels = run.event_names, run.event_levels
    chosen = gantt_steps(run, steps)
    shown = np.isin(events["step"], chosen)
    rank, code, lane = events["rank"][shown], events["name"][shown], events["lane"][shown]
    start = events["start"][shown] * 1000
    width = np.maximum(events["duration"][shown], 0.0) * 1000
    origin = start.min()
    start = start - origin
    ranks = int(rank.max()) + 1
    fig, ax = plt.subplots(figsize=(11, min(22, max(2.8, 0.32 * ranks + 1.8))))
    heights = {0: 0.8, 1: 0.56, 2: 0.34, 3: 0.18}
    drawn = []
    for c in np.unique(code).tolist():
        name = names[c] if c < len(names) else f"event {c}"
        level = levels[c] if c < len(levels) else 1
        colour = EVENT_COLOURS.get(name, "#999999")
        for is_comm in (False, True):
            mine = (code == c) & ((lane != 0) == is_comm)
            if not mine.any():
                continue
            for r in np.unique(rank[mine]).tolist():
                sel = mine & (rank == r)
                if is_comm:   # under the row
                    y, h = r + 0.3, 0.12
                else:
                    h = heights.get(level, 0.18)
                    y = r - h / 2
                ax.broken_barh(list(zip(start[sel], width[sel])), (y, h), facecolors=colour,
                               edgecolor="none" if level or is_comm else "#bbbbbb", linewidth=0.5)
            drawn.append((name, colour, is_comm))
    handles = [matplotlib.patches.Patch(color=colour, label=name + (" (in flight)" if is_comm else ""))
               for name, colour, is_comm in drawn]
    ax.set_ylim(ranks - 0.5, -0.5)
    if ranks <= 32:
        ax.set_yticks(np.arange(ranks))
    first, last = chosen[0], chosen[-1]
    ax.set(xlabel="ms (one clock for all ranks)", ylabel="rank",
           title=f"{run.name}: sampled steps {first}-{last}, per rank")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


BUBBLE_COLOUR = "#f4c7c3"


def _draw_timeline(ax, timeline: pipeline_analysis.Timeline, title: str) -> None:
    """Rows of forward (light) and backward (dark) bars, each labelled with its micro-batch and
    coloured by it; the idle time of each row (the bubble) shaded behind them."""
    palette = plt.get_cmap("tab20")  # 20 colours: an integer picks one
    rows = list(timeline.rows)
    ax.barh(range(len(rows)), timeline.makespan * 1000, height=0.8, color=BUBBLE_COLOUR, hatch="//",
            edgecolor="#e08a82", linewidth=0)
    for y, rank in enumerate(rows):   # one collection per row: thousands of spans draw in a moment
        row = timeline.rows[rank]
        ax.broken_barh([(s.start * 1000, (s.end - s.start) * 1000) for s in row], (y - 0.4, 0.8), edgecolor="white",
                       linewidth=0.5, facecolors=[palette((2 * s.microbatch + (s.kind == "F")) % palette.N)
                                                  for s in row])
    spans = [(y, span) for y, rank in enumerate(rows) for span in timeline.rows[rank]]
    widest = timeline.makespan * 1000 / 90   # labels where they fit, and not thousands of them
    labelled = [(y, s) for y, s in spans if (s.end - s.start) * 1000 > widest][:160]
    for y, span in labelled:
        ax.text((span.start + span.end) * 500, y, f"{span.kind}{span.microbatch}", ha="center", va="center",
                fontsize="x-small")
    labels = []
    for rank in rows:
        stages = sorted({span.stage for span in timeline.rows[rank]})
        labels.append(f"rank {rank}\nstage {','.join(map(str, stages))}")
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)


def pipeline_schedule(run: Run, path: Path) -> Optional[Path]:
    """A pipeline run's last sampled step as measured (forward F and backward B of each
    micro-batch per rank of the first pipeline) above the same schedule simulated with the
    measured mean stage times and free communication, both on one time axis, the bubble shaded."""
    if not pipeline_analysis.is_pipeline(run):
        return None
    measured = pipeline_analysis.measured_timeline(run)
    if measured is None:
        return None
    ideal = pipeline_analysis.ideal_for_run(run)
    panels = [(measured, f"measured: step {int(run.traced_steps[-1])}, bubble {measured.bubble:.3f}")]
    if ideal is not None:
        panels.append((ideal, f"ideal: {run.attrs['schedule']} with the measured mean stage times, free "
                              f"communication, bubble {ideal.bubble:.3f}"))
    rows = sum(len(t.rows) for t, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.6 + 0.55 * rows + 0.8 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (timeline, title) in zip(axes[:, 0], panels):
        _draw_timeline(ax, timeline, title)
    axes[-1, 0].set_xlabel("ms from the first forward")
    handles = [matplotlib.patches.Patch(facecolor=BUBBLE_COLOUR, edgecolor="#e08a82", hatch="//",
                                        label="idle (bubble)")]
    axes[0, 0].legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{run.name}: {run.attrs['schedule']}, {run.attrs['stages']} stages, {run.attrs['microbatches']} "
                 f"micro-batches (F3: forward of micro-batch 3)", fontsize="medium")
    return _save(fig, path)


def p2p_heatmap(run: Run, path: Path) -> Optional[Path]:
    """Bytes each rank sent to each peer point to point over the run (None without such traffic)."""
    matrix = run.p2p_matrix()
    if matrix is None:
        return None
    size = len(matrix)
    fig, ax = plt.subplots(figsize=(min(9.0, max(4.5, 0.5 * size + 3)), min(8.0, max(3.5, 0.5 * size + 2))))
    image = ax.imshow(matrix / 1e6, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="MB sent (whole run)")
    if size <= 8:
        top = matrix.max() / 1e6
        for (sender, peer), value in np.ndenumerate(matrix / 1e6):
            ax.text(peer, sender, f"{value:.3g}", ha="center", va="center", fontsize="small",
                    color="black" if value > 0.6 * top else "white")
    if size <= 32:
        ax.set_xticks(range(size))
        ax.set_yticks(range(size))
    ax.set(xlabel="to rank", ylabel="from rank", title=f"{run.name}: point-to-point bytes, rank x rank")
    return _save(fig, path)
