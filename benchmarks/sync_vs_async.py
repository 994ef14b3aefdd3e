"""Sync or async, and how often to average: one table from real runs of the jobs on this machine.

    python benchmarks/sync_vs_async.py --workers 2 --epochs 2 --out runs/sync_vs_async
    python benchmarks/sync_vs_async.py --workers 2 --epochs 1 --only ps-sync ps-async --straggler

Runs each configuration as its job under mpirun (resnet-small on Fashion-MNIST by default):
synchronous data parallelism, the parameter server (sync, async, bounded staleness 2; one
server rank besides the workers), local SGD (H = 4, 16, 64) and DiLoCo (H = 16, outer lr 0.7,
Nesterov 0.9); with --straggler, the parameter-server modes again with the last worker slowed
2x. Reads every run's metrics.h5 and prints one Markdown table: final test accuracy, wall
time, bytes sent (all ranks), wall time until the test accuracy first reached --target (at an
epoch end), mean staleness. Runs are sequential; each configuration runs once (a study of
accuracy and time together, not a paired timing comparison: rerun it for spread).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name: (job, extra ranks besides the workers, arguments)
    "dp": ("resnet_dp.py", 0, ()),
    "ps-sync": ("resnet_ps.py", 1, ("--mode", "sync")),
    "ps-async": ("resnet_ps.py", 1, ("--mode", "async")),
    "ps-bounded2": ("resnet_ps.py", 1, ("--mode", "bounded", "--staleness", "2")),
    "local-H4": ("resnet_dp.py", 0, ("--sync-every", "4")),
    "local-H16": ("resnet_dp.py", 0, ("--sync-every", "16")),
    "local-H64": ("resnet_dp.py", 0, ("--sync-every", "64")),
    "diloco-H16": ("resnet_dp.py", 0, ("--sync-every", "16", "--outer-lr", "0.7", "--outer-momentum", "0.9")),
}
STRAGGLER = ("ps-sync", "ps-async", "ps-bounded2")


def run(name, job, ranks, args, out, common):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    mpirun = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun), "-n", str(ranks), "--oversubscribe", sys.executable, str(ROOT / "jobs" / job),
               *common, *args, "--out", str(out / name)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def summarise(path: Path, target: float) -> dict:
    with h5py.File(path / "metrics.h5", "r") as f:
        accuracy = f["epochs/test_accuracy"][...]
        walls = np.cumsum(f["epochs/wall_time"][...])
        reached = np.flatnonzero(accuracy >= target)
        staleness = f["updates/staleness"][...] if "updates/staleness" in f else None
        return dict(accuracy=float(accuracy[-1]), wall=float(walls[-1]),
                    megabytes=float(f["steps/bytes_sent"][...].sum() / 2**20),
                    to_target=f"{walls[reached[0]]:.0f}" if len(reached) else "not reached",
                    staleness=f"{staleness.mean():.2f}" if staleness is not None and len(staleness) else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per worker per step")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--target", type=float, default=0.88, help="test accuracy for the time-to-target column")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="a subset of the configurations")
    parser.add_argument("--straggler", action="store_true", help="also the parameter server with a 2x slower worker")
    parser.add_argument("--out", default="runs/sync_vs_async")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    common = ("--data", args.data, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--threads", "1", "--log-every", "0", "--device", "cpu")
    names = args.only or list(CONFIGS)
    plan = [(name, *CONFIGS[name]) for name in names]
    if args.straggler:
        for name in [n for n in names if n in STRAGGLER]:
            job, extra, job_args = CONFIGS[name]
            last = args.workers + extra - 1
            plan.append((f"{name}+straggler", job, extra, (*job_args, "--straggler", str(last), "--slowdown", "2")))
    print(f"| configuration | ranks | test accuracy | wall s | MiB sent | s to {args.target} | mean staleness |")
    print("|---|---|---|---|---|---|---|")
    for name, job, extra, job_args in plan:
        run(name, job, args.workers + extra, job_args, out, common)
        row = summarise(out / name, args.target)
        print(f"| {name} | {args.workers + extra} | {row['accuracy']:.4f} | {row['wall']:.0f} | {row['megabytes']:.1f} "
              f"| {row['to_target']} | {row['staleness']} |", flush=True)


if __name__ == "__main__":
    main()
