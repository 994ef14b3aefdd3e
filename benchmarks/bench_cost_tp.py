"""Predicted vs measured: tensor parallelism of a vision transformer (the cost model's TP prediction).

Usage (a driver; it launches every MPI run itself):
    python benchmarks/bench_cost_tp.py --rounds 3 --out benchmarks/results/cost_tp-DATE.md
    python benchmarks/bench_cost_tp.py --rounds 1 --steps 10        # a smoke run

Each round calibrates a machine file on 2 ranks (``mpipar-calibrate --model vit-tiny``: the links, the
unsplit model and one rank of tp 2 and 4), then, with that file only, runs ``jobs/vit_tp.py --data
synthetic`` on 2 ranks with ``--machine``: ``--tp 2`` at 128 and 32 samples per group (the blocks' 16
Allreduces per step on shared memory) and ``--tp 1`` (2 data-parallel replicas, the check that the unsplit
profile predicts as the DP model does), and reads predicted and measured back from the metrics files
(``mpipar.cost.report_rows``: medians over the steps after the first). Medians over rounds; the load
average is recorded with every round. Target: the TP step within 15%.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS = (("tp 2, 128 per group", ("--tp", "2", "--batch-size", "128")),
        ("tp 2, 32 per group", ("--tp", "2", "--batch-size", "32")),
        ("tp 1 (DP x 2), 128 per replica", ("--tp", "1", "--batch-size", "128")))
QUANTITIES = ("step s", "compute s", "not computing s")
TARGET = 0.15


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def mpirun(ranks: int, *args: str, timeout: float = 600) -> str:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    command = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), "--oversubscribe", sys.executable,
               *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def one_round(work: Path, steps: int) -> dict:
    """{job: {quantity: (predicted, measured)}} of one calibration and the jobs predicted from it."""
    from mpipar.cost import report_rows

    machine = work / "machine.json"
    mpirun(2, "-m", "mpipar.cost.calibrate", "--model", "vit-tiny", "--out", str(machine))
    result = {}
    for index, (name, args) in enumerate(JOBS):
        out = work / f"job{index}"
        mpirun(2, str(ROOT / "jobs" / "vit_tp.py"), "--data", "synthetic", "--max-steps", str(steps), "--threads",
               "1", "--machine", str(machine), "--out", str(out), *args)
        result[name] = {q: (p, m) for q, p, m in report_rows(out / "metrics.h5")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps of each job")
    parser.add_argument("--out", help="write the Markdown table here")
    args = parser.parse_args()
    rounds, loads = [], []
    for index in range(args.rounds):
        before = load()
        with tempfile.TemporaryDirectory(prefix="bench_cost_tp-") as work:
            rounds.append(one_round(Path(work), args.steps))
        loads.append(f"{before} -> {load()}")
        print(f"round {index + 1}: load {loads[-1]}", flush=True)
        for name, rows in rounds[-1].items():
            print(f"  {name}: " + ", ".join(f"{q} {1e3 * p:.1f}/{1e3 * m:.1f} ms" for q, (p, m) in rows.items()))
    lines = [f"# Cost model: tensor parallelism, predicted vs measured ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python benchmarks/bench_cost_tp.py --rounds {args.rounds} --steps {args.steps}"
             + (f" --out {args.out}`" if args.out else "`"), "",
             f"Load average (1 min) at the start and end of each round: {'; '.join(loads)}. "
             f"{os.cpu_count()} cores, shared.", "",
             "Each round calibrates on 2 ranks (`mpipar-calibrate --model vit-tiny`), then runs `jobs/vit_tp.py "
             f"--data synthetic --max-steps {args.steps}` on 2 ranks (shared memory) with `--machine`. Predicted and "
             "measured: medians over rounds (measured: the median step after the first); the ratio "
             "measured/predicted: the median of the rounds' ratios and their range.", "",
             "| job | quantity | predicted ms | measured ms | measured/predicted (rounds' range) | step within 15% |",
             "|---|---|---|---|---|---|"]
    for name, _ in JOBS:
        for quantity in QUANTITIES:
            pairs = [r[name][quantity] for r in rounds if quantity in r[name]]
            ratios = [m / p for p, m in pairs if p > 0]
            ratio = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-")
            within = ""
            if quantity == "step s" and ratios:
                within = "yes" if abs(statistics.median(ratios) - 1) <= TARGET else "no"
            lines.append(f"| {name} | {quantity} | {1e3 * statistics.median(p for p, _ in pairs):.2f} | "
                         f"{1e3 * statistics.median(m for _, m in pairs):.2f} | {ratio} | {within} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
