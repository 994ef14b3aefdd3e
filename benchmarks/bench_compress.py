"""Benchmark: gradient compression, mpipar against PyTorch DDP (gloo) with the same compression.

Usage:
    mpirun -n 2 python benchmarks/bench_compress.py --model resnet-small
    mpirun -n 2 python benchmarks/bench_compress.py --model gpt --batch-size 8
    # across 2 emulated nodes at 1 Gbit/s, 1 ms (docs/multinode.md):
    sudo slurm/nodes/emulated-nodes.sh up 2 --no-slurm --rate 1gbit --delay 1ms
    MPIPAR_NODES_SLOTS=1 ... slurm/nodes/emulated-nodes.sh mpirun -n 2 $PWD/.venv/bin/python \
        benchmarks/bench_compress.py --model gpt

Six contenders, each a data-parallel trainer of the same model from the same weights on the same batches:
mpipar ``DataParallel`` with fp32 gradients, with the bf16 wire (``--grad-wire bf16``: 16-bit values,
fp32 sums) and with PowerSGD (``--compress powersgd:RANK``), and DDP (gloo, ``gradient_as_bucket_view``,
no buffer broadcast per forward) with no hook, with ``bf16_compress_hook`` (bf16 values, bf16 sums; DDP
refuses it by name without NCCL, so it is called through a wrapper: gloo sums bf16 on CPU) and
with ``powerSGD_hook`` (rank RANK, error feedback and warm start, ``min_compression_rate=1`` so that it
compresses the matrices mpipar does: (n+m) r < n m; ``start_powerSGD_iter=2``, the untimed warm-up round
covers its uncompressed first steps). Every trainer gets ``--bucket-mb`` buckets, DDP's first one too (DDP's
PowerSGD hook on gloo crashed with a collective mismatch, 5 runs of 5, when DDP's default 1 MiB first
bucket split the gpt's gradients in two; at 25 MiB both models are one bucket). Rounds run the six in ABBA
order; a warm-up round is not counted.
Rank 0 prints samples/s per round and the median; for each compression the paired per-round ratio
mpipar / DDP (median and range); bytes per step and rank: mpipar's counted ``bytes_sent`` (ring
estimate, the metrics file's), and where the rank has an ``eth0`` (an emulated node) the bytes that
left it (``/proc/net/dev``, TCP/IP headers included) for every contender.
"""

import argparse
import copy
import statistics

import torch
import torch.distributed as dist
from _bench import abba, ddp, gloo_world, mpi_library, paired, time_steps  # before mpipar
from mpi4py import MPI
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

import mpipar
from mpipar import models
from mpipar.comm.compress import powersgd_elements
from mpipar.models.gpt import gpt


def eth0_sent() -> int:
    """Bytes sent by this network namespace's eth0 so far (0 without one)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "eth0":
                return int(counters.split()[8])
    return 0


def bf16_hook(state, bucket):
    """DDP's ``bf16_compress_hook`` itself: DDP refuses that name without NCCL, gloo runs it."""
    return default_hooks.bf16_compress_hook(state, bucket)


def build(name: str):
    """The model and a batch maker ``batch(generator, size)`` for ``--model``."""
    if name == "resnet-small":
        return models.resnet_small(), lambda g, b: (torch.randn(b, 1, 28, 28, generator=g),
                                                    torch.randint(0, 10, (b,), generator=g))
    model = gpt(width=128, layers=4, heads=4, seq_len=64)
    return model, lambda g, b: (torch.randint(0, 256, (b, 64), generator=g),
                                torch.randint(0, 256, (b, 64), generator=g))


