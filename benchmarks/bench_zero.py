"""Benchmark: mpipar's DataParallel and ZeRO-1/2/3 against PyTorch's ZeroRedundancyOptimizer and FSDP2
(gloo, CPU): samples/s and peak resident memory per rank, same model, batches and seed for every variant.

Usage (the driver launches one ``mpirun`` per variant and round, ABBA order, and writes the results):
    python benchmarks/bench_zero.py --ranks 2 --rounds 10 --out benchmarks/results/bench_zero-2ranks.md
    python benchmarks/bench_zero.py --ranks 4 --rounds 10 --oversubscribe --out benchmarks/results/bench_zero-4ranks.md
One variant alone (what the driver runs; rank 0 prints a JSON line):
    mpirun -n 2 python benchmarks/bench_zero.py --variant zero3

Variants: ``dp`` (mpipar.DataParallel), ``zero1``/``zero2``/``zero3`` (mpipar ShardedDataParallel, stage 3
gathering each Linear of the MLP as one unit), ``torch-zero`` (DDP + ``ZeroRedundancyOptimizer``),
``fsdp2`` (``fully_shard`` on each Linear, then on the model), ``ddp`` (plain DDP, not run by default).
All use AdamW on the same MLP; each step is zero_grad, forward, backward, step. Peak RSS is monotone
within a process, so each variant runs in its own launch: ``ru_maxrss`` per rank at the end, and the RSS
before the model was built (torch, MPI and gloo alone). Transports: mpipar over the MPI library
(printed), torch over gloo TCP on localhost (rank and size from MPI). Ratios are paired per round,
reported as median and range (the extreme tenth dropped from 10 rounds on), "no measurable difference"
when the range includes 1. A variant that fails is reported with its error, not retried.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench import (  # before mpipar: the checkout
    current_rss,
    ddp,
    gloo_world,
    launch_result,
    launch_rounds,
    mpi_library,
    paired,
    peak_rss,
    warm_up,
)
from mpi4py import MPI
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

import mpipar
from mpipar import models
from mpipar.sharded import ShardedDataParallel

VARIANTS = ("dp", "zero1", "zero2", "zero3", "torch-zero", "fsdp2", "ddp")
DEFAULT_VARIANTS = ("dp", "zero1", "zero2", "zero3", "torch-zero", "fsdp2")
MiB = 2 ** 20
ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc settings passed on to the ranks when set (a fixed mmap threshold returns freed buffers to the system,
so RSS follows the bytes in use; by default glibc raises it as buffers are freed and keeps them)."""


def build_model(args):
    torch.manual_seed(0)
    return models.mlp([args.features] + [args.width] * args.layers + [args.classes], flatten=False)


