"""Stall watchdog: a rank waiting too long gets a report naming the ranks that have not arrived."""

import re
import time

import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, assert_all_ranks, run_mpi
from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug
from mpipar.diagnostics.watchdog import Watchdog, stall_report

SCENARIO = ROOT / "tests" / "scenarios" / "stall_rank_sleeps.py"
WORLD4 = (0, 1, 2, 3)


def waiting(what, seq, seconds, members=WORLD4, p2p=False, peer=None):
    return {"what": what, "members": members, "peer": peer, "seq": seq, "p2p": p2p, "for": seconds}


def heartbeat(current=None, last=None, progress=None, heard=0.2, **labels):
    return {"current": current, "last": last, "progress": progress or {}, "labels": labels, "heard": heard}


# -- the report, from literal heartbeats (no MPI) --------------------------------------------------

def test_report_names_the_ranks_that_have_not_arrived():
    states = {
        0: heartbeat(waiting("allreduce_ #57 (SUM)", 57, 62.0), progress={WORLD4: 57}, step=3),
        1: heartbeat(last=waiting("allreduce_ #56 (SUM)", 56, 61.5), progress={WORLD4: 56}, step=3),
        2: heartbeat(waiting("allreduce_ #57 (SUM)", 57, 61.0), progress={WORLD4: 57}, step=3),
        3: heartbeat(waiting("bcast_ #12 (root 0)", 12, 45.0), progress={WORLD4: 12}, heard=45.0, step=2),
    }
    report = stall_report(states, size=4)
    lines = report.splitlines()
    assert lines[0] == ("mpipar watchdog: rank 0 has waited 62.0 s in allreduce_ #57 (SUM) at step 3; "
                        "arrived: ranks 0, 2; not arrived: ranks 1, 3")
    assert lines[1] == ("  rank 1: outside MPI for 61.5 s since allreduce_ #56 (SUM) at step 3; "
                        "last heartbeat 0.2 s ago")
    assert lines[2] == ("  rank 3: not heard from for 45.0 s; last known: waiting 45.0 s in bcast_ #12 (root 0) "
                        "at step 2")


def test_report_on_a_sub_communicator_and_a_rank_never_heard_from():
    pair = (1, 3)
    states = {
        0: heartbeat(last=waiting("allreduce_ #2 (SUM)", 2, 1.0)),
        1: heartbeat(waiting("iallreduce_ #9 (SUM)", 9, 70.0, members=pair), progress={pair: 9}),
    }
    report = stall_report(states, size=4)
    assert "rank 1 has waited 70.0 s in iallreduce_ #9 (SUM); arrived: rank 1; not arrived: rank 3" in report
    assert "rank 3: never heard from" in report
    assert "rank 0" not in report.split("\n", 1)[1]  # not a member: not listed as missing


def test_report_on_a_send_recv_pair():
    states = {
        0: heartbeat(waiting("recv from rank 2 #4 (tag 3)", 4, 80.0, members=WORLD4, p2p=True, peer=2)),
        2: heartbeat(last=waiting("send to rank 1 #1 (tag 5)", 1, 79.0)),
    }
    report = stall_report(states, size=3)
    assert "rank 0 has waited 80.0 s in recv from rank 2 #4 (tag 3); arrived: rank 0; not arrived: rank 2" in report
    assert "rank 2: outside MPI for 79.0 s since send to rank 1 #1 (tag 5)" in report
    assert "never heard from: rank 1" in report


