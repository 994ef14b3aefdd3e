"""Train a ResNet with a parameter server over MPI: synchronous, asynchronous or with bounded staleness.

Usage:
    mpirun -n 3 python jobs/resnet_ps.py --data fashion-mnist --mode async
    mpirun -n 4 python jobs/resnet_ps.py --data synthetic --max-steps 20 --mode bounded --staleness 2
    mpirun -n 4 python jobs/resnet_ps.py --data synthetic --max-steps 20 --servers 2 --mode sync
    mpirun -n 4 python jobs/resnet_ps.py --data synthetic --max-steps 40 --straggler 3 --slowdown 2
    mpirun -n 3 python jobs/resnet_ps.py --data synthetic --max-steps 20 --mode sync --out runs/ps --resume
    sbatch slurm/resnet_ps.sh --data synthetic --max-steps 5

Flags: --help. Manual: docs/parameter_server.md (the job: servers, workers, modes).
As root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks
than cores needs --oversubscribe.
"""

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI

from mpipar import models
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.parameter_server import ParameterServerConfig, ParameterServerStrategy
from mpipar.parameter_server.config import MODES
from mpipar.run.cli import training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/resnet_ps",
                             batch_help="samples per worker per step (one shard)", models=models.IMAGE_MODELS)
    parser.add_argument("--mode", choices=MODES, default="async")
    parser.add_argument("--staleness", type=int, default=2, help="the bound of --mode bounded (versions)")
    parser.add_argument("--servers", type=int, default=1, help="server ranks (each holds a share of the weights)")
    parser.add_argument("--staleness-lr", action="store_true", help="divide each gradient's step by its staleness")
    parser.add_argument("--one-sided", action="store_true",
                        help="MPI one-sided updates (Accumulate/Get on a window; plain SGD, async)")
    parser.add_argument("--straggler", type=int, default=-1, help="a worker rank to slow down (experiments)")
    parser.add_argument("--slowdown", type=float, default=2.0, help="the straggler's compute time factor")
    args = parser.parse_args(argv)
    if args.grad_wire != "fp32":
        parser.error("--grad-wire applies to Allreduced gradients (data parallelism, pipelines, tensor parallelism); "
                     "a parameter server sends its own")
    if args.compress != "none":
        parser.error("--compress compresses the gradients of plain data parallelism; a parameter server sends its own")

    session = Session.from_args(comm, args, EARLY_SIGNALS, settings=lambda: ParameterServerConfig(
        mode=args.mode, staleness=args.staleness, servers=args.servers, staleness_lr=args.staleness_lr,
        one_sided=args.one_sided, straggler=args.straggler, slowdown=args.slowdown if args.straggler >= 0 else 1.0))
    splits = session.data()
    model = models.IMAGE_MODELS[session.config.model](**splits.model_shape)
    config = session.config
    strategy = ParameterServerStrategy(comm, model, session.settings, batch_size=config.batch_size,
                                       weight_decay=config.weight_decay, momentum=config.momentum,
                                       device=session.device)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
