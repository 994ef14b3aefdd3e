"""Train the 4-layer MLP of jobs/mlp_mp.py with every layer split by neurons over ranks (tensor parallelism).

Usage:
    mpirun -n 2 python jobs/mlp_tp.py --data fashion-mnist
    mpirun -n 2 python jobs/mlp_tp.py --data synthetic --max-steps 20 --out runs/mlp_tp
    mpirun -n 2 python jobs/mlp_tp.py --data synthetic --max-steps 20 --out runs/mlp_tp --resume
    mpirun -n 4 python jobs/mlp_tp.py --tp 2 --data synthetic --max-steps 20 --out runs/mlp_tp_dp
    mpirun -n 4 python jobs/mlp_tp.py --tp 2 --stages 2 --data synthetic --max-steps 20 --out runs/mlp_tp_pp
    mpirun -n 4 python jobs/mlp_tp.py --tp 2 --zero 1 --data synthetic --max-steps 20 --out runs/mlp_tp_zero

The model is Flatten, fc1 (784-256), fc2 (256-128), fc3 (128-100), fc4 (100-10), as in
jobs/mlp_mp.py, but instead of placing whole layers on ranks, --tp consecutive ranks
(default: all) each hold a slice of every layer's neurons: fc1 and fc3 are column-parallel
(split outputs), fc2 and fc4 row-parallel (split inputs), so each pair costs one Allreduce
forward and one backward (the backward one overlapped with the weight gradient). The
hidden sizes 256 and 100 must be divisible by --tp (1, 2 or 4). A world of k x tp ranks
runs k data-parallel replicas. With --stages S the split blocks (fc1+fc2, fc3+fc4) also
form a pipeline of S stages of --tp ranks each (--schedule, --microbatches as in
jobs/resnet_pp.py; a world of k x S x tp ranks). Writes OUT/metrics.h5 like the other jobs (tensor-parallel
Allreduce time and bytes in the communication fields, the attribute tp); each rank
checkpoints its own shards and --resume continues the latest one, bitwise as if never
interrupted. --zero 1 shards the optimizer state over the replicas; with --tp 1 and no --stages,
--zero 1-3 is sharded data parallelism (docs/sharded.md, Grids). As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than cores needs --oversubscribe.
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
from mpipar.sharded import ShardedConfig, ShardedStrategy
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy, split_mlp


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/mlp_tp", epochs=3, lr=0.05,
                             batch_help="samples per tensor-parallel group per step")
    parser.add_argument("--tp", type=int, default=0,
                        help="ranks that split every layer (0: all ranks, or all ranks of a stage with --stages)")
    add_pipeline_flags(parser, schedule="1f1b", microbatches=2)
    add_zero_flag(parser)
    args = parser.parse_args(argv)
    stages = max(args.stages, 1)

    def settings():
        tp = args.tp or comm.Get_size() // stages
        if stages == 1 and tp == 1 and args.zero:  # no split: sharded data parallelism, every stage
            return ShardedConfig(args.zero)
        if stages == 1:
            return TensorParallelConfig(tp=tp, zero=args.zero)
        return PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=stages,
                              balance=args.balance, tp=tp, virtual_stages=args.virtual_stages, zero=args.zero)

    session = Session.from_args(comm, args, EARLY_SIGNALS, model="mlp-" + "-".join(map(str, models.MLP_SIZES)),
                                settings=settings)
    splits = session.data()
    model = models.image_mlp(**splits.model_shape)
    config = session.config
    if isinstance(session.settings, ShardedConfig):
        strategy = ShardedStrategy(model, comm, session.settings, bucket_mb=config.bucket_mb, device=session.device,
                                   checkpoint=session.resumed_from, grad_wire=config.grad_wire)
    elif stages == 1:
        strategy = TensorParallelStrategy(comm, model, session.settings, bucket_mb=config.bucket_mb,
                                          state=session.state, device=session.device, grad_wire=config.grad_wire)
    else:
        strategy = PipelineStrategy(comm, model, session.settings, batch_size=config.batch_size,
                                    bucket_mb=config.bucket_mb, state=session.state, checkpoint=session.resumed_from,
                                    say=session.say, device=session.device, split_layers=split_mlp,
                                    grad_wire=config.grad_wire)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
