"""The training loop shared by the pipeline jobs: steps, evaluation, metrics and checkpoints on a process grid."""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from mpipar import __version__
from mpipar.comm.topology import ProcessGrid
from mpipar.data.datasets import ArrayDataset, resolve
from mpipar.data.sharding import rank_batches, steps_per_epoch
from mpipar.diagnostics import debug
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import FaultInjection
from mpipar.diagnostics.watchdog import Watchdog
from mpipar.pipeline.executor import Pipeline
from mpipar.pipeline.microbatch import check_microbatches
from mpipar.pipeline.partition import auto_balance, format_report, gather_stage_times, stage_sums
from mpipar.pipeline.placement import Placement
from mpipar.pipeline.replicas import ReplicaAverager
from mpipar.pipeline.schedule import SCHEDULES, placement_bubble
from mpipar.run.checkpoint import Checkpointer, check_same_run, rng_state, set_rng_state
from mpipar.run.config import TrainConfig
from mpipar.run.evaluate import EvalResult, Stopwatch
from mpipar.run.launch import StopRequest, mpi_library, prepare_output_dir, requeue_slurm_job
from mpipar.run.metrics import MetricsWriter

__all__ = ["PipelineConfig", "Recovery", "choose_placement", "train_pipeline", "evaluate_pipeline", "store_bubble",
           "run_job"]


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is split and scheduled. Raises ValueError naming the bad flag.

    ``balance``: ``even``, ``auto`` (profiled) or layers per stage ``N,N,...``;
    ``placement``: a rank per layer ``R,R,...`` (may be non-contiguous), overrides
    ``balance``; ``stages``: ranks per pipeline (the data-parallel degree is the
    world size divided by it).
    """

    schedule: str = "1f1b"
    microbatches: int = 4
    stages: int = 2
    balance: str = "even"
    placement: Optional[str] = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES[:3]:
            raise ValueError(f"--schedule must be one of {SCHEDULES[:3]}, got {self.schedule!r}")
        if self.microbatches < 1 or self.stages < 1:
            raise ValueError(f"--microbatches and --stages must be >= 1, got {self.microbatches}, {self.stages}")
        if self.balance not in ("even", "auto"):
            counts = self.balance.split(",")
            if not all(c.strip().isdigit() and int(c) > 0 for c in counts) or len(counts) != self.stages:
                raise ValueError(f"--balance must be 'even', 'auto' or {self.stages} positive layer counts "
                                 f"'N,N,...', got {self.balance!r}")
        if self.placement is not None:
            ranks = self.placement.split(",")
            if not all(r.strip().isdigit() for r in ranks) or \
                    sorted({int(r) for r in ranks}) != list(range(self.stages)):
                raise ValueError(f"--placement must give a rank in 0..{self.stages - 1} to every layer and use "
                                 f"each of them, got {self.placement!r}")


def choose_placement(model: nn.Sequential, config: PipelineConfig, comm: MPI.Intracomm,
                     sample: Optional[torch.Tensor], say: Callable[[str], None]) -> tuple:
    """The placement the config asks for, and the profiled per-layer times (``auto`` only).

    Collective over ``comm`` (``auto`` profiles on its rank 0 and broadcasts, so
    every replica gets the same placement).
    """
    if config.placement is not None:
        return Placement(tuple(int(r) for r in config.placement.split(","))), None
    if config.balance == "even":
        return Placement.even(len(model), config.stages), None
    if config.balance == "auto":
        balance, profiles = auto_balance(model, sample, config.stages, comm)
        say(f"auto balance {balance} from per-layer ms "
            f"{[round(1e3 * p.time, 2) for p in profiles]}")
        return Placement.from_balance(balance), [p.time for p in profiles]
    return Placement.from_balance([int(c) for c in config.balance.split(",")]), None


@torch.no_grad()
def evaluate_pipeline(pipe: Pipeline, model: nn.Module, dataset: ArrayDataset, grid: ProcessGrid,
                      world: MPI.Intracomm, batch_size: int = 1000) -> EvalResult:
    """Mean cross-entropy and accuracy over ``dataset``, each replica taking a share.

    Collective over ``world``; every rank gets the same result.
    """
    was_training = model.training
    model.eval()
    totals = np.zeros(3)
    for indices in rank_batches(len(dataset), batch_size, grid.replicas, grid.replica, seed=0, epoch=0,
                                shuffle=False):
        images, labels = dataset.batch(indices)
        result = pipe.evaluate(images, labels, microbatches=math.gcd(len(labels), pipe.microbatches))
        if pipe.holds_last_stage:
            totals += (result.loss * len(labels), (result.outputs.argmax(1) == labels).sum().item(), len(labels))
    with debug.watched(world, "Allreduce", detail="evaluation"):
        world.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    model.train(was_training)
    return EvalResult(totals[0] / totals[2], totals[1] / totals[2], int(totals[2]))


@dataclass
class Recovery:
    """What lets a run survive interruptions; the defaults do nothing.

    Attributes:
        checkpoints: where every rank saves its own stages' state (``per_rank=True``);
            None: no checkpoints.
        state: this rank's part of the checkpoint to continue from, or None.
        run_config: the settings stored with each checkpoint (compared on resume).
        stop: a :class:`~mpipar.launch.StopRequest`; a stop requested on any rank is
            seen by all at the next metrics flush, and they save and stop together.
        requeue: after the stop checkpoint, ask Slurm to requeue the job.
        fault: a deliberate crash for tests (``MPIPAR_FAULT_AT_STEP``).
        watchdog: labelled with the epoch and step, so stall reports say where.
    """

    checkpoints: Optional[Checkpointer] = None
    state: Optional[dict] = None
    run_config: dict = field(default_factory=dict)
    stop: Optional[StopRequest] = None
    requeue: bool = False
    fault: FaultInjection = field(default_factory=FaultInjection)
    watchdog: Optional[Watchdog] = None

    @property
    def stop_requested(self) -> bool:
        return bool(self.stop and self.stop.requested)


def train_pipeline(*, world: MPI.Intracomm, grid: ProcessGrid, model: nn.Sequential, pipe: Pipeline,
                   config: TrainConfig, train: ArrayDataset, test: ArrayDataset, metrics: MetricsWriter,
                   say: Callable[[str], None], recovery: Optional[Recovery] = None,
                   predicted: Optional[list] = None) -> bool:
    """Train with ``pipe`` in every replica and average gradients across replicas.

    Collective over ``world``. Each replica takes ``config.batch_size`` samples per
    step; only full steps are taken (a short last step could not be split into
    equal micro-batches). Records per step and rank: compute (busy), communication
    and idle time, activation bytes; samples are counted on the last-stage rank.

    With ``recovery.checkpoints``, every rank saves its stages (parameters and
    buffers), optimizer, learning-rate schedule, RNG states, position and partial
    epoch loss every ``config.checkpoint_every`` steps (mid-epoch: replicas' buffers
    are saved as they are, so saving never changes the run), at each epoch end
    (after evaluation and the buffer average) and on a stop request, each time
    after flushing the metrics. ``recovery.state`` continues such a checkpoint: the
    result is bitwise the run never interrupted (CPU, same settings and ranks).

    Returns:
        ``(stopped, stage_times)``: whether a stop request ended the run early, and
        each stage's mean (forward, backward) seconds per micro-batch in this
        replica over the steps run (None when none ran).
    """
    recovery = recovery or Recovery()
    averager = ReplicaAverager(pipe.local_module, grid.data_comm, bucket_cap_mb=config.bucket_mb)
    params = list(pipe.parameters())
    optimizer = torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    full_steps = len(train) // (config.batch_size * grid.replicas)
    total_steps = full_steps * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                      pct_start=0.15)
    say(f"{full_steps} steps/epoch of {config.batch_size} x {grid.replicas} samples "
        f"(of {steps_per_epoch(len(train), config.batch_size, grid.replicas)}; partial steps dropped); "
        f"{total_steps} steps")
    step, start_epoch, skip, loss_sum, seen = 0, 0, 0, 0.0, 0
    if recovery.state is not None:  # after the averager's broadcast: each replica's buffers are its own
        state = recovery.state
        pipe.local_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        step, start_epoch, skip = state["step"], state["epoch"], state["step_in_epoch"]
        loss_sum, seen = state["loss_sum"], state["samples_seen"]

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Flush metrics up to ``step``, then save every rank's part of the checkpoint of ``step``. Collective."""
        metrics.flush()
        if recovery.checkpoints is not None:
            path = recovery.checkpoints.save(step, {
                "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
                "samples_seen": seen, "model": pipe.local_module.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": lr_schedule.state_dict(), "rng": rng_state(), "config": recovery.run_config,
                "placement": list(pipe.placement.ranks)})
            say(f"checkpoint: {path}")

    first_step, run_start = step, time.perf_counter()
    last_log, stopping = run_start, False
    stage_forward = {index: 0.0 for index in pipe.stages}
    stage_backward = {index: 0.0 for index in pipe.stages}
    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps and not skip:  # resumed from the final checkpoint: nothing left
            break
        epoch_start = time.perf_counter()
        batches = rank_batches(len(train), config.batch_size, grid.replicas, grid.replica, seed=config.seed,
                               epoch=epoch)[:full_steps]
        for step_in_epoch in range(skip, len(batches)):
            if step >= total_steps:
                break
            recovery.fault.maybe_fail(step)
            if recovery.watchdog is not None:
                recovery.watchdog.label(epoch=epoch + 1, step=step)
            indices = batches[step_in_epoch]
            clock = Stopwatch()
            images, labels = train.batch(indices) if pipe.holds_first_stage or pipe.holds_last_stage \
                else (None, None)
            data_time = clock.lap()
            optimizer.zero_grad()
            averager.begin_step()  # replicas' gradients are reduced during the last micro-batch's backward
            result = pipe.step(images, labels, before_last_backward=averager.stage_finishing)
            averager.average()
            reduce_time, bytes_sent = averager.take_stats()
            update_start = time.perf_counter()
            optimizer.step()
            lr_schedule.step()
            update_time = time.perf_counter() - update_start
            step_time = data_time + clock.lap()
            times = result.times
            compute_time, comm_time = times.busy + update_time, times.comm + reduce_time
            for index, (forward, backward) in result.stage_times.items():
                stage_forward[index] += forward
                stage_backward[index] += backward
            metrics.record_step(
                loss=result.loss, samples=len(indices) if pipe.holds_last_stage else 0, step_time=step_time,
                data_time=data_time, compute_time=compute_time, comm_time=comm_time,
                idle_time=max(0.0, step_time - data_time - compute_time - comm_time),
                bytes_sent=bytes_sent + result.bytes_sent,
                pipeline_busy=times.busy, pipeline_wall=times.wall, activation_bytes=result.activation_bytes,
                max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0)
            step += 1
            loss_sum, seen = loss_sum + result.loss * len(indices), seen + len(indices)
            if metrics.maybe_flush(stop=recovery.stop_requested):
                stopping = True
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 \
                    and step_in_epoch + 1 < len(batches) and step < total_steps:  # else the epoch end saves
                save_checkpoint(epoch, step_in_epoch + 1)
            now = time.perf_counter()
            if config.log_every and now - last_log >= config.log_every:
                last_log = now
                say(f"epoch {epoch + 1}/{config.epochs} step {step}/{total_steps} loss {loss_sum / seen:.4f} "
                    f"{(step - first_step) * config.batch_size * grid.replicas / (now - run_start):.0f} samples/s")
        if stopping:  # mid-epoch: the resumed run finishes this epoch, then evaluates it
            save_checkpoint(epoch, step_in_epoch + 1)
        else:
            skip = 0
            averager.sync_buffers(pipe.local_module)
            result = evaluate_pipeline(pipe, model, test, grid, world)
            wall = time.perf_counter() - epoch_start
            train_loss = loss_sum / max(seen, 1)
            metrics.record_epoch(epoch=epoch + 1, train_loss=train_loss, test_loss=result.loss,
                                 test_accuracy=result.accuracy, wall_time=wall)
            stopping = metrics.flush(stop=recovery.stop_requested)
            say(f"epoch {epoch + 1}/{config.epochs} done in {wall:.1f}s: train loss {train_loss:.4f}, "
                f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.4f}")
            loss_sum, seen = 0.0, 0
            save_checkpoint(epoch + 1, 0)
        if stopping:
            why = recovery.stop.describe() if recovery.stop_requested else "a stop was requested on another rank"
            say(f"stopping early: {why}; metrics flushed to {metrics.path}")
            if recovery.requeue and not (recovery.stop is not None and recovery.stop.cancelled):
                requeue_slurm_job(world, say)  # on Slurm's warning only: scancel's SIGTERM must not requeue
            break
    steps_run = step - first_step
    forward = gather_stage_times(grid.pipeline_comm, stage_forward, pipe.num_stages)
    backward = gather_stage_times(grid.pipeline_comm, stage_backward, pipe.num_stages)
    if not steps_run:
        return stopping, None
    per_microbatch = steps_run * pipe.microbatches
    stage_times = [(f / per_microbatch, b / per_microbatch) for f, b in zip(forward, backward)]
    if predicted is not None:
        say("per-stage time per micro-batch (replica 0):\n" + format_report(
            pipe.placement.balance(), stage_sums(predicted, pipe.placement.balance()), [f + b for f, b in stage_times]))
    return stopping, stage_times


