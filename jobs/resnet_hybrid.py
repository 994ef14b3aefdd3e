"""Train ResNet pipelines replicated with data parallelism: a grid of pipelines x stages.

Usage:
    mpirun -n 4 python jobs/resnet_hybrid.py --stages 2 --data fashion-mnist --microbatches 4
    mpirun -n 4 python jobs/resnet_hybrid.py --stages 2 --data synthetic --max-steps 20 --out runs/hybrid
    mpirun -n 4 python jobs/resnet_hybrid.py --stages 2 --data synthetic --max-steps 20 --out runs/hybrid --resume
    sbatch slurm/resnet_hybrid.sh --data synthetic --max-steps 5

The ranks form a grid from sub-communicators: --stages S consecutive ranks run one
pipeline (as in jobs/resnet_pp.py) and the world size / S pipelines are
data-parallel replicas: each takes --batch-size samples per step, and after each
step every stage's gradients are averaged over its replicas (sample-weighted
Allreduce on the data-parallel group). With 4 ranks and --stages 2: pipelines
{0,1} and {2,3}, gradient groups {0,2} and {1,3}. Writes OUT/metrics.h5 like
jobs/resnet_pp.py, plus the root attribute replicas. As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than
cores needs --oversubscribe.

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
    p.add_argument("--out", default="runs/resnet_hybrid", help="output directory (must not hold an earlier run)")
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
    p.add_argument("--stages", type=int, default=2, help="ranks per pipeline (divides the world size)")
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
        PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=args.stages,
                       balance=args.balance)), "configuration")
    run_job(comm, config, pipeline, MODELS[config.model], strategy="pipeline_hybrid", say=say,
            stop=StopRequest.install(EARLY_SIGNALS), resume=args.resume, requeue=args.requeue)


if __name__ == "__main__":
    main()
