"""What every job sets up before it builds its strategy: checks, output directory, checkpoint to resume, data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from mpi4py import MPI

from mpipar.comm import cuda_aware
from mpipar.comm.device import describe, select_device
from mpipar.data.augment import Augmentation
from mpipar.data.datasets import DataSplits, resolve
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import FaultInjection
from mpipar.diagnostics.watchdog import Watchdog
from mpipar.run.checkpoint import Checkpointer, check_same_run
from mpipar.run.cli import train_config
from mpipar.run.config import TrainConfig
from mpipar.run.launch import RootPrinter, StopRequest, check_world_size, prepare_output_dir, threads_per_rank

__all__ = ["Session"]


class Session:
    """One run of a job on ``comm``: settings agreed, output directory ready, the
    checkpoint to continue (if any) loaded, a stall watchdog watching.

    Collective over ``comm`` (construction and :meth:`data`). Every check raises on
    every rank together, before any training collective.

    Args:
        comm: the job's ranks.
        config: the settings every job shares.
        settings: the strategy's own settings (a frozen dataclass or None); stored
            with checkpoints and the metrics file, and compared on resume.
        resume: continue from the newest intact checkpoint in ``config.out`` (a fresh
            start when there is none; damaged ones are skipped with a warning); refuses
            one written with other settings or ranks.
        resume_from: continue from this checkpoint directory (implies ``resume``).
        requeue: on Slurm's warning signal, checkpoint and requeue the job.
        stop: the signal flag (:class:`~mpipar.run.launch.StopRequest`).
        machine: a machine file (``mpipar-calibrate``): the step is predicted for this layout and
            the ``predicted_*`` attributes go to the metrics file; not part of the settings, so
            free on resume (a resumed run's metrics file keeps the attributes it was created with).

    Attributes:
        device: this rank's device (:func:`~mpipar.comm.device.select_device` of ``config.device``).
        device_attrs: the device and the CUDA-aware-MPI decision, and with ``machine`` the
            prediction's ``predicted_*`` attributes, for the metrics file.
        prediction: the :class:`~mpipar.cost.model.Prediction` of the step, or None.
        out: the output directory. ``checkpoints``: its :class:`Checkpointer`.
        state: the checkpoint being resumed (this rank's part) or None.
        run_config: ``config`` and ``settings`` as one dict.
        say: prints on rank 0.
    """

    def __init__(self, comm: MPI.Intracomm, config: TrainConfig, *, settings: Any = None, resume: bool = False,
                 resume_from: Optional[str] = None, requeue: bool = False, stop: Optional[StopRequest] = None,
                 machine: Optional[str] = None):
        self.comm = comm
        self.config = config
        self.settings = settings
        self.say = RootPrinter(comm)
        self.watchdog = Watchdog(comm).start()  # reports ranks that have not arrived after MPIPAR_STALL_WARN s
        self.run_config = {**config.to_dict(), **(settings.to_dict() if settings is not None else {})}
        agree_on(comm, "the configuration", {k: v for k, v in self.run_config.items() if k != "threads"},
                 hint="launch every rank with the same arguments")
        torch.set_num_threads(config.threads)
        self.device = select_device(comm, config.device)
        torch.manual_seed(config.seed)
        self.say(describe(comm, self.device))
        self.device_attrs: Dict[str, Any] = {"device": self.device.type}
        if self.device.type == "cuda":
            decision = cuda_aware.agreed_cuda_awareness(comm)
            self.say(decision.describe())
            self.device_attrs.update(cuda_aware=int(decision.aware), cuda_aware_reason=decision.reason)
        self.prediction = None if machine is None else self._predict(machine)
        self.resume, self.requeue = resume or resume_from is not None, requeue
        self.stop = stop or StopRequest()
        self.fault = FaultInjection.from_environment(comm)
        self.out = prepare_output_dir(comm, config.out, allow_existing_run=self.resume)
        self.checkpoints = Checkpointer(self.out / "checkpoints", comm)
        self.resumed_from, self.state = None, None
        if self.resume:
            self.resumed_from, self.state = self.checkpoints.resume(
                explicit=None if resume_from is None else Path(resume_from), warn=self.say)
        if self.state is not None:
            state = self.state
            agree_on(comm, "the checkpoint's step", state["step"])
            collective_check(comm, lambda: check_same_run(state["config"], self.run_config), "--resume")

    @classmethod
    def from_args(cls, comm: MPI.Intracomm, args: argparse.Namespace, early_signals=(), *,
                  settings: Optional[Callable[[], Any]] = None, model: Optional[str] = None) -> Session:
        """The session of parsed job flags (:func:`~mpipar.run.cli.training_parser`):
        world size checked against the launch, threads per rank chosen, ``settings()``
        (the strategy's settings, validated) built on every rank together. Collective."""
        check_world_size(comm)
        threads = threads_per_rank(comm, args.threads)
        config, strategy_settings = collective_check(
            comm, lambda: (train_config(args, threads=threads, model=model), settings() if settings else None),
            "configuration")
        return cls(comm, config, settings=strategy_settings, resume=args.resume, resume_from=args.resume_from,
                   requeue=args.requeue, stop=StopRequest.install(early_signals), machine=args.machine)

    def _predict(self, path: str):
        """The step predicted from the machine file at ``path`` for this job; its attributes join
        ``device_attrs``. Collective (the file is read on every rank, errors raised together)."""
        from mpipar.comm.topology import node_indices
        from mpipar.cost import Machine, predict_run

        machine = collective_check(self.comm, lambda: Machine.load(path), "--machine")
        nodes = node_indices(self.comm)
        prediction, why_not = predict_run(
            machine, model=self.config.model, batch_size=self.config.batch_size, bucket_mb=self.config.bucket_mb,
            settings=self.settings, ranks=self.comm.Get_size(), ranks_per_node=max(map(nodes.count, set(nodes))),
            config=self.config)
        if prediction is None:
            self.say(f"--machine {path}: no prediction: {why_not}")
            return None
        self.device_attrs.update(prediction.attrs(), predicted_machine=str(path))
        self.say(f"predicted ({path}): {prediction.strategy} {prediction.layout.shape} step "
                 f"{1e3 * prediction.step:.1f} ms, compute {1e3 * prediction.compute:.1f} ms; {prediction.why()}")
        return prediction

    def data(self) -> DataSplits:
        """The training and test data of ``config.data`` (checked to be the same on every rank), the
        training samples augmented with ``config.augment``. Collective; HDF5 files are streamed
        (:func:`~mpipar.data.streaming.load_h5`), each rank reading its own samples."""
        splits = collective_check(self.comm, lambda: resolve(self.config.data, seed=self.config.seed), "data")
        agree_on(self.comm, "the dataset size and image shape",
                 (len(splits.train), len(splits.test), splits.train.image_shape))
        if self.config.augment is not None:
            splits.train.augment = Augmentation(self.config.seed, self.config.augment)
        return splits
