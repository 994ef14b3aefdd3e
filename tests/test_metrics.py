"""The HDF5 metrics file: schema, per-rank columns, flushing, NaN stop, no overwrite."""

import json

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpi_helpers import assert_all_ranks
from mpipar.run.metrics import MetricsWriter, NonFiniteLossError, Table

PER_RANK = ("compute_time", "comm_time", "idle_time", "data_time", "step_time", "bytes_sent", "rank_loss",
            "rank_samples")


def shared_path(comm, tmp_path, name="metrics.h5"):
    return comm.bcast(str(tmp_path / name) if comm.Get_rank() == 0 else None, root=0)


def record(writer, comm, steps, loss=None):
    rank = comm.Get_rank()
    for step in range(steps):
        writer.record_step(loss=loss if loss is not None else 1.0 + rank + step, samples=2 + rank, step_time=1.0,
                           data_time=0.1, wait_time=0.2 + 0.1 * rank, bytes_sent=100.0 * (rank + 1))


@pytest.mark.mpi
def test_schema_and_values(comm, mpi_tmp_path):
    size, rank = comm.Get_size(), comm.Get_rank()
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="data_parallel", config={"lr": 0.1}, flush_every=3)
    record(writer, comm, 5)  # flushes are explicit here
    writer.flush()
    writer.record_epoch(epoch=1, train_loss=1.5, test_loss=1.2, test_accuracy=0.75, wall_time=3.0)
    record(writer, comm, 2)
    writer.close()
    ok, message = True, ""
    if rank == 0:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            ok &= attrs["strategy"] == "data_parallel" and attrs["world_size"] == size
            ok &= json.loads(attrs["config"]) == {"lr": 0.1} and len(json.loads(attrs["hosts"])) == size
            ok &= all(key in attrs for key in ("mpi_library", "torch_version", "mpi4py_version", "mpipar_version"))
            ok &= f["steps/loss"].shape == (7,) and f["steps/samples"][0] == sum(2 + r for r in range(size))
            for key in PER_RANK:
                ok &= f[f"steps/{key}"].shape == (7, size)
            weights = np.array([2 + r for r in range(size)])
            expected = (weights * np.array([1.0 + r for r in range(size)])).sum() / weights.sum()
            ok &= np.isclose(f["steps/loss"][0], expected)
            # collective waits: comm = least wait over ranks, idle = the rest
            ok &= np.allclose(f["steps/comm_time"][0], 0.2)
            ok &= np.allclose(f["steps/idle_time"][0], [0.1 * r for r in range(size)])
            ok &= np.allclose(f["steps/compute_time"][0], [1.0 - 0.1 - 0.2 - 0.1 * r for r in range(size)])
            ok &= np.allclose(f["steps/bytes_sent"][0], [100.0 * (r + 1) for r in range(size)])
            ok &= f["epochs/test_accuracy"][...].tolist() == [0.75] and f["epochs/last_step"][0] == 5
            message = f"file content wrong: {dict(f['steps'])}"
    assert_all_ranks(comm, ok, message)


@pytest.mark.mpi
def test_file_is_readable_between_flushes(comm, mpi_tmp_path):
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="x", config={}, flush_every=2)
    record(writer, comm, 2)
    writer.maybe_flush()
    record(writer, comm, 1)  # buffered, not yet written
    steps = None
    if comm.Get_rank() == 0:
        with h5py.File(path, "r") as f:  # the writer still "runs": the file must be readable now
            steps = len(f["steps/loss"])
    assert_all_ranks(comm, comm.bcast(steps, root=0) == 2, f"expected 2 steps on disk, found {steps}")
    writer.close()


@pytest.mark.mpi
def test_nonfinite_loss_stops_every_rank_after_flushing(comm, mpi_tmp_path):
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="x", config={}, flush_every=10)
    record(writer, comm, 3)
    writer.record_step(loss=float("nan") if comm.Get_rank() == comm.Get_size() - 1 else 1.0, samples=1,
                       step_time=1.0)
    with pytest.raises(NonFiniteLossError, match="nan at step 3"):
        writer.flush()
    steps = None
    if comm.Get_rank() == 0:
        with h5py.File(path, "r") as f:
            steps = len(f["steps/loss"])
    assert_all_ranks(comm, comm.bcast(steps, root=0) == 4)


