"""Benchmark on one GPU shared by N ranks: mpipar.DataParallel vs PyTorch DDP (gloo) vs one process,
and mpipar's staged (host-memory) Allreduce of CUDA tensors vs a plain host Allreduce.

Usage:
    mpirun -n 2 --bind-to none python benchmarks/bench_gpu.py                   # CUDA if available
    mpirun -n 2 --oversubscribe python benchmarks/bench_gpu.py --device cpu --rounds 2 --steps 2 --batch-size 8

What is compared, all in one run:

* training throughput (samples/s over all ranks; SGD with momentum, ``zero_grad`` before forward,
  synthetic 1x28x28 images and labels generated on the device with a fixed seed, the same weights):
  ``mpipar``: ``mpipar.DataParallel``, gradients averaged by the MPI library (printed);
  ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` with the gloo backend over TCP on localhost
  (on CUDA tensors gloo copies through host memory itself, like mpipar's staged path, so this is
  the like-for-like comparison; buffers are not broadcast in every forward, gradients are bucket views);
  ``single``: rank 0 alone on N x batch per step (the other ranks wait), the serial reference.
  The device is synchronised before every clock reading.
* staged bandwidth (CUDA only): ``mpipar.comm.mpi_tensor.allreduce_`` of a CUDA float32 tensor
  (which an MPI that is not CUDA-aware, such as Open MPI from PyPI, gets through pinned host
  memory) vs the same call on a CPU tensor of the same size; GB/s = payload bytes / seconds per call.

How to read the output (rank 0 prints it): modes run in ABBA order (the order reverses every
round) so that drift in machine load hits all of them alike. Each mode's samples/s per round
and median; each ratio is taken per round (paired) and given as the median and [min-max] of
those; "no measurable difference" when [min-max] includes 1. Lines that start with ``RESULT``
are the summary (the GPU check script copies them into its summary file).
"""

import argparse
import copy
import datetime
import functools
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench import (  # before mpipar: the checkout on sys.path
    abba,
    ddp,
    init_gloo,
    mpi_library,
    paired,
    sleeping_barrier,
    time_steps,
)
from mpi4py import MPI

import mpipar
from mpipar import models
from mpipar.comm import mpi_tensor

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--model", choices=sorted(models.IMAGE_MODELS), default="resnet-small")
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--mb", default="1,16,64", help="staged-bandwidth payload sizes in MiB, comma-separated")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size for mpipar and DDP")
    return parser.parse_args()


def say(comm, *lines):
    if comm.Get_rank() == 0:
        for line in lines:
            print(line, flush=True)


def pick_device(name: str, comm) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device("cuda", comm.Get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(device, count: int, batch: int, seed: int) -> list:
    generator = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(batch, *IMAGE_SHAPE, generator=generator, device=device),
             torch.randint(0, NUM_CLASSES, (batch,), generator=generator, device=device)) for _ in range(count)]


def build_ddp(comm, base, device, bucket_mb: float):
    """(model, DDP wrapper) with gloo, or (None, every rank's error) when any rank failed to build it or to
    run one step (agreed over ranks; a rank that fails alone costs the others the 30 s rendezvous timeout)."""
    error = None
    model = wrapped = None
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: loopback only
        init_gloo(comm, timeout=datetime.timedelta(seconds=30))
        model = copy.deepcopy(base)
        wrapped = ddp(model, bucket_mb, device_ids=[device.index] if device.type == "cuda" else None)
        probe = make_batches(device, 1, 2, seed=99)[0]  # one step: does gloo reduce these tensors?
        F.cross_entropy(wrapped(probe[0]), probe[1]).backward()
        model.zero_grad()
        sync(device)
    except Exception as exc:  # noqa: BLE001 - reported, and the other modes go on
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    errors = [f"rank {rank}: {e}" for rank, e in enumerate(comm.allgather(error)) if e]
    if errors:
        return None, "; ".join(errors)
    return model, wrapped


def timed_mode(comm, name, contender, batches, single_batches, device) -> float:
    """Samples/s of one round of one mode, the same number on every rank."""
    size = comm.Get_size()
    model, wrapped = contender
    device_sync = functools.partial(sync, device)
    comm.Barrier()
    if name == "single":
        seconds = time_steps(model, wrapped, single_batches, sync=device_sync) if comm.Get_rank() == 0 else None
        sleeping_barrier(comm)
        seconds = comm.bcast(seconds, root=0)
    else:
        seconds = comm.allreduce(time_steps(model, wrapped, batches, sync=device_sync), op=MPI.MAX)
    return (len(batches) - 1) * len(batches[0][1]) * size / seconds


def ratio_summary(results: dict, top: str, bottom: str) -> str:
    """Median and [min-max] of the paired per-round ratios top/bottom, and what they say."""
    ratios = paired(results[top], results[bottom], trim=False)
    return (f"RESULT {top} / {bottom} samples/s, {ratios.count} paired rounds: median {ratios.median:.3f} "
            f"[{ratios.low:.3f}-{ratios.high:.3f}]: {ratios.verdict(f'{top} faster', f'{bottom} faster')}")