def timed(model, wrapped, batches, sync_stats=None):
    """(seconds, bytes sent by eth0) of SGD steps over ``batches[1:]`` after one warm-up step (``time_steps``);
    ``sync_stats``' count of the warm-up is dropped."""
    sent_before = []

    def warmed():
        if sync_stats is not None:
            sync_stats.take()
        sent_before.append(eth0_sent())

    seconds = time_steps(model, wrapped, batches, warmed=warmed)
    return seconds, eth0_sent() - sent_before[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet-small", "gpt"], default="resnet-small")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rank", type=int, default=4, help="the PowerSGD rank")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start-iter", type=int, default=2, help="DDP PowerSGD's start_powerSGD_iter")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="bucket size for all (DDP's first bucket too: DDP's PowerSGD hook on gloo crashed with a "
                             "collective mismatch when the gpt's gradients took two buckets)")
    args = parser.parse_args()

    comm, rank, size = gloo_world(args.threads)
    torch.manual_seed(0)
    base, make_batch = build(args.model)
    generator = torch.Generator().manual_seed(rank)
    batches = [make_batch(generator, args.batch_size) for _ in range(args.steps + 1)]

    contenders = []
    for label, wire, compress in (("fp32", None, None), ("bf16", torch.bfloat16, None), ("powersgd", None, args.rank)):
        model = copy.deepcopy(base)
        contenders.append((f"mpipar {label}", model, mpipar.DataParallel(model, comm, wire=wire, compress=compress,
                                                                            bucket_cap_mb=args.bucket_mb)))
    for label in ("fp32", "bf16", "powersgd"):
        model = copy.deepcopy(base)
        group = dist.new_group(list(range(size)))  # its own group: DDP instances do not share one's collectives
        wrapped = ddp(model, args.bucket_mb, process_group=group)
        if label == "bf16":
            wrapped.register_comm_hook(group, bf16_hook)
        elif label == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=args.rank,
                                                start_powerSGD_iter=args.start_iter, min_compression_rate=1)
            wrapped.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        contenders.append((f"DDP {label}", model, wrapped))

    speed = {name: [] for name, _, _ in contenders}
    wire_bytes = {name: [] for name, _, _ in contenders}
    counted = {}
    for round_index in range(args.rounds + 1):  # round 0: warm-up, not counted
        for name, model, wrapped in abba(contenders, round_index):
            comm.Barrier()
            stats = wrapped.stats if isinstance(wrapped, mpipar.DataParallel) else None
            seconds, sent = timed(model, wrapped, batches, stats)
            seconds = comm.allreduce(seconds, op=MPI.MAX)
            if round_index:
                speed[name].append(args.steps * args.batch_size * size / seconds)
                wire_bytes[name].append(sent / args.steps)
                if stats is not None:
                    counted[name] = stats.take().bytes_sent / args.steps

    if rank == 0:
        shapes = [p.shape for p in base.parameters()]
        elements = sum(p.numel() for p in base.parameters())
        ring = 2.0 * (size - 1) / size
        print(f"model {args.model} ({elements:,} parameters), {size} ranks x {args.threads} threads, batch "
              f"{args.batch_size}/rank, {args.steps} steps x {args.rounds} rounds (+1 warm-up), PowerSGD rank "
              f"{args.rank}; mpipar {mpipar.__version__} ({mpi_library()}) vs DDP (torch {torch.__version__}, gloo)")
        print(f"ring estimate per step and rank: fp32 {ring * 4 * elements:,.0f} B, bf16 {ring * 2 * elements:,.0f} B, "
              f"PowerSGD {ring * 4 * powersgd_elements(shapes, args.rank):,.0f} B "
              f"({powersgd_elements(shapes, args.rank):,} of {elements:,} elements)")
        for name, values in speed.items():
            sent = statistics.median(wire_bytes[name])
            print(f"{name:>14}: samples/s " + " ".join(f"{v:7.1f}" for v in values)
                  + f" | median {statistics.median(values):7.1f}"
                  + (f" | counted {counted[name]:,.0f} B/step" if name in counted else "")
                  + (f" | eth0 {sent:,.0f} B/step" if sent else ""))
        for label in ("fp32", "bf16", "powersgd"):
            ratio = paired(speed[f"mpipar {label}"], speed[f"DDP {label}"])
            print(f"{label}: mpipar / DDP samples/s, {ratio.count} paired rounds: "
                  + ratio.text("mpipar faster", "DDP faster"))
        for label in ("bf16", "powersgd"):
            ratio = paired(speed[f"mpipar {label}"], speed["mpipar fp32"])
            print(f"mpipar {label} / mpipar fp32 samples/s: " + ratio.text(f"{label} faster", "fp32 faster"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
