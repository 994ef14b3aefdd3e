"""The flags every training job shares, and the TrainConfig they make."""

from __future__ import annotations

import argparse
from typing import Optional

from mpipar.run.config import GRAD_WIRES, OPTIMIZERS, PRECISIONS, RECOMPUTES, TrainConfig

__all__ = ["training_parser", "train_config", "rank_list", "step_range", "add_zero_flag"]


class _RankParser(argparse.ArgumentParser):
    """An ArgumentParser that prints (help, usage errors) only when ``speaks``: every
    rank parses and exits alike, one rank talks."""

    speaks = True

    def _print_message(self, message, file=None):
        if self.speaks:
            super()._print_message(message, file)


def training_parser(doc: str, *, out: str, batch_help: str, epochs: int = 5, lr: float = 0.1,
                    models=None, rank: int = 0) -> argparse.ArgumentParser:
    """An argument parser with the common flags of ``jobs/``; a job adds its own.

    Args:
        doc: the job's docstring (shown by ``--help``).
        out: the default output directory.
        batch_help: what ``--batch-size`` counts (per rank, per pipeline, ...).
        epochs, lr: the job's defaults.
        models: names accepted by ``--model`` (no ``--model`` flag when None).
        rank: this process's MPI rank; only rank 0 prints ``--help`` and usage
            errors (every rank still exits with status 2 on a bad flag).
    """
    p = _RankParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.speaks = rank == 0
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, synthetic, or a path (IDX dir or .h5)")
    p.add_argument("--augment", type=int, nargs="?", const=4, default=None, metavar="PAD",
                   help="image jobs: random crop from a PAD-pixel border (default 4) and horizontal flip, "
                        "each sample's a function of seed, epoch and sample (resumes bitwise)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help=batch_help)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd: Nesterov momentum (--momentum); adamw: AdamW, decoupled --weight-decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output directory (must not hold an earlier run unless --resume)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks per node)")
    if models:
        p.add_argument("--model", choices=sorted(models), default="resnet-small")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda: one GPU per rank (node-local rank mod visible GPUs); auto: cuda when every rank "
                        "sees a GPU, else cpu")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB")
    p.add_argument("--grad-wire", choices=GRAD_WIRES, default="fp32",
                   help="bf16/fp16: gradient buckets travel in 16 bits, summed in fp32 (half the bytes; "
                        "docs/precision.md)")
    p.add_argument("--compress", default="none", metavar="{none,powersgd:RANK}",
                   help="powersgd:RANK: data-parallel gradients summed as rank-RANK factors with error feedback "
                        "(PowerSGD, Vogels et al. 2019; docs/precision.md)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16/fp16: autocast forward and backward, fp32 weights and optimizer state; fp16 with "
                        "dynamic loss scaling, overflowing steps skipped on every rank (docs/precision.md)")
    p.add_argument("--recompute", choices=RECOMPUTES, default="none",
                   help="activation recompute, bitwise the same training: full: keep only each block's (or "
                        "Sequential entry's, or pipeline stage's) input and recompute the rest in the backward; "
                        "selective: recompute only the attention core of transformer blocks (docs/precision.md)")
    p.add_argument("--flush-every", type=int, default=50, help="steps between metrics flushes")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: at epoch ends only); also written on SIGUSR1/SIGTERM")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out (start fresh when there is none)")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint directory (OUT/checkpoints/step-N); implies --resume")
    p.add_argument("--trace-steps", type=step_range, default=None, metavar="FIRST-LAST",
                   help="record timed events (data, forward+backward, each gradient bucket's Allreduce, optimizer, "
                        "parameter-server pushes and pulls) of these steps (0-based, e.g. 20-25 or 7) in metrics.h5; "
                        "mpipar-report RUN --trace out.json shows them in Perfetto")
    p.add_argument("--machine", metavar="FILE", default=None,
                   help="a machine file of mpipar-calibrate: the run stores its predicted step time and parts in "
                        "metrics.h5 (predicted_* attributes) beside the measured ones; free on --resume")
    p.add_argument("--requeue", action="store_true",
                   help="on Slurm's warning signal, checkpoint and requeue the job (the Slurm scripts pass it)")
    return p


def add_zero_flag(parser: argparse.ArgumentParser) -> None:
    """``--zero {0,1,2,3}`` for a data-parallel job: 0 plain data parallelism, 1 optimizer state
    sharded, 2 gradients too, 3 parameters too (:mod:`mpipar.sharded`)."""
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                        help="ZeRO stage: 0 data parallelism; 1 optimizer state sharded over the data-parallel "
                             "ranks; 2 gradients too (reduce-scattered); 3 parameters too (gathered per layer); "
                             "pipelines take 0 or 1, tensor-parallel splits 0-2 (docs/sharded.md, Grids)")


def rank_list(text: str) -> tuple:
    """``"0,0,1"`` -> ``(0, 0, 1)``: an argparse type for layer counts and placements."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def step_range(text: str) -> tuple:
    """``"20-25"`` -> ``(20, 25)``, ``"7"`` -> ``(7, 7)``: an argparse type for ``--trace-steps``."""
    first, _, last = text.partition("-")
    try:
        steps = (int(first), int(last or first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST or STEP (0-based step indices), got {text!r}") from None
    if not 0 <= steps[0] <= steps[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= FIRST <= LAST, got {text!r}")
    return steps


def train_config(args: argparse.Namespace, *, threads: int, model: Optional[str] = None) -> TrainConfig:
    """The validated TrainConfig of parsed common flags (raises ValueError naming the flag)."""
    return TrainConfig(
        data=args.data, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, out=args.out, threads=threads,
        model=model or args.model, bucket_mb=args.bucket_mb, flush_every=args.flush_every,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, device=args.device,
        grad_wire=args.grad_wire, precision=args.precision, recompute=getattr(args, "recompute", "none"),
        compress=args.compress,
        trace_steps=args.trace_steps, augment=args.augment, optimizer=getattr(args, "optimizer", "sgd"))
