"""Train a ResNet with synchronous data parallelism over MPI.

Usage:
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3
    mpirun -n 2 python jobs/resnet_dp.py --data synthetic --max-steps 20 --out runs/try
    mpirun -n 2 python jobs/resnet_dp.py --data synthetic --max-steps 20 --out runs/try --resume
    sbatch slurm/resnet_dp.sh --data synthetic --max-steps 5

Each rank trains on its share of every global batch (--batch-size samples per
rank); gradients are averaged with MPI Allreduce, weighted by sample counts.
Writes OUT/metrics.h5 (per step and rank: compute, communication and idle time,
bytes sent, loss; per epoch: test accuracy). Rank 0 checkpoints the model, and
every rank's BatchNorm statistics, to OUT/checkpoints (every --checkpoint-every
steps, at epoch ends, and on SIGUSR1/SIGTERM); --resume continues the latest one,
bitwise as if never interrupted. As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than
cores needs --oversubscribe.
"""

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI

from mpipar import models
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.run.cli import training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/resnet_dp",
                             batch_help="samples per rank per step", models=models.IMAGE_MODELS)
    args = parser.parse_args(argv)

    session = Session.from_args(comm, args, EARLY_SIGNALS)
    splits = session.data()
    model = models.IMAGE_MODELS[session.config.model](**splits.model_shape)
    strategy = DataParallelStrategy(model, comm, bucket_mb=session.config.bucket_mb, device=session.device)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
