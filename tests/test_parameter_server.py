"""The parameter server against single-process references: one worker equals SGD bitwise, the
synchronous server equals data parallelism, every asynchronous run equals the delayed-gradient
replay of its own recorded updates, and the staleness bound holds in the records."""

import random
import time

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import assert_all_ranks, float64_mlp, loop_session, shared_directory
from mpipar.comm import mpi_tensor
from mpipar.data import synthetic
from mpipar.data.sharding import step_plan
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.parameter_server import ParameterServerConfig, ParameterServerStrategy
from mpipar.parameter_server.placement import assign_to_servers
from mpipar.parameter_server.tickets import NONE_LEFT, WAIT, Tickets
from mpipar.run.config import TrainConfig
from mpipar.run.loop import train
from mpipar.run.session import Session

BATCH, STEPS, LR, MOMENTUM, DECAY = 6, 5, 0.05, 0.9, 1e-3
SIZES = (784, 16, 12, 10)


# -- pure parts -------------------------------------------------------------------------------

def test_sync_tickets_give_each_worker_its_own_shard_once_per_step():
    tickets = Tickets(3, sync=True, bound=None)
    assert [tickets.grant(w, 0) for w in (2, 0, 1)] == [(0, 2), (0, 0), (0, 1)]
    assert tickets.grant(0, 0) == NONE_LEFT
    assert tickets.grant(1, 1) == (1, 1)


def test_async_tickets_go_to_whoever_asks_until_the_step_is_handed_out():
    tickets = Tickets(2, sync=False, bound=None)
    assert [tickets.grant(0, 4), tickets.grant(0, 4), tickets.grant(1, 4)] == [(4, 0), (4, 1), NONE_LEFT]


@pytest.mark.parametrize("sync", [False, True])
def test_a_slow_worker_asking_about_an_old_step_hears_none_left_not_a_shard_again(sync):
    tickets, given = Tickets(2, sync=sync, bound=None), []
    for step in range(6):  # worker 0 runs ahead: in async mode it takes both shards of every step
        while (ticket := tickets.grant(0, step)) != NONE_LEFT:
            given.append(ticket)
    for step in range(6):  # worker 1 comes to each step late
        while (ticket := tickets.grant(1, step)) != NONE_LEFT:
            given.append(ticket)
        assert tickets.finished(step)
    assert sorted(given) == [(step, shard) for step in range(6) for shard in range(2)]


def simulate(workers, bound, rounds=400, seed=0):
    """Workers with random compute times take tickets and push through the rule; returns the
    staleness of every applied gradient (one server applying on arrival)."""
    rng = random.Random(seed)
    tickets, version, clock = Tickets(workers, sync=False, bound=bound), 0, 0.0
    busy, waiting, staleness, step = {}, list(range(workers)), [], 0  # busy: worker -> (finish, ticket, base)
    while len(staleness) < rounds:
        for worker in list(waiting):
            decision = tickets.grant(worker, step)
            if decision == NONE_LEFT:
                step += 1
                decision = tickets.grant(worker, step)
            if decision == WAIT:
                continue
            busy[worker] = (clock + rng.uniform(0.5, 2.0), decision, version)
            waiting.remove(worker)
        worker = min(busy, key=lambda w: busy[w][0])
        clock, ticket, base = busy.pop(worker)
        staleness.append(version - base)
        version += 1
        tickets.applied([ticket])
        waiting.append(worker)
    return staleness


@pytest.mark.parametrize("workers,bound", [(3, 0), (3, 1), (4, 2), (4, 5)])
def test_the_grant_rule_keeps_every_gradient_within_the_bound(workers, bound):
    staleness = simulate(workers, bound)
    assert max(staleness) <= bound
    assert max(staleness) >= min(bound, workers - 1)  # the bound is reached, not merely respected


def test_unbounded_equal_workers_see_staleness_near_workers_minus_one():
    staleness = simulate(4, None)
    assert 2.0 <= np.mean(staleness) <= 4.0, np.mean(staleness)


