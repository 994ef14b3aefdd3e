"""Benchmark: peak memory per rank and samples/s training on an HDF5 file, streamed or cached.

Usage:
    python benchmarks/bench_streaming.py write /tmp/big.h5 --samples 5600000          # 4.4 GB of 28x28
    mpirun -n 4 python benchmarks/bench_streaming.py train /tmp/big.h5 --cache no --max-steps 200
    python benchmarks/bench_streaming.py write /tmp/small.h5 --samples 200000
    mpirun -n 4 python benchmarks/bench_streaming.py train /tmp/small.h5 --cache no --max-steps 200
    mpirun -n 4 python benchmarks/bench_streaming.py train /tmp/small.h5 --cache yes --max-steps 200

``write``: a synthetic, learnable HDF5 file as ``mpipar-idx2h5`` writes one (chunked, lzf, mean/std
attributes), a block at a time, so writing it takes no more memory than reading it. ``train``: the
data-parallel loop (``jobs/resnet_dp.py``'s strategy, the model of ``--model``) for ``--max-steps`` steps
on every rank of the launch; rank 0 prints each rank's peak resident memory (``ru_maxrss``), the median
step time, the median data time (the wait for the prefetch thread: how far loading falls behind) and
samples/s (global batch / median step). Delete the files afterwards.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from _bench import mpi_library, peak_rss  # before mpipar: the checkout on sys.path
from mpi4py import MPI

from mpipar import models
from mpipar.data import synthetic
from mpipar.data.convert import finish_h5, write_split
from mpipar.data.streaming import load_h5
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.run.config import TrainConfig
from mpipar.run.loop import train
from mpipar.run.session import Session

BLOCK = 20000


def write(path: Path, samples: int, test: int, size: int, seed: int) -> None:
    """Samples of :func:`mpipar.data.synthetic` (2000 of them) with fresh noise, a block at a time."""
    base = synthetic(2000, 1, image_size=size, seed=seed).train
    images, labels = base.images.squeeze(1).numpy().astype(np.int16), base.labels.numpy()

    def blocks(count, stream):
        rng = np.random.default_rng([seed, stream])
        for first in range(0, count, BLOCK):
            chosen = rng.integers(0, len(labels), min(BLOCK, count - first))
            noise = rng.integers(-20, 21, (len(chosen), size, size), dtype=np.int16)
            yield np.clip(images[chosen] + noise, 0, 255).astype(np.uint8), labels[chosen]

    def fill(f):
        write_split(f, "", samples, (size, size), blocks(samples, 1))
        write_split(f, "test/", test, (size, size), blocks(test, 2))

    start = time.perf_counter()
    finish_h5(path.with_name(path.name + ".tmp"), path, fill)
    print(f"wrote {path}: {samples:,} + {test:,} samples of {size}x{size}, {path.stat().st_size / 2**30:.2f} GiB "
          f"in {time.perf_counter() - start:.0f} s")


def run(comm, path: Path, args) -> None:
    cache = {"auto": None, "yes": True, "no": False}[args.cache]
    with tempfile.TemporaryDirectory() as scratch:
        out = comm.bcast(scratch if comm.Get_rank() == 0 else None, root=0)
        config = TrainConfig(data=str(path), epochs=1, max_steps=args.max_steps, batch_size=args.batch_size,
                             threads=args.threads, model=args.model, out=str(Path(out) / "run"), log_every=0,
                             flush_every=args.max_steps, device="cpu")
        session = Session(comm, config)
        splits = load_h5(path, cache=cache)
        model = models.IMAGE_MODELS[args.model](**splits.model_shape)
        start = time.perf_counter()
        train(session, DataParallelStrategy(model, comm), splits)
        wall = time.perf_counter() - start
        if comm.Get_rank() == 0:
            with h5py.File(Path(out) / "run" / "metrics.h5", "r") as f:
                step_time, data_time = f["steps/step_time"][...], f["steps/data_time"][...]
        comm.Barrier()
    peaks = comm.gather(peak_rss() / 2**30, root=0)  # GiB
    if comm.Get_rank() == 0:
        skip = min(5, len(step_time) // 4)  # the first steps warm up
        step = statistics.median(step_time[skip:].max(axis=1))
        data = statistics.median(data_time[skip:].max(axis=1))
        size = path.stat().st_size / 2**30
        print(f"{path.name} ({size:.2f} GiB), {splits.description}; {comm.Get_size()} ranks x {args.threads} "
              f"threads, {mpi_library()}, model {args.model}, batch {args.batch_size}/rank, {len(step_time)} steps")
        print("| file GiB | mode | ranks | peak RSS per rank, GiB (max) | median step, ms | median data wait, ms "
              "| samples/s | wall s |")
        print(f"| {size:.2f} | {'cached' if 'in memory' in splits.description else 'streamed'} | {comm.Get_size()} "
              f"| {max(peaks):.2f} ({', '.join(f'{p:.2f}' for p in peaks)}) | {1e3 * step:.1f} | {1e3 * data:.1f} "
              f"| {args.batch_size * comm.Get_size() / step:.0f} | {wall:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["write", "train"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--samples", type=int, default=5_600_000, help="write: training samples")
    parser.add_argument("--test", type=int, default=10_000, help="write: test samples")
    parser.add_argument("--size", type=int, default=28, help="write: image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", choices=["auto", "yes", "no"], default="auto",
                        help="train: hold the file in memory (auto: $MPIPAR_DATA_CACHE_MB's rule)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--model", default="resnet-small", choices=sorted(models.IMAGE_MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if args.action == "write":
        if comm.Get_rank() == 0:
            write(args.path, args.samples, args.test, args.size, args.seed)
    else:
        run(comm, args.path, args)


if __name__ == "__main__":
    main()
