"""Benchmark: peak resident memory per rank with and without ``--recompute``, for a data-parallel transformer
and for the stages of a pipeline (CPU); samples/s beside it (the recompute's extra forward).

Usage (the driver launches one ``mpirun`` per variant and round, ABBA order, and writes the results):
    python benchmarks/bench_recompute.py --ranks 2 --rounds 6 --out benchmarks/results/bench_recompute-2ranks.md
One variant alone (what the driver runs; rank 0 prints a JSON line):
    mpirun -n 2 python benchmarks/bench_recompute.py --variant pipeline:full

Variants ``CASE:RECOMPUTE``: CASE ``dp`` (a GPT trained by DataParallelStrategy on every rank) or ``pipeline``
(the same GPT as a GPipe pipeline of one stage per rank, ``--microbatches`` micro-batches); RECOMPUTE ``none``,
``full`` or ``selective`` (the strategy's ``bind_recompute``, as ``--recompute`` does). Peak RSS is monotone
within a process, so each variant runs in its own launch: ``ru_maxrss`` per rank at the end, less the RSS
before the model was built (torch and MPI alone). Ratios are per round (with/without recompute, the same
round), reported as median and range, "no measurable difference" when the range includes 1. The children
run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, default 65536 here unless set), so freed
activation buffers go back to the system and RSS follows the bytes in use.
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
import torch.nn.functional as F
from _bench import current_rss, launch_result, launch_rounds, mpi_library, paired, peak_rss, warm_up  # before mpipar
from mpi4py import MPI

import mpipar
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.models.gpt import gpt
from mpipar.pipeline import Pipeline, Placement

CASES = ("dp", "pipeline")
RECOMPUTES = ("none", "full", "selective")
MiB = 2 ** 20


def build_model(args):
    torch.manual_seed(0)
    return gpt(width=args.width, layers=args.layers, heads=args.heads, seq_len=args.seq_len)


def trainer(case: str, recompute: str, comm, args):
    """``train(tokens, targets) -> loss`` of one step of ``case`` with ``recompute``, and the pipeline (or None)."""
    model = build_model(args)
    if case == "dp":
        strategy = DataParallelStrategy(model, comm)
        if recompute != "none":
            strategy.bind_recompute(recompute)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

        def train(tokens, targets):
            optimizer.zero_grad()
            record = strategy.train_step((tokens, targets))
            optimizer.step()
            return record.loss
        return train, None
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule="gpipe",
                    microbatches=args.microbatches, loss_fn=F.cross_entropy)
    from mpipar.run.recompute import apply_recompute
    for stage in pipe.stages.values():
        if recompute == "full":
            stage.recompute = True
        elif recompute == "selective":
            apply_recompute(stage.module, "selective", strict=False)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=args.lr, momentum=0.9)

    def train(tokens, targets):
        optimizer.zero_grad()
        result = pipe.step(tokens if pipe.holds_first_stage else None, targets if pipe.holds_last_stage else None)
        optimizer.step()
        return result.loss
    return train, pipe


def run_variant(args) -> None:
    """One variant on MPI.COMM_WORLD: rank 0 prints one JSON line (samples/s, RSS per rank, final loss)."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    case, recompute = args.variant.split(":")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(rank if case == "dp" else 0)  # a pipeline's ranks share a batch
    batches = []
    for _ in range(args.steps + 1):
        tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=generator)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    warm_up(torch.optim.SGD, lr=0.1)
    rss_before = current_rss()
    result = {"variant": args.variant}
    try:
        train, pipe = trainer(case, recompute, comm, args)
        train(*batches[0])
        comm.Barrier()
        start = time.perf_counter()
        for tokens, targets in batches[1:]:
            loss = train(tokens, targets)
        seconds = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        samples = args.batch_size * (size if case == "dp" else 1)
        result.update(samples_per_s=args.steps * samples / seconds, loss=comm.allreduce(loss) / size)
        if pipe is not None:  # the executor's own estimate: saved bytes of the micro-batches in flight
            result["activation_bytes"] = comm.gather(sum(s.activation_peak_bytes for s in pipe.stages.values()))
    except Exception as error:  # noqa: BLE001 - reported, not hidden: the driver prints what failed
        result["error"] = f"rank {rank}: {type(error).__name__}: {error}"
    errors = [e for e in comm.allgather(result.get("error")) if e]
    if errors:
        result = {"variant": args.variant, "error": errors[0]}
    result.update(rss_before=comm.gather(rss_before), peak_rss=comm.gather(peak_rss()))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def launch(variant, args) -> dict:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_",
                                                                                           "65536")}
    command = [mpirun, "-n", str(args.ranks), "--oversubscribe", "-x", "MALLOC_MMAP_THRESHOLD_", sys.executable,
               str(Path(__file__).resolve()), "--variant", variant, *child_options(args)]
    return launch_result(command, variant, env)