def test_thresholds_from_arguments_and_environment(monkeypatch):
    monkeypatch.delenv("MPIPAR_STALL_WARN", raising=False)
    monkeypatch.delenv("MPIPAR_STALL_ABORT", raising=False)
    watchdog = Watchdog(MPI.COMM_SELF)
    assert (watchdog.warn_after, watchdog.abort_after, watchdog.interval) == (60.0, None, 1.0)
    monkeypatch.setenv("MPIPAR_STALL_WARN", "2")
    monkeypatch.setenv("MPIPAR_STALL_ABORT", "4.5")
    watchdog = Watchdog(MPI.COMM_SELF)
    assert (watchdog.warn_after, watchdog.abort_after, watchdog.interval) == (2.0, 4.5, 0.5)
    monkeypatch.setenv("MPIPAR_STALL_WARN", "soon")
    with pytest.raises(ValueError, match="MPIPAR_STALL_WARN must be a positive number of seconds, got 'soon'"):
        Watchdog(MPI.COMM_SELF)
    with pytest.raises(ValueError, match="argument must be a positive"):
        Watchdog(MPI.COMM_SELF, warn_after=10, abort_after=-1)


# -- running: records what each rank does, stops promptly --------------------------------------------

def watch_some_collectives(comm) -> str:
    """Start a watchdog, make labelled collectives, stop it; '' or what went wrong."""
    watchdog = Watchdog(comm, warn_after=30, interval=0.05).start()
    try:
        if debug.hooks is None or debug.hooks.activity is not watchdog.activity:
            return "the watchdog did not attach to mpi_tensor"
        for step in range(3):
            watchdog.label(step=step)
            mpi_tensor.allreduce_(torch.ones(3), comm)
            mpi_tensor.iallreduce_(torch.ones(2), comm).wait()
        snapshot = watchdog.activity.snapshot(comm.Get_rank())
        if snapshot["current"] is not None or not snapshot["last"]["what"].startswith("iallreduce_ #"):
            return f"activity not recorded: {snapshot}"
        if snapshot["labels"] != {"step": 2}:
            return f"labels: {snapshot['labels']}"
        time.sleep(0.2)  # a few heartbeats
    finally:
        start = time.monotonic()
        watchdog.stop()
        stopped_in = time.monotonic() - start
    if debug.hooks is not None and debug.hooks.activity is not None:
        return "stop() left the activity hook installed"
    return "" if stopped_in < 5 else f"stop() took {stopped_in:.1f} s"


def test_watchdog_on_comm_self():
    problem = watch_some_collectives(MPI.COMM_SELF)
    assert not problem, problem


@pytest.mark.mpi
def test_watchdog_on_every_rank(comm):
    problem = watch_some_collectives(comm)
    assert_all_ranks(comm, not problem, problem)


# -- whole jobs -------------------------------------------------------------------------------------