def bench_training(args, comm, device):
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(0)
    base = models.IMAGE_MODELS[args.model](in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES,
                                           image_size=IMAGE_SHAPE[1]).to(device)
    batches = make_batches(device, args.steps + 1, args.batch_size, seed=1000 + rank)
    single_batches = make_batches(device, args.steps + 1, args.batch_size * size, seed=2000) if rank == 0 else None

    model_mpipar = copy.deepcopy(base)
    contenders = {"mpipar": (model_mpipar, mpipar.DataParallel(model_mpipar, comm, bucket_cap_mb=args.bucket_mb))}
    model_ddp, ddp_or_error = build_ddp(comm, base, device, args.bucket_mb)
    if model_ddp is not None:
        contenders["ddp"] = (model_ddp, ddp_or_error)
    model_single = copy.deepcopy(base)
    contenders["single"] = (model_single, model_single)

    params = sum(p.numel() for p in base.parameters())
    cuda_transport = describe_transport(torch.zeros(4, device=device)) if device.type == "cuda" else "host"
    say(comm,
        f"model {args.model} ({params:,} parameters) on {device_name(device)}, {size} ranks, "
        f"batch {args.batch_size}/rank, {args.steps} steps x {args.rounds} rounds, torch threads "
        f"{torch.get_num_threads()}/rank",
        f"transports: mpipar {mpipar.__version__} over {mpi_library()} "
        f"(tensors on {device.type}: {cuda_transport}); DDP torch {torch.__version__} gloo over TCP on "
        f"localhost{' (copies CUDA tensors through host memory)' if device.type == 'cuda' else ''}; "
        f"single: rank 0 alone on {size} x batch")
    if model_ddp is None:
        say(comm, f"RESULT ddp gloo: unavailable ({ddp_or_error})")

    names = list(contenders)
    results = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in abba(names, round_index):
            results[name].append(timed_mode(comm, name, contenders[name], batches, single_batches, device))

    for name, values in results.items():
        say(comm, f"{name:>7}: samples/s per round " + " ".join(f"{v:9.1f}" for v in values))
    for name, values in results.items():
        say(comm, f"RESULT {name} median samples/s {statistics.median(values):.1f}")
    if "ddp" in results:
        say(comm, ratio_summary(results, "mpipar", "ddp"))
    say(comm, ratio_summary(results, "mpipar", "single"))
    if dist.is_initialized():
        dist.destroy_process_group()


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def describe_transport(tensor) -> str:
    try:
        return mpi_tensor.transport_for(tensor)
    except Exception as exc:  # noqa: BLE001 - only a label
        return f"unknown ({type(exc).__name__})"


def time_allreduce(comm, tensor, reps: int) -> float:
    """Seconds per ``allreduce_`` call (the slowest rank's), device synchronised around the calls."""
    comm.Barrier()
    sync(tensor.device)
    start = time.perf_counter()
    for _ in range(reps):
        mpi_tensor.allreduce_(tensor, comm)
    sync(tensor.device)
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / reps


def bench_staged(args, comm, device):
    if device.type != "cuda":
        say(comm, "RESULT staged bandwidth: skipped (--device cpu: no CUDA tensors to stage)")
        return
    rounds = max(args.rounds, 10)
    sizes = [float(s) for s in args.mb.split(",") if s.strip()]
    say(comm, f"staged Allreduce: CUDA tensor via mpipar ({describe_transport(torch.zeros(4, device=device))}) "
              f"vs CPU tensor (host), float32, {rounds} rounds ABBA, GB/s = payload bytes / seconds per call")
    for mb in sizes:
        numel = int(mb * 2**20) // 4
        tensors = {"cuda": torch.zeros(numel, device=device), "host": torch.zeros(numel)}  # zeros: sums stay finite
        reps = max(2, min(50, int(256 / mb)))
        for tensor in tensors.values():
            time_allreduce(comm, tensor, 1)  # warm-up (pinned buffers, connections)
        seconds = {name: [] for name in tensors}
        for round_index in range(rounds):
            for name in abba(tensors, round_index):
                seconds[name].append(time_allreduce(comm, tensors[name], reps))
        nbytes = numel * 4
        gbps = {name: [nbytes / s / 1e9 for s in values] for name, values in seconds.items()}
        ratios = paired(gbps["cuda"], gbps["host"], trim=False)
        say(comm, f"RESULT staged allreduce {mb:g} MiB: cuda {statistics.median(gbps['cuda']):.2f} GB/s, "
                  f"host {statistics.median(gbps['host']):.2f} GB/s, cuda/host median {ratios.median:.3f} "
                  f"[{ratios.low:.3f}-{ratios.high:.3f}] ({reps} calls x {rounds} rounds each)")


def main() -> None:
    args = parse_args()
    comm = MPI.COMM_WORLD
    device = pick_device(args.device, comm)
    failed = False
    try:
        bench_training(args, comm, device)
    except Exception:  # noqa: BLE001 - the bandwidth part still runs if every rank got here
        print(f"[rank {comm.Get_rank()}] training benchmark failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        failed = True
    bench_staged(args, comm, device)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
