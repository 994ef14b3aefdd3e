"""Streamed HDF5 datasets: a rank reads only its rows, and every batch, and every run, is bitwise the
one of the same data held in memory."""

import h5py
import numpy as np
import pytest
import torch

from mpipar import data


def write_h5(path, count=600, test=100, *, chunk=16, stats=True, channels=1, size=28, seed=0):
    """The synthetic data as an HDF5 file, chunked by ``chunk`` rows; ``stats``: with mean/std attributes."""
    splits = data.synthetic(count, test, seed=seed, channels=channels, image_size=size)
    with h5py.File(path, "w") as f:
        for prefix, split in (("", splits.train), ("test/", splits.test)):
            images = split.images.numpy()
            f.create_dataset(prefix + "images", data=images, chunks=(chunk,) + images.shape[1:], compression="gzip")
            f.create_dataset(prefix + "labels", data=split.labels.numpy().astype(np.uint8))
        if stats:
            f.attrs["mean"], f.attrs["std"] = splits.train.mean, splits.train.std
    return splits


def record_image_reads(monkeypatch):
    """The number of rows of every read of an ``images`` dataset from now on."""
    reads, original = [], h5py.Dataset.__getitem__

    def getitem(self, selection):
        result = original(self, selection)
        if self.name.endswith("/images"):
            reads.append(len(result) if np.ndim(result) else 1)
        return result

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return reads


