"""The training loop shared by the pipeline jobs: steps, evaluation and metrics on a process grid."""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from .. import __version__
from ..agree import agree_on, collective_check
from ..config import TrainConfig
from ..data import ArrayDataset, resolve
from ..launch import mpi_library, prepare_output_dir
from ..metrics import MetricsWriter
from ..sharding import rank_batches, steps_per_epoch
from ..topology import ProcessGrid
from ..training import EvalResult, Stopwatch
from .executor import Pipeline
from .microbatch import check_microbatches
from .partition import auto_balance, format_report, gather_stage_times, stage_sums
from .placement import Placement
from .replicas import ReplicaAverager
from .schedule import SCHEDULES, placement_bubble

__all__ = ["PipelineConfig", "choose_placement", "train_pipeline", "evaluate_pipeline", "store_bubble", "run_job"]


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
    world.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    model.train(was_training)
    return EvalResult(totals[0] / totals[2], totals[1] / totals[2], int(totals[2]))


def train_pipeline(*, world: MPI.Intracomm, grid: ProcessGrid, model: nn.Sequential, pipe: Pipeline,
                   config: TrainConfig, train: ArrayDataset, test: ArrayDataset, metrics: MetricsWriter,
                   say: Callable[[str], None], stop=None, predicted: Optional[list] = None) -> None:
    """Train with ``pipe`` in every replica and average gradients across replicas.

    Collective over ``world``. Each replica takes ``config.batch_size`` samples per
    step; only full steps are taken (a short last step could not be split into
    equal micro-batches). Records per step and rank: compute (busy), communication
    and idle time, activation bytes; samples are counted on the last-stage rank.
    """
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
    step, run_start = 0, time.perf_counter()
    last_log = run_start
    stage_busy = {index: 0.0 for index in pipe.stages}
    for epoch in range(config.epochs):
        epoch_start, loss_sum, seen = time.perf_counter(), 0.0, 0
        batches = rank_batches(len(train), config.batch_size, grid.replicas, grid.replica, seed=config.seed,
                               epoch=epoch)[:full_steps]
        for indices in batches:
            if step >= total_steps:
                break
            clock = Stopwatch()
            images, labels = train.batch(indices) if pipe.holds_first_stage or pipe.holds_last_stage \
                else (None, None)
            data_time = clock.lap()
            optimizer.zero_grad()
            result = pipe.step(images, labels)
            averager.average()
            reduce_time, bytes_sent = averager.take_stats()
            update_start = time.perf_counter()
            optimizer.step()
            lr_schedule.step()
            update_time = time.perf_counter() - update_start
            step_time = data_time + clock.lap()
            times = result.times
            compute_time, comm_time = times.busy + update_time, times.comm + reduce_time
            for index, seconds in result.stage_busy.items():
                stage_busy[index] += seconds
            metrics.record_step(
                loss=result.loss, samples=len(indices) if pipe.holds_last_stage else 0, step_time=step_time,
                data_time=data_time, compute_time=compute_time, comm_time=comm_time,
                idle_time=max(0.0, step_time - data_time - compute_time - comm_time), bytes_sent=bytes_sent,
                pipeline_busy=times.busy, pipeline_wall=times.wall, activation_bytes=result.activation_bytes,
                max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0)
            step += 1
            loss_sum, seen = loss_sum + result.loss * len(indices), seen + len(indices)
            if metrics.maybe_flush(stop=bool(stop and stop.requested)):
                break
            now = time.perf_counter()
            if config.log_every and now - last_log >= config.log_every:
                last_log = now
                say(f"epoch {epoch + 1}/{config.epochs} step {step}/{total_steps} loss {loss_sum / seen:.4f} "
                    f"{step * config.batch_size * grid.replicas / (now - run_start):.0f} samples/s")
        averager.sync_buffers(pipe.local_module)
        result = evaluate_pipeline(pipe, model, test, grid, world)
        wall = time.perf_counter() - epoch_start
        train_loss = loss_sum / max(seen, 1)
        metrics.record_epoch(epoch=epoch + 1, train_loss=train_loss, test_loss=result.loss,
                             test_accuracy=result.accuracy, wall_time=wall)
        stopping = metrics.flush(stop=bool(stop and stop.requested))
        say(f"epoch {epoch + 1}/{config.epochs} done in {wall:.1f}s: train loss {train_loss:.4f}, "
            f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.4f}")
        if stopping:
            say(f"stopping early: {stop.describe() if stop else 'stop requested'}; metrics flushed")
            break
        if step >= total_steps:
            break
    measured = gather_stage_times(grid.pipeline_comm, stage_busy, pipe.num_stages)
    if predicted is not None and step:
        share = [t / step / pipe.microbatches for t in measured]
        say("per-stage time per micro-batch (replica 0):\n" + format_report(
            pipe.placement.balance(), stage_sums(predicted, pipe.placement.balance()), share))


