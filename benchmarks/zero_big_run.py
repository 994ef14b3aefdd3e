"""The run data parallelism cannot do here: a GPT whose AdamW training state on 4 replicated ranks exceeds
this machine's memory, trained by ZeRO-3 (``ShardedStrategy``, as ``--zero 3`` runs it) on 4 ranks.

Usage (synthetic tokens, a few steps; rank 0 prints the sizes, each step's loss and every rank's memory):
    mpirun -n 4 --oversubscribe python benchmarks/zero_big_run.py --width 1536 --layers 16 --steps 3
    python benchmarks/zero_big_run.py --width 256 --layers 2 --dry-run   # the sizes only, no training

The GPT is :func:`mpipar.models.gpt` with its head untied from the embedding (ZeRO-3 gathers each direct
child alone and refuses a weight shared by two of them; untying adds vocab x width parameters). Peak
resident memory per rank is read twice: over the whole process (``ru_maxrss``, which includes building
the full model before it is sharded, as every rank does today) and over training only (the kernel's
high-water mark reset after the wrapper is built, ``/proc/self/clear_refs``, then ``VmHWM``).
"""

import argparse
import json
import time

import torch
from _bench import current_rss, peak_rss  # before mpipar: the checkout
from mpi4py import MPI

from mpipar.models import gpt
from mpipar.sharded import ShardedConfig, ShardedStrategy

GiB = 2 ** 30


def high_water() -> int:
    """The kernel's peak resident set since the last reset (VmHWM), bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def build(args) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = gpt(width=args.width, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    head = model[-1]
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied: each unit gathered alone
    return model


def sizes(args) -> dict:
    """Parameter count and the bytes of AdamW training state (fp32 parameters, gradients, two moments)."""
    with torch.device("meta"):
        model = build(args)
    parameters = sum(p.numel() for p in model.parameters())
    unit = max(sum(p.numel() for p in child.parameters()) for child in model.children())
    return {"parameters": parameters, "state_bytes": 16 * parameters, "largest_unit_bytes": 4 * unit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="print the sizes, train nothing")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    info = sizes(args)
    if rank == 0:
        state = info["state_bytes"]
        print(f"GPT width {args.width}, {args.layers} layers, {args.heads} heads, seq-len {args.seq_len}: "
              f"{info['parameters']:,} parameters; AdamW state {state / GiB:.2f} GiB per replica, "
              f"{size} DataParallel ranks {size * state / GiB:.2f} GiB; ZeRO-3 {state / size / GiB:.2f} GiB per "
              f"rank + a gathered unit {info['largest_unit_bytes'] / GiB:.3f} GiB", flush=True)
    if args.dry_run:
        return
    before = current_rss()
    start = time.perf_counter()
    model = build(args)
    strategy = ShardedStrategy(model, comm, ShardedConfig(3))
    optimizer = torch.optim.AdamW(strategy.parameters() or [torch.zeros(0, requires_grad=True)], lr=1e-4)
    strategy.bind_optimizer(optimizer)
    built = time.perf_counter() - start
    after_build = current_rss()
    reset = reset_high_water()
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for step in range(args.steps):
        tokens = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=generator)
        begin = time.perf_counter()
        optimizer.zero_grad()
        record = strategy.train_step((tokens[:, :-1], tokens[:, 1:]))
        losses.append((record.loss, time.perf_counter() - begin))
        if rank == 0:
            print(f"step {step}: loss {record.loss:.4f}, {losses[-1][1]:.1f} s", flush=True)
    held = strategy.sdp.memory(optimizer)
    training_peak = high_water() if reset else None
    strategy.sdp.close()
    report = {"rank": rank, "rss_before_model": before, "rss_after_build": after_build,
              "peak_rss_process": peak_rss(), "peak_rss_training": training_peak, "rss_end": current_rss(),
              "held": held, "build_s": built}
    reports = comm.gather(report)
    if rank == 0:
        for r in reports:
            print(f"rank {r['rank']}: before model {r['rss_before_model'] / GiB:.2f} GiB, after build "
                  f"{r['rss_after_build'] / GiB:.2f}, peak over training "
                  + (f"{r['peak_rss_training'] / GiB:.2f}" if r['peak_rss_training'] else "n/a")
                  + f", peak over the process {r['peak_rss_process'] / GiB:.2f} GiB; held between steps: "
                  f"parameters {r['held']['param_bytes'] / GiB:.3f}, gradients {r['held']['grad_bytes'] / GiB:.3f}, "
                  f"optimizer {r['held']['optimizer_bytes'] / GiB:.3f} GiB", flush=True)
        print("RESULT " + json.dumps({"args": vars(args), "ranks": size, **info, "losses": losses,
                                      "reports": reports}), flush=True)


if __name__ == "__main__":
    main()
