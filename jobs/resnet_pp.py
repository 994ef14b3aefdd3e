"""Train a ResNet as a pipeline over MPI, alone or replicated with data parallelism (a grid of pipelines x stages).

Usage:
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule 1f1b --microbatches 8
    mpirun -n 4 python jobs/resnet_pp.py --data synthetic --max-steps 20 --out runs/pp
    mpirun -n 4 python jobs/resnet_pp.py --data synthetic --max-steps 20 --out runs/pp --resume
    mpirun -n 2 python jobs/resnet_pp.py --model resnet-small --balance even   # 5 block layers, split 3|2
    mpirun -n 4 python jobs/resnet_pp.py --microbatches 8 --schedule gpipe --stage-memory-mb 64
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule interleaved --virtual-stages 2
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule zero-bubble
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule zbv   # two chunks per rank in a V
    mpirun -n 2 python jobs/resnet_pp.py --data fashion-mnist --schedule pipedream --microbatches 8 --epochs 1
    mpirun -n 4 python jobs/resnet_pp.py --data fashion-mnist --schedule 2bw --microbatches 8 --epochs 1
    mpirun -n 4 python jobs/resnet_pp.py --stages 2 --data synthetic --max-steps 20 --out runs/hybrid
    mpirun -n 4 python jobs/resnet_pp.py --stages 2 --zero 1 --optimizer adamw --data synthetic --max-steps 20
    sbatch slurm/resnet_pp.sh --data synthetic --max-steps 5

Flags: --help. Manual: docs/pipeline.md (the job: models, balance, schedules, grids); --zero 1 (each
stage's optimizer state sharded over the replicas): docs/sharded.md (Grids).
As root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks
than cores needs --oversubscribe.
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
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/resnet_pp", epochs=3, lr=0.05,
                             batch_help="samples per pipeline per step", models=models.IMAGE_MODELS)
    add_pipeline_flags(parser, asynchronous=True)
    parser.add_argument("--stage-memory-mb", type=float, default=0.0,
                        help="--balance auto: MiB a stage may hold (parameters, gradients, momentum, activations "
                             "of its micro-batches in flight); 0: no limit")
    parser.set_defaults(model="resnet-small-fine", balance="auto")  # balanced pipelines by default
    add_zero_flag(parser)
    args = parser.parse_args(argv)

    session = Session.from_args(comm, args, EARLY_SIGNALS, settings=lambda: PipelineConfig(
        schedule=args.schedule, microbatches=args.microbatches, stages=args.stages or comm.Get_size(),
        balance=args.balance, stage_memory_mb=args.stage_memory_mb, virtual_stages=args.virtual_stages,
        zero=args.zero))
    splits = session.data()
    model = models.IMAGE_MODELS[session.config.model](**splits.model_shape)
    pipeline, config = session.settings, session.config
    sample = None  # one profile for all replicas, on rank 0
    if pipeline.balance == "auto" and comm.Get_rank() == 0:
        sample = splits.train.batch(range(max(1, config.batch_size // pipeline.microbatches)))[0]
    strategy = PipelineStrategy(comm, model, pipeline, batch_size=config.batch_size, bucket_mb=config.bucket_mb,
                                state=session.state, checkpoint=session.resumed_from, sample=sample, say=session.say,
                                device=session.device, grad_wire=config.grad_wire)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
