"""Train a small vision transformer with every block split over ranks (tensor parallelism).

Usage:
    mpirun -n 2 python jobs/vit_tp.py --data fashion-mnist
    mpirun -n 2 python jobs/vit_tp.py --data fashion-mnist --tp 1 --out runs/vit_dp      # 2 replicas, no split
    mpirun -n 2 python jobs/vit_tp.py --data synthetic --max-steps 20 --out runs/vit_tp
    mpirun -n 2 python jobs/vit_tp.py --data synthetic --max-steps 20 --out runs/vit_tp --resume
    mpirun -n 4 python jobs/vit_tp.py --tp 2 --data synthetic --max-steps 20 --out runs/vit_tp_dp
    mpirun -n 4 python jobs/vit_tp.py --tp 2 --zero 1 --optimizer adamw --data synthetic --max-steps 20
    mpirun -n 4 python jobs/vit_tp.py --tp 1 --zero 2 --optimizer adamw --data synthetic --max-steps 20

The model (--model vit-tiny, 117k parameters) cuts a 28x28 image into 16 patches of 7x7,
embeds each as a token of width 48 (plus a learned position embedding), runs 4 pre-norm
transformer blocks (4 attention heads, MLP 48-192-48 with GELU), and classifies the mean
token after a LayerNorm. --tp consecutive ranks (default: all) split every block
Megatron-style: each holds a share of the heads (its rows of the q, k and v projections and
columns of the output projection) and of the MLP's hidden features, so a block costs two
Allreduces forward and two backward. The patch and position embeddings, the LayerNorms and
the head stay whole on every rank (their gradients are equal on every rank of a group). The
heads (4) and hidden features (192) must be divisible by --tp: 1, 2 or 4 (vit-small: 12
heads, 384 hidden, 1, 2, 3, 4, 6 or 12). A world of k x tp ranks runs k data-parallel
replicas. Writes OUT/metrics.h5 like the other jobs (tensor-parallel Allreduce time and
bytes in the communication fields, the attribute tp); each rank checkpoints its own shards
and --resume continues the latest one. As root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than cores needs --oversubscribe. --zero 1 shards the
optimizer state over the replicas; with --tp 1, --zero 1-3 is sharded data parallelism (docs/sharded.md).
"""

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI

from mpipar import models
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.run.cli import add_zero_flag, training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session
from mpipar.sharded import ShardedConfig, ShardedStrategy
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    parser = training_parser(__doc__, rank=comm.Get_rank(), out="runs/vit_tp", epochs=5, lr=0.05,
                             models=models.VIT_MODELS, batch_help="samples per tensor-parallel group per step")
    parser.set_defaults(model="vit-tiny")
    parser.add_argument("--tp", type=int, default=0, help="ranks that split every block (0: all ranks)")
    add_zero_flag(parser)
    args = parser.parse_args(argv)

    def settings():
        tp = args.tp or comm.Get_size()
        if tp == 1 and args.zero:  # no split: sharded data parallelism, every stage
            return ShardedConfig(args.zero)
        return TensorParallelConfig(tp=tp, zero=args.zero)

    session = Session.from_args(comm, args, EARLY_SIGNALS, settings=settings)
    splits = session.data()
    model = models.VIT_MODELS[session.config.model](**splits.model_shape)
    config = session.config
    if isinstance(session.settings, ShardedConfig):
        strategy = ShardedStrategy(model, comm, session.settings, bucket_mb=config.bucket_mb, device=session.device,
                                   checkpoint=session.resumed_from, grad_wire=config.grad_wire)
    else:
        strategy = TensorParallelStrategy(comm, model, session.settings, bucket_mb=config.bucket_mb,
                                          state=session.state, device=session.device, grad_wire=config.grad_wire)
    train(session, strategy, splits)


if __name__ == "__main__":
    main()
