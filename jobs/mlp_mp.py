"""Train a 4-layer MLP split over two ranks by layer (model parallelism), non-contiguously by default.

Usage:
    mpirun -n 2 python jobs/mlp_mp.py --data fashion-mnist
    mpirun -n 2 python jobs/mlp_mp.py --data synthetic --max-steps 20 --out runs/mlp
    mpirun -n 2 python jobs/mlp_mp.py --data synthetic --max-steps 20 --out runs/mlp --resume
    mpirun -n 2 python jobs/mlp_mp.py --placement 0,0,0,1,1 --schedule 1f1b --microbatches 8
    mpirun -n 4 python jobs/mlp_mp.py --zero 1 --schedule 1f1b --microbatches 2 --data synthetic --max-steps 20
    sbatch slurm/mlp_mp.sh --data synthetic --max-steps 5

The model is Flatten, fc1 (784-256), fc2 (256-128), fc3 (128-100), fc4 (100-10).
--placement gives the rank of each of these five layers; the default 0,0,1,1,0
puts fc1 and fc4 on rank 0 and fc2 and fc3 on rank 1, so the activation goes
0 -> 1 -> 0 and the gradient 0 -> 1 -> 0 back. The default --schedule naive with
one micro-batch is plain layer-partitioned training (one rank works at a time);
gpipe or 1f1b with --microbatches M pipeline it. A world of 2k ranks runs k
data-parallel replicas; --zero 1 shards each rank's optimizer state over its
replicas (docs/sharded.md, Grids). Writes OUT/metrics.h5 like jobs/resnet_pp.py; each rank
checkpoints its own layers to OUT/checkpoints and --resume continues the latest
one, bitwise as if never interrupted. As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than
cores needs --oversubscribe.
"""

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI

from mpipar import models
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.flags import add_pipeline_flags
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.cli import add_zero_flag, training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/mlp_mp", epochs=3, lr=0.05,
                             batch_help="samples per model replica per step")
    add_pipeline_flags(parser, schedule="naive", microbatches=1, placement="0,0,1,1,0", stages=False)
    add_zero_flag(parser)
    args = parser.parse_args(argv)

    session = Session.from_args(comm, args, EARLY_SIGNALS, model="mlp-" + "-".join(map(str, models.MLP_SIZES)),
                                settings=lambda: PipelineConfig(schedule=args.schedule, microbatches=args.microbatches,
                                                                stages=len(set(args.placement)),
                                                                placement=args.placement,
                                                                virtual_stages=args.virtual_stages, zero=args.zero))
    splits = session.data()
    model = models.image_mlp(**splits.model_shape)
    strategy = PipelineStrategy(comm, model, session.settings, batch_size=session.config.batch_size,
                                bucket_mb=session.config.bucket_mb, state=session.state,
                                checkpoint=session.resumed_from, say=session.say, device=session.device,
                                grad_wire=session.config.grad_wire)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
