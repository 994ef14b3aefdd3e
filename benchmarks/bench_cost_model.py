"""Predicted vs measured: Allreduce and point-to-point, a data-parallel step, a pipeline's bubble.

Usage (a driver; it launches every MPI run itself):
    python benchmarks/bench_cost_model.py --rounds 3 --out benchmarks/results/cost_model-DATE.md
    python benchmarks/bench_cost_model.py --rounds 1 --quick     # a smoke run

Each round calibrates a machine file on 2 ranks (``mpipar-calibrate``, layer times of resnet-small
at micro-batches 8..128), then, with that file only: times ping-pong and Allreduce from 64 KiB to
64 MiB on 2 and 4 ranks (shared memory; at 4 ranks the Allreduce is the ring model's extrapolation
from the 2-rank fit), runs ``jobs/resnet_dp.py`` on 2 ranks and ``jobs/resnet_pp.py`` (resnet-small,
3|2 split, 1F1B) at 4 and 8 micro-batches with ``--machine``, and reads predicted and measured back
from their metrics files (``mpipar.cost.report_rows``). Medians over rounds; the load average is
recorded with every round. With ``--nodes-script slurm/emulated-nodes.sh`` the comm part also runs
across 2 emulated nodes (see that script's header).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = tuple(2**k for k in range(16, 27, 2))  # 64 KiB ... 64 MiB


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def mpirun(ranks: int, *args: str, timeout: float = 600, nodes_script: str = None, per_node: bool = False) -> str:
    """``per_node``: one rank per emulated node (``--map-by node``)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    mpirun_path = Path(sys.executable).parent / "mpirun"
    command = [str(mpirun_path), "-n", str(ranks), "--oversubscribe", sys.executable, *args]
    if nodes_script:  # on the emulated nodes: the script's mpirun (hostfile, options), absolute paths
        command = ["bash", nodes_script, "mpirun", "-n", str(ranks), *(["--map-by", "node"] if per_node else []),
                   sys.executable, *args]
        env["MPIRUN"] = str(mpirun_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def worker_comm(path: str, sizes, peer: int = 1) -> None:
    """Under mpirun: one-way times between ranks 0 and ``peer`` and Allreduce times on every rank, as JSON on rank 0."""
    from mpi4py import MPI

    from mpipar.cost.calibrate import allreduce_times, ping_pong

    comm = MPI.COMM_WORLD
    p2p = ping_pong(comm, 0, peer, sizes, budget=2.0)
    allreduce = allreduce_times(comm, sizes, budget=2.0)
    gradient = allreduce_times(comm, sizes, budget=2.0, gradient=True)
    if comm.Get_rank() == 0:
        Path(path).write_text(json.dumps({"sizes": list(sizes), "p2p": p2p, "allreduce": allreduce,
                                          "gradient": gradient}))


def comm_round(machine_path: Path, ranks: int, sizes, work: Path, nodes_script: str = None, label: str = None,
               per_node: bool = False) -> list:
    """Measured and predicted rows; across nodes the ping-pong goes from rank 0 to the first rank of
    the second node and the Allreduce crosses nodes (predicted with the link across); ``per_node``:
    one rank per node."""
    from mpipar.cost import Machine

    machine = Machine.load(machine_path)
    on_node = 1 if per_node else machine.ranks_per_node
    link, peer, where = (machine.across, on_node, "2 nodes") if nodes_script else (
        machine.within, 1, "shared memory")
    where = label or where
    out = work / f"comm-{ranks}-{where.replace(' ', '-').replace(',', '')}.json"
    mpirun(ranks, str(Path(__file__).resolve()), "--worker-comm", str(out), "--sizes", ",".join(map(str, sizes)),
           "--peer", str(peer), nodes_script=nodes_script, per_node=per_node)
    data = json.loads(out.read_text())
    nodes = [rank // on_node for rank in range(ranks)] if nodes_script else [0] * ranks
    rows = []
    for nbytes, p2p, allreduce, gradient in zip(data["sizes"], data["p2p"], data["allreduce"], data["gradient"]):
        rows.append(("p2p", where, ranks, nbytes, link.p2p_seconds(nbytes), p2p))
        rows.append(("allreduce", where, ranks, nbytes, link.allreduce_seconds(nbytes, ranks), allreduce))
        rows.append(("gradient allreduce", where, ranks, nbytes, machine.gradient_allreduce_seconds(nbytes, nodes),
                     gradient))
    return rows


def job_round(machine_path: Path, work: Path, name: str, job: str, *args: str, ranks: int = 2,
              nodes_script: str = None) -> dict:
    from mpipar.cost import report_rows

    out = work / name
    mpirun(ranks, str(ROOT / "jobs" / job), "--data", "synthetic", "--threads", "1", "--machine", str(machine_path),
           "--out", str(out), *args, nodes_script=nodes_script)
    return {quantity: (predicted, measured) for quantity, predicted, measured in report_rows(out / "metrics.h5")}


def ratio(predicted: float, measured: float) -> float:
    return measured / predicted if predicted > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps of each job")
    parser.add_argument("--quick", action="store_true", help="sizes to 4 MiB, quick calibration")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--nodes-script", help="also across 2 emulated nodes of 2 ranks each, brought up with this "
                        "script (slurm/nodes/emulated-nodes.sh up 2); they must be up already")
    parser.add_argument("--worker-comm", help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_comm:
        worker_comm(args.worker_comm, [int(s) for s in args.sizes.split(",")], args.peer)
        return
    sizes = SIZES[:3] if args.quick else SIZES
    comm_rows, dp_rows, nodes_dp_rows, pp_rows, loads, nodes_notes = [], [], [], {4: [], 8: []}, [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            work = Path(scratch) / f"round-{round_index}"
            work.mkdir()
            machine = work / "machine.json"
            before = load()
            mpirun(2, "-m", "mpipar.cost.calibrate", "--out", str(machine), "--microbatch-sizes", "8,16,32,64,128",
                   *(["--quick"] if args.quick else []))
            machine4 = work / "machine-4.json"  # the same calibration on 4 ranks (links; layers at one size)
            mpirun(4, "-m", "mpipar.cost.calibrate", "--out", str(machine4), "--microbatch-sizes", "8",
                   *(["--quick"] if args.quick else []))
            comm_rows += comm_round(machine, 2, sizes, work)
            comm_rows += comm_round(machine, 4, sizes, work, label="shared memory, 2-rank file")
            comm_rows += comm_round(machine4, 4, sizes, work, label="shared memory, 4-rank file")
            dp_rows.append(job_round(machine, work, "dp", "resnet_dp.py", "--batch-size", "64",
                                     "--max-steps", str(args.steps)))
            for micro in (4, 8):
                pp_rows[micro].append(job_round(machine, work, f"pp{micro}", "resnet_pp.py", "--model",
                                                "resnet-small", "--balance", "even", "--batch-size", "128",
                                                "--microbatches", str(micro), "--schedule", "1f1b",
                                                "--max-steps", str(args.steps)))
            if args.nodes_script:
                try:
                    state = subprocess.run(["bash", args.nodes_script, "status"], capture_output=True, text=True,
                                           cwd=ROOT)
                    if state.returncode != 0:
                        raise RuntimeError("the emulated nodes are not up")
                    links = next((line.strip() for line in state.stdout.splitlines()
                                  if line.startswith(("links:", "shaped:"))), "?")
                    nodes_machine = work / "machine-nodes.json"
                    mpirun(4, "-m", "mpipar.cost.calibrate", "--out", str(nodes_machine), "--microbatch-sizes",
                           "8,16,32,64,128", *(["--quick"] if args.quick else []), nodes_script=args.nodes_script)
                    rows = comm_round(nodes_machine, 4, sizes, work, args.nodes_script)
                    rows += comm_round(nodes_machine, 2, sizes, work, args.nodes_script,
                                       label="2 nodes, 1 rank each", per_node=True)
                    dp = job_round(nodes_machine, work, "dp-nodes", "resnet_dp.py", "--batch-size", "64",
                                   "--max-steps", str(args.steps), ranks=4, nodes_script=args.nodes_script)
                    comm_rows += rows
                    nodes_dp_rows.append(dp)
                    nodes_notes.append(f"round {round_index + 1}: 2 emulated nodes, {links}")
                except RuntimeError as exc:  # the nodes belong to whoever brought them up; they may go down
                    nodes_notes.append(f"round {round_index + 1}: across nodes skipped: {str(exc).splitlines()[-1]}")
            loads.append(f"{before} -> {load()}")
            print(f"round {round_index + 1}/{args.rounds} done, load {loads[-1]}", flush=True)
    lines = [f"# Cost model: predicted vs measured ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python benchmarks/bench_cost_model.py {' '.join(sys.argv[1:])}`", "",
             f"Load average (1 min) at the start and end of each round: {'; '.join(loads)}. 2 cores, shared.", "",
             *([f"Emulated nodes: {'; '.join(nodes_notes)}.", ""] if nodes_notes else []),
             "Each round calibrates on 2 ranks and on 4 (across nodes: on the 4 ranks of 2 emulated nodes), then "
             "predicts from those files alone (4 ranks: from the 2-rank file, the ring model's extrapolation, and "
             "from the 4-rank file). Predicted and measured: medians over rounds; the ratio: the median of the "
             "rounds' ratios, and their range.", "",
             "## Point-to-point (one way) and Allreduce", "",
             "| operation | where | ranks | size | predicted ms | measured ms | measured/predicted (rounds' range) | "
             "within 25% |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({row[:4] for row in comm_rows}, key=lambda key: (not key[1].startswith("shared"), key))
    for operation, where, ranks, nbytes in keys:
        group = [row for row in comm_rows if row[:4] == (operation, where, ranks, nbytes)]
        predicted = statistics.median(row[4] for row in group)
        measured = statistics.median(row[5] for row in group)
        ratios = sorted(ratio(row[4], row[5]) for row in group)
        r = statistics.median(ratios)
        lines.append(f"| {operation} | {where} | {ranks} | {nbytes // 1024} KiB | {1e3 * predicted:.3f} | "
                     f"{1e3 * measured:.3f} | {r:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
                     f"{'yes' if abs(r - 1) <= 0.25 else 'no'} |")
    lines += ["", "## Data-parallel step (resnet-small, 64 samples per rank, 2 ranks) and pipeline bubble "
              "(resnet-small 3|2, 1F1B, 128 per batch)", "",
              "| run | quantity | predicted | measured | measured/predicted | target | met |",
              "|---|---|---|---|---|---|---|"]

    def add(run, rows, quantity, target):
        values = [row[quantity] for row in rows if quantity in row]
        if not values:
            lines.append(f"| {run} | {quantity} | - | - | - | {target} | no data |")
            return
        predicted = statistics.median(v[0] for v in values)
        measured = statistics.median(v[1] for v in values)
        if quantity == "bubble":
            gap = statistics.median(100 * (v[1] - v[0]) for v in values)
            lines.append(f"| {run} | bubble | {predicted:.3f} | {measured:.3f} | {gap:+.1f} points | within 6 points "
                         f"| {'yes' if abs(gap) <= 6 else 'no'} |")
        else:
            ratios = sorted(ratio(*v) for v in values)
            r = statistics.median(ratios)
            lines.append(f"| {run} | {quantity} | {predicted:.4f} | {measured:.4f} | {r:.2f} ({ratios[0]:.2f}-"
                         f"{ratios[-1]:.2f}) | {target} | "
                         f"{'yes' if target and abs(r - 1) <= 0.15 else '-' if not target else 'no'} |")

    add("DP 2 ranks", dp_rows, "step s", "within 15%")
    add("DP 2 ranks", dp_rows, "compute s", "")
    add("DP 2 ranks", dp_rows, "not computing s", "")
    if args.nodes_script:
        add("DP 2 nodes x 2 ranks", nodes_dp_rows, "step s", "within 15%")
        add("DP 2 nodes x 2 ranks", nodes_dp_rows, "not computing s", "")
    for micro in (4, 8):
        add(f"PP 2 stages, {micro} micro-batches", pp_rows[micro], "bubble", "")
        add(f"PP 2 stages, {micro} micro-batches", pp_rows[micro], "step s", "")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
