"""Train a ResNet with synchronous data parallelism over MPI, or with local SGD (model averaging).

Usage:
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3
    mpirun -n 2 python jobs/resnet_dp.py --data synthetic --max-steps 20 --out runs/try
    mpirun -n 2 python jobs/resnet_dp.py --data synthetic --max-steps 20 --out runs/try --resume
    sbatch slurm/resnet_dp.sh --data synthetic --max-steps 5
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3 --sync-every 8
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3 --sync-every 8 --local-warmup 100
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 1 --sync-every end
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --sync-every 16 --outer-lr 0.7 --outer-momentum 0.9
    sbatch slurm/resnet_dp.sh --data synthetic --max-steps 20 --sync-every 4 --local-warmup 4
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3 --zero 2 --optimizer adamw
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3 --zero 3 --optimizer adamw

Flags: --help. Manual: docs/usage.md (the job), docs/local_sgd.md (--sync-every),
docs/sharded.md (--zero).
As root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks
than cores needs --oversubscribe.
"""

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI

from mpipar import models
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.local_sgd import LocalSGDConfig, LocalSGDStrategy, sync_every_flag
from mpipar.run.cli import add_zero_flag, training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session
from mpipar.sharded import ShardedConfig, ShardedStrategy


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/resnet_dp",
                             batch_help="samples per rank per step", models=models.IMAGE_MODELS)
    parser.add_argument("--sync-every", type=sync_every_flag, default=1, metavar="H",
                        help="local SGD: average the models every H local steps (1: synchronous data parallelism; "
                             "'end' or 0: at epoch ends only)")
    parser.add_argument("--local-warmup", type=int, default=0, metavar="N",
                        help="local SGD: N synchronous steps before the local ones")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer learning rate (1: plain average)")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="DiLoCo outer Nesterov momentum")
    add_zero_flag(parser)
    args = parser.parse_args(argv)

    # the defaults are plain data parallelism: its settings and checkpoints stay as they were
    local_sgd = (args.sync_every, args.local_warmup, args.outer_lr, args.outer_momentum) != (1, 0, 1.0, 0.0)
    if local_sgd and args.grad_wire != "fp32":
        parser.error("--grad-wire is for synchronous data parallelism (--zero too) here; local SGD averages in fp32")
    if (local_sgd or args.zero) and args.compress != "none":
        parser.error("--compress is for plain data parallelism; local SGD and --zero do not compress")
    if local_sgd and args.zero:
        parser.error("--zero shards synchronous data parallelism; local SGD flags cannot be combined with it")
    settings = (lambda: LocalSGDConfig(args.sync_every, args.local_warmup, args.outer_lr, args.outer_momentum)) \
        if local_sgd else (lambda: ShardedConfig(args.zero)) if args.zero else None  # validated on every rank
    session = Session.from_args(comm, args, EARLY_SIGNALS, settings=settings)
    splits = session.data()
    model = models.IMAGE_MODELS[session.config.model](**splits.model_shape)
    if local_sgd:
        strategy = LocalSGDStrategy(model, comm, session.settings, bucket_mb=session.config.bucket_mb,
                                    device=session.device, state=session.state)
    elif args.zero:
        strategy = ShardedStrategy(model, comm, session.settings, bucket_mb=session.config.bucket_mb,
                                   device=session.device, checkpoint=session.resumed_from,
                                   grad_wire=session.config.grad_wire)
    else:
        strategy = DataParallelStrategy(model, comm, bucket_mb=session.config.bucket_mb, device=session.device,
                                        grad_wire=session.config.grad_wire, compress=session.config.compress)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
