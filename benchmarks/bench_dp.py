"""Benchmark: mpipar.DataParallel against PyTorch DDP (gloo), same model, batch and ranks, one run.

Usage:
    mpirun -n 2 python benchmarks/bench_dp.py
    mpirun -n 4 --oversubscribe python benchmarks/bench_dp.py --model resnet-small --batch-size 64 --steps 30

Both trainers start from the same weights and see the same batches; each step is
``zero_grad`` before forward, forward, backward, ``step`` (the training loop's order).
DDP gets the same advantages as mpipar: ``gradient_as_bucket_view=True`` (no copies
into buckets) and no buffer broadcast in every forward (``forward_sync_buffers=False``, formerly
``broadcast_buffers=False``: mpipar broadcasts once at construction).
Rounds alternate the order ABBA (mpipar first in even rounds, DDP first in odd ones)
so that drift in machine load hits both alike; rank 0 prints samples/s of each round,
the median of the per-round ratios mpipar/DDP and their range, and says "no measurable
difference" when the range includes 1. Transports: mpipar's Allreduce goes through the
MPI library (printed); DDP's through gloo over TCP on localhost (rendezvous via
MASTER_ADDR/MASTER_PORT, rank and size taken from MPI).
"""

import argparse
import copy
import statistics

import torch
import torch.distributed as dist
from _bench import abba, ddp, gloo_world, mpi_library, paired, time_steps  # before mpipar: the checkout
from mpi4py import MPI

import mpipar
from mpipar import models

MODELS = {"resnet-small": models.resnet_small, "resnet18": lambda: models.resnet18(1, 10, 28),
          "mlp": lambda: models.mlp([784, 1024, 1024, 1024, 10])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet-small")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for both")
    args = parser.parse_args()

    comm, rank, size = gloo_world(args.threads)

    torch.manual_seed(0)
    base = MODELS[args.model]()
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]

    model_mpipar = copy.deepcopy(base)
    mpipar_dp = mpipar.DataParallel(model_mpipar, comm, bucket_cap_mb=args.bucket_mb)
    model_ddp = copy.deepcopy(base)
    torch_ddp = ddp(model_ddp, args.bucket_mb)

    results = {"mpipar": [], "ddp": []}
    contenders = [("mpipar", model_mpipar, mpipar_dp), ("ddp", model_ddp, torch_ddp)]
    for round_index in range(args.rounds):
        for name, model, wrapped in abba(contenders, round_index):
            comm.Barrier()
            seconds = comm.allreduce(time_steps(model, wrapped, batches), op=MPI.MAX)
            results[name].append(args.steps * args.batch_size * size / seconds)

    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        print(f"model {args.model} ({params:,} parameters), {size} ranks x {args.threads} threads, "
              f"batch {args.batch_size}/rank, {args.steps} steps x {args.rounds} rounds, "
              f"mpipar {mpipar.__version__} ({mpi_library()}) vs "
              f"DDP (torch {torch.__version__}, gloo over TCP)")
        for name, values in results.items():
            print(f"{name:>7}: samples/s per round " + " ".join(f"{v:8.1f}" for v in values)
                  + f" | median {statistics.median(values):8.1f}")
        ratios = paired(results["mpipar"], results["ddp"])  # range: the extreme tenth dropped each side
        print(f"mpipar / DDP samples/s, median of {ratios.count} paired rounds: "
              + ratios.text("mpipar faster", "DDP faster"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
