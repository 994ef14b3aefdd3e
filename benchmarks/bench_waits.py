"""Benchmark: mpipar's napping wait against MPI's spinning one (``mpi_tensor.WAIT``, ``MPIPAR_WAIT``).

Usage:
    mpirun -n 2 python benchmarks/bench_waits.py
    mpirun -n 2 python benchmarks/bench_waits.py --rounds 10 --repeats 200 --sizes 8,65536,1048576

Two measurements, each in ABBA rounds (nap first in even rounds, spin first in odd ones) so that drift
in machine load hits both alike:

* Allreduce: the reducer's call, ``mpi_tensor.iallreduce_(...).wait()`` on float32 tensors of each
  size, ``--repeats`` times per round; the time per call is the slowest rank's mean. ``skewed``: the
  last rank computes (busy, ``--skew-ms``) before each call, so the others wait past the spin and nap
  (where a nap's overshoot shows).
* Parameter server: rank 0 serves, the others are workers; a worker computes (busy, ``--compute-ms``),
  sends a control record and waits for the reply with the protocol's wait (``protocol.wait_any``), the
  server waits for any worker's record with it and answers. Exchanges per second over all workers.

Rank 0 prints each round's value, the median of the per-round ratios nap / spin (time per Allreduce;
seconds per exchange) and their range; above 1 the nap is slower, and "no measurable difference" when
the range includes 1. Transports: every message goes through the MPI library (printed): shared memory
between ranks of one node, its TCP BTL between nodes (run it under ``slurm/nodes/emulated-nodes.sh``).
"""

import argparse
import statistics
import time

import numpy as np
import torch
from _bench import abba, mpi_library, paired, sleeping_barrier  # before mpipar: the checkout on sys.path
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.parameter_server import protocol

MODES = ("nap", "spin")


def busy(seconds: float) -> None:
    """Compute for ``seconds`` (a busy loop: it holds the core as a forward and backward would)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def allreduce_seconds(comm, tensor: torch.Tensor, repeats: int, skew: float) -> float:
    """The slowest rank's mean seconds per ``iallreduce_(...).wait()``; the last rank computes ``skew`` s first."""
    late = skew if comm.Get_rank() == comm.Get_size() - 1 else 0.0
    for _ in range(3):
        mpi_tensor.iallreduce_(tensor, comm).wait()
    sleeping_barrier(comm)
    start = time.perf_counter()
    for _ in range(repeats):
        busy(late)
        mpi_tensor.iallreduce_(tensor, comm).wait()
    return comm.allreduce((time.perf_counter() - start) / repeats, op=MPI.MAX)


def exchange_seconds(comm, exchanges: int, compute: float) -> float:
    """Seconds per exchange of the parameter server's pattern (``exchanges`` per worker), all workers together."""
    rank, workers = comm.Get_rank(), comm.Get_size() - 1
    record, answer = protocol.control(protocol.PUSH), protocol.reply(0, 0.0)
    sleeping_barrier(comm)
    start = time.perf_counter()
    if rank == 0:
        inboxes = [np.zeros_like(record) for _ in range(workers)]
        requests = [comm.Irecv(inboxes[w], source=w + 1, tag=protocol.TAG_CONTROL) for w in range(workers)]
        left = [exchanges] * workers
        for _ in range(exchanges * workers):
            slot = protocol.wait_any(requests)
            left[slot] -= 1
            requests[slot] = (comm.Irecv(inboxes[slot], source=slot + 1, tag=protocol.TAG_CONTROL) if left[slot]
                              else MPI.REQUEST_NULL)
            comm.Send(answer, dest=slot + 1, tag=protocol.TAG_REPLY)
    else:
        reply = np.zeros_like(answer)
        for _ in range(exchanges):
            busy(compute)
            comm.Send(record, dest=0, tag=protocol.TAG_CONTROL)
            protocol.wait_any([comm.Irecv(reply, source=0, tag=protocol.TAG_REPLY)])
    elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    return elapsed / (exchanges * max(workers, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200, help="Allreduce calls per size and round")
    parser.add_argument("--sizes", default="8,65536,1048576", help="Allreduce sizes in bytes, comma-separated")
    parser.add_argument("--skew-ms", type=float, default=2.0, help="the last rank's compute before each call")
    parser.add_argument("--exchanges", type=int, default=200, help="parameter-server exchanges per worker and round")
    parser.add_argument("--compute-ms", type=float, default=1.0, help="a worker's compute before each exchange")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = [(f"Allreduce {n} B", n, 0.0) for n in sizes] + [(f"Allreduce {sizes[0]} B skewed", sizes[0],
                                                              args.skew_ms / 1e3)]
    names = [name for name, _, _ in cases] + (["parameter server exchange"] if size > 1 else [])
    times = {name: {mode: [] for mode in MODES} for name in names}
    for round_index in range(args.rounds):
        for mode in abba(MODES, round_index):
            mpi_tensor.WAIT = mode
            for name, nbytes, skew in cases:
                tensor = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
                times[name][mode].append(allreduce_seconds(comm, tensor, args.repeats, skew))
            if size > 1:
                times["parameter server exchange"][mode].append(
                    exchange_seconds(comm, args.exchanges, args.compute_ms / 1e3))
    mpi_tensor.WAIT = "nap"
    if rank != 0:
        return
    print(f"{size} ranks, {mpi_library()}; {args.rounds} ABBA rounds; Allreduce: {args.repeats} calls per round, "
          f"skew {args.skew_ms} ms; parameter server: {args.exchanges} exchanges per worker, compute "
          f"{args.compute_ms} ms; nap: spin {mpi_tensor.SPIN_SECONDS * 1e6:.0f} us then every "
          f"{mpi_tensor.NAP_SECONDS * 1e6:.0f} us (protocol: {protocol.SPIN_SECONDS * 1e6:.0f} / "
          f"{protocol.NAP_SECONDS * 1e6:.0f} us)")
    print("| case | nap, µs (median) | spin, µs (median) | nap / spin, median (range) |")
    print("|---|---|---|---|")
    for name in names:
        nap, spin = times[name]["nap"], times[name]["spin"]
        ratio = paired(nap, spin)
        print(f"| {name} | {statistics.median(nap) * 1e6:.1f} | {statistics.median(spin) * 1e6:.1f} | "
              f"{ratio.text('the nap is slower', 'the nap is faster')} |")
    for name in names:
        for mode in MODES:
            print(f"{name}, {mode}, µs per round: " + " ".join(f"{v * 1e6:.1f}" for v in times[name][mode]))


if __name__ == "__main__":
    main()
