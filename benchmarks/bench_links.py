"""Point-to-point and Allreduce times within one emulated node and across two, and a shaped link against alpha-beta.

Needs root and nodes up (``slurm/nodes/emulated-nodes.sh up 2``, or ``up 2 --rate 1gbit --delay 1ms``
for shaped links). The driver launches itself under mpirun on the nodes and prints a Markdown table::

    sudo slurm/nodes/emulated-nodes.sh up 2 --no-slurm
    python benchmarks/bench_links.py --out benchmarks/results/bench_links-unshaped.md
    sudo slurm/nodes/emulated-nodes.sh down
    sudo slurm/nodes/emulated-nodes.sh up 2 --no-slurm --rate 1gbit --delay 1ms
    python benchmarks/bench_links.py --sizes 8,65536,1048576,16777216,67108864 \\
        --out benchmarks/results/bench_links-1gbit-1ms.md

Cases: ping-pong between 2 ranks on one node (shared memory) and on two nodes (TCP over the
emulated link); Allreduce (float32 sum) on 4 ranks of one node and on 2 nodes x 2 ranks. A
one-way time is half the median round trip. With shaped links the ping-pong is compared with
``k * alpha + n * beta``: alpha the unshaped one-way latency plus the link delay, beta the wire
time of a byte (TCP/IP and Ethernet overhead: 1538 wire bytes per 1448 payload bytes), k = 1 up
to Open MPI's TCP eager limit (below 64 KiB) and 3 from there (the rendezvous adds a round trip).

The MPI part (``--worker``) runs on every rank: ``mpirun -n 2 python bench_links.py --worker pingpong``.
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

REPO = Path(__file__).resolve().parents[1]
NODES = REPO / "slurm" / "nodes" / "emulated-nodes.sh"
NODES_DIR = Path(os.environ.get("MPIPAR_NODES_DIR", "/tmp/mpipar-nodes"))
EAGER_LIMIT = 65536  # Open MPI's btl_tcp_eager_limit default
WIRE_PER_PAYLOAD = 1538 / 1448


def worker(kind: str, sizes, budget: float) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rows = []
    for size in [sizes[0], *sizes]:  # the first pass warms the connections up (TCP's first exchanges) and is dropped
        send = np.ones(max(1, size // 4), dtype=np.float32) if kind == "allreduce" else np.ones(size, dtype=np.uint8)
        receive = np.empty_like(send)
        times = []
        started = time.perf_counter()
        for repetition in range(10000):
            comm.Barrier()
            begin = time.perf_counter()
            if kind == "pingpong":
                if rank == 0:
                    comm.Send(send, dest=1)
                    comm.Recv(receive, source=1)
                elif rank == 1:
                    comm.Recv(receive, source=0)
                    comm.Send(send, dest=0)
            else:
                comm.Allreduce(send, receive)
            times.append(time.perf_counter() - begin)
            # every rank must agree when to stop: rank 0 decides
            done = repetition >= 4 and time.perf_counter() - started > budget
            if comm.bcast(done, root=0):
                break
        if rank == 0:
            median = statistics.median(times[1:] if len(times) > 2 else times)
            rows.append({"bytes": send.nbytes, "seconds": median / 2 if kind == "pingpong" else median,
                         "repetitions": len(times)})
    if rank == 0:
        print("RESULT " + json.dumps(rows[1:]), flush=True)


def launch(kind: str, hostfile_text: str, ranks: int, sizes, budget: float, mpirun: str):
    with tempfile.NamedTemporaryFile("w", suffix=".hostfile", delete=False) as hostfile:
        hostfile.write(hostfile_text)
    try:
        command = ["bash", str(NODES), "exec", "n1", mpirun, "--hostfile", hostfile.name, "-n", str(ranks),
                   sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                   "--sizes", ",".join(map(str, sizes)), "--budget", str(budget)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(hostfile.name)
    line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        said = done.stdout[-2000:] + done.stderr[-2000:]
        sys.exit(f"{kind} on {hostfile_text!r} failed (exit {done.returncode}):\n{said}")
    return {row["bytes"]: row["seconds"] for row in json.loads(line[len("RESULT "):])}


def human(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def shaping():
    path = NODES_DIR / "shaping"
    if not path.exists():
        return None
    values = dict(item.split("=") for item in path.read_text().split())
    return int(values["rate_bps"]), int(values["delay_ns"]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["pingpong", "allreduce"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="8,1024,65536,1048576,16777216", help="message sizes in bytes")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of repetitions per size")
    parser.add_argument("--base-latency", type=float, default=None,
                        help="unshaped one-way latency across nodes in seconds, for the model (default: "
                             "the 8-byte ping-pong time minus the delay)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(args.worker, sizes, args.budget)
        return
    if not (NODES_DIR / "hostfile").exists():
        sys.exit(f"no emulated nodes up ({NODES_DIR}/hostfile); run: sudo {NODES} up 2")
    mpirun = str(Path(sys.executable).parent / "mpirun")
    mpirun = mpirun if os.path.exists(mpirun) else "mpirun"
    cases = {
        "p2p, 1 node": launch("pingpong", "n1 slots=2\n", 2, sizes, args.budget, mpirun),
        "p2p, 2 nodes": launch("pingpong", "n1 slots=1\nn2 slots=1\n", 2, sizes, args.budget, mpirun),
        "Allreduce 4, 1 node": launch("allreduce", "n1 slots=4\n", 4, sizes, args.budget, mpirun),
        "Allreduce 2x2, 2 nodes": launch("allreduce", "n1 slots=2\nn2 slots=2\n", 4, sizes, args.budget, mpirun),
    }
    shaped = shaping()
    lines = [f"# bench_links: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
             + (f"links shaped to {shaped[0] / 1e9:g} Gbit/s, {shaped[1] * 1e3:g} ms" if shaped else "unshaped links"),
             "", f"`python benchmarks/bench_links.py --sizes {args.sizes}` (one-way = half the median round trip; "
             "Allreduce: median time, float32 sum)", ""]
    header = ["size", *[f"{name} (µs)" for name in cases]]
    if shaped:
        rate, delay = shaped
        across = cases["p2p, 2 nodes"]
        base = args.base_latency if args.base_latency is not None else max(0.0, across[min(across)] - delay)
        alpha, beta = base + delay, 8 * WIRE_PER_PAYLOAD / rate
        header += ["model k*alpha+n*beta (µs)", "measured/model"]
        lines.insert(3, f"Model: alpha = {alpha * 1e6:.0f} µs ({base * 1e6:.0f} µs base + delay), "
                        f"beta = {beta * 1e9:.3f} ns/byte, k = 1 below {human(EAGER_LIMIT)}, 3 from there.\n")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sizes:
        allreduce_bytes = max(4, size // 4 * 4)  # float32 elements
        row = [human(size), *[f"{cases[name].get(size if 'p2p' in name else allreduce_bytes, float('nan')) * 1e6:.0f}"
                              for name in cases]]
        if shaped:
            k = 1 if size < EAGER_LIMIT else 3  # the limit counts the match header too
            model = k * alpha + size * beta
            measured = cases["p2p, 2 nodes"][size]
            row += [f"{model * 1e6:.0f}", f"{measured / model:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
