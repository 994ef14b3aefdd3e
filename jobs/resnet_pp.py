"""Train a ResNet as a pipeline over MPI: one stage per rank, micro-batches streamed through.

Usage:
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule 1f1b --microbatches 8
    mpirun -n 4 python jobs/resnet_pp.py --data synthetic --max-steps 20 --balance auto --out runs/pp
    mpirun -n 4 python jobs/resnet_pp.py --data synthetic --max-steps 20 --balance auto --out runs/pp --resume
    sbatch slurm/resnet_pp.sh --data synthetic --max-steps 5

The model's layers (stem, residual blocks, head) are cut into as many contiguous
stages as there are ranks: --balance even (by layer count), auto (profiled: the
slowest stage is minimised and predicted vs measured stage times are printed) or
N,N,... layers per stage. --schedule gpipe runs all forwards then all backwards;
1f1b bounds the micro-batches in flight; naive runs one micro-batch at a time.
Writes OUT/metrics.h5 with the data-parallel schema plus the root attributes
schedule, stages, microbatches, bubble_measured and bubble_ideal, and per step and
rank busy (compute), communication and idle time and activation bytes. As root,
Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more
ranks than cores needs --oversubscribe.

Each rank checkpoints its own stages, optimizer and position to OUT/checkpoints
(every --checkpoint-every steps, at epoch ends, and on SIGUSR1/SIGTERM); --resume
continues the latest one, bitwise as if never interrupted.
"""

import signal

EARLY_SIGNALS = []  # Slurm's warning signal can come while torch is still importing
for _name in ("SIGUSR1", "SIGTERM"):
    signal.signal(getattr(signal, _name), lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mpi4py import MPI

from mpipar import models
from mpipar.agree import collective_check
from mpipar.config import TrainConfig
from mpipar.failure import abort_on_exception
from mpipar.launch import RootPrinter, StopRequest, check_world_size, threads_per_rank
from mpipar.pipeline.trainer import PipelineConfig, run_job

MODELS = {"resnet-small": models.resnet_small, "resnet18": models.resnet18, "resnet50": models.resnet50}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, synthetic, or a path (IDX dir or .h5)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="samples per pipeline per step")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/resnet_pp", help="output directory (must not hold an earlier run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks per node)")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet-small")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB")
    p.add_argument("--flush-every", type=int, default=50, help="steps between metrics flushes")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (0: at epoch ends only); also written on SIGUSR1/SIGTERM")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (start fresh when there is none)")
    p.add_argument("--requeue", action="store_true",
                   help="on Slurm's warning signal, checkpoint and requeue the job (the Slurm scripts pass it)")
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "naive"], default="1f1b")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per batch (must divide it)")
    p.add_argument("--balance", default="even", help="even, auto, or layers per stage N,N,...")
    return p.parse_args(argv)


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    say = RootPrinter(comm)
    args = parse_args(argv)
    check_world_size(comm)
    threads = threads_per_rank(comm, args.threads)
    config, pipeline = collective_check(comm, lambda: (TrainConfig(
        data=args.data, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, out=args.out, threads=threads,
        model=args.model, bucket_mb=args.bucket_mb, flush_every=args.flush_every, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every),
        PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=comm.Get_size(),
                       balance=args.balance)), "configuration")
    run_job(comm, config, pipeline, MODELS[config.model], strategy="pipeline", say=say,
            stop=StopRequest.install(EARLY_SIGNALS), resume=args.resume, requeue=args.requeue)


if __name__ == "__main__":
    main()
