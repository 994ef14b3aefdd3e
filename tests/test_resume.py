"""Every strategy survives faults through the one training loop: killed, signalled or requeued runs resume to
the bitwise state of a run never interrupted, and a resume with other settings or ranks is refused.

Each checkpoint mechanism is launched once as a job (``MECHANISMS``: mpirun, a real SIGKILL or Slurm's
signal, the printed messages, the exit codes); each strategy's variations run in-process through the loop
(``KINDS``, under ``mpirun -n N pytest --only-mpi``), a kill there being a run whose later checkpoints are
removed.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, assert_all_ranks, float64_mlp, loop_session, mpirun_command, run_mpi, shared_directory
from mpipar import models
from mpipar.data import synthetic
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.failure import AgreedError
from mpipar.local_sgd import LocalSGDConfig, LocalSGDStrategy
from mpipar.parameter_server.config import ParameterServerConfig
from mpipar.parameter_server.strategy import ParameterServerStrategy
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.strategy import PipelineStrategy
from mpipar.run.checkpoint import check_same_run, verify_file
from mpipar.run.launch import StopRequest, requeue_slurm_job
from mpipar.run.loop import train
from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy, split_mlp

STEPS, EVERY = 12, 5  # a 12-step run with checkpoints at steps 5 and 10 (and the last step's)
KILLED_AT = "step-000000005"


# -- the mechanisms, launched once each ----------------------------------------------------------------------

RUN = ("--data", "synthetic", "--threads", "1", "--flush-every", "3", "--max-steps", str(STEPS),
       "--checkpoint-every", str(EVERY), "--epochs", "1")
MECHANISMS = {  # name: (script, ranks, arguments, MPIPAR_FAULT_AT_STEP)
    "rank_0_file": ("resnet_dp.py", 2, ("--batch-size", "16"), "8"),  # data parallelism: rank 0's file
    "per_rank_same_layout": ("mlp_tp.py", 2, ("--batch-size", "16", "--tp", "2"), "8:0"),  # every rank its shards
    # a file per rank, resumed on 2 ranks: re-laid out by parameter name (the auto balance's profile is stored)
    "per_rank_relayout": ("resnet_pp.py", 3, ("--batch-size", "16", "--schedule", "gpipe", "--microbatches", "4",
                                              "--balance", "auto"), "7:0"),
    # PipeDream: drained at every checkpoint, its stashed weight versions saved
    "asynchronous_pipeline": ("resnet_pp.py", 2, ("--batch-size", "16", "--schedule", "pipedream",
                                                  "--microbatches", "4", "--balance", "even"), "8:0"),
    # the synchronous parameter server (1 server, 2 workers): stopped by Slurm's signal, requeued, resumed
    "parameter_server": ("resnet_ps.py", 3, ("--batch-size", "8", "--mode", "sync"), None),
}
RELAYOUT_RANKS = 2  # per_rank_relayout's resume


def run_job(mechanism, out, *args, env=None, ranks=None, timeout=300):
    script, default_ranks, job_args, _ = MECHANISMS[mechanism]
    return run_mpi(ranks or default_ranks, str(ROOT / "jobs" / script), *RUN, *job_args, "--out", str(out), *args,
                   env=env, timeout=timeout)


def straight_job(mechanism, out):
    """The job run through without a fault; an asynchronous pipeline keeps its checkpoints (each one
    drains the pipeline), the others write none before the end (so saving one must not change the run)."""
    every = () if mechanism == "asynchronous_pipeline" else ("--checkpoint-every", "0")
    result = run_job(mechanism, out, *every)
    assert result.returncode == 0, result.stdout + result.stderr


def killed_job(mechanism, out):
    """The job killed by ``MPIPAR_FAULT_AT_STEP`` after its checkpoint of step 5; returns its output."""
    killed = run_job(mechanism, out, env={"MPIPAR_FAULT_AT_STEP": MECHANISMS[mechanism][3]})
    assert killed.returncode != 0 and "MPIPAR_FAULT_AT_STEP" in killed.stderr, killed.stdout + killed.stderr
    assert checkpoints(out) == [KILLED_AT]
    with h5py.File(out / "metrics.h5") as f:
        assert len(f["steps/loss"]) >= 5  # rows flushed after the checkpoint are dropped on resume
    return killed.stdout


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def final_states(out):
    """Every file of the final checkpoint (one per rank for partitions, rank 0's for replicas)."""
    directory = out / "checkpoints" / f"step-{STEPS:09d}"
    return [torch.load(path, weights_only=True) for path in sorted(directory.glob("rank-*.pt"))]


def differences(straight, resumed):
    """Where the final checkpoint's files and the metrics file of ``resumed`` differ from ``straight``'s:
    parameters, buffers (every replica's too), optimizer state, schedule, RNG, per-step and per-epoch
    metrics, bit for bit; an empty list when they are the same."""
    states_a, states_b = final_states(straight), final_states(resumed)
    if not len(states_a) == len(states_b) >= 1:
        return [f"final checkpoint files: {len(states_a)} vs {len(states_b)}"]
    found = []
    for a, b in zip(states_a, states_b):
        if (a["step"], a.get("placement")) != (b["step"], b.get("placement")):
            found.append(f"step, placement {(a['step'], a.get('placement'))} vs {(b['step'], b.get('placement'))}")
        if a["model"].keys() != b["model"].keys() or not a["model"]:
            found.append(f"model keys {list(a['model'])} vs {list(b['model'])}")
        found += [key for key, value in a["model"].items()  # parameters and BatchNorm statistics
                  if key in b["model"] and not torch.equal(value, b["model"][key])]
        for rank, (buffers_a, buffers_b) in enumerate(zip(a.get("rank_buffers") or [], b.get("rank_buffers") or [])):
            found += [f"rank {rank} {key}" for key, value in buffers_a.items()
                      if not torch.equal(value, buffers_b[key])]
        optimizer_a, optimizer_b = a["optimizer"]["state"], b["optimizer"]["state"]
        holds_parameters = not (a.get("parameter_server") and a["parameter_server"]["version"] is None)
        if optimizer_a.keys() != optimizer_b.keys() or not (optimizer_a or not holds_parameters):  # a PS worker
            found.append(f"optimizer state of {list(optimizer_a)} vs {list(optimizer_b)}")
        found += [f"momentum {index}" for index, state in optimizer_a.items()
                  if index in optimizer_b and not torch.equal(state["momentum_buffer"],
                                                              optimizer_b[index]["momentum_buffer"])]
        if a["optimizer"]["param_groups"] != b["optimizer"]["param_groups"]:
            found.append("optimizer param_groups")
        if not a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"] == STEPS:
            found.append(f"schedule at {a['schedule']['last_epoch']}, {b['schedule']['last_epoch']}")
        if not torch.equal(a["rng"]["torch"], b["rng"]["torch"]):
            found.append("torch RNG state")
        if a.get("pipeline_async") is not None and not same_tree(a["pipeline_async"], b.get("pipeline_async")):
            found.append("stashed weight versions")
    with h5py.File(straight / "metrics.h5") as fa, h5py.File(resumed / "metrics.h5") as fb:
        if fb["steps/loss"].shape != (STEPS,):  # no duplicated or missing steps
            found.append(f"{fb['steps/loss'].shape[0]} metrics rows")
        found += [key for key in ("steps/loss", "steps/rank_loss", "steps/samples", "epochs/train_loss",
                                  "epochs/test_loss", "epochs/test_accuracy", "epochs/last_step")
                  if not np.array_equal(fa[key][...], fb[key][...])]
    return found


def same_tree(a, b) -> bool:
    """Whether two nested structures of dicts, lists and tensors are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b


@pytest.mark.launch
@pytest.mark.parametrize("mechanism", ["rank_0_file", "per_rank_same_layout", "asynchronous_pipeline"])
def test_killed_job_resumes_to_the_uninterrupted_run(tmp_path, mechanism):
    out = tmp_path / "interrupted"
    killed_job(mechanism, out)
    resumed = run_job(mechanism, out, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 5 (epoch 1, step 5 of it)" in resumed.stdout
    straight_job(mechanism, tmp_path / "straight")
    found = differences(tmp_path / "straight", out)
    assert not found, found


@pytest.mark.launch
def test_killed_job_resumes_on_other_ranks_re_laid_out(tmp_path):
    """A pipeline's files per rank, auto-balanced on 3 ranks and killed, resume on 2: the model and
    optimizer are re-laid out by parameter name and the metrics file widens."""
    out, mechanism = tmp_path / "run", "per_rank_relayout"
    killed_output = killed_job(mechanism, out)
    assert "auto balance" in killed_output
    ranks = MECHANISMS[mechanism][1]
    moved = run_job(mechanism, out, "--resume", ranks=RELAYOUT_RANKS, timeout=240)
    output = moved.stdout + moved.stderr
    assert moved.returncode == 0, output
    assert "resumed from" in output and "at step 5" in output, output
    assert "re-laid out the checkpoint's placement" in output, output
    with h5py.File(out / "metrics.h5") as f:
        assert f["steps/world_size"][...].tolist() == [ranks] * 5 + [RELAYOUT_RANKS] * (STEPS - 5)
        assert f["steps/comm_time"].shape == (STEPS, max(ranks, RELAYOUT_RANKS))


def rank_pid(job_pid, rank, script):
    """The pid of MPI rank ``rank`` running ``script`` under the mpirun ``job_pid`` (None until it runs)."""
    for pid in subprocess.run(["pgrep", "-f", script], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(pid) != job_pid and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(pid)
    return None


def catches(pid, signum):
    """Whether process ``pid`` has installed a handler for ``signum`` (Linux)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.launch
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank processes through /proc")
def test_stop_signal_checkpoints_requeues_and_resumes(tmp_path):
    """Slurm's warning signal on rank 1 (a worker) while the job starts: every rank stops at the
    first flush, saves, rank 0 runs 'scontrol requeue', and the resumed run is exact."""
    mechanism = "parameter_server"
    fake_bin, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    script, ranks, job_args, _ = MECHANISMS[mechanism]
    out, path = tmp_path / "signalled", str(ROOT / "jobs" / script)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", SLURM_JOB_ID="4242", PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    command = mpirun_command(ranks, path, *RUN, *job_args, "--out", str(out), "--resume", "--requeue")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT)
    try:
        deadline, target = time.monotonic() + 60, None
        while target is None or not catches(target, signal.SIGUSR1):  # the job's first lines have run
            assert time.monotonic() < deadline and process.poll() is None, "rank 1 never installed its handler"
            target = target or rank_pid(process.pid, 1, path)
            time.sleep(0.02)
        os.kill(target, signal.SIGUSR1)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopping early: a stop was requested on another rank" in output, output
    assert checkpoints(out) == ["step-000000003"]  # the first flush
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in output

    resumed = run_job(mechanism, out, "--resume", "--requeue")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 3" in resumed.stdout and "stopping early" not in resumed.stdout
    straight_job(mechanism, tmp_path / "straight")
    found = differences(tmp_path / "straight", out)
    assert not found, found


# -- every strategy, in-process ------------------------------------------------------------------------------

SIZES = (784, 24, 16, 12, 10)  # ToFloat64, Flatten, 4 layers: 6 entries to place


@functools.cache
def splits():
    return synthetic(600, 100, seed=0)  # read-only: one copy serves every run


def build_vit():
    """A float64 vision transformer whose 12 heads and 24 hidden features split over 2 ranks."""
    torch.manual_seed(7)
    return models.VisionTransformer(1, 10, 28, patch_size=7, dim=24, depth=2, heads=12, hidden=24).double()


def pipeline(comm, run, settings, say):
    sample = None  # jobs/resnet_pp.py: one profile of a micro-batch, on rank 0
    if settings.balance == "auto" and comm.Get_rank() == 0:
        sample = splits().train.batch(range(run.config.batch_size // settings.microbatches))[0]
    return PipelineStrategy(comm, float64_mlp(SIZES, 7), settings, batch_size=run.config.batch_size,
                            state=run.state, checkpoint=run.resumed_from, sample=sample, say=say,
                            split_layers=split_mlp if settings.tp > 1 else None)


@dataclass(frozen=True)
class Kind:
    """A strategy as its job builds it, on the float64 MLP (or ViT)."""

    ranks: int
    settings: Any
    build: Callable  # (comm, session, settings, say) -> strategy
    other: dict  # settings changed by a resume with other flags (besides lr), and how the refusal names it
    other_ranks: int  # a resume on another allocation: it goes on (re-laid out), or is refused with `refused`
    other_settings: Any = None  # the settings on other_ranks (free layout settings), default `settings`
    refused: Optional[str] = None
    batch: int = 4  # per replica (per pipeline, per tensor-parallel group, per worker)
    keeps_checkpoints: bool = False  # the uninterrupted run saves too: a checkpoint drains an asynchronous pipeline


KINDS = {
    "data_parallel": Kind(2, None, lambda comm, run, settings, say: DataParallelStrategy(float64_mlp(SIZES, 7), comm),
                          {"model": "mlp-other"}, 3),
    # local SGD: a synchronous step, then averages after steps 4, 7 and 10 and at the epoch end with DiLoCo's outer
    # momentum; the checkpoint of step 5 falls between averages (the ranks' models differ)
    "local_sgd": Kind(2, LocalSGDConfig(sync_every=3, local_warmup=1, outer_lr=0.7, outer_momentum=0.5),
                      lambda comm, run, settings, say: LocalSGDStrategy(float64_mlp(SIZES, 7), comm, settings,
                                                                        state=run.state),
                      {"settings": {"sync_every": 2}}, 3,
                      refused="a local-SGD checkpoint resumes only on the number of ranks that wrote it"),
    "pipeline_non_contiguous": Kind(2, PipelineConfig(schedule="naive", microbatches=1, stages=2,
                                                      placement=(0, 0, 1, 1, 0, 0)), pipeline,
                                    {"settings": {"schedule": "1f1b"}}, 4),
    "pipeline_auto_balance": Kind(3, PipelineConfig(schedule="gpipe", microbatches=2, stages=3, balance="auto"),
                                  pipeline, {"settings": {"schedule": "1f1b"}}, 2,
                                  PipelineConfig(schedule="gpipe", microbatches=2, stages=2, balance="auto")),
    "hybrid": Kind(4, PipelineConfig(schedule="1f1b", microbatches=2, stages=2), pipeline,
                   {"settings": {"schedule": "gpipe"}}, 2),
    "asynchronous_pipeline": Kind(2, PipelineConfig(schedule="pipedream", microbatches=2, stages=2), pipeline,
                                  {"settings": {"schedule": "2bw"}}, 3,
                                  PipelineConfig(schedule="pipedream", microbatches=2, stages=3),
                                  "a pipedream checkpoint (stashed weight versions per stage) resumes only on the "
                                  "layout that wrote it", keeps_checkpoints=True),
    "interleaved_pipeline": Kind(2, PipelineConfig(schedule="interleaved", microbatches=2, stages=2, virtual_stages=2),
                                 pipeline, {"settings": {"microbatches": 4}}, 1,
                                 PipelineConfig(schedule="interleaved", microbatches=2, stages=1, virtual_stages=2)),
    "zero_bubble_pipeline": Kind(2, PipelineConfig(schedule="zero-bubble", microbatches=2, stages=2), pipeline,
                                 {"settings": {"schedule": "1f1b"}}, 3,
                                 PipelineConfig(schedule="zero-bubble", microbatches=2, stages=3)),
    # zbv: the V's stage boundary (stages 1 and 2 on rank 1) in the files; re-laid out on 3 ranks' V
    "zbv_pipeline": Kind(2, PipelineConfig(schedule="zbv", microbatches=2, stages=2), pipeline,
                         {"settings": {"schedule": "1f1b"}}, 3,
                         PipelineConfig(schedule="zbv", microbatches=2, stages=3)),
    "tensor": Kind(2, TensorParallelConfig(tp=2),
                   lambda comm, run, settings, say: TensorParallelStrategy(comm, float64_mlp(SIZES, 7), settings,
                                                                           state=run.state),
                   {"settings": {"tp": 1}}, 4,
                   refused="a tensor-parallel checkpoint resumes only on the ranks that wrote it"),
    "tensor_stages": Kind(4, PipelineConfig(schedule="1f1b", microbatches=2, stages=2, tp=2), pipeline,
                          {"settings": {"schedule": "gpipe"}}, 4,
                          PipelineConfig(schedule="1f1b", microbatches=2, stages=1, tp=2),
                          "a checkpoint with tensor-parallel stages resumes only on the layout that wrote it"),
    "vit_tensor": Kind(2, TensorParallelConfig(tp=2),
                       lambda comm, run, settings, say: TensorParallelStrategy(comm, build_vit(), settings,
                                                                               state=run.state),
                       {"model": "vit-other"}, 4,
                       refused="a tensor-parallel checkpoint resumes only on the ranks that wrote it"),
    "parameter_server": Kind(3, ParameterServerConfig(mode="sync"),
                             lambda comm, run, settings, say: ParameterServerStrategy(
                                 comm, float64_mlp(SIZES, 7), settings, batch_size=run.config.batch_size),
                             {"settings": {"mode": "async"}}, 4,
                             refused="a parameter-server checkpoint resumes only on the ranks and --servers that "
                                     "wrote it"),
}


def run_kind(kind, comm, out, *, settings=None, resume=False, checkpoint_every=0, stop=None, said=None, **config):
    """The loop of ``kind`` on ``comm`` (12 steps, flushes every 3); returns ``train``'s result. Collective."""
    spec = KINDS[kind]
    settings = spec.settings if settings is None else settings
    run = loop_session(comm, out, spec.batch, settings, resume=resume, max_steps=STEPS, flush_every=3,
                       checkpoint_every=checkpoint_every, **config)
    run.checkpoints.keep = 5
    run.say = said.append if said is not None else run.say
    if stop is not None:
        run.stop = stop
    try:
        return train(run, spec.build(comm, run, settings, run.say), splits())
    finally:
        run.watchdog.stop()  # also when the strategy refuses the checkpoint


def refusal(action) -> Optional[str]:
    """The message of the error ``action()`` raises on every rank together (an AgreedError), or None."""
    try:
        action()
    except AgreedError as error:
        return str(error)
    return None


def in_group(comm, ranks):
    """The first ``ranks`` ranks of ``comm`` (MPI.COMM_NULL on the others). Collective."""
    return comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED, comm.Get_rank())


@pytest.mark.mpi
@pytest.mark.parametrize("kind", KINDS)
def test_killed_run_resumes_bitwise_and_refuses_other_settings(comm, mpi_tmp_path, kind):
    """The run with checkpoints, its checkpoints after step 5 removed (killed there), resumes to the
    final checkpoint and metrics file of the uninterrupted run, bit for bit; before that, the run
    started again without --resume is refused (it holds an earlier run), and so is a resume with
    another lr and one other setting, every one named, nothing destroyed."""
    spec = KINDS[kind]
    if spec.ranks > comm.Get_size():
        pytest.skip(f"needs {spec.ranks} ranks")
    directory = shared_directory(comm, mpi_tmp_path) / kind
    problems, group = [], in_group(comm, spec.ranks)
    if group != MPI.COMM_NULL:
        every = EVERY if spec.keeps_checkpoints else 0
        run_kind(kind, group, directory / "straight", checkpoint_every=every)
        out = directory / "interrupted"
        run_kind(kind, group, out, checkpoint_every=EVERY)
        group.Barrier()
        if group.Get_rank() == 0:
            for later in checkpoints(out)[1:]:
                shutil.rmtree(out / "checkpoints" / later)
        group.Barrier()

        again = refusal(lambda: run_kind(kind, group, out, checkpoint_every=EVERY))
        if again is None or "holds an earlier run" not in again:
            problems.append(f"started again without --resume: {again}")
        changed = spec.other.get("settings", {})
        settings = replace(spec.settings, **changed) if changed else None
        other = {key: value for key, value in spec.other.items() if key != "settings"}
        said = refusal(lambda: run_kind(kind, group, out, settings=settings, resume=True, checkpoint_every=EVERY,
                                        lr=0.3, **other))
        named = [f"{key}: checkpoint {getattr(spec.settings, key)!r}, now {value!r}" for key, value in changed.items()]
        named += [f"{key}: checkpoint 'mlp', now {value!r}" for key, value in other.items()]
        if said is None or "other settings" not in said or not all(n in said for n in ["lr: checkpoint 0.05, now 0.3",
                                                                                        *named]):
            problems.append(f"resumed with other settings: {said}")
        if checkpoints(out) != [KILLED_AT]:
            problems.append(f"checkpoints after the refusals: {checkpoints(out)}")

        messages = []
        run_kind(kind, group, out, resume=True, checkpoint_every=EVERY, said=messages)
        if not any("at step 5 (epoch 1, step 5 of it)" in message for message in messages):
            problems.append(f"no resume message in {messages}")
        if isinstance(spec.settings, PipelineConfig) and spec.settings.balance == "auto":
            if any("auto balance" in message for message in messages):  # the checkpoint's placement is kept
                problems.append("the resumed run profiled the balance again")
        problems += differences(directory / "straight", out)
        group.Free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("kind", KINDS)
def test_resume_on_other_ranks_goes_on_or_is_refused(comm, mpi_tmp_path, kind):
    """A run stopped by a signal on its last rank (every rank stops at the first flush, step 3) resumes
    on another number of ranks: re-laid out (the metrics file records the world size of every step),
    or, where the checkpoint holds state that only its own layout can take, refused on every rank with
    the checkpoint and the metrics file intact."""
    spec = KINDS[kind]
    if max(spec.ranks, spec.other_ranks) > comm.Get_size():
        pytest.skip(f"needs {max(spec.ranks, spec.other_ranks)} ranks")
    directory = shared_directory(comm, mpi_tmp_path) / kind
    out, problems = directory / "run", []
    group = in_group(comm, spec.ranks)
    if group != MPI.COMM_NULL:
        stop = StopRequest()
        if group.Get_rank() == spec.ranks - 1:
            stop.signal_name = "SIGUSR1"  # as if Slurm's warning came to this rank only
        messages = []
        if not run_kind(kind, group, out, checkpoint_every=EVERY, stop=stop, said=messages):
            problems.append("the run did not stop at the stop request")
        if group.Get_rank() == 0 and not any("a stop was requested on another rank" in m for m in messages):
            problems.append(f"rank 0 did not hear of the stop: {messages}")
        group.Free()
    comm.Barrier()
    stopped_at = "step-000000003"
    if checkpoints(out) != [stopped_at]:
        problems.append(f"checkpoints of the stopped run: {checkpoints(out)}")
    group = in_group(comm, spec.other_ranks)
    if group != MPI.COMM_NULL:
        messages = []
        settings = spec.other_settings or spec.settings
        said = refusal(lambda: run_kind(kind, group, out, settings=settings, resume=True, checkpoint_every=EVERY,
                                        said=messages))
        if spec.refused is not None:
            saved = out / "checkpoints" / stopped_at
            meta = json.loads((saved / "meta.json").read_text())
            damaged = [problem for name, entry in meta["files"].items()
                       if (problem := verify_file(saved / name, entry))]
            with h5py.File(out / "metrics.h5") as f:
                rows, world = len(f["steps/loss"]), int(f.attrs["world_size"])
            if said is None or spec.refused not in said or checkpoints(out) != [stopped_at] or damaged:
                problems.append(f"on {spec.other_ranks} ranks: {said}; {checkpoints(out)}, damaged {damaged}")
            if len(list(saved.glob("rank-*.pt"))) != spec.ranks or meta["step"] != 3 or rows < 3 or \
                    world != spec.ranks:
                problems.append(f"the checkpoint or metrics changed: {meta['step']}, {rows} rows, world {world}")
        else:
            if said is not None or not any("at step 3" in message for message in messages):
                problems.append(f"resumed on {spec.other_ranks} ranks: {said}; {messages}")
            if isinstance(spec.settings, PipelineConfig) and \
                    not any("re-laid out the checkpoint's placement" in message for message in messages):
                problems.append("the pipeline's files were not re-laid out")
            with h5py.File(out / "metrics.h5") as f:
                world, comm_time = f["steps/world_size"][...].tolist(), f["steps/comm_time"].shape
            if world != [spec.ranks] * 3 + [spec.other_ranks] * (STEPS - 3) or \
                    comm_time != (STEPS, max(spec.ranks, spec.other_ranks)):
                problems.append(f"metrics: world sizes {world}, comm_time {comm_time}")
        group.Free()
    assert_all_ranks(comm, not problems, "; ".join(problems))


def test_check_same_run_ignores_free_settings_and_names_the_others():
    saved = {"lr": 0.1, "threads": 2, "out": "a", "schedule": "gpipe", "microbatches": 2, "stages": 2,
             "balance": "even", "placement": None}
    # free: threads, logging, output, and a pipeline's layout (re-laid out on resume)
    check_same_run(saved, {**saved, "threads": 8, "out": "b", "flush_every": 7, "stages": 3, "balance": (2, 2, 1),
                           "placement": (0, 1, 1)})
    with pytest.raises(ValueError, match=r"^the checkpoint was written with other settings: lr: checkpoint 0.1, "
                                         r"now 0.2, microbatches: checkpoint 2, now None; resume with the same flags$"):
        check_same_run(saved, {"lr": 0.2, "threads": 2, "out": "a", "schedule": "gpipe"})


def test_requeue_runs_scontrol_on_rank_0_only_under_slurm(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    said = []
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={})
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={"SLURM_JOB_ID": "77"})
    assert said == ["--requeue: not running under Slurm; nothing to requeue", "requeued Slurm job 77"]
    assert (tmp_path / "calls").read_text() == "requeue 77\n"


def test_a_requeue_that_stops_scontrol_itself_is_reported_as_done(tmp_path, monkeypatch):
    """Slurm signals the whole job step when it requeues it, scontrol included: an scontrol ended by a
    signal has requeued the job (seen under load: "could not requeue" printed for a job that was requeued);
    one that exits with an error has not."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\nif [ "$2" = 1 ]; then kill -TERM $$; fi\necho "no such job" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    said = []
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={"SLURM_JOB_ID": "1"})
    requeue_slurm_job(MPI.COMM_SELF, said.append, environ={"SLURM_JOB_ID": "2"})
    assert said == ["requeued Slurm job 1 (scontrol was ended by SIGTERM: Slurm stopped this run to requeue it)",
                    "could not requeue Slurm job 2: no such job"]
