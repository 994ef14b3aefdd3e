"""Train a GPT language model on bytes of text: data parallel, tensor parallel (--tp) or as pipelines (--stages).

Usage:
    mpipar-text2h5 $(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")/*.py runs/stdlib.h5
    mpirun -n 2 python jobs/gpt_lm.py --data runs/stdlib.h5 --max-steps 300 --out runs/gpt
    mpirun -n 2 python jobs/gpt_lm.py --data synthetic --max-steps 20 --out runs/gpt_syn
    mpirun -n 2 python jobs/gpt_lm.py --data synthetic --max-steps 20 --out runs/gpt_syn --resume
    mpirun -n 2 python jobs/gpt_lm.py --tp 2 --data synthetic --max-steps 20 --out runs/gpt_tp
    mpirun -n 4 python jobs/gpt_lm.py --stages 2 --tp 2 --data synthetic --max-steps 20 --out runs/gpt_pp_tp
    mpirun -n 4 python jobs/gpt_lm.py --tp 2 --zero 1 --data synthetic --max-steps 20 --out runs/gpt_tp_zero
    mpirun -n 4 python jobs/gpt_lm.py --zero 2 --data synthetic --max-steps 20 --out runs/gpt_zero2
    sbatch slurm/gpt_lm.sh --data synthetic --max-steps 20

Flags: --help. Manual: docs/gpt.md (the job: model, data, strategies); --zero: docs/sharded.md (Grids).
As root, Open MPI needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks
than cores needs --oversubscribe.
"""

import math

from _prelude import EARLY_SIGNALS  # first: catches Slurm's warning signal while torch imports
from mpi4py import MPI
from numpy import frombuffer, ndarray, uint8
from numpy.random import default_rng
from torch import Generator, randint

from mpipar.data.arrays import DataSplits
from mpipar.data.tokens import TokenWindows, load_tokens
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import abort_on_exception
from mpipar.models.gpt import gpt, gpt_name
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.flags import add_pipeline_flags
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.report.reader import read_run
from mpipar.run.cli import add_zero_flag, training_parser
from mpipar.run.loop import train
from mpipar.run.session import Session
from mpipar.sharded import ShardedConfig, ShardedStrategy
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy, split_transformer

SYNTHETIC_TOKENS = (400_000, 40_000)  # train, validation bytes of --data synthetic


def parser(rank: int = 0):
    p = training_parser(__doc__, rank=rank, out="runs/gpt_lm", epochs=1, lr=3e-3,
                        batch_help="windows of --seq-len tokens per data-parallel replica per step")
    p.set_defaults(data="synthetic", batch_size=32, optimizer="adamw", weight_decay=0.01)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", type=int, default=64, help="embedding width")
    p.add_argument("--heads", type=int, default=4, help="attention heads per block (must divide --width)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window (the model's context)")
    p.add_argument("--tp", type=int, default=1, help="ranks that split every block's heads and MLP")
    add_pipeline_flags(p, schedule="1f1b", microbatches=2)
    p.set_defaults(stages=1)  # 1: no pipeline
    add_zero_flag(p)
    return p


def settings_of(args, world_size: int):
    """The strategy's settings: None (data parallel), a ShardedConfig (--zero 1-3 without --tp or
    --stages), a TensorParallelConfig (--tp > 1) or a PipelineConfig (--stages > 1), either of these
    two with --zero 0 or 1. Raises ValueError naming the flag."""
    zero = getattr(args, "zero", 0)
    if args.stages > 1:
        return PipelineConfig(schedule=args.schedule, microbatches=args.microbatches, stages=args.stages,
                              balance=args.balance, tp=args.tp, virtual_stages=args.virtual_stages, zero=zero)
    if args.tp > 1:
        return TensorParallelConfig(tp=args.tp, zero=zero)
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    return ShardedConfig(zero) if zero else None