def test_parameters_are_balanced_over_servers_and_every_server_gets_one():
    owner = assign_to_servers([100, 10, 60, 50], 2)
    loads = [sum(size for size, o in zip([100, 10, 60, 50], owner) if o == s) for s in range(2)]
    assert sorted(loads) == [110, 110]
    with pytest.raises(ValueError, match="every server needs at least one"):
        assign_to_servers([5, 5], 3)


def test_one_sided_needs_async_mode():
    with pytest.raises(ValueError, match="--mode async"):
        ParameterServerConfig(mode="sync", one_sided=True)


# -- through the loop ---------------------------------------------------------------------------

def build_model():
    return float64_mlp(SIZES, 3)


def run_session(comm, out, batch_size, settings=None, steps=STEPS):
    return loop_session(comm, out, batch_size, settings, max_steps=steps, lr=LR, momentum=MOMENTUM,
                        weight_decay=DECAY, flush_every=2)


def splits():
    return synthetic(300, 50, seed=0)


def serial(directory, batch_size):
    """The loop on one process (COMM_SELF), plain data parallelism of one rank."""
    model = build_model()
    train(run_session(MPI.COMM_SELF, directory / f"serial-{MPI.COMM_WORLD.Get_rank()}", batch_size),
          DataParallelStrategy(model, MPI.COMM_SELF), splits())
    return model


def parameter_server_run(comm, directory, settings, name):
    """The parameter server on the first ``ranks`` ranks; returns (model, comm) there, None elsewhere."""
    model = build_model()
    run = run_session(comm, directory / name, BATCH, settings)
    strategy = ParameterServerStrategy(comm, model, settings, batch_size=BATCH, weight_decay=DECAY)
    train(run, strategy, splits())
    return model


def first_ranks(comm, n):
    sub = comm.Split(0 if comm.Get_rank() < n else MPI.UNDEFINED, comm.Get_rank())
    return None if sub == MPI.COMM_NULL else sub


