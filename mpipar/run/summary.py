"""``mpipar-summary metrics.h5``: where the time went in a run, from its metrics file."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mpipar.report.reader import read_run

__all__ = ["summarize", "main"]


def summarize(path) -> str:
    """A short human-readable account of a run's metrics file."""
    run = read_run(path)
    attrs, steps, epochs = run.attrs, run.steps, run.epochs
    lines = [f"run: {attrs.get('strategy')} on {attrs.get('world_size')} ranks ({path})"]
    if not steps or len(steps.get("loss", [])) == 0:
        return "\n".join(lines + ["no steps recorded"])
    n = len(steps["loss"])
    step_time = steps["step_time"]               # (S, W); NaN where a rank did not exist (resumed on fewer)
    run_time = np.nansum(step_time, axis=0).max()
    share = {k: np.nansum(steps[k]) / np.nansum(step_time)
             for k in ("compute_time", "comm_time", "idle_time", "data_time")}
    sizes = steps.get("world_size")
    if sizes is not None and len(set(sizes.tolist())) > 1:
        changes = [f"{sizes[i - 1]} -> {sizes[i]} ranks at step {i}" for i in range(1, n) if sizes[i] != sizes[i - 1]]
        lines.append("resumed on another number of ranks: " + ", ".join(changes))
    lines.append(f"steps: {n}, samples/s: {steps['samples'].sum() / run_time:.1f}, "
                 f"final loss: {steps['loss'][-1]:.4f}")
    lines.append("step time: " + ", ".join(f"{k.replace('_time', '')} {100 * v:.1f}%" for k, v in share.items()))
    per_rank = np.nansum(step_time, axis=0)
    lines.append(f"per rank busy s: {np.array2string(np.nansum(steps['compute_time'], axis=0), precision=1)}; "
                 f"MB sent: {np.array2string(np.nansum(steps['bytes_sent'], axis=0) / 1e6, precision=1)}; "
                 f"slowest/fastest rank time: {per_rank.max() / max(per_rank.min(), 1e-12):.2f}")
    peaks = run.rank_peaks("max_rss_bytes")
    if peaks is not None:
        worst = int(np.nanargmax(peaks))
        lines.append(f"peak resident memory: max {peaks[worst] / 1e6:.1f} MB on rank {worst} "
                     f"(per rank MB: {np.array2string(peaks / 1e6, precision=1)})")
    if len(epochs.get("test_accuracy", [])):
        metric = attrs.get("test_metric", "accuracy")  # mpipar.fit's own metric is stored as test_accuracy
        lines.append(f"epochs: {len(epochs['test_accuracy'])}, final test {metric}: "
                     f"{epochs['test_accuracy'][-1]:.4f}, test loss: {epochs['test_loss'][-1]:.4f}")
    for key in ("bubble_measured", "bubble_ideal", "bubble_bound"):
        if key in attrs:
            lines.append(f"{key}: {float(attrs[key]):.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", help="a run's metrics.h5")
    parser.add_argument("--config", action="store_true", help="also print the run's configuration")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.metrics))
        if args.config:
            print(json.dumps(json.loads(read_run(args.metrics).attrs["config"]), indent=2))
    except (OSError, KeyError) as exc:
        print(f"mpipar-summary: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