def activation_bytes(model, images) -> int:
    """Bytes autograd saves for the backward in one forward (distinct storages), serial."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in parameters)


def wrap(variant, model, comm, args):
    """(forward, optimizer, step) for ``variant``; ``step(optimizer)`` after the backward."""
    adamw = dict(lr=args.lr)
    if variant == "dp":
        wrapped = mpipar.DataParallel(model, comm, bucket_cap_mb=args.bucket_mb)
        return wrapped, torch.optim.AdamW(model.parameters(), **adamw), lambda optimizer: optimizer.step()
    if variant.startswith("zero"):
        sharded = ShardedDataParallel(model, comm, stage=int(variant[-1]), bucket_cap_mb=args.bucket_mb)
        return sharded, torch.optim.AdamW(sharded.parameters(), **adamw), sharded.step
    if variant in ("ddp", "torch-zero"):
        wrapped = ddp(model, args.bucket_mb)
        if variant == "ddp":
            return wrapped, torch.optim.AdamW(model.parameters(), **adamw), lambda optimizer: optimizer.step()
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **adamw)
        return wrapped, optimizer, lambda optimizer: optimizer.step()
    if variant == "fsdp2":
        mesh = init_device_mesh("cpu", (comm.Get_size(),))
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), **adamw), lambda optimizer: optimizer.step()
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")


def run_variant(args) -> None:
    """One variant on MPI.COMM_WORLD: rank 0 prints one JSON line (samples/s, RSS per rank, final loss)."""
    comm, rank, size = gloo_world(args.threads)
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(args.batch_size, args.features, generator=generator),
                torch.randint(0, args.classes, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]
    warm_up(torch.optim.AdamW)
    rss_before = current_rss()
    result = {"variant": args.variant}
    try:
        model = build_model(args)
        forward, optimizer, step = wrap(args.variant, model, comm, args)

        def train(images, labels):
            optimizer.zero_grad()
            loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            step(optimizer)
            return loss.item()

        train(*batches[0])
        comm.Barrier()
        start = time.perf_counter()
        for images, labels in batches[1:]:
            loss = train(images, labels)
        seconds = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        result.update(samples_per_s=args.steps * args.batch_size * size / seconds, loss=comm.allreduce(loss) / size)
    except Exception as error:  # noqa: BLE001 - reported, not hidden: the driver prints what failed
        result["error"] = f"rank {rank}: {type(error).__name__}: {error}"
    errors = [e for e in comm.allgather(result.get("error")) if e]
    if errors:
        result = {"variant": args.variant, "error": errors[0]}
    result.update(rss_before=comm.gather(rss_before), rss_after=comm.gather(current_rss()),
                  peak_rss=comm.gather(peak_rss()))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if not errors:
        dist.destroy_process_group()


def launch(variant, args) -> dict:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    forwarded = [option for name in ALLOCATOR_SETTINGS if name in os.environ for option in ("-x", name)]
    command = [mpirun, "-n", str(args.ranks), *(["--oversubscribe"] if args.oversubscribe else []), *forwarded,
               sys.executable, str(Path(__file__).resolve()), "--variant", variant, *child_options(args)]
    return launch_result(command, variant, {**os.environ, "OMP_NUM_THREADS": "1"})


def child_options(args) -> list:
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
            ("features", "width", "layers", "classes", "batch_size", "steps", "lr", "bucket_mb", "threads")]


def describe(args) -> dict:
    """Model sizes and the terms of the ZeRO-3 memory aim, computed serially."""
    model = build_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    largest_unit = max(sum(p.numel() for p in unit.parameters()) for unit in model.children())
    images = torch.randn(args.batch_size, args.features)
    return {"parameters": parameters, "param_bytes": 4 * parameters,
            "model_state_bytes": 16 * parameters,  # fp32 parameters, gradients, AdamW exp_avg and exp_avg_sq
            "largest_unit_bytes": 4 * largest_unit, "activation_bytes": activation_bytes(model, images)}


def drive(args) -> None:
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    sizes = describe(args)
    print(launch_rounds(variants, args.rounds, lambda variant: launch(variant, args),
                        lambda rounds, *load_and_time: render(args, rounds, sizes, *load_and_time), args.out))


def render(args, rounds, sizes, load_start, load_end, seconds) -> str:
    ok = {v: results for v, results in rounds.items() if all("error" not in r for r in results)}
    failed = {v: next(r["error"] for r in results if "error" in r) for v, results in rounds.items() if v not in ok}
    n = args.ranks
    allocator = ", ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR_SETTINGS if name in os.environ)
    lines = [f"# bench_zero: DataParallel, ZeRO-1/2/3, ZeroRedundancyOptimizer, FSDP2; {n} ranks, {date.today()}",
             "",
             f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
             f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
             f"({seconds / 60:.1f} min); allocator settings: "
             f"{allocator or 'glibc defaults'}. torch {torch.__version__}, {mpi_library()}, "
             f"mpipar {mpipar.__version__}.",
             "",
             "    " + " ".join(["python", "benchmarks/bench_zero.py", *sys.argv[1:]]),
             "",
             f"Model: MLP {args.features} -> {args.layers} x {args.width} -> {args.classes}, "
             f"{sizes['parameters']:,} parameters (fp32), AdamW lr {args.lr}; batch {args.batch_size} per rank, "
             f"{args.steps} timed steps after one warm-up, {args.threads} thread(s) per rank, "
             f"{len(next(iter(rounds.values())))} of {args.rounds} rounds done "
             f"(ABBA over launches: variants in order in even rounds, reversed in odd ones). mpipar over MPI "
             f"(shared memory), torch over gloo TCP on localhost: the transports differ.",
             "",
             "| variant | samples/s, median | ratio to dp (range) | peak RSS per rank, MiB, median (ranks) "
             "| peak - RSS before model, MiB | ratio to dp (range) | RSS after last step - before, MiB | final loss |",
             "|---|---|---|---|---|---|---|---|"]

    def per_round(variant, key):
        return [r[key] for r in ok[variant]]

    def growth(variant):  # per round: the largest rank's growth over its RSS before the model
        return [max(p - b for p, b in zip(r["peak_rss"], r["rss_before"])) for r in ok[variant]]

    def held(variant):  # per round: the largest rank's RSS after its last step over its RSS before the model
        return [max(a - b for a, b in zip(r["rss_after"], r["rss_before"])) for r in ok[variant]]

    base = "dp" if "dp" in ok else None
    for variant in ok:
        speed, peaks, grown = per_round(variant, "samples_per_s"), [max(r["peak_rss"]) for r in ok[variant]], \
            growth(variant)
        last = ok[variant][-1]["peak_rss"]
        compared = base is not None and variant != base
        speed_ratio = paired(speed, per_round(base, "samples_per_s")).text("faster", "slower") if compared else "-"
        memory_ratio = paired(grown, growth(base)).text("more", "less") if compared else "-"
        lines.append(f"| {variant} | {median(speed):.0f} | {speed_ratio} | {median(peaks) / MiB:.1f} "
                     f"({', '.join(f'{p / MiB:.1f}' for p in last)}) | {median(grown) / MiB:.1f} | {memory_ratio} | "
                     f"{median(held(variant)) / MiB:.1f} | {ok[variant][-1]['loss']:.6f} |")
    lines.append("")
    for one, other in (("zero3", "fsdp2"), ("zero1", "torch-zero"), ("zero2", "fsdp2")):
        if one in ok and other in ok:
            lines.append(f"- {one} / {other}: samples/s "
                         + paired(per_round(one, "samples_per_s"), per_round(other, "samples_per_s")).text(
                             f"{one} faster", f"{other} faster")
                         + "; peak RSS growth " + paired(growth(one), growth(other)).text(
                             f"{one} more", f"{other} more"))
    for variant, error in failed.items():
        lines.append(f"- {variant} FAILED: {error}")
    state, unit, act = sizes["model_state_bytes"], sizes["largest_unit_bytes"], sizes["activation_bytes"]
    aim = state / n + unit + act
    lines += ["", f"ZeRO-3 aim, per rank: model state {state / MiB:.2f} MiB (16 B/parameter) / {n} = "
              f"{state / n / MiB:.2f} MiB, + largest unit gathered {unit / MiB:.2f} MiB, + activations saved for "
              f"the backward {act / MiB:.2f} MiB (measured serially, one batch) = {aim / MiB:.2f} MiB."]
    if "zero3" in ok:
        lines.append(f"zero3's peak RSS growth over the process before the model: {median(growth('zero3')) / MiB:.2f} "
                     f"MiB (median over rounds of the largest rank) = {median(growth('zero3')) / aim:.2f} x the aim; "
                     f"held after the last step {median(held('zero3')) / MiB:.2f} MiB = "
                     f"{median(held('zero3')) / aim:.2f} x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="run this one variant (under mpirun)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="driver: comma-separated")
    parser.add_argument("--ranks", type=int, default=2, help="driver: ranks per launch")
    parser.add_argument("--rounds", type=int, default=10, help="driver: ABBA rounds")
    parser.add_argument("--oversubscribe", action="store_true", help="driver: pass --oversubscribe to mpirun")
    parser.add_argument("--out", help="driver: write the markdown results here")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4, help="hidden layers")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per launch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