@pytest.mark.mpi(min_size=2)
def test_one_server_and_one_async_worker_equal_single_process_sgd_bitwise(comm, mpi_tmp_path):
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial(directory, BATCH)
    sub, problems = first_ranks(comm, 2), []
    if sub is not None:
        model = parameter_server_run(sub, directory, ParameterServerConfig(mode="async"), "async-1")
        for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
            if not torch.equal(mine, theirs):
                problems.append(f"{name}: max difference {(mine - theirs).abs().max().item():.2e}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("servers", [1, 2])
def test_synchronous_server_equals_data_parallelism(comm, mpi_tmp_path, servers):
    size = comm.Get_size()
    workers = size - servers
    if workers < 2:
        pytest.skip(f"{servers} servers and 2 workers need {servers + 2} ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial(directory, BATCH * workers)
    model = parameter_server_run(comm, directory, ParameterServerConfig(mode="sync", servers=servers), "sync")
    problems = [f"{name}: max difference {(mine - theirs).abs().max().item():.2e}"
                for (name, mine), theirs in zip(model.named_parameters(), reference.parameters())
                if not torch.allclose(mine, theirs, rtol=1e-10, atol=1e-12)]
    with h5py.File(directory / "sync" / "metrics.h5", "r") as f:
        staleness = f["updates/staleness"][...]
        if len(staleness) != STEPS * workers * servers or staleness.any():
            problems.append(f"{len(staleness)} update records, staleness {sorted(set(staleness.tolist()))}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


def replay(updates, batch_size, workers, lr_by_step):
    """The delayed-gradient reference: one process applies, in the server's order, the gradient
    of each recorded shard at the weights of its recorded base version, weighted and decayed as
    documented (full steps: a share of the global batch), with the same optimizer."""
    model = build_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True)
    data = splits().train
    plan = step_plan(len(data), batch_size, workers, seed=0, epoch=0)
    history = [[p.detach().clone() for p in params]]
    for step, shard, base, server_step in updates:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, old in zip(params, history[base]):
                p.copy_(old)
        model.zero_grad()
        images, labels = data.batch(plan[step][shard])
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        share = len(labels) / (batch_size * workers)
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.grad.mul_(share).add_(old, alpha=DECAY * share)
                p.copy_(old)
        optimizer.param_groups[0].update(lr_by_step[server_step])
        optimizer.step()
        history.append([p.detach().clone() for p in params])
    return model


def lr_by_step(steps):
    """The loop's one-cycle schedule: (learning rate, momentum) of every step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR, momentum=MOMENTUM, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.15)
    rates = []
    for _ in range(steps):
        rates.append({key: optimizer.param_groups[0][key] for key in ("lr", "momentum")})
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode,bound", [("async", None), ("bounded", 0), ("bounded", 1)])
def test_asynchronous_runs_equal_the_delayed_gradient_replay_of_their_updates(comm, mpi_tmp_path, mode, bound):
    size = comm.Get_size()
    workers = size - 1
    directory = shared_directory(comm, mpi_tmp_path)
    settings = ParameterServerConfig(mode=mode, staleness=bound or 0)
    model = parameter_server_run(comm, directory, settings, f"{mode}-{bound}")
    with h5py.File(directory / f"{mode}-{bound}" / "metrics.h5", "r") as f:
        table = {name: f[f"updates/{name}"][...] for name in ("step", "shard", "base_version", "version",
                                                                "staleness", "server_step")}
        per_rank_updates = f["steps/updates"][...].sum(0)
    order = np.argsort(table["version"])
    updates = [(int(table["step"][i]), int(table["shard"][i]), int(table["base_version"][i]),
                int(table["server_step"][i])) for i in order]
    reference = replay(updates, BATCH, workers, lr_by_step(STEPS))
    problems = [f"{name}: max difference {(mine - theirs).abs().max().item():.2e}"
                for (name, mine), theirs in zip(model.named_parameters(), reference.parameters())
                if not torch.allclose(mine, theirs, rtol=1e-10, atol=1e-12)]
    if sorted((s, h) for s, h, _, _ in updates) != [(s, h) for s in range(STEPS) for h in range(workers)]:
        problems.append("not every shard of every step was applied exactly once")
    if not (table["version"][order] == np.arange(len(order))).all():
        problems.append("versions are not 0, 1, 2, ...")
    if bound is not None and table["staleness"].max() > bound:
        problems.append(f"staleness {table['staleness'].max()} above the bound {bound}")
    if per_rank_updates[0] != STEPS * workers or per_rank_updates[1:].sum() != STEPS * workers:
        problems.append(f"updates per rank {per_rank_updates.tolist()}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
def test_one_sided_windows_sum_every_accumulate_exactly_and_count_tickets(comm):
    from mpipar.parameter_server.flat import FlatShares
    from mpipar.parameter_server.one_sided import TICKET, VERSION, WindowShares

    size, rank, servers, rounds = comm.Get_size(), comm.Get_rank(), 1 if comm.Get_size() < 4 else 2, 25
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    flat = FlatShares(model, servers)
    shares = WindowShares(comm, flat, servers)
    tickets = []
    if rank >= servers:
        for _ in range(rounds):
            tickets.append(shares.fetch_add(TICKET))
            for server in range(servers):
                shares.accumulate(server, torch.ones_like(flat.weights[server]))
            shares.fetch_add(VERSION)
    comm.Barrier()
    workers = size - servers
    problems = []
    if rank < servers and not bool((flat.weights[rank] == rounds * workers).all()):
        problems.append(f"server {rank} holds {sorted(set(flat.weights[rank].tolist()))}, expected {rounds * workers}")
    everyone = sorted(t for part in comm.allgather(tickets) for t in part)
    if everyone != list(range(rounds * workers)):
        problems.append("tickets were not 0..n-1, each once")
    if rank >= servers and shares.read_counter(VERSION) != rounds * workers:
        problems.append(f"version counter {shares.read_counter(VERSION)}")
    comm.Barrier()
    shares.free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


def plain_session(comm, out, settings, steps=STEPS):
    config = TrainConfig(data="synthetic", epochs=1, max_steps=steps, batch_size=BATCH, lr=LR, momentum=0.0,
                         weight_decay=0.0, threads=1, out=str(out), model="mlp", flush_every=2, log_every=0)
    return Session(comm, config, settings=settings)


@pytest.mark.mpi(min_size=2)
def test_one_sided_training_applies_every_shard_once(comm, mpi_tmp_path):
    directory = shared_directory(comm, mpi_tmp_path)
    settings = ParameterServerConfig(mode="async", one_sided=True)
    model = build_model()
    strategy = ParameterServerStrategy(comm, model, settings, batch_size=BATCH)
    before = [p.detach().clone() for p in model.parameters()]
    train(plain_session(comm, directory / "one-sided", settings), strategy, splits())
    workers = comm.Get_size() - 1
    with h5py.File(directory / "one-sided" / "metrics.h5", "r") as f:
        applied = sorted(zip(f["updates/step"][...].tolist(), f["updates/shard"][...].tolist()))
        versions = sorted(f["updates/version"][...].tolist())
    problems = []
    if applied != [(s, h) for s in range(STEPS) for h in range(workers)] or versions != list(range(len(applied))):
        problems.append(f"applied {applied}, versions {versions}")
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        problems.append("the weights never moved")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_slowed_worker_computes_fewer_shards_only_when_asynchronous(comm, mpi_tmp_path, mode):
    directory = shared_directory(comm, mpi_tmp_path)
    straggler = comm.Get_size() - 1
    settings = ParameterServerConfig(mode=mode, straggler=straggler, slowdown=30.0)
    strategy = ParameterServerStrategy(comm, build_model(), settings, batch_size=BATCH)
    steps = 8
    train(plain_session(comm, directory / mode, settings, steps=steps), strategy, splits())
    with h5py.File(directory / mode / "metrics.h5", "r") as f:
        shards = f["steps/updates"][...].sum(0)[1:]  # per worker
        applied = sorted(zip(f["updates/step"][...].tolist(), f["updates/shard"][...].tolist()))
    slow, others = shards[-1], shards[:-1]
    ok = slow < others.min() if mode == "async" else (shards == steps).all()
    once = applied == [(s, h) for s in range(steps) for h in range(len(shards))]  # no shard computed twice
    assert_all_ranks(comm, bool(ok) and once, f"{mode}: shards per worker {shards.tolist()} (the last one is slowed "
                                              f"30x); every shard applied once: {once}")


@pytest.mark.launch
def test_a_job_without_a_worker_rank_fails_on_every_rank_with_a_clear_error(tmp_path):
    from mpi_helpers import run_mpi

    result = run_mpi(2, "jobs/resnet_ps.py", "--data", "synthetic", "--max-steps", "2", "--servers", "2",
                     "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    assert "--servers 2 on 2 ranks leaves no worker" in result.stdout + result.stderr


class WithUnused(torch.nn.Module):
    """build_model's network beside a layer the forward never uses (no gradient on any worker)."""

    def __init__(self):
        super().__init__()
        self.net = build_model()
        self.unused = torch.nn.Linear(3, 2).double()

    def forward(self, images):
        return self.net(images)


def short_splits():
    """45 samples: global batches of 6, 12 and 18 all leave a short last step (3 or 9 samples)."""
    return synthetic(45, 10, seed=0)


def short_session(comm, out, batch_size, settings=None, plain=False):
    config = TrainConfig(data="synthetic", epochs=1, batch_size=batch_size, lr=LR, threads=1, out=str(out),
                         momentum=0.0 if plain else MOMENTUM, weight_decay=0.0 if plain else DECAY,
                         model="mlp", flush_every=2, log_every=0)
    return Session(comm, config, settings=settings)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode,servers", [("sync", 1), ("sync", 2), ("async", 1), ("one-sided", 1)])
def test_an_unused_parameter_stays_put_and_a_short_last_step_weighs_its_samples(comm, mpi_tmp_path, monkeypatch,
                                                                               mode, servers):
    """Data parallelism (the reference) leaves a parameter without a gradient untouched (no decay,
    no momentum) and averages a short last step over its samples; so must every mode (async and
    one-sided with one worker, whose run is deterministic)."""
    size = comm.Get_size()
    workers = size - servers if mode == "sync" else 1
    if workers < 1:
        pytest.skip(f"{servers} servers need {servers + 1} ranks")
    plain = mode == "one-sided"
    if plain:  # the start check sleeps 2 s and, on a loaded machine, can miss the read on a split communicator
        from mpipar.parameter_server import strategy as module

        monkeypatch.setattr(module, "check_passive_progress", lambda *args, **kwargs: None)
    settings = ParameterServerConfig(mode="async" if plain else mode, servers=servers, one_sided=plain)
    directory = shared_directory(comm, mpi_tmp_path)
    reference = WithUnused()
    train(short_session(MPI.COMM_SELF, directory / f"serial-{comm.Get_rank()}", BATCH * workers, plain=plain),
          DataParallelStrategy(reference, MPI.COMM_SELF), short_splits())
    sub, problems = (comm if mode == "sync" else first_ranks(comm, servers + 1)), []
    if sub is not None:
        model = WithUnused()
        unused = [p.detach().clone() for p in model.unused.parameters()]
        strategy = ParameterServerStrategy(sub, model, settings, batch_size=BATCH, weight_decay=0.0 if plain else DECAY)
        train(short_session(sub, directory / f"{mode}-{servers}", BATCH, settings, plain), strategy, short_splits())
        problems = [f"{name}: max difference {(mine - theirs).abs().max().item():.2e}"
                    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters())
                    if not torch.allclose(mine, theirs, rtol=1e-10, atol=1e-12)]
        if not all(torch.equal(a, b) for a, b in zip(unused, model.unused.parameters())):
            problems.append("the unused layer moved")
    mpi_tensor.wait_any([comm.Ibarrier()])  # ranks left out must not spin: the one-sided start check needs the CPU
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
def test_a_workers_own_push_is_communication_and_queueing_at_the_server_is_idle(comm, monkeypatch):
    """README: communication is the transfer itself, idle the waiting for other ranks. The server
    (rank 0) is made to notice every message QUEUE seconds late (busy elsewhere: the worker waits
    for it) and to take TRANSFER seconds receiving each pushed gradient (the push's own transfer)."""
    from mpipar.parameter_server import protocol
    from mpipar.parameter_server.flat import FlatShares
    from mpipar.parameter_server.server import Server
    from mpipar.parameter_server.worker import Worker

    queue, transfer = 0.2, 0.4
    rank, workers = comm.Get_rank(), list(range(1, comm.Get_size()))
    flat = FlatShares(torch.nn.Linear(4, 3).double(), 1)
    problems = []
    if rank == 0:
        wait_any, recv_ = protocol.wait_any, mpi_tensor.recv_

        def late(requests):
            index = wait_any(requests)
            time.sleep(queue)
            return index

        def slow(tensor, comm, source, tag):
            recv_(tensor, comm, source, tag)
            if tag == protocol.TAG_GRADIENT:
                time.sleep(transfer)

        monkeypatch.setattr(protocol, "wait_any", late)
        monkeypatch.setattr(mpi_tensor, "recv_", slow)
        server = Server(comm, 0, workers, flat, sync=False, weight_decay=0.0, staleness_lr=False,
                        tickets=Tickets(len(workers), sync=False, bound=None))
        server.optimizer = torch.optim.SGD(flat.params[0], lr=0.1)
        server.serve(0)
        server.close()
    else:
        worker = Worker(comm, 1, flat)
        ticket, pushes = worker.exchange(0), 0
        worker.take_times()  # the first request carries no push
        while ticket is not None:
            ticket, pushes = worker.exchange(0, (ticket, 2, 0.0, 2 * len(workers))), pushes + 1
        times = worker.take_times()
        if times["comm"] < transfer * pushes:
            problems.append(f"{pushes} pushes of {transfer} s each, communication {times['comm']:.3f} s")
        if times["idle"] < queue * pushes:
            problems.append(f"{pushes} waits of {queue} s for the server, idle {times['idle']:.3f} s")
    assert_all_ranks(comm, not problems, "; ".join(problems))


class RecordedWindow:
    """An MPI window that logs its synchronisation calls (and passes every call on)."""

    def __init__(self, window, log):
        self.window, self.log = window, log

    def __getattr__(self, name):
        attribute = getattr(self.window, name)
        if name not in ("Lock", "Sync", "Unlock"):
            return attribute

        def logged(*args, **kwargs):
            self.log.append(name)
            return attribute(*args, **kwargs)
        return logged


@pytest.mark.mpi(min_size=2)
def test_a_one_sided_server_syncs_its_window_in_a_lock_epoch_before_reading_its_share(comm, monkeypatch):
    """MPI's separate memory model: a server's own loads see the workers' Accumulates only after
    ``Win.Sync`` in a passive-target epoch. Open MPI on coherent CPUs is the unified model, where
    no result can show the difference, so this checks the calls, in order, before the broadcast
    that reads the share (an epoch end; checkpoints and evaluation come through it)."""
    from mpipar.parameter_server import strategy as module

    monkeypatch.setattr(module, "check_passive_progress", lambda *args, **kwargs: None)  # its 2 s: not tested here
    servers = 2 if comm.Get_size() >= 4 else 1
    settings = ParameterServerConfig(mode="async", one_sided=True, servers=servers)
    strategy = ParameterServerStrategy(comm, build_model(), settings, batch_size=BATCH)
    rank, log = comm.Get_rank(), []
    if rank < servers:
        strategy.shares.windows[rank] = RecordedWindow(strategy.shares.windows[rank], log)
        bcast_ = mpi_tensor.bcast_

        def logged_bcast(tensor, comm, root=0):
            if root == rank:
                log.append("bcast")
            return bcast_(tensor, comm, root=root)
        monkeypatch.setattr(mpi_tensor, "bcast_", logged_bcast)
    strategy.end_epoch()
    strategy.shares.free()
    ok = rank >= servers or log == ["Lock", "Sync", "Unlock", "bcast"]
    assert_all_ranks(comm, ok, f"server {rank}: calls on its own window {log}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_every_flush_writes_the_updates_applied_so_far(comm, mpi_tmp_path, monkeypatch, mode):
    """A run killed after a flush keeps ``/updates`` up to it (README), and memory holds only the
    rows since: after each flush of step s's metrics the file has every shard of steps 0..s."""
    from mpipar.run.metrics import MetricsWriter

    flush, seen = MetricsWriter.flush, []

    def flush_and_look(self, stop=False):
        result = flush(self, stop)
        if self.is_root:
            with h5py.File(self.path, "r") as f:
                rows = sorted(zip(f["updates/step"][...].tolist(), f["updates/shard"][...].tolist())) \
                    if "updates" in f else []
            seen.append((self.steps_written, rows))
        return result

    monkeypatch.setattr(MetricsWriter, "flush", flush_and_look)
    directory = shared_directory(comm, mpi_tmp_path)
    parameter_server_run(comm, directory, ParameterServerConfig(mode=mode), f"flushed-{mode}")
    workers = comm.Get_size() - 1
    wrong = [f"after {steps} steps: {rows}" for steps, rows in seen
             if rows != [(s, h) for s in range(steps) for h in range(workers)]]
    assert_all_ranks(comm, bool(seen or comm.Get_rank()) and not wrong, "; ".join(wrong))