def build_strategy(comm: MPI.Intracomm, model, session: Session):
    """The strategy ``session.settings`` names, over ``comm``, for ``model`` (the unsplit GPT). Collective."""
    settings, config = session.settings, session.config
    if isinstance(settings, PipelineConfig):
        sample = None  # --balance auto profiles the layers on rank 0, on token windows of the batch's shape
        if settings.balance == "auto" and comm.Get_rank() == 0:
            embedding = model[0]
            sample = randint(0, embedding.tokens.num_embeddings,
                             (max(1, config.batch_size // settings.microbatches), embedding.seq_len),
                             generator=Generator().manual_seed(0))
        return PipelineStrategy(comm, model, settings, batch_size=config.batch_size, bucket_mb=config.bucket_mb,
                                state=session.state, checkpoint=session.resumed_from, sample=sample, say=session.say,
                                device=session.device, split_layers=split_transformer, grad_wire=config.grad_wire)
    if isinstance(settings, TensorParallelConfig):
        return TensorParallelStrategy(comm, model, settings, splitter="transformer", bucket_mb=config.bucket_mb,
                                      state=session.state, device=session.device, grad_wire=config.grad_wire)
    if isinstance(settings, ShardedConfig):
        return ShardedStrategy(model, comm, settings, bucket_mb=config.bucket_mb, device=session.device,
                               checkpoint=session.resumed_from, grad_wire=config.grad_wire)
    return DataParallelStrategy(model, comm, bucket_mb=config.bucket_mb, device=session.device,
                                grad_wire=config.grad_wire, compress=config.compress)


class _MemoryRows:
    """Generated tokens in memory, read as :class:`~mpipar.data.streaming.H5Rows` reads a file's."""

    path = "synthetic"

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def read(self, name: str, rows: ndarray) -> ndarray:
        return self.arrays[name][rows]


def synthetic_text(count: int, seed: int, stream: int) -> ndarray:
    """``count`` bytes of generated text: 64 random lower-case words, each followed by one of 3 others
    (a seeded Markov chain), separated by spaces and now and then a full stop and a newline."""
    rng = default_rng([seed, 104729])
    words = [bytes(rng.integers(97, 123, rng.integers(2, 9)).astype(uint8)) for _ in range(64)]
    successors = rng.integers(0, len(words), (len(words), 3))
    draw = default_rng([seed, 104729, stream])
    text, word = bytearray(), 0
    while len(text) < count:
        text += words[word] + (b".\n" if draw.random() < 0.1 else b" ")
        word = successors[word, draw.integers(0, 3)]
    return frombuffer(bytes(text[:count]), dtype=uint8)


def token_data(comm: MPI.Intracomm, data: str, seq_len: int, seed: int) -> DataSplits:
    """Windows of ``seq_len + 1`` tokens of ``data`` (a token file of ``mpipar-text2h5`` or ``synthetic``),
    the validation windows as the test split. Collective: refused on every rank together."""
    def load():
        if data != "synthetic":
            tokens = load_tokens(data, seq_len, seed=seed)
            return DataSplits(tokens.train, tokens.validation, tokens.description)
        train_count, validation_count = SYNTHETIC_TOKENS
        rows = _MemoryRows({"train": synthetic_text(train_count, seed, 1),
                            "validation": synthetic_text(validation_count, seed, 2)})
        return DataSplits(TokenWindows(rows, "train", train_count, seq_len, seed=seed, prefetch=0),
                          TokenWindows(rows, "validation", validation_count, seq_len, seed=seed, prefetch=0),
                          f"synthetic text ({train_count:,} train / {validation_count:,} validation bytes, seed "
                          f"{seed}, windows of {seq_len} + 1)")

    splits = collective_check(comm, load, "--data")
    agree_on(comm, "the token windows (train, validation, vocabulary)",
             (len(splits.train), len(splits.test), splits.train.vocab_size))
    return splits


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    args = parser(comm.Get_rank()).parse_args(argv)
    name = gpt_name(layers=args.layers, width=args.width, heads=args.heads, seq_len=args.seq_len)
    session = Session.from_args(comm, args, EARLY_SIGNALS, model=name,
                                settings=lambda: settings_of(args, comm.Get_size()))
    splits = token_data(comm, session.config.data, args.seq_len, session.config.seed)
    model = collective_check(comm, lambda: gpt(vocab=splits.train.vocab_size, width=args.width, layers=args.layers,
                                               heads=args.heads, seq_len=args.seq_len), "the model's sizes")
    strategy = build_strategy(comm, model, session)
    strategy.metrics_attrs.update(task="language model", vocab_size=splits.train.vocab_size)  # report: bits/byte
    if not train(session, strategy, splits) and comm.Get_rank() == 0:
        loss = read_run(session.out / "metrics.h5").epochs["test_loss"][-1]
        session.say(f"validation: {loss:.4f} nats per token = {loss / math.log(2):.4f} bits per byte")


if __name__ == "__main__":
    main()
