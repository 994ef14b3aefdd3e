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
                        out="runs/resnet_hybrid", batch_help="samples per pipeline per step", epochs=3,
                        lr=0.05, models=MODELS)
    p.add_argument("--stages", type=int, default=2, help="ranks per pipeline (divides the world size)")
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
        PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=args.stages,
                       balance=args.balance)), "configuration")
    run_job(comm, config, pipeline, MODELS[config.model], strategy="pipeline_hybrid", say=say,
            stop=StopRequest.install(EARLY_SIGNALS), resume=args.resume, requeue=args.requeue)


if __name__ == "__main__":
    main()
