"""The one training loop: epochs, optimizer and schedule, checkpoints, stop and requeue, metrics, evaluation."""

from __future__ import annotations

import re
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from mpipar import __version__
from mpipar.comm.device import to_device
from mpipar.data.datasets import DataSplits
from mpipar.data.sharding import rank_batches, step_plan, steps_per_epoch
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.events import EventRecorder
from mpipar.run.checkpoint import rng_state, set_rng_state
from mpipar.run.launch import mpi_library, requeue_slurm_job
from mpipar.run.metrics import MetricsWriter
from mpipar.run.precision import (
    LossScaler,
    autocast,
    check_precision,
    check_strategy_compress,
    check_strategy_precision,
)
from mpipar.run.recompute import check_strategy_recompute
from mpipar.run.session import Session
from mpipar.run.strategy import StepShards, Strategy
from mpipar.run.summary import summarize

__all__ = ["train"]


def train(session: Session, strategy: Strategy, splits: DataSplits) -> bool:
    """Train ``strategy`` on ``splits.train`` for the session's epochs (or ``max_steps``).

    Collective over ``session.comm``. Each step: this rank's share of the global
    batch (``strategy.replicas`` shards, each ``config.batch_size`` samples; the
    epoch plan is a pure function of seed and epoch; a run resumed on another
    number of replicas keeps the checkpoint's global batch, split as evenly as
    possible), ``strategy.train_step``, then
    the optimizer (``config.optimizer``: SGD with Nesterov momentum, or AdamW) and the one-cycle
    learning-rate schedule.
    Per step and rank the metrics file gets loss, samples, compute, communication
    and idle time, bytes sent; per epoch, after ``strategy.end_epoch``, test loss and
    accuracy.

    Checkpoints (flushing the metrics first) every ``config.checkpoint_every`` steps
    inside an epoch, at each epoch end and on a stop request: position, partial
    epoch sums, optimizer, schedule, RNG states, the run's settings and
    ``strategy.state_dict()``. A stop requested on any rank (Slurm's warning signal)
    is seen by all at the next metrics flush; they save and stop together, and with
    ``session.requeue`` rank 0 asks Slurm to requeue the job (not after scancel's
    SIGTERM). Resuming ``session.state`` gives, on CPU, the bitwise result of the
    run never interrupted.

    Returns:
        True when a stop request ended the run early.
    """
    run = _Run(session, strategy, splits)
    stopping = False
    for epoch in range(run.start_epoch, session.config.epochs):
        if run.step >= run.total_steps and not run.skip:  # resumed from the final checkpoint: nothing left
            break
        stopping = run.epoch(epoch)
        if stopping:
            run.stop_early()
            break
    run.finish(stopping)
    return stopping