def test_a_streamed_file_is_read_only_where_the_batch_asks(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    write_h5(path, 2000, 100, chunk=16)
    monkeypatch.setenv("MPIPAR_DATA_CACHE_MB", "0")
    reads = record_image_reads(monkeypatch)
    splits = data.resolve(str(path))
    indices = np.random.default_rng(1).choice(2000, 8, replace=False)
    images, labels = splits.train.batch(indices)
    assert images.shape == (8, 1, 28, 28) and len(labels) == 8
    assert sum(reads) <= 8 * 16, f"read {sum(reads)} image rows (in {len(reads)} reads) for a batch of 8"


@pytest.mark.parametrize("rows,chunk,expected", [
    ([], 4, []),
    ([5], 4, [(5, 6)]),
    ([0, 1, 2, 7], 4, [(0, 3), (7, 8)]),         # 2 and 7: other chunks, not neighbours
    ([0, 3, 4, 5, 9], 4, [(0, 6), (9, 10)]),     # 0 and 3 share a chunk; 3, 4, 5 are neighbours
    ([0, 3, 4, 9], 1, [(0, 1), (3, 5), (9, 10)]),  # contiguous layout: neighbours only
])
def test_slabs_join_neighbours_and_rows_of_one_chunk(rows, chunk, expected):
    from mpipar.data.streaming import slabs

    assert slabs(np.array(rows, dtype=np.int64), chunk) == expected


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("test_group", [True, False])
def test_streamed_batches_equal_the_in_memory_ones_bitwise(tmp_path, stats, test_group):
    """Random indices (repeats too), test split or held-out rows, stored or computed statistics: the
    streamed batch, the cached one and the old in-memory dataset's are bitwise equal."""
    path = tmp_path / "d.h5"
    reference = write_h5(path, 300, 50, stats=stats, channels=3, size=8)
    if not test_group:
        with h5py.File(path, "a") as f:
            del f["test"]
    streamed, cached = data.load_h5(path, cache=False), data.load_h5(path, cache=True)
    assert isinstance(streamed.train, data.H5Images) and isinstance(cached.train, data.ArrayDataset)
    assert (streamed.train.mean, streamed.train.std) == (reference.train.mean, reference.train.std) \
        or not test_group  # held out: the statistics are of the rows left for training
    assert len(streamed.train) == len(cached.train) and len(streamed.test) == len(cached.test)
    assert streamed.model_shape == cached.model_shape == {"in_channels": 3, "num_classes": 10, "image_size": 8}
    indices = np.random.default_rng(2).integers(0, len(streamed.train), 40)
    for a, b in zip(streamed.train.batch(indices), cached.train.batch(indices)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(streamed.test.batch(np.arange(len(streamed.test))), cached.test.batch(np.arange(len(cached.test)))):
        assert torch.equal(a, b)
    if test_group:
        old = reference.train  # what load_h5 held before streaming: every image, statistics of the first ones
        for a, b in zip(streamed.train.batch(indices), old.batch(indices)):
            assert torch.equal(a, b)


def test_the_cache_rule_follows_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    write_h5(path, 100, 20)
    monkeypatch.setenv("MPIPAR_DATA_CACHE_MB", "0")
    assert "streamed" in data.load_h5(path).description
    monkeypatch.delenv("MPIPAR_DATA_CACHE_MB")
    assert "in memory" in data.load_h5(path).description
    monkeypatch.setenv("MPIPAR_DATA_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="MPIPAR_DATA_CACHE_MB must be a number"):
        data.load_h5(path)


SIZES, BATCH, STEPS = (784, 24, 16, 10), 6, 6


def loop_run(comm, out, splits, kind, *, stop=False, resume=False):
    """The loop (data parallel or a pipeline over every rank) for STEPS steps on ``splits``;
    ``stop``: stopped (and checkpointed) at the first metrics flush. Returns the model and the
    step losses of the metrics file. Collective."""
    from mpi_helpers import float64_mlp, loop_session
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.launch import StopRequest
    from mpipar.run.loop import train

    model, size = float64_mlp(SIZES, seed=7), comm.Get_size()
    options = dict(max_steps=STEPS, flush_every=2, checkpoint_every=2, resume=resume)
    if kind == "data_parallel":
        run = loop_session(comm, out, BATCH, **options)
        strategy = DataParallelStrategy(model, comm)
    else:
        settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=size)
        run = loop_session(comm, out, BATCH * size, settings, **options)
        strategy = PipelineStrategy(comm, model, settings, batch_size=BATCH * size, state=run.state,
                                    checkpoint=run.resumed_from, say=run.say)
    if stop:
        run.stop = StopRequest()
        run.stop.signal_name = "SIGUSR1"  # as if Slurm's warning came: save and stop at the first flush
    train(run, strategy, splits)
    losses = None
    if comm.Get_rank() == 0:
        with h5py.File(out / "metrics.h5", "r") as f:
            losses = f["steps/loss"][...]
    return model, comm.bcast(losses, root=0)


def same_run(a, b) -> list:
    """What differs between two loop runs' models and losses (bitwise)."""
    (model_a, losses_a), (model_b, losses_b) = a, b
    problems = [name for (name, x), y in zip(model_a.named_parameters(), model_b.parameters()) if not torch.equal(x, y)]
    if not np.array_equal(losses_a, losses_b, equal_nan=True):
        problems.append(f"losses {losses_a.ravel().tolist()} vs {losses_b.ravel().tolist()}")
    return problems


def shared_file(comm, mpi_tmp_path):
    from mpi_helpers import shared_directory

    directory = shared_directory(comm, mpi_tmp_path)
    if comm.Get_rank() == 0:
        write_h5(directory / "d.h5", 600, 60, stats=False)
    comm.Barrier()
    return directory


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["data_parallel", "pipeline"])
def test_a_streamed_run_equals_the_cached_run_bitwise(comm, mpi_tmp_path, kind):
    from mpi_helpers import assert_all_ranks

    directory = shared_file(comm, mpi_tmp_path)
    streamed = data.load_h5(directory / "d.h5", cache=False)
    cached = data.load_h5(directory / "d.h5", cache=True)
    problems = same_run(loop_run(comm, directory / "streamed", streamed, kind),
                        loop_run(comm, directory / "cached", cached, kind))
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_a_streamed_augmented_run_stopped_and_resumed_equals_the_run_never_stopped(comm, mpi_tmp_path):
    """Stopped at step 2 and resumed, streamed, with --augment: bitwise the uninterrupted cached run;
    and the augmentation changed the run."""
    from mpi_helpers import assert_all_ranks
    from mpipar.data.augment import Augmentation

    directory = shared_file(comm, mpi_tmp_path)

    def splits(cache, augment=True):
        loaded = data.load_h5(directory / "d.h5", cache=cache)
        loaded.train.augment = Augmentation(seed=0, padding=4) if augment else None
        return loaded

    loop_run(comm, directory / "resumed", splits(False), "data_parallel", stop=True)
    resumed = loop_run(comm, directory / "resumed", splits(False), "data_parallel", resume=True)
    problems = same_run(resumed, loop_run(comm, directory / "whole", splits(True), "data_parallel"))
    plain = loop_run(comm, directory / "plain", splits(True, augment=False), "data_parallel")
    if not same_run(resumed, plain):
        problems.append("the augmented run equals the plain one")
    assert_all_ranks(comm, not problems, "; ".join(problems))


class Recorded:
    """A dataset whose batch is its indices (and epoch), failing at index ``fail``."""

    def __init__(self, fail=None):
        self.fail, self.asked = fail, []

    def batch(self, indices, epoch=None):
        self.asked.append(list(indices))
        if self.fail in indices:
            raise OSError(f"cannot read sample {self.fail}")
        return list(indices), epoch


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_gives_the_batches_in_order_and_raises_a_read_error_in_turn(depth):
    from mpipar.data.prefetch import Prefetcher

    batches = [[0, 1], [2], [3, 4], [5]]
    assert list(Prefetcher(Recorded(), batches, epoch=7, depth=depth)) == [(b, 7) for b in batches]
    reads = Prefetcher(Recorded(fail=3), batches, depth=depth)
    assert next(reads) == ([0, 1], None) and next(reads) == ([2], None)
    with pytest.raises(OSError, match="cannot read sample 3"):
        next(reads)
    reads.close()


def test_prefetcher_closed_early_stops_reading():
    from mpipar.data.prefetch import Prefetcher

    dataset = Recorded()
    reads = Prefetcher(dataset, [[i] for i in range(100)], depth=2)
    assert next(reads) == ([0], None)
    reads.close()
    assert len(dataset.asked) <= 4 and list(reads) == []  # at most the taken one, a full queue and one more


def test_augmentation_is_a_function_of_seed_epoch_and_sample():
    from mpipar.data.augment import Augmentation

    splits = data.synthetic(64, 8, seed=1)
    augment = Augmentation(seed=3, padding=2)
    images = splits.train.images
    whole = augment.apply(images, np.arange(64), epoch=5)
    part = augment.apply(images[[9, 2]], [9, 2], epoch=5)  # another batch, another rank: the same draws
    assert torch.equal(part, whole[[9, 2]]) and whole.shape == images.shape and whole.dtype == torch.uint8
    assert not torch.equal(whole, augment.apply(images, np.arange(64), epoch=6))
    rows, columns, flips = augment.draws(5, np.arange(4096))
    assert set(rows.tolist()) == set(columns.tolist()) == set(range(5)) and 0.45 < flips.mean() < 0.55
    r, c, flip = (int(v[0]) for v in augment.draws(5, [9]))
    padded = torch.nn.functional.pad(images[9], (2, 2, 2, 2))[:, r:r + 28, c:c + 28]
    assert torch.equal(whole[9], padded.flip(-1) if flip else padded)
    splits.train.augment = augment
    assert not torch.equal(splits.train.batch([9], epoch=5)[0], splits.train.batch([9])[0])  # no epoch: as stored
    assert torch.equal(splits.train.batch([9])[0], data.synthetic(64, 8, seed=1).train.batch([9])[0])


@pytest.mark.mpi
def test_session_data_streams_a_large_file_and_sets_the_augmentation(comm, mpi_tmp_path, monkeypatch):
    from mpi_helpers import assert_all_ranks, loop_session
    from mpipar.data.augment import Augmentation

    directory = shared_file(comm, mpi_tmp_path)
    monkeypatch.setenv("MPIPAR_DATA_CACHE_MB", "0.1")  # the file's 0.5 MB of images is over it
    splits = loop_session(comm, directory / "run", 4, data=str(directory / "d.h5"), augment=3).data()
    ok = isinstance(splits.train, data.H5Images) and splits.train.augment == Augmentation(0, 3) \
        and splits.test.augment is None and len(splits.train) == 600
    assert_all_ranks(comm, ok, f"{splits.description}: train {splits.train!r}, augment {splits.train.augment}")