def child_options(args) -> list:
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
            ("width", "layers", "heads", "seq_len", "batch_size", "microbatches", "steps", "lr", "threads")]


def drive(args) -> None:
    variants = [f"{case}:{mode}" for case in args.cases.split(",") for mode in RECOMPUTES]
    print(launch_rounds(variants, args.rounds, lambda variant: launch(variant, args),
                        lambda rounds, *load_and_time: render(args, rounds, *load_and_time), args.out))


def render(args, rounds, load_start, load_end, seconds) -> str:
    ok = {v: results for v, results in rounds.items() if results and all("error" not in r for r in results)}
    failed = {v: next(r["error"] for r in results if "error" in r) for v, results in rounds.items()
              if results and v not in ok}
    done = min(len(results) for results in rounds.values())
    lines = [f"# bench_recompute: peak RSS per rank with and without --recompute; {args.ranks} ranks, {date.today()}",
             "",
             f"Machine: {platform.node()}, {os.cpu_count()} cores, shared with other jobs (load average "
             f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, {seconds / 60:.1f} min); "
             f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '65536')}. torch {torch.__version__}, "
             f"{mpi_library()}, mpipar {mpipar.__version__}.",
             "",
             "    " + " ".join(["python", "benchmarks/bench_recompute.py", *sys.argv[1:]]),
             "",
             f"Model: GPT, {args.layers} blocks of width {args.width}, {args.heads} heads, {args.seq_len} tokens, "
             f"fp32; "
             f"SGD; batch {args.batch_size} per rank (dp) or per pipeline of {args.ranks} stages and "
             f"{args.microbatches} micro-batches (GPipe); {args.steps} timed steps after one warm-up; "
             f"{done} of {args.rounds} rounds (ABBA over launches). Growth = peak RSS less the RSS before the "
             f"model (the largest rank's, median over rounds); ratios paired per round against `none`.",
             "",
             "| variant | growth, MiB (per rank, last round) | growth vs none (range) | samples/s | "
             "samples/s vs none (range) | executor's activation estimate, MiB |",
             "|---|---|---|---|---|---|"]

    def growth(variant):
        return [max(p - b for p, b in zip(r["peak_rss"], r["rss_before"])) for r in ok[variant]]

    def per_rank(variant):
        last = ok[variant][-1]
        return ", ".join(f"{(p - b) / MiB:.0f}" for p, b in zip(last["peak_rss"], last["rss_before"]))

    for variant in ok:
        base = variant.split(":")[0] + ":none"
        compared = variant != base and base in ok
        speed = [r["samples_per_s"] for r in ok[variant]]
        memory_ratio = paired(growth(variant), growth(base)).text("more", "less") if compared else "-"
        speed_ratio = paired(speed, [r["samples_per_s"] for r in ok[base]]).text("faster", "slower") \
            if compared else "-"
        estimate = ok[variant][-1].get("activation_bytes")
        lines.append(f"| {variant} | {median(growth(variant)) / MiB:.0f} ({per_rank(variant)}) | {memory_ratio} | "
                     f"{median(speed):.1f} | {speed_ratio} | "
                     f"{', '.join(f'{b / MiB:.1f}' for b in estimate) if estimate else '-'} |")
    for variant, error in failed.items():
        lines.append(f"- {variant} FAILED: {error}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", help="run this one variant CASE:RECOMPUTE (under mpirun)")
    parser.add_argument("--cases", default=",".join(CASES), help="driver: comma-separated cases")
    parser.add_argument("--ranks", type=int, default=2, help="driver: ranks per launch")
    parser.add_argument("--rounds", type=int, default=6, help="driver: ABBA rounds")
    parser.add_argument("--out", help="driver: write the markdown results here")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank (dp) or per pipeline")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per launch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