def store_bubble(path, stages: int, ideal: float, skip: int = 1) -> float:
    """Add the measured bubble to a finished metrics file (call on one rank, after ``close``).

    Per step and pipeline (``stages`` consecutive ranks): ``1 - sum(busy) /
    (stages * max(pipeline wall))``; ``/steps/bubble_measured`` holds the mean over
    pipelines, the root attributes ``bubble_measured`` (mean over steps after the
    first ``skip``) and ``bubble_ideal``.

    Returns:
        The measured bubble (NaN when no step was recorded).
    """
    with h5py.File(Path(path), "a") as f:
        if "steps/pipeline_busy" not in f:
            f.attrs["bubble_ideal"] = ideal
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
        f.attrs["bubble_ideal"] = ideal
        f.attrs["peak_activation_bytes_per_rank"] = json.dumps(
            f["steps/activation_bytes"][...].max(0).tolist()) if "steps/activation_bytes" in f else "[]"
    return measured


def run_job(world: MPI.Intracomm, config: TrainConfig, pipeline: PipelineConfig,
            make_model: Callable[..., nn.Sequential], *, strategy: str, say: Callable[[str], None],
            stop=None) -> None:
    """A whole pipeline training job: data, grid, placement, training, metrics. Collective over ``world``."""
    agree_on(world, "the configuration", ({k: v for k, v in config.to_dict().items() if k != "threads"},
                                         pipeline), hint="launch every rank with the same arguments")
    collective_check(world, lambda: check_microbatches(config.batch_size, pipeline.microbatches),
                     "--batch-size and --microbatches")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = prepare_output_dir(world, config.out)
    grid = ProcessGrid(world, pipeline.stages)
    splits = collective_check(world, lambda: resolve(config.data, seed=config.seed), "data")
    train, test = splits.train, splits.test
    channels, size, _ = train.image_shape
    model = make_model(in_channels=channels, num_classes=max(train.num_classes, test.num_classes),
                       image_size=size)
    sample = None
    if world.Get_rank() == 0 and pipeline.balance == "auto":  # one profile for all replicas
        sample = train.batch(np.arange(max(1, config.batch_size // pipeline.microbatches)))[0]
    placement, predicted = choose_placement(model, pipeline, world, sample, say)
    pipe = Pipeline(model, grid.pipeline_comm, placement, schedule=pipeline.schedule,
                    microbatches=pipeline.microbatches, loss_fn=torch.nn.functional.cross_entropy)
    ideal = placement_bubble(pipe.schedule, pipe.stage_ranks)
    parameters = sum(p.numel() for p in model.parameters())
    metrics = MetricsWriter(out / "metrics.h5", world, strategy=strategy,
                            config={**config.to_dict(), **pipeline.__dict__}, flush_every=config.flush_every,
                            attrs={"model": config.model, "parameters": parameters,
                                   "schedule": pipeline.schedule, "stages": pipe.num_stages,
                                   "microbatches": pipeline.microbatches, "replicas": grid.replicas,
                                   "placement": json.dumps(list(placement.ranks)), "bubble_ideal": ideal})
    say(f"mpipar {__version__}: {strategy} on {world.Get_size()} ranks ({grid}) x {config.threads} threads, "
        f"{mpi_library()}")
    say(f"data: {splits.description}")
    say(f"model: {config.model}, {parameters:,} parameters, {len(model)} layers; {placement}; "
        f"{pipe.schedule}; ideal bubble {ideal:.3f}; metrics -> {out / 'metrics.h5'}")
    train_pipeline(world=world, grid=grid, model=model, pipe=pipe, config=config, train=train, test=test,
                   metrics=metrics, say=say, stop=stop, predicted=predicted)
    metrics.close()
    grid.free()
    if world.Get_rank() == 0:
        measured = store_bubble(out / "metrics.h5", pipeline.stages, ideal)
        say(f"pipeline bubble: measured {measured:.3f}, ideal {ideal:.3f}")
        from ..summary import summarize
        say(summarize(out / "metrics.h5"))
