"""The one training loop: epochs, optimizer and schedule, checkpoints, stop and requeue, metrics, evaluation."""

from __future__ import annotations

import re
import time
import warnings

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
from mpipar.run.precision import LossScaler, autocast, check_precision, check_strategy_precision
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
    comm, config, say = session.comm, session.config, session.say
    train_set, test_set = splits.train, splits.test
    batch_size, replicas, state = config.batch_size, strategy.replicas, session.state
    global_batch = state.get("global_batch", batch_size * replicas) if state is not None else batch_size * replicas
    planned = steps_per_epoch(len(train_set), batch_size, replicas, global_batch=global_batch)
    in_epoch = len(train_set) // global_batch if strategy.full_steps_only else planned
    total_steps = min(in_epoch * config.epochs, config.max_steps or in_epoch * config.epochs)
    if state is not None:  # the schedule's length is the checkpoint's (another number of ranks can move an
        total_steps = state.get("total_steps", total_steps)  # epoch's short last step by one)
    params = strategy.parameters() or [torch.zeros(0, requires_grad=True)]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                    nesterov=config.momentum > 0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(  # AdamW keeps its betas
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15,
        cycle_momentum=config.momentum > 0 and config.optimizer == "sgd")
    step, start_epoch, skip, loss_sum, seen = 0, 0, 0, 0.0, 0
    if state is not None:
        strategy.load_state_dict(state)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        step, start_epoch, skip = state["step"], state["epoch"], state["step_in_epoch"]
        loss_sum, seen = state["loss_sum"], state["samples_seen"]  # rank 0's (files of mpipar before 0.2)
        by_rank = state.get("loss_sums_by_rank")
        if by_rank is not None and len(by_rank) == comm.Get_size():
            loss_sum, seen = by_rank[comm.Get_rank()]  # every rank its own, so the epoch's mean is bitwise the same
        elif by_rank is not None:  # another number of ranks: the epoch so far counts once, on rank 0
            first = comm.Get_rank() == 0
            loss_sum, seen = (sum(a for a, _ in by_rank), sum(b for _, b in by_rank)) if first else (0.0, 0)
    steps_optimizer, shares_shards = getattr(strategy, "steps_optimizer", False), getattr(strategy, "shares_shards",
                                                                                          False)
    collective_check(comm, lambda: (check_precision(config.precision, session.device),
                                    check_strategy_precision(config.precision, strategy)), "--precision")
    scaler = LossScaler(comm) if config.precision == "fp16" else None  # found-inf agreed over every rank
    if scaler is not None:
        strategy.bind_loss_scaler(scaler)
        if state is not None and "loss_scaler" in state:
            scaler.load_state_dict(state["loss_scaler"])
    if steps_optimizer:
        strategy.bind_optimizer(optimizer)
    recorder = EventRecorder(comm, config.trace_steps) if config.trace_steps is not None else None
    metrics = MetricsWriter(session.out / "metrics.h5", comm, strategy=strategy.name, config=session.run_config,
                            flush_every=config.flush_every, resume=session.resume, resume_at_step=step,
                            wait_groups=strategy.wait_groups, events=recorder,
                            tables=getattr(strategy, "metrics_tables", ()),
                            attrs={"model": config.model, **session.device_attrs, **strategy.metrics_attrs})
    say(f"mpipar {__version__}: {strategy.name} on {comm.Get_size()} ranks x {config.threads} threads, "
        f"{mpi_library()}")
    say(f"data: {splits.description}")
    say(f"model: {config.model}; {strategy.describe()}")
    say(f"{in_epoch} steps/epoch of {global_batch} samples"
        + (f" ({batch_size} x {replicas} replicas)" if global_batch == batch_size * replicas else
           f" (the checkpoint's, over {replicas} replicas)")
        + (f" (of {planned}; partial steps dropped)" if in_epoch != planned else "")
        + f"; {total_steps} steps; metrics -> {metrics.path}")
    if recorder is not None:
        say(f"tracing steps {config.trace_steps[0]}-{config.trace_steps[1]}: timed events -> {metrics.path}:/events "
            f"(mpipar-report {session.out} --trace trace.json)")
    if state is not None:
        say(f"resumed from {session.resumed_from} at step {step} (epoch {start_epoch + 1}, step {skip} of it)")
        if global_batch != batch_size * replicas:
            low, high = global_batch // replicas, -(-global_batch // replicas)
            say(f"resumed on {replicas} replicas instead of {state['replicas']}: the checkpoint's global batch of "
                f"{global_batch} samples is kept ({low if low == high else f'{low}-{high}'} per replica), so every "
                f"step covers the samples it would have")
    session.checkpoints.per_rank = strategy.checkpoint_per_rank

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Flush metrics up to ``step``, then write the checkpoint of ``step``. Collective."""
        metrics.flush()
        strategy_state = strategy.state_dict()  # first: an asynchronous pipeline's drain steps the optimizer
        path = session.checkpoints.save(step, {
            "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
            "loss_sums_by_rank": collectives.allgather(comm, (loss_sum, seen), "checkpoint: train loss sums"),
            "samples_seen": seen, "optimizer": optimizer.state_dict(), "schedule": lr_schedule.state_dict(),
            "rng": rng_state(), "config": session.run_config, "global_batch": global_batch, "replicas": replicas,
            "total_steps": total_steps, "strategy": strategy.name,
            **({"loss_scaler": scaler.state_dict()} if scaler is not None else {}),
            **strategy_state})
        say(f"checkpoint: {path}")

    first_step, run_start = step, time.perf_counter()
    last_log, stopping = run_start, False
    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps and not skip:  # resumed from the final checkpoint: nothing left
            break
        epoch_start = time.perf_counter()
        if shares_shards:  # every shard of every step: the strategy hands them out
            batches = step_plan(len(train_set), batch_size, replicas, seed=config.seed, epoch=epoch,
                                global_batch=global_batch)[:in_epoch]
        else:
            batches = rank_batches(len(train_set), batch_size, replicas, strategy.replica, seed=config.seed,
                                   epoch=epoch, global_batch=global_batch)[:in_epoch]
        reads = train_set.stream(batches[skip:], epoch=epoch) \
            if not shares_shards and strategy.needs_batch() else None  # a streamed dataset reads ahead
        for step_in_epoch in range(skip, len(batches)):
            if step >= total_steps:
                break
            session.fault.maybe_fail(step)
            session.watchdog.label(epoch=epoch + 1, step=step)
            sampled = recorder is not None and recorder.begin_step(step)  # collective at the first sampled step
            step_start = time.perf_counter()
            indices = batches[step_in_epoch]
            if shares_shards:
                def fetch(j, shards=indices, epoch=epoch):
                    return to_device(train_set.batch(shards[j], epoch=epoch), session.device)
                batch = StepShards(step, replicas, _traced_fetch(recorder, fetch) if sampled else fetch,
                                   sum(len(shard) for shard in indices))
            else:
                batch = to_device(next(reads), session.device) if reads is not None else None
            data_end = time.perf_counter()
            data_time = data_end - step_start
            slowed = session.fault.maybe_slow()  # a test's straggler: its extra compute
            optimizer.zero_grad()  # before forward: gradients stay views into the reducer's buckets
            train_start = time.perf_counter()
            with autocast(config.precision, session.device):
                record = strategy.train_step(batch)
            update_start = time.perf_counter()
            scaling = {}  # fp16: the step's loss scale and whether an overflow on any rank skipped it
            skipped = scaler is not None and scaler.unscale(params)  # collective: every rank skips together
            if scaler is not None:
                scaling = {"loss_scale": scaler.scale_value, "skipped": float(skipped)}
                scaler.update(skipped)
            if not steps_optimizer and not skipped:
                optimizer.step()
                lr_schedule.step()
            else:  # the strategy stepped it (or this rank holds nothing to step, or the step was skipped): not
                # the misuse torch warns of
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                    lr_schedule.step()
            update_time = time.perf_counter() - update_start
            step_end = time.perf_counter()
            step_time = step_end - step_start
            if sampled:
                recorder.add("step", step_start, step_end)
                recorder.add("data", step_start, data_end)
                recorder.add("train_step", train_start, update_start)
                recorder.add("optimizer", update_start, update_start + update_time)
                recorder.end_step()
            data_time += record.data_time
            compute_time = None if record.compute_time is None else record.compute_time + update_time + slowed
            metrics.record_step(loss=record.loss, samples=record.samples, step_time=step_time, data_time=data_time,
                                compute_time=compute_time, comm_time=record.comm_time, idle_time=record.idle_time,
                                wait_time=record.wait_time, bytes_sent=record.bytes_sent, **record.extra, **scaling)
            step += 1
            weight = len(indices) if record.loss_weight is None else record.loss_weight
            loss_sum, seen = loss_sum + record.loss * weight, seen + weight
            if metrics.maybe_flush(stop=session.stop.requested):
                stopping = True
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 \
                    and step_in_epoch + 1 < len(batches) and step < total_steps:  # else the epoch end saves
                save_checkpoint(epoch, step_in_epoch + 1)
            now = time.perf_counter()
            if config.log_every and now - last_log >= config.log_every:
                last_log = now
                mean_loss = loss_sum / max(seen, 1)  # a parameter-server worker may not have computed yet
                say(f"epoch {epoch + 1}/{config.epochs} step {step}/{total_steps} loss {mean_loss:.4f} "
                    f"{(step - first_step) * global_batch / (now - run_start):.0f} samples/s")
        if reads is not None:
            reads.close()
        if stopping:  # mid-epoch: the resumed run finishes this epoch, then evaluates it
            save_checkpoint(epoch, step_in_epoch + 1)
        else:
            skip = 0
            strategy.end_epoch()
            result = strategy.evaluate(test_set)
            wall = time.perf_counter() - epoch_start
            summed = collectives.allreduce_sum(comm, np.array([loss_sum, seen], dtype=np.float64), "train loss")
            train_loss = summed[0] / max(summed[1], 1)  # over every rank's samples, not rank 0's alone
            metrics.record_epoch(epoch=epoch + 1, train_loss=train_loss, test_loss=result.loss,
                                 test_accuracy=result.accuracy, wall_time=wall)
            stopping = metrics.flush(stop=session.stop.requested)
            say(f"epoch {epoch + 1}/{config.epochs} done in {wall:.1f}s: train loss {train_loss:.4f}, "
                f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.4f}")
            loss_sum, seen = 0.0, 0
            save_checkpoint(epoch + 1, 0)
        if stopping:
            why = session.stop.describe() if session.stop.requested else "a stop was requested on another rank"
            say(f"stopping early: {why}; metrics flushed to {metrics.path}")
            if session.requeue and not session.stop.cancelled:  # scancel's SIGTERM must not bring the job back
                requeue_slurm_job(comm, say)
            break
    metrics.close()
    strategy.finish(metrics, say, step - first_step)
    if not stopping and comm.Get_rank() == 0:
        say(summarize(metrics.path))
        if session.prediction is not None:  # --machine: the cost model beside the measurement
            from mpipar.cost.run import format_rows, report_rows

            rows = report_rows(metrics.path)
            if rows:
                say(format_rows(rows))
    session.watchdog.stop()
    return stopping


def _traced_fetch(recorder: EventRecorder, fetch):
    """``fetch`` recording each shard it loads as a ``shard_data`` event (index: the shard)."""
    def traced(j):
        start = time.perf_counter()
        batch = fetch(j)
        recorder.add("shard_data", start, time.perf_counter(), index=j)
        return batch
    return traced