@pytest.mark.launch
def test_rank_that_sleeps_before_a_collective_is_named():
    result = run_mpi(3, str(SCENARIO), "6", timeout=120, env={"MPIPAR_STALL_WARN": "2"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "in allreduce_ #3 (SUM) at step 2; arrived: ranks 0, 2; not arrived: rank 1" in output, output
    assert "rank 1: outside MPI for" in output and "since allreduce_ #2 (SUM) at step 2" in output, output
    assert output.count("finished") == 3, output


@pytest.mark.launch
def test_stall_abort_threshold_ends_the_job():
    start = time.monotonic()
    result = run_mpi(3, str(SCENARIO), "120", timeout=150,
                     env={"MPIPAR_STALL_WARN": "2", "MPIPAR_STALL_ABORT": "4"})
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 45, f"the job took {elapsed:.0f} s to end"  # rank 1 sleeps 120 s
    assert "not arrived: rank 1" in output and "aborting the job (MPIPAR_STALL_ABORT=4 s)" in output, output
    assert "finished" not in output


@pytest.mark.launch
def test_pipeline_stall_names_the_micro_batch_and_pickled_collectives_are_seen():
    result = run_mpi(2, str(ROOT / "tests" / "scenarios" / "stall_pipeline_stage.py"), "5", timeout=120,
                     env={"MPIPAR_STALL_WARN": "2"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # stage 1 waits in the receive (posted ahead) of the activation rank 0 is still computing
    assert "rank 1 has waited" in output and re.search(
        r"in recv from rank 0 (#\d+ )?\(activation of micro-batch 1 for stage 1, tag", output) \
        and "at step 1; arrived: rank 1; not arrived: rank 0" in output, output
    # a pickled allgather outside mpi_tensor: rank 0 waits there for rank 1
    assert "rank 0 has waited" in output and "(agree on the end) at step 1; arrived: rank 0; not arrived: rank 1" \
        in output, output
    assert output.count("finished") == 2, output


# -- nested calls ------------------------------------------------------------------------------------

def nested_calls(comm) -> str:
    """A watched call around a nested watched call and an mpi_tensor call: inside the inner one the watchdog
    sees it, the outer one enclosing it; after each inner one the outer is current again, with the time it
    has waited since it began. '' or what went wrong."""
    watchdog = Watchdog(comm, warn_after=30, interval=0.05).start()
    problems = []
    try:
        activity = watchdog.activity
        with debug.watched(comm, "gather", detail="outer"):
            outer = activity.snapshot(comm.Get_rank())["current"]
            with debug.watched(comm, "bcast", detail="inner"):
                inside = activity.snapshot(comm.Get_rank())
            after_watched = activity.snapshot(comm.Get_rank())
            mpi_tensor.allreduce_(torch.ones(3), comm)
            time.sleep(0.01)
            after_tensor = activity.snapshot(comm.Get_rank())
        after_all = activity.snapshot(comm.Get_rank())
        if not (outer and outer["what"].startswith("gather #") and "(outer)" in outer["what"]):
            problems.append(f"outer call not current: {outer}")
        if not (inside["current"]["what"].startswith("bcast #") and [op["what"] for op in inside["enclosing"]]
                == [outer["what"]]):
            problems.append(f"inside the inner call: {inside}")
        for name, seen, last in (("watched", after_watched, "bcast #"), ("mpi_tensor", after_tensor, "allreduce_ #")):
            current = seen["current"]
            if current is None or current["what"] != outer["what"] or seen["enclosing"] \
                    or not seen["last"]["what"].startswith(last):
                problems.append(f"after the nested {name} call the outer entry was lost: {seen}")
        if after_tensor["current"] and not after_tensor["current"]["for"] > after_watched["current"]["for"]:
            problems.append(f"the outer call's wait restarted: {after_watched} then {after_tensor}")
        if after_all["current"] is not None or after_all["last"]["what"] != outer["what"]:
            problems.append(f"after the outer call: {after_all}")
    finally:
        watchdog.stop()
    return "; ".join(problems)


def test_nested_calls_keep_the_outer_entry_on_comm_self():
    problem = nested_calls(MPI.COMM_SELF)
    assert not problem, problem


@pytest.mark.mpi
def test_nested_calls_keep_the_outer_entry(comm):
    problem = nested_calls(comm)
    assert_all_ranks(comm, not problem, problem)


def test_report_names_the_calls_around_the_one_waited_in():
    pair = (0, 1)
    outer = waiting("gather #3 (metrics flush)", 3, 75.0, members=pair)
    states = {0: heartbeat(waiting("allreduce_ #8 (SUM)", 8, 70.0, members=pair), progress={pair: 8}),
              1: heartbeat(last=waiting("allreduce_ #7 (SUM)", 7, 1.0, members=pair), progress={pair: 7})}
    states[0]["enclosing"] = [outer]
    states[1]["current"] = waiting("recv from rank 0 #1", 0, 69.0, members=pair, p2p=True, peer=0)
    states[1]["enclosing"] = [outer]
    report = stall_report(states, size=2)
    first = report.splitlines()[0]
    assert first == ("mpipar watchdog: rank 0 has waited 70.0 s in allreduce_ #8 (SUM) inside gather #3 "
                     "(metrics flush) (75.0 s); arrived: rank 0; not arrived: rank 1"), report
    assert "rank 1: waiting 69.0 s in recv from rank 0 #1 inside gather #3 (metrics flush) (75.0 s)" in report
