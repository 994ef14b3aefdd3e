"""Train a 4-layer MLP split over two ranks by layer (model parallelism), non-contiguously by default.

Usage:
    mpirun -n 2 python jobs/mlp_mp.py --data fashion-mnist
    mpirun -n 2 python jobs/mlp_mp.py --data synthetic --max-steps 20 --out runs/mlp
    mpirun -n 2 python jobs/mlp_mp.py --data synthetic --max-steps 20 --out runs/mlp --resume
    mpirun -n 2 python jobs/mlp_mp.py --placement 0,0,0,1,1 --schedule 1f1b --microbatches 8
    sbatch slurm/mlp_mp.sh --data synthetic --max-steps 5

The model is Flatten, fc1 (784-256), fc2 (256-128), fc3 (128-100), fc4 (100-10).
--placement gives the rank of each of these five layers; the default 0,0,1,1,0
puts fc1 and fc4 on rank 0 and fc2 and fc3 on rank 1, so the activation goes
0 -> 1 -> 0 and the gradient 0 -> 1 -> 0 back. The default --schedule naive with
one micro-batch is plain layer-partitioned training (one rank works at a time);
gpipe or 1f1b with --microbatches M pipeline it. A world of 2k ranks runs k
data-parallel replicas. Writes OUT/metrics.h5 like jobs/resnet_pp.py. As root,
Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more
ranks than cores needs --oversubscribe.

Each rank checkpoints its own layers, optimizer and position to OUT/checkpoints
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

SIZES = (256, 128, 100)


def make_mlp(in_channels: int, num_classes: int, image_size: int):
    return models.mlp([in_channels * image_size * image_size, *SIZES, num_classes])


def parse_args(argv=None, rank: int = 0) -> argparse.Namespace:
    p = training_parser(__doc__, rank=rank,
                        out="runs/mlp_mp", batch_help="samples per model replica per step", epochs=3,
                        lr=0.05)
    p.add_argument("--placement", default="0,0,1,1,0",
                   help="rank of each layer (Flatten, fc1, fc2, fc3, fc4); default: fc1,fc4 | fc2,fc3")
    p.add_argument("--schedule", choices=["naive", "gpipe", "1f1b"], default="naive")
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches per batch (must divide it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    say = RootPrinter(comm)
    args = parse_args(argv, comm.Get_rank())
    check_world_size(comm)
    threads = threads_per_rank(comm, args.threads)
    stages = len(set(args.placement.split(",")))
    model_name = "mlp-" + "-".join(map(str, SIZES))
    config, pipeline = collective_check(comm, lambda: (train_config(args, threads=threads, model=model_name),
        PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=stages,
                       placement=args.placement)), "configuration")
    run_job(comm, config, pipeline, make_mlp, strategy="model_parallel", say=say,
            stop=StopRequest.install(EARLY_SIGNALS), resume=args.resume, requeue=args.requeue)


if __name__ == "__main__":
    main()
