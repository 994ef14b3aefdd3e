"""Train a ResNet with synchronous data parallelism over MPI.

Usage:
    mpirun -n 4 python jobs/resnet_dp.py --data fashion-mnist --epochs 3
    mpirun -n 2 python jobs/resnet_dp.py --data synthetic --max-steps 20 --out runs/try
    sbatch slurm/resnet_dp.sh --data synthetic --max-steps 5

Each rank trains on its share of every global batch (--batch-size samples per
rank); gradients are averaged with MPI Allreduce, weighted by sample counts.
Writes OUT/metrics.h5 (per step and rank: compute, communication and idle time,
bytes sent, loss; per epoch: test accuracy). As root, Open MPI needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and more ranks than
cores needs --oversubscribe.
"""

import signal

EARLY_SIGNALS = []  # Slurm's warning signal can come while torch is still importing
for _name in ("SIGUSR1", "SIGTERM"):
    signal.signal(getattr(signal, _name), lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpipar
from mpipar import data, models
from mpipar.data.sharding import rank_batches, steps_per_epoch
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import FaultInjection, abort_on_exception
from mpipar.diagnostics.watchdog import Watchdog
from mpipar.run.checkpoint import Checkpointer, check_same_run, rng_state, set_rng_state
from mpipar.run.cli import train_config, training_parser
from mpipar.run.evaluate import Stopwatch, evaluate
from mpipar.run.launch import (
    RootPrinter,
    StopRequest,
    check_world_size,
    mpi_library,
    prepare_output_dir,
    requeue_slurm_job,
    threads_per_rank,
)
from mpipar.run.metrics import MetricsWriter
from mpipar.run.summary import summarize

MODELS = {
    "resnet-small": models.resnet_small,  # 8 layers, 78k parameters: CPUs
    "resnet18": models.resnet18,
    "resnet50": models.resnet50,
}


def parse_args(argv=None, rank: int = 0) -> argparse.Namespace:
    p = training_parser(__doc__, rank=rank, out="runs/resnet_dp", batch_help="samples per rank per step", models=MODELS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    abort_on_exception(comm)
    watchdog = Watchdog(comm).start()  # reports ranks that have not arrived when one waits > MPIPAR_STALL_WARN s
    say = RootPrinter(comm)
    args = parse_args(argv, comm.Get_rank())
    check_world_size(comm)
    threads = threads_per_rank(comm, args.threads)
    config = collective_check(comm, lambda: train_config(args, threads=threads), "configuration")
    agree_on(comm, "the configuration", {k: v for k, v in config.to_dict().items() if k != "threads"},
             hint="launch every rank with the same arguments")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = prepare_output_dir(comm, config.out, allow_existing_run=args.resume)
    stop = StopRequest.install(EARLY_SIGNALS)
    fault = FaultInjection.from_environment(comm)
    checkpoints = Checkpointer(out / "checkpoints", comm)
    resume_from = checkpoints.latest() if args.resume else None

    splits = collective_check(comm, lambda: data.resolve(config.data, seed=config.seed), "data")
    train, test = splits.train, splits.test
    agree_on(comm, "the dataset size and image shape", (len(train), len(test), train.image_shape))
    channels, size, _ = train.image_shape
    model = MODELS[config.model](in_channels=channels, num_classes=max(train.num_classes, test.num_classes),
                                 image_size=size)
    dp = mpipar.DataParallel(model, comm, bucket_cap_mb=config.bucket_mb)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    steps_in_epoch = steps_per_epoch(len(train), config.batch_size, comm.Get_size())
    total_steps = steps_in_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=0.15)
    say(f"mpipar {mpipar.__version__}: data parallel on {comm.Get_size()} ranks x {config.threads} threads, "
        f"{mpi_library()}")
    say(f"data: {splits.description}")
    say(f"model: {config.model}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{steps_in_epoch} steps/epoch of {config.batch_size} x {comm.Get_size()} samples; "
        f"{total_steps} steps; metrics -> {out / 'metrics.h5'}")

    step, start_epoch, skip, loss_sum, samples_seen = 0, 0, 0, 0.0, 0
    if resume_from is not None:
        state = checkpoints.load(resume_from)
        agree_on(comm, "the checkpoint's step", state["step"])
        check_same_run(state["config"], config.to_dict())
        model.load_state_dict(state["model"])
        if "rank_buffers" in state:  # each rank's own BatchNorm statistics (same number of ranks: checked)
            dp.load_rank_buffers(state["rank_buffers"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        step, start_epoch, skip = state["step"], state["epoch"], state["step_in_epoch"]
        loss_sum, samples_seen = state["loss_sum"], state["samples_seen"]
        say(f"resumed from {resume_from} at step {step} (epoch {start_epoch + 1}, step {skip} of it)")
    metrics = MetricsWriter(out / "metrics.h5", comm, strategy="data_parallel", config=config.to_dict(),
                            flush_every=config.flush_every, resume=args.resume, resume_at_step=step,
                            attrs={"model": config.model, "parameters": sum(p.numel() for p in model.parameters())})

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Flush metrics up to ``step``, then write the checkpoint of ``step``. Collective.
        Every rank's buffers are stored (not averaged), so saving never changes the run."""
        metrics.flush()
        rank_buffers = dp.gather_buffers()
        path = checkpoints.save(step, {
            "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "loss_sum": loss_sum,
            "samples_seen": samples_seen, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": rng_state(), "config": config.to_dict(),
            "rank_buffers": rank_buffers})
        say(f"checkpoint: {path}")

    run_start = time.perf_counter()
    last_log, first_step = run_start, step
    stopping = False
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        batches = rank_batches(len(train), config.batch_size, comm.Get_size(), comm.Get_rank(),
                               seed=config.seed, epoch=epoch)
        for step_in_epoch in range(skip, len(batches)):
            if step >= total_steps:
                break
            fault.maybe_fail(step)
            watchdog.label(epoch=epoch + 1, step=step)
            clock = Stopwatch()
            images, labels = train.batch(batches[step_in_epoch])
            data_time = clock.lap()
            loss = F.cross_entropy(dp(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
            step_time = data_time + clock.lap()
            comm_stats = dp.stats.take()
            metrics.record_step(loss=loss_value, samples=len(labels), step_time=step_time, data_time=data_time,
                                wait_time=comm_stats.wait_time, bytes_sent=comm_stats.bytes_sent)
            step += 1
            loss_sum += loss_value * len(labels)
            samples_seen += len(labels)
            if metrics.maybe_flush(stop=stop.requested):
                stopping = True
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step_in_epoch + 1 < len(batches):
                save_checkpoint(epoch, step_in_epoch + 1)
            now = time.perf_counter()
            if config.log_every and now - last_log >= config.log_every:
                last_log = now
                say(f"epoch {epoch + 1}/{config.epochs} step {step}/{total_steps} loss {loss_sum / samples_seen:.4f} "
                    f"{(step - first_step) * config.batch_size * comm.Get_size() / (now - run_start):.0f} samples/s")
        if stopping:  # Slurm's warning signal (or SIGTERM): save where we are and go
            save_checkpoint(epoch, step_in_epoch + 1)
            say(f"stopping early: {stop.describe()}; metrics flushed to {out / 'metrics.h5'}")
            if args.requeue and not stop.cancelled:  # scancel (SIGTERM) must not bring the job back
                requeue_slurm_job(comm, say)
            break
        skip = 0
        dp.sync_buffers()
        result = evaluate(model, test, comm)
        wall = time.perf_counter() - epoch_start
        metrics.record_epoch(epoch=epoch + 1, train_loss=loss_sum / max(samples_seen, 1), test_loss=result.loss,
                             test_accuracy=result.accuracy, wall_time=wall)
        say(f"epoch {epoch + 1}/{config.epochs} done in {wall:.1f}s: train loss {loss_sum / max(samples_seen, 1):.4f}, "
            f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.4f}")
        loss_sum = samples_seen = 0
        save_checkpoint(epoch + 1, 0)
        if step >= total_steps:
            break
    metrics.close()
    watchdog.stop()
    if comm.Get_rank() == 0 and not stopping:
        print(summarize(out / "metrics.h5"), flush=True)


if __name__ == "__main__":
    main()