class _Run:
    """One call of :func:`train`: its plan, optimizer, schedule, loss scaler and metrics writer, and where
    it stands (step, steps to skip in the resumed epoch, this rank's running loss sum). Built, and each
    method called, on every rank of ``session.comm`` together; a method that communicates says so."""

    def __init__(self, session: Session, strategy: Strategy, splits: DataSplits):
        """Plan the run, build the optimizer and schedule, resume ``session.state``, check the precision
        (agreed), open the metrics file and say what will run. Collective."""
        self.session, self.strategy, self.splits = session, strategy, splits
        self.comm, self.config, self.say = session.comm, session.config, session.say
        config = self.config
        self.train_set, self.test_set = splits.train, splits.test
        self.metric_name = strategy.metrics_attrs.get("test_metric", "accuracy")  # a fit() run names its own
        self._plan()
        self.params = strategy.parameters() or [torch.zeros(0, requires_grad=True)]
        self.optimizer = _optimizer(config, self.params)
        self.lr_schedule = torch.optim.lr_scheduler.OneCycleLR(  # AdamW keeps its betas
            self.optimizer, max_lr=config.lr, total_steps=self.total_steps, pct_start=0.15,
            cycle_momentum=config.momentum > 0 and config.optimizer == "sgd")
        self.step, self.start_epoch, self.skip, self.loss_sum, self.seen = 0, 0, 0, 0.0, 0
        if session.state is not None:
            self._resume(session.state)
        self.steps_optimizer = getattr(strategy, "steps_optimizer", False)
        self.shares_shards = getattr(strategy, "shares_shards", False)
        self.scaler = self._loss_scaler()
        self._bind_recompute()
        if self.steps_optimizer:
            strategy.bind_optimizer(self.optimizer)
        observe = getattr(strategy, "observe_optimizer", None)
        if observe is not None:
            observe(self.optimizer)
        self.recorder = EventRecorder(self.comm, config.trace_steps) if config.trace_steps is not None else None
        self.metrics = MetricsWriter(session.out / "metrics.h5", self.comm, strategy=strategy.name,
                                     config=session.run_config, flush_every=config.flush_every,
                                     resume=session.resume, resume_at_step=self.step,
                                     wait_groups=strategy.wait_groups, events=self.recorder,
                                     tables=getattr(strategy, "metrics_tables", ()),
                                     attrs={"model": config.model, **session.device_attrs, **strategy.metrics_attrs})
        self._announce()
        session.checkpoints.per_rank = strategy.checkpoint_per_rank
        self.first_step, self.run_start = self.step, time.perf_counter()
        self.last_log = self.run_start

    def _plan(self) -> None:
        """The global batch (the checkpoint's on resume), the steps of an epoch and of the run. Local."""
        config, state, train_set = self.config, self.session.state, self.train_set
        batch_size, self.replicas = config.batch_size, self.strategy.replicas
        own_batch = batch_size * self.replicas
        self.global_batch = state.get("global_batch", own_batch) if state is not None else own_batch
        self.planned = steps_per_epoch(len(train_set), batch_size, self.replicas, global_batch=self.global_batch)
        self.in_epoch = len(train_set) // self.global_batch if self.strategy.full_steps_only else self.planned
        self.total_steps = min(self.in_epoch * config.epochs, config.max_steps or self.in_epoch * config.epochs)
        if state is not None:  # the schedule's length is the checkpoint's (another number of ranks can move an
            self.total_steps = state.get("total_steps", self.total_steps)  # epoch's short last step by one)

    def _resume(self, state: dict) -> None:
        """Load the checkpoint: strategy, optimizer, schedule, RNG states, position, this rank's loss sums."""
        comm = self.comm
        self.strategy.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        self.step, self.start_epoch, self.skip = state["step"], state["epoch"], state["step_in_epoch"]
        self.loss_sum, self.seen = state["loss_sum"], state["samples_seen"]  # rank 0's (files of mpipar before 0.2)
        by_rank = state.get("loss_sums_by_rank")
        if by_rank is not None and len(by_rank) == comm.Get_size():
            # every rank its own, so the epoch's mean is bitwise the same
            self.loss_sum, self.seen = by_rank[comm.Get_rank()]
        elif by_rank is not None:  # another number of ranks: the epoch so far counts once, on rank 0
            first = comm.Get_rank() == 0
            self.loss_sum, self.seen = (sum(a for a, _ in by_rank), sum(b for _, b in by_rank)) if first else (0.0, 0)

    def _loss_scaler(self) -> Optional[LossScaler]:
        """Check ``--precision`` (agreed, collective); for fp16 the loss scaler, bound to the strategy and
        resumed from the checkpoint."""
        config, session, strategy = self.config, self.session, self.strategy
        collective_check(self.comm, lambda: (check_precision(config.precision, session.device),
                                             check_strategy_precision(config.precision, strategy),
                                             check_strategy_compress(config.compress, strategy)),
                         "--precision and --compress")
        if config.precision != "fp16":
            return None
        scaler = LossScaler(self.comm)  # found-inf agreed over every rank
        strategy.bind_loss_scaler(scaler)
        if session.state is not None and "loss_scaler" in session.state:
            scaler.load_state_dict(session.state["loss_scaler"])
        return scaler

    def _bind_recompute(self) -> None:
        """Check ``--recompute`` and have the strategy checkpoint its units (agreed, collective)."""
        mode, strategy = self.config.recompute, self.strategy

        def bind():
            check_strategy_recompute(mode, strategy)
            if mode != "none":
                strategy.bind_recompute(mode)

        collective_check(self.comm, bind, "--recompute")

    def _announce(self) -> None:
        """Say what runs: library, data, model, the plan, tracing, where it resumes. Local."""
        say, config, session, strategy = self.say, self.config, self.session, self.strategy
        batch_size, replicas, global_batch, state = config.batch_size, self.replicas, self.global_batch, session.state
        say(f"mpipar {__version__}: {strategy.name} on {self.comm.Get_size()} ranks x {config.threads} threads, "
            f"{mpi_library()}")
        say(f"data: {self.splits.description}")
        say(f"model: {config.model}; {strategy.describe()}"
            + (f"; activations recomputed ({config.recompute})" if config.recompute != "none" else ""))
        say(f"{self.in_epoch} steps/epoch of {global_batch} samples"
            + (f" ({batch_size} x {replicas} replicas)" if global_batch == batch_size * replicas else
               f" (the checkpoint's, over {replicas} replicas)")
            + (f" (of {self.planned}; partial steps dropped)" if self.in_epoch != self.planned else "")
            + f"; {self.total_steps} steps; metrics -> {self.metrics.path}")
        if self.recorder is not None:
            say(f"tracing steps {config.trace_steps[0]}-{config.trace_steps[1]}: timed events -> "
                f"{self.metrics.path}:/events (mpipar-report {session.out} --trace trace.json)")
        if state is not None:
            say(f"resumed from {session.resumed_from} at step {self.step} (epoch {self.start_epoch + 1}, "
                f"step {self.skip} of it)")
            if global_batch != batch_size * replicas:
                low, high = global_batch // replicas, -(-global_batch // replicas)
                say(f"resumed on {replicas} replicas instead of {state['replicas']}: the checkpoint's global batch "
                    f"of {global_batch} samples is kept ({low if low == high else f'{low}-{high}'} per replica), "
                    f"so every step covers the samples it would have")

    def epoch(self, epoch: int) -> bool:
        """Epoch ``epoch`` from step ``self.skip`` of it: its steps, then its checkpoint, after the
        evaluation when it ran to its end. The reader of a streamed dataset is closed even when a step
        raises. Returns whether a stop was requested."""
        epoch_start = time.perf_counter()
        batches = self._batches(epoch)
        reads = self.train_set.stream(batches[self.skip:], epoch=epoch) \
            if not self.shares_shards and self.strategy.needs_batch() else None  # a streamed dataset reads ahead
        stopped_at = None
        try:
            for step_in_epoch in range(self.skip, len(batches)):
                if self.step >= self.total_steps:
                    break
                if self._step(epoch, batches[step_in_epoch], reads):  # a stop was requested
                    stopped_at = step_in_epoch + 1
                    break
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0 \
                        and step_in_epoch + 1 < len(batches) and self.step < self.total_steps:  # else the epoch end
                    self.save_checkpoint(epoch, step_in_epoch + 1)
                self._log_progress(epoch)
        finally:
            if reads is not None:
                reads.close()
        if stopped_at is not None:  # mid-epoch: the resumed run finishes this epoch, then evaluates it
            self.save_checkpoint(epoch, stopped_at)
            return True
        self.skip = 0
        return self._end_epoch(epoch, epoch_start)

    def _batches(self, epoch: int) -> list:
        """The epoch's steps: every shard of each (``shares_shards``) or this rank's batch of each. Local."""
        config, train_set = self.config, self.train_set
        if self.shares_shards:  # every shard of every step: the strategy hands them out
            plan: list = step_plan(len(train_set), config.batch_size, self.replicas, seed=config.seed, epoch=epoch,
                                   global_batch=self.global_batch)
        else:
            plan = rank_batches(len(train_set), config.batch_size, self.replicas, self.strategy.replica,
                                seed=config.seed, epoch=epoch, global_batch=self.global_batch)
        return plan[:self.in_epoch]

    def _step(self, epoch: int, indices, reads) -> bool:
        """Step ``self.step`` on ``indices`` (this rank's batch, or every shard of the step): the strategy's
        ``train_step``, the update, the metrics row, the running loss. Returns whether a stop was requested
        (seen by every rank at a metrics flush)."""
        session, recorder = self.session, self.recorder
        session.fault.maybe_fail(self.step)
        session.watchdog.label(epoch=epoch + 1, step=self.step)
        sampled = recorder is not None and recorder.begin_step(self.step)  # collective at the first sampled step
        step_start = time.perf_counter()
        batch = self._batch(epoch, indices, reads, recorder if sampled else None)
        data_end = time.perf_counter()
        data_time = data_end - step_start
        slowed = session.fault.maybe_slow()  # a test's straggler: its extra compute
        self.optimizer.zero_grad()  # before forward: gradients stay views into the reducer's buckets
        train_start = time.perf_counter()
        with autocast(self.config.precision, session.device):
            record = self.strategy.train_step(batch)
        update_start = time.perf_counter()
        scaling = self._update()
        update_time = time.perf_counter() - update_start
        step_end = time.perf_counter()
        if sampled and recorder is not None:
            recorder.add("step", step_start, step_end)
            recorder.add("data", step_start, data_end)
            recorder.add("train_step", train_start, update_start)
            recorder.add("optimizer", update_start, update_start + update_time)
            recorder.end_step()
        data_time += record.data_time
        compute_time = None if record.compute_time is None else record.compute_time + update_time + slowed
        self.metrics.record_step(loss=record.loss, samples=record.samples, step_time=step_end - step_start,
                                 data_time=data_time, compute_time=compute_time, comm_time=record.comm_time,
                                 idle_time=record.idle_time, wait_time=record.wait_time,
                                 bytes_sent=record.bytes_sent, **record.extra, **scaling)
        self.step += 1
        weight = len(indices) if record.loss_weight is None else record.loss_weight
        self.loss_sum, self.seen = self.loss_sum + record.loss * weight, self.seen + weight
        return self.metrics.maybe_flush(stop=session.stop.requested)

    def _batch(self, epoch: int, indices, reads, recorder: Optional[EventRecorder]):
        """The step's input on this rank's device: a :class:`StepShards` (``shares_shards``; each shard's
        load traced to ``recorder`` if given), the next batch read, or None (a rank that reads no data). Local."""
        device = self.session.device
        if not self.shares_shards:
            return to_device(next(reads), device) if reads is not None else None
        train_set = self.train_set

        def fetch(j):
            return to_device(train_set.batch(indices[j], epoch=epoch), device)
        return StepShards(self.step, self.replicas, _traced_fetch(recorder, fetch) if recorder is not None else fetch,
                          sum(len(shard) for shard in indices))

    def _update(self) -> dict:
        """fp16: unscale, and skip the step on an overflow on any rank (collective). Then the optimizer's step
        (unless the strategy steps it) and the schedule's. Returns fp16's metrics fields (loss scale, skipped)."""
        scaler = self.scaler
        scaling: dict = {}  # fp16: the step's loss scale and whether an overflow on any rank skipped it
        skipped = scaler is not None and scaler.unscale(self.params)  # collective: every rank skips together
        if scaler is not None:
            scaling = {"loss_scale": scaler.scale_value, "skipped": float(skipped)}
            scaler.update(skipped)
        if not self.steps_optimizer and not skipped:
            self.optimizer.step()
            self.lr_schedule.step()
        else:  # the strategy stepped it (or this rank holds nothing to step, or the step was skipped): not
            # the misuse torch warns of
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                self.lr_schedule.step()
        return scaling

    def _log_progress(self, epoch: int) -> None:
        """Every ``config.log_every`` seconds: the running train loss and samples per second. Local."""
        now, config = time.perf_counter(), self.config
        if config.log_every and now - self.last_log >= config.log_every:
            self.last_log = now
            mean_loss = self.loss_sum / max(self.seen, 1)  # a parameter-server worker may not have computed yet
            self.say(f"epoch {epoch + 1}/{config.epochs} step {self.step}/{self.total_steps} loss {mean_loss:.4f} "
                     f"{(self.step - self.first_step) * self.global_batch / (now - self.run_start):.0f} samples/s")

    def _end_epoch(self, epoch: int, epoch_start: float) -> bool:
        """``strategy.end_epoch``, evaluation, the epoch's train loss over every rank, its metrics row and
        flush, then the checkpoint of the next epoch's start. Returns whether a stop was requested."""
        strategy, metrics = self.strategy, self.metrics
        strategy.end_epoch()
        result = strategy.evaluate(self.test_set)
        wall = time.perf_counter() - epoch_start
        summed = collectives.allreduce_sum(self.comm, np.array([self.loss_sum, self.seen], dtype=np.float64),
                                           "train loss")
        train_loss = summed[0] / max(summed[1], 1)  # over every rank's samples, not rank 0's alone
        metrics.record_epoch(epoch=epoch + 1, train_loss=train_loss, test_loss=result.loss,
                             test_accuracy=result.accuracy, wall_time=wall)
        stopping = metrics.flush(stop=self.session.stop.requested)
        self.say(f"epoch {epoch + 1}/{self.config.epochs} done in {wall:.1f}s: train loss {train_loss:.4f}, "
                 f"test loss {result.loss:.4f}, test {self.metric_name} {result.accuracy:.4f}")
        self.loss_sum, self.seen = 0.0, 0
        self.save_checkpoint(epoch + 1, 0)
        return stopping

    def save_checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        """Flush metrics up to ``self.step``, then write the checkpoint of ``self.step``."""
        self.metrics.flush()
        strategy_state = self.strategy.state_dict()  # first: an asynchronous pipeline's drain steps the optimizer
        path = self.session.checkpoints.save(self.step, {
            "step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": self.loss_sum,
            "loss_sums_by_rank": collectives.allgather(self.comm, (self.loss_sum, self.seen),
                                                       "checkpoint: train loss sums"),
            "samples_seen": self.seen, "optimizer": self.optimizer.state_dict(),
            "schedule": self.lr_schedule.state_dict(), "rng": rng_state(), "config": self.session.run_config,
            "global_batch": self.global_batch, "replicas": self.replicas, "total_steps": self.total_steps,
            "strategy": self.strategy.name,
            **({"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **strategy_state})
        self.say(f"checkpoint: {path}")

    def stop_early(self) -> None:
        """Say why the run stops; with ``session.requeue``, ask Slurm to requeue the job (not after scancel)."""
        session = self.session
        why = session.stop.describe() if session.stop.requested else "a stop was requested on another rank"
        self.say(f"stopping early: {why}; metrics flushed to {self.metrics.path}")
        if session.requeue and not session.stop.cancelled:  # scancel's SIGTERM must not bring the job back
            requeue_slurm_job(self.comm, self.say)

    def finish(self, stopping: bool) -> None:
        """Close the metrics file, ``strategy.finish``; after a whole run rank 0 prints the summary (and the
        cost model's prediction beside it); stop the watchdog."""
        self.metrics.close()
        self.strategy.finish(self.metrics, self.say, self.step - self.first_step)
        if not stopping and self.comm.Get_rank() == 0:
            self.say(summarize(self.metrics.path))
            if self.session.prediction is not None:  # --machine: the cost model beside the measurement
                from mpipar.cost.run import format_rows, report_rows

                rows = report_rows(self.metrics.path)
                if rows:
                    self.say(format_rows(rows))
        self.session.watchdog.stop()


def _optimizer(config, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``params``: SGD with Nesterov momentum (when ``config.momentum`` > 0), or
    AdamW. Local."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.momentum > 0)


def _traced_fetch(recorder: EventRecorder, fetch):
    """``fetch`` recording each shard it loads as a ``shard_data`` event (index: the shard)."""
    def traced(j):
        start = time.perf_counter()
        batch = fetch(j)
        recorder.add("shard_data", start, time.perf_counter(), index=j)
        return batch
    return traced