@pytest.mark.mpi
def test_existing_file_is_never_overwritten(comm, mpi_tmp_path):
    path = shared_path(comm, mpi_tmp_path)
    MetricsWriter(path, comm, strategy="x", config={}).close()
    with pytest.raises(FileExistsError, match="already exists"):
        MetricsWriter(path, comm, strategy="y", config={})
    resumed = MetricsWriter(path, comm, strategy="x", config={}, resume=True)
    assert_all_ranks(comm, resumed.steps_written == 0)


@pytest.mark.mpi
def test_stop_flag_from_one_rank_reaches_all(comm, mpi_tmp_path):
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="x", config={}, flush_every=1)
    record(writer, comm, 1)
    stop = writer.maybe_flush(stop=comm.Get_rank() == comm.Get_size() - 1)
    assert_all_ranks(comm, stop is True)
    assert_all_ranks(comm, writer.flush() is False)


def test_unwritable_location_is_an_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OSError):
        MetricsWriter(target / "metrics.h5", MPI.COMM_SELF, strategy="x", config={})


@pytest.mark.mpi
def test_waits_split_within_each_reducing_group_with_known_times_added(comm, mpi_tmp_path):
    """A pipeline grid: each stage's replicas reduce together (even ranks, odd ranks), so a
    rank's wait is communication up to the least wait of its own group and idle beyond it;
    transfer and idle time known directly (point-to-point) are added, compute is given."""
    size, rank = comm.Get_size(), comm.Get_rank()
    groups = [list(range(0, size, 2)), list(range(1, size, 2))] if size > 1 else [[0]]
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="x", config={}, wait_groups=groups)
    writer.record_step(loss=1.0, samples=1, step_time=2.0, data_time=0.1, compute_time=1.0, comm_time=0.05,
                       wait_time=0.2 + 0.1 * rank)  # idle: what is left of the step
    writer.close()
    ok, message = True, ""
    if rank == 0:
        with h5py.File(path, "r") as f:
            comm_time, idle_time = f["steps/comm_time"][0], f["steps/idle_time"][0]
        least = [0.2 + 0.1 * (r % 2) for r in range(size)]  # ranks 0 and 1 wait least in their groups
        wait = [0.2 + 0.1 * r for r in range(size)]
        left = [2.0 - 0.1 - 1.0 - 0.05 - w for w in wait]
        ok = np.allclose(comm_time, [0.05 + m for m in least]) and \
            np.allclose(idle_time, [left[r] + wait[r] - least[r] for r in range(size)])
        message = f"comm {comm_time}, idle {idle_time}"
    assert_all_ranks(comm, ok, message)


def test_wait_groups_must_cover_every_rank_once(tmp_path):
    with pytest.raises(ValueError, match="wait_groups must hold every rank"):
        MetricsWriter(tmp_path / "m.h5", MPI.COMM_SELF, strategy="x", config={}, wait_groups=[[0], [0]])


