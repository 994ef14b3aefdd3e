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
schedule, stages, microbatches, bubble_measured, bubble_ideal and bubble_bound, and per step and
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

import argparse  # noqa: E402 (parse_args's annotation)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mpi4py import MPI

from mpipar import models
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.pipeline.trainer import PipelineConfig, run_job
from mpipar.run.cli import train_config, training_parser
from mpipar.run.launch import RootPrinter, StopRequest, check_world_size, threads_per_rank

MODELS = {"resnet-small": models.resnet_small, "resnet18": models.resnet18, "resnet50": models.resnet50}


def parse_args(argv=None, rank: int = 0) -> argparse.Namespace:
    p = training_parser(__doc__, rank=rank,
                        out="runs/resnet_pp", batch_help="samples per pipeline per step", epochs=3, lr=0.05,
                        models=MODELS)
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "naive"], default="1f1b")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per batch (must divide it)")
    p.add_argument("--balance", default="even", help="even, auto, or layers per stage N,N,...")
    return p.parse_args(argv)


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    say = RootPrinter(comm)
    args = parse_args(argv, comm.Get_rank())
    check_world_size(comm)
    threads = threads_per_rank(comm, args.threads)
    config, pipeline = collective_check(comm, lambda: (train_config(args, threads=threads),
        PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=comm.Get_size(),
                       balance=args.balance)), "configuration")
    run_job(comm, config, pipeline, MODELS[config.model], strategy="pipeline", say=say,
            stop=StopRequest.install(EARLY_SIGNALS), resume=args.resume, requeue=args.requeue)


if __name__ == "__main__":
    main()