def store_bubble(path, stages: int, ideal: float, skip: int = 1, bound: float = float("nan")) -> float:
    """Add the measured bubble to a finished metrics file (call on one rank, after ``close``).

    Per step and pipeline (``stages`` consecutive ranks): ``1 - sum(busy) /
    (stages * max(pipeline wall))``; ``/steps/bubble_measured`` holds the mean over
    pipelines, the root attributes ``bubble_measured`` (mean over steps after the
    first ``skip``), ``bubble_ideal`` (equal stages) and ``bubble_bound`` (the
    schedule run with the measured stage times and free communication: what stage
    imbalance alone costs; the rest of the measured bubble is communication and
    overhead).

    Returns:
        The measured bubble (NaN when no step was recorded).
    """
    with h5py.File(Path(path), "a") as f:
        f.attrs["bubble_ideal"] = ideal
        f.attrs["bubble_bound"] = bound
        if "steps/pipeline_busy" not in f:
            return float("nan")
        busy, wall = f["steps/pipeline_busy"][...], f["steps/pipeline_wall"][...]
        steps, ranks = busy.shape
        per_pipeline = busy.reshape(steps, ranks // stages, stages).sum(2) / \
            (stages * wall.reshape(steps, ranks // stages, stages).max(2))
        bubble = 1.0 - per_pipeline.mean(1)
        if "steps/bubble_measured" in f:
            del f["steps/bubble_measured"]
        f.create_dataset("steps/bubble_measured", data=bubble)
        measured = float(bubble[skip:].mean() if steps > skip else bubble.mean())
        f.attrs["bubble_measured"] = measured
        f.attrs["peak_activation_bytes_per_rank"] = json.dumps(
            f["steps/activation_bytes"][...].max(0).tolist()) if "steps/activation_bytes" in f else "[]"
    return measured


def run_job(world: MPI.Intracomm, config: TrainConfig, pipeline: PipelineConfig,
            make_model: Callable[..., nn.Sequential], *, strategy: str, say: Callable[[str], None],
            stop: Optional[StopRequest] = None, resume: bool = False, requeue: bool = False) -> None:
    """A whole pipeline training job: data, grid, placement, training, metrics, checkpoints.

    Collective over ``world``. Every rank checkpoints its own stages under
    ``OUT/checkpoints`` (see :func:`train_pipeline`). ``resume`` continues from the
    latest checkpoint there (a fresh start when there is none) with the placement it
    was written with, refuses one written with other settings that change results or
    another number of ranks, and continues the metrics file from its step. ``stop``
    (Slurm's warning signal) saves and stops at the next flush; ``requeue`` then asks
    Slurm to requeue the job. A stall watchdog watches ``world`` throughout, and
    ``MPIPAR_FAULT_AT_STEP=N[:RANK]`` kills a rank at step N (for tests).
    """
    watchdog = Watchdog(world).start()  # reports ranks that have not arrived when one waits > MPIPAR_STALL_WARN s
    agree_on(world, "the configuration", ({k: v for k, v in config.to_dict().items() if k != "threads"},
                                         pipeline), hint="launch every rank with the same arguments")
    collective_check(world, lambda: check_microbatches(config.batch_size, pipeline.microbatches),
                     "--batch-size and --microbatches")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = prepare_output_dir(world, config.out, allow_existing_run=resume)
    run_config = {**config.to_dict(), **asdict(pipeline)}
    checkpoints = Checkpointer(out / "checkpoints", world, per_rank=True)
    resume_from = checkpoints.latest() if resume else None
    state = checkpoints.load(resume_from) if resume_from is not None else None
    if state is not None:
        agree_on(world, "the checkpoint's step", state["step"])
        collective_check(world, lambda: check_same_run(state["config"], run_config), "--resume")
    grid = ProcessGrid(world, pipeline.stages)
    splits = collective_check(world, lambda: resolve(config.data, seed=config.seed), "data")
    train, test = splits.train, splits.test
    channels, size, _ = train.image_shape
    model = make_model(in_channels=channels, num_classes=max(train.num_classes, test.num_classes),
                       image_size=size)
    if state is not None:  # the checkpoint's own placement (auto balance could profile another)
        placement, predicted = Placement(tuple(state["placement"])), None
    else:
        sample = None
        if world.Get_rank() == 0 and pipeline.balance == "auto":  # one profile for all replicas
            sample = train.batch(np.arange(max(1, config.batch_size // pipeline.microbatches)))[0]
        placement, predicted = choose_placement(model, pipeline, world, sample, say)
    pipe = Pipeline(model, grid.pipeline_comm, placement, schedule=pipeline.schedule,
                    microbatches=pipeline.microbatches, loss_fn=torch.nn.functional.cross_entropy)
    ideal = placement_bubble(pipe.schedule, pipe.stage_ranks)
    parameters = sum(p.numel() for p in model.parameters())
    metrics = MetricsWriter(out / "metrics.h5", world, strategy=strategy, config=run_config,
                            flush_every=config.flush_every, resume=resume,
                            resume_at_step=state["step"] if state is not None else 0,
                            attrs={"model": config.model, "parameters": parameters,
                                   "schedule": pipeline.schedule, "stages": pipe.num_stages,
                                   "microbatches": pipeline.microbatches, "replicas": grid.replicas,
                                   "placement": json.dumps(list(placement.ranks)), "bubble_ideal": ideal})
    say(f"mpipar {__version__}: {strategy} on {world.Get_size()} ranks ({grid}) x {config.threads} threads, "
        f"{mpi_library()}")
    say(f"data: {splits.description}")
    say(f"model: {config.model}, {parameters:,} parameters, {len(model)} layers; {placement}; "
        f"{pipe.schedule}; ideal bubble {ideal:.3f}; metrics -> {out / 'metrics.h5'}")
    if state is not None:
        say(f"resumed from {resume_from} at step {state['step']} "
            f"(epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of it)")
    recovery = Recovery(checkpoints=checkpoints, state=state, run_config=run_config, stop=stop, requeue=requeue,
                        fault=FaultInjection.from_environment(world), watchdog=watchdog)
    stopped, stage_times = train_pipeline(world=world, grid=grid, model=model, pipe=pipe, config=config, train=train,
                             test=test, metrics=metrics, say=say, recovery=recovery, predicted=predicted)
    metrics.close()
    grid.free()
    if world.Get_rank() == 0:
        bound = float("nan") if stage_times is None else \
            placement_bubble(pipe.schedule, pipe.stage_ranks, stage_times)
        measured = store_bubble(out / "metrics.h5", pipeline.stages, ideal, bound=bound)
        say(f"pipeline bubble: measured {measured:.3f}; ideal {ideal:.3f} with equal stages, {bound:.3f} with "
            f"the measured stage times (the rest, {measured - bound:+.3f}, is communication and overhead)")
        if not stopped:
            from mpipar.run.summary import summarize
            say(summarize(out / "metrics.h5"))
    watchdog.stop()