@pytest.mark.mpi
def test_a_strategys_table_is_appended_at_every_flush_and_cut_back_on_resume(comm, mpi_tmp_path):
    """A table (``/updates``) reaches the file at each flush, so a killed run keeps it up to its last
    flush; a resumed run drops the rows of steps after its checkpoint and recounts the histogram."""
    size, rank = comm.Get_size(), comm.Get_rank()
    path = shared_path(comm, mpi_tmp_path)
    rows = []  # this rank's (step, staleness) since the last take

    def take():
        columns = {"step": np.array([s for s, _ in rows], dtype=np.int64),
                   "staleness": np.array([v for _, v in rows], dtype=np.int64)}
        rows.clear()
        return columns

    def staleness(step, of_rank):
        return of_rank + step % 2

    table = Table("updates", take, histograms=("staleness",), attrs={"about": "a test"})
    writer = MetricsWriter(path, comm, strategy="test", config={}, flush_every=2, tables=[table])
    problems = []
    for step in range(4):
        rows.append((step, staleness(step, rank)))
        record(writer, comm, 1)
        writer.maybe_flush()
        if rank == 0 and step % 2:  # just flushed
            with h5py.File(path, "r") as f:
                stored = len(f["updates/step"]) if "updates" in f else 0
            if stored != (step + 1) * size or rows:
                problems.append(f"after step {step}: {stored} rows stored, {len(rows)} still in memory")
    writer.close()
    resumed = MetricsWriter(path, comm, strategy="test", config={}, flush_every=2, resume=True, resume_at_step=3,
                            tables=[table])
    resumed.close()
    if rank == 0:
        expected = sorted((s, staleness(s, r)) for s in range(3) for r in range(size))
        with h5py.File(path, "r") as f:
            kept = sorted(zip(f["updates/step"][...].tolist(), f["updates/staleness"][...].tolist()))
            histogram = f["updates/staleness_histogram"][...].tolist()
            about = f["updates"].attrs["about"]
        if kept != expected or histogram != np.bincount([v for _, v in expected]).tolist() or about != "a test":
            problems.append(f"after resuming at step 3: rows {kept}, histogram {histogram}, attribute {about!r}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


def test_peak_memory_column_joins_an_older_file_on_resume(tmp_path):
    """Every step records the rank's peak resident bytes (> 0, never falling); a file of an older
    mpipar resumed without the column keeps all its steps, its earlier rows NaN."""
    path = tmp_path / "metrics.h5"
    with h5py.File(path, "w") as f:   # an older file: two steps, no /steps/max_rss_bytes
        f.create_dataset("steps/loss", data=np.ones(2), maxshape=(None,))
        f.create_dataset("steps/step_time", data=np.ones((2, 1)), maxshape=(None, None))
    writer = MetricsWriter(path, MPI.COMM_SELF, strategy="test", config={}, resume=True)
    record(writer, MPI.COMM_SELF, 3)
    writer.close()
    with h5py.File(path, "r") as f:
        peak, steps = f["steps/max_rss_bytes"][...], len(f["steps/loss"])
    assert steps == 5 and peak.shape == (5, 1) and np.isnan(peak[:2]).all(), peak
    assert (peak[2:] > 0).all() and (np.diff(peak[2:, 0]) >= 0).all(), peak


@pytest.mark.mpi
def test_a_column_newer_than_the_files_steps_stays_aligned_on_resume(comm, mpi_tmp_path):
    """A file written with a column ``old``, resumed by a run that records ``new`` instead (from its
    second step on): ``new`` starts with the file's rows as NaN, ``old`` reads NaN in the resumed
    rows, and every column keeps the rows of ``/steps/loss``."""
    size, rank = comm.Get_size(), comm.Get_rank()
    path = shared_path(comm, mpi_tmp_path)
    writer = MetricsWriter(path, comm, strategy="test", config={}, flush_every=10)
    for step in range(3):
        writer.record_step(loss=1.0, samples=1, step_time=1.0, old=10.0 * step + rank)
    writer.close()
    resumed = MetricsWriter(path, comm, strategy="test", config={}, flush_every=10, resume=True)
    for step in range(3, 5):
        extra = {"new": 100.0 * step + rank} if step > 3 else {}
        resumed.record_step(loss=2.0, samples=1, step_time=1.0, **extra)
    resumed.flush()
    resumed.record_step(loss=3.0, samples=1, step_time=1.0, new=500.0 + rank)
    resumed.close()
    problems = []
    if rank == 0:
        with h5py.File(path, "r") as f:
            lengths = {key: len(dataset) for key, dataset in f["steps"].items()}
            old, new = f["steps/old"][...], f["steps/new"][...]
        if set(lengths.values()) != {6}:
            problems.append(f"columns of unequal length: {lengths}")
        ranks = np.arange(size, dtype=np.float64)
        want_old = np.full((6, size), np.nan)
        want_old[:3] = 10.0 * np.arange(3)[:, None] + ranks
        want_new = np.full((6, size), np.nan)
        want_new[4:] = np.array([[400.0], [500.0]]) + ranks
        if not (np.array_equal(old, want_old, equal_nan=True) and np.array_equal(new, want_new, equal_nan=True)):
            problems.append(f"old {old.tolist()}, new {new.tolist()}")
    assert_all_ranks(comm, not problems, "; ".join(problems))
