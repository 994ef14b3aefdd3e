"""Benchmark of the CUDA-aware transport on one GPU shared by N ranks: device buffers vs staged vs host.

Usage:
    mpirun -n 2 --bind-to none python benchmarks/bench_cuda_aware.py          # a CUDA-aware MPI, one GPU
    mpirun -n 2 --oversubscribe python benchmarks/bench_cuda_aware.py --device cpu --rounds 2 --steps 2 \\
        --batch-size 8 --mb 1                                                  # the host rows only

What is compared, each in ABBA rounds (the order reverses every round), medians and paired ratios as
in bench_gpu.py:

* Allreduce (``mpi_tensor.allreduce_``, float32) and point-to-point (``send``/``recv_`` ping-pong
  between ranks 0 and 1; GB/s = 2 x payload / round trip) at each ``--mb`` size, on three transports:
  ``cuda-aware`` (a CUDA tensor handed to MPI), ``staged`` (a CUDA tensor copied through pinned host
  memory), ``host`` (a CPU tensor);
* DP training samples/s over all ranks: ``mpipar.DataParallel`` with the transport decision forced
  CUDA-aware, forced staged, and DDP (gloo over TCP, which copies CUDA tensors through host memory).
  The overlapped gradient Allreduce is non-blocking and so staged on both mpipar rows (cuda_aware.py);
  the rows differ only in the blocking calls.

The transport is switched per row with ``MPIPAR_CUDA_AWARE`` and ``cuda_aware.reset()``; the
``cuda-aware`` rows run only where this MPI's own decision is CUDA-aware (else a RESULT line says so).
"""

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _bench import abba, mpi_library, paired  # before mpipar: the checkout on sys.path
from bench_gpu import IMAGE_SHAPE, NUM_CLASSES, build_ddp, make_batches, pick_device, say, sync, timed_mode
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.comm import cuda_aware, mpi_tensor


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--model", choices=sorted(models.IMAGE_MODELS), default="resnet-small")
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--mb", default="1,4,16,64", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size for mpipar and DDP")
    return parser.parse_args()


@contextlib.contextmanager
def transport(aware: bool):
    """Every mpi_tensor call inside takes the CUDA-aware (``aware``) or the staged transport for CUDA
    tensors; the process's own decision afterwards."""
    before = os.environ.get("MPIPAR_CUDA_AWARE")
    os.environ["MPIPAR_CUDA_AWARE"] = "1" if aware else "0"
    cuda_aware.reset()
    try:
        yield
    finally:
        os.environ.pop("MPIPAR_CUDA_AWARE") if before is None else os.environ.update(MPIPAR_CUDA_AWARE=before)
        cuda_aware.reset()


def modes(device, aware_available: bool) -> dict:
    """name -> (device of the tensor, transport context)."""
    if device.type != "cuda":
        return {"host": (torch.device("cpu"), contextlib.nullcontext)}
    rows = {"cuda-aware": (device, lambda: transport(True))} if aware_available else {}
    rows.update({"staged": (device, lambda: transport(False)), "host": (torch.device("cpu"), contextlib.nullcontext)})
    return rows


def seconds_allreduce(comm, tensor, reps: int) -> float:
    """Seconds per ``allreduce_`` (the slowest rank's), device synchronised around the calls."""
    comm.Barrier()
    sync(tensor.device)
    start = time.perf_counter()
    for _ in range(reps):
        mpi_tensor.allreduce_(tensor, comm)
    sync(tensor.device)
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / reps


def seconds_ping_pong(comm, tensor, reps: int) -> float:
    """Seconds per round trip of ``tensor`` between ranks 0 and 1 (others wait at the barrier)."""
    rank = comm.Get_rank()
    comm.Barrier()
    sync(tensor.device)
    start = time.perf_counter()
    for _ in range(reps):
        if rank == 0:
            mpi_tensor.send(tensor, comm, 1)
            mpi_tensor.recv_(tensor, comm, 1)
        elif rank == 1:
            mpi_tensor.recv_(tensor, comm, 0)
            mpi_tensor.send(tensor, comm, 0)
    sync(tensor.device)
    return comm.allreduce(time.perf_counter() - start if rank < 2 else 0.0, op=MPI.MAX) / reps


