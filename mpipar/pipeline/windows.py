"""An asynchronous schedule's windows (fill, steady, drain), one batch per step, and what lives between steps."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

import torch
from torch import nn

from mpipar.pipeline.microbatch import check_microbatches
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.stage import TensorSpec
from mpipar.pipeline.step_state import RunState, StepResult
from mpipar.pipeline.timing import StepClock
from mpipar.pipeline.versions import step_with_decay_share
from mpipar.pipeline_plan.schedule import window_program

__all__ = ["AsyncWindows"]


class AsyncWindows(PipelineParts):
    """:class:`~mpipar.pipeline.executor.Pipeline`'s asynchronous schedules (``pipedream``, ``2bw``): a step runs
    one window of the never-flushing stream; :meth:`drain` (collective) empties the pipeline."""

    def _window(self, window: str) -> list:
        """This rank's program of an asynchronous schedule's ``window``, cached."""
        key = ("window", window)
        if key not in self._programs:
            self._check_tags(2 * self.microbatches)
            self._programs[key] = window_program(self.schedule, self.stage_ranks, self.rank, window,
                                                 [(e.producer, e.consumer) for e in self.stage_skips])
        return self._programs[key]

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer an asynchronous schedule steps at each ``Update``, with only the updating
        stage's parameters holding a gradient (an optimizer skips parameters without one) and its
        weight decay scaled by the update's part of the batch (PipeDream: ``1/m``), so decay per
        batch is the flushing schedules'. Local (no communication)."""
        self._optimizer = optimizer

    def _step_optimizer(self, params: List[nn.Parameter], share: float) -> None:
        if self._optimizer is None:
            raise RuntimeError(f"the {self.schedule.name} schedule steps an optimizer at each update: call "
                               f"pipe.bind_optimizer(optimizer) before the first step")
        step_with_decay_share(self._optimizer, share)

    @property
    def in_flight(self) -> bool:
        """Whether an asynchronous schedule's last step left micro-batches in the pipeline."""
        return self._in_flight

    def _check_steady_batch(self, inputs, targets) -> None:
        """Local checks of a steady step's batch against the fill's (no communication)."""
        assert self._batch_spec is not None  # set by the fill step, which every steady step follows
        spec, batch = self._batch_spec
        if self.holds_first_stage:
            size = check_microbatches(inputs.shape[0], self.microbatches) if isinstance(inputs, torch.Tensor) \
                and inputs.dim() else None
            if size is None or TensorSpec((size, *inputs.shape[1:]), inputs.dtype) != spec:
                raise ValueError(f"rank {self.rank}: a steady step of {self.schedule.name} needs batches like the "
                                 f"fill's ({batch} x {spec}); call drain() before changing the batch")
        if self.holds_last_stage and (not isinstance(targets, torch.Tensor) or targets.shape[:1] != (batch,)):
            raise ValueError(f"rank {self.rank}: a steady step of {self.schedule.name} needs {batch} targets on "
                             f"the last stage's rank")

    def _async_state(self, clock: StepClock) -> RunState:
        if self._async_run is None:
            self._async_run = RunState(clock=clock, train=True, microbatches=self.microbatches, chunks=None,
                                        target_chunks=None, last_backward={}, before_last_backward=None,
                                        tag_count=2 * self.microbatches)
        run = self._async_run
        run.clock, run.base, run.bytes_sent, run.skip_bytes_sent = clock, self._batches * self.microbatches, 0, 0
        return run

    def _execute_window(self, window: str, run: RunState) -> None:
        program = [dataclasses.replace(instruction, microbatch=run.base + instruction.microbatch)
                   for instruction in self._window(window)]
        self._post_receives(program, run)
        for instruction in program:
            self._handlers[type(instruction)](instruction, run)

    def _run_async(self, inputs, targets) -> StepResult:
        clock = StepClock()
        window = "steady" if self._in_flight else "fill"
        if window == "fill":  # the pipeline is empty: agree like a flushing step (waiting: idle)
            self._agree_batch(inputs, targets, True, self.microbatches)
        else:
            self._check_steady_batch(inputs, targets)
        for stage in self.stages.values():
            stage.outputs.clear()
            stage.losses.clear()
            stage.forward_busy = stage.backward_busy = 0.0
            stage.peak_in_flight = 0
        for versions in self.versions.values():
            versions.reset_peaks()
        run = self._async_state(clock)
        run.chunks = list(inputs.chunk(self.microbatches)) if self.holds_first_stage else None
        run.target_chunks = list(targets.chunk(self.microbatches)) if self.holds_last_stage else None
        self._execute_window(window, run)
        self._batches += 1
        self._in_flight = True
        with clock.communicating():  # the previous window's sends: received in this window at the latest
            self._wait_sends(self._previous_sends)
        self._previous_sends, run.sends = run.sends, []
        clock.busy = sum(stage.busy for stage in self.stages.values())
        last = self.stages.get(self.num_stages - 1)
        mean = last.mean_loss() if last is not None else None
        return StepResult(
            loss=math.nan if mean is None else mean, outputs=last.gathered_outputs() if last else None,
            times=clock.finish(),
            stage_busy={index: stage.busy for index, stage in self.stages.items()},
            stage_times={index: (stage.forward_busy, stage.backward_busy) for index, stage in self.stages.items()},
            peak_in_flight={index: stage.peak_in_flight for index, stage in self.stages.items()},
            activation_bytes=sum(s.activation_peak_bytes for s in self.stages.values()),
            bytes_sent=run.bytes_sent, skip_bytes_sent=run.skip_bytes_sent,
            weight_versions={index: v.peak_versions for index, v in self.versions.items()},
            stash_bytes=sum(v.peak_bytes for v in self.versions.values()),
            updates=self.take_updates())

    def take_updates(self) -> List[Tuple[int, int, int, int]]:
        """``(stage, micro-batch, forward version, applied version)`` of the local updates not yet
        reported (a step reports its own; this gives a drain's). Local."""
        return [(index, *record) for index, v in self.versions.items() for record in v.take_records()]

    def drain(self) -> None:
        """Finish the micro-batches an asynchronous schedule left in flight (their backwards and
        updates), so that nothing is in the pipeline. Collective over ``comm``; nothing to do
        for a flushing schedule or when already drained (the same on every rank). Results do
        not depend on where drains happen: versions follow the schedule's rule."""
        if not self._in_flight:
            return
        run = self._async_state(StepClock())
        run.chunks = run.target_chunks = None
        self._execute_window("drain", run)
        self._wait_sends(self._previous_sends + run.sends)
        self._previous_sends, run.sends = [], []
        run.received.clear()
        self._in_flight = False

    def async_state_dict(self) -> dict:
        """After a :meth:`drain` (done here; collective): the batch count and each local stage's
        weight versions that later forwards will use (``{}`` for a flushing schedule)."""
        if not self.schedule.is_async:
            return {}
        self.drain()
        return {"batches": self._batches,
                "stages": {index: versions.state_dict() for index, versions in self.versions.items()}}

    def load_async_state_dict(self, state: dict) -> None:
        """Continue from :meth:`async_state_dict` (same schedule and placement). Local."""
        if not self.schedule.is_async:
            return
        self._batches = int(state["batches"])
        for index, versions in self.versions.items():
            versions.load_state_dict(state["stages"][index])