def bench_bandwidth(args, comm, rows: dict):
    rounds = max(args.rounds, 10)
    calls = {"allreduce": (seconds_allreduce, 1), "ping-pong": (seconds_ping_pong, 2)}
    say(comm, f"bandwidth: {', '.join(rows)}; float32, {rounds} rounds ABBA, GB/s = bytes moved / seconds")
    for mb in [float(s) for s in args.mb.split(",") if s.strip()]:
        numel = int(mb * 2**20) // 4
        reps = max(2, min(50, int(256 / mb)))
        tensors = {name: torch.zeros(numel, device=device) for name, (device, _) in rows.items()}  # sums stay 0
        for call, (timer, trips) in calls.items():
            if call == "ping-pong" and comm.Get_size() < 2:
                continue
            for name, (_, context) in rows.items():  # warm-up: pinned buffers, connections, IPC handles
                with context():
                    timer(comm, tensors[name], 1)
            seconds = {name: [] for name in rows}
            for round_index in range(rounds):
                for name in abba(rows, round_index):
                    with rows[name][1]():
                        seconds[name].append(timer(comm, tensors[name], reps))
            gbps = {name: [trips * numel * 4 / s / 1e9 for s in values] for name, values in seconds.items()}
            line = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in gbps.items())
            versus = [f"{top}/{bottom} {paired(gbps[top], gbps[bottom], trim=False).median:.3f}"
                      for top, bottom in [("cuda-aware", "staged"), ("cuda-aware", "host"), ("staged", "host")]
                      if top in gbps and bottom in gbps]
            versus = f"; paired medians {', '.join(versus)}" if versus else ""
            say(comm, f"RESULT {call} {mb:g} MiB GB/s: {line}{versus} ({reps} calls x {rounds} rounds)")


def bench_training(args, comm, device, aware_available: bool):
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(0)
    base = models.IMAGE_MODELS[args.model](in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES,
                                           image_size=IMAGE_SHAPE[1]).to(device)
    batches = make_batches(device, args.steps + 1, args.batch_size, seed=1000 + rank)
    contenders = {}  # name -> ((model, wrapped), transport context)
    for name, aware in [("mpipar-cuda-aware", True), ("mpipar-staged", False)]:
        if device.type == "cuda" and (aware_available or not aware):
            with transport(aware):
                model = copy.deepcopy(base)
                contenders[name] = ((model, mpipar.DataParallel(model, comm, bucket_cap_mb=args.bucket_mb)),
                                    lambda aware=aware: transport(aware))
    if device.type != "cuda":
        model = copy.deepcopy(base)
        contenders["mpipar"] = ((model, mpipar.DataParallel(model, comm, bucket_cap_mb=args.bucket_mb)),
                                contextlib.nullcontext)
    model_ddp, ddp_or_error = build_ddp(comm, base, device, args.bucket_mb)
    if model_ddp is None:
        say(comm, f"RESULT ddp gloo: unavailable ({ddp_or_error})")
    else:
        contenders["ddp"] = ((model_ddp, ddp_or_error), contextlib.nullcontext)
    say(comm, f"training: {args.model} on {device}, {size} ranks, batch {args.batch_size}/rank, "
              f"{args.steps} steps x {args.rounds} rounds ABBA: {', '.join(contenders)}")
    results = {name: [] for name in contenders}
    for round_index in range(args.rounds):
        for name in abba(contenders, round_index):
            with contenders[name][1]():
                results[name].append(timed_mode(comm, name, contenders[name][0], batches, None, device))
    for name, values in results.items():
        say(comm, f"RESULT {name} median samples/s {statistics.median(values):.1f}")
    names = list(results)
    for top, bottom in zip(names, names[1:]):
        ratios = paired(results[top], results[bottom], trim=False)
        say(comm, f"RESULT {top} / {bottom} samples/s, {ratios.count} paired rounds: median {ratios.median:.3f} "
                  f"[{ratios.low:.3f}-{ratios.high:.3f}]: {ratios.verdict(f'{top} faster', f'{bottom} faster')}")
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    comm = MPI.COMM_WORLD
    device = pick_device(args.device, comm)
    decision = cuda_aware.cuda_awareness()
    aware_available = device.type == "cuda" and decision.aware
    say(comm, f"{mpi_library()}, mpipar {mpipar.__version__}, torch {torch.__version__}: {decision.describe()}")
    if device.type == "cuda" and not aware_available:
        say(comm, "RESULT cuda-aware rows: skipped (this MPI is not CUDA-aware)")
    bench_bandwidth(args, comm, modes(device, aware_available))
    bench_training(args, comm, device, aware_available)
    sys.exit(0)


if __name__ == "__main__":
    main()
