"""The compute of an instruction on a stage: a forward, a backward, an asynchronous schedule's update."""

from __future__ import annotations

import time
from typing import List, Optional

import torch
from torch import nn

from mpipar.diagnostics import events
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.step_state import RunState
from mpipar.pipeline_plan.instructions import (
    Backward,
    Forward,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    Update,
)

__all__ = ["Compute", "finished_by_stage"]


def finished_by_stage(module: nn.Module, shared: List[nn.Parameter]) -> nn.Module:
    """The parameters whose gradients a stage's last backward completes: all of the stage's, but those it
    shares with other stages (summed at the end of the step)."""
    if not shared:
        return module
    return nn.ParameterList([p for p in module.parameters() if all(p is not s for s in shared)])


class Compute(PipelineParts):
    """:class:`~mpipar.pipeline.executor.Pipeline`'s compute handlers: each runs one stage's step on this rank
    (local), taking its inputs from the run's received tensors and leaving its outputs for the sends."""

    def _stage_input(self, index: int, microbatch: int, run: RunState) -> torch.Tensor:
        """The input activation of stage ``index`` (not the first): received, or handed over in memory from the
        stage before on this rank, copied in the agreed dtype as the wire would."""
        if index - 1 not in self.stages:
            return run.received.pop(RecvActivation(index, microbatch))
        spec = self._input_specs[index]
        assert spec is not None  # agreed before the first step (a failed agreement raised on every rank)
        return run.outgoing.pop(SendActivation(index - 1, microbatch)).to(self.stages[index].device, spec.dtype,
                                                                          copy=True)

    def _output_grad(self, index: int, microbatch: int, run: RunState) -> Optional[torch.Tensor]:
        """The gradient of stage ``index``'s output (None on the last stage): received, or handed over in memory
        from the stage after on this rank, in the agreed dtype."""
        if self.stages[index].is_last:
            return None
        if index + 1 not in self.stages:
            return run.received.pop(RecvGrad(index, microbatch))
        spec = self._input_specs[index + 1]
        assert spec is not None
        return run.outgoing.pop(SendGrad(index + 1, microbatch)).to(spec.dtype)

    def _forward(self, instruction: Forward, run: RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        if stage.is_first:
            assert run.chunks is not None  # the first stage's rank holds the batch (checked by _agree_batch)
            x = run.chunks[i - run.base]
        else:
            x = self._stage_input(index, i, run)
        used = {name: run.skips.pop((name, i)) for name in self._uses[index]}  # received, or saved on this rank
        weights = self.versions[index].weights_for(i) if run.train and self.versions else None
        begin = time.perf_counter()
        y, saved = stage.forward(i, x, train=run.train,
                                 target=run.target_chunks[i - run.base] if run.target_chunks else None,
                                 loss_fn=self.loss_fn, scale=self.loss_scale / run.microbatches, skips=used,
                                 weights=weights)
        end = time.perf_counter()
        stage.forward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("forward", begin, end, index=i, stage=index)
        for name, tensor in saved.items():  # for SendSkip, or for a later stage on this rank
            run.skips[name, i] = tensor.detach()
        if not stage.is_last:
            run.outgoing[SendActivation(index, i)] = y.detach()

    def _backward(self, instruction: Backward, run: RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        grad_output = self._output_grad(index, i, run)
        skip_grads = {name: run.skip_grads.pop((name, i)) for name in self._saves[index]}
        if run.before_last_backward is not None and instruction == run.last_backward[index]:
            run.before_last_backward(self._finishing[index])
        begin = time.perf_counter()
        grad_input, used_grads = stage.backward(i, grad_output, skip_grads)
        if self.versions:
            self.versions[index].take_gradient(i)
        end = time.perf_counter()
        stage.backward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("backward", begin, end, index=i, stage=index)
        for name, grad in used_grads.items():  # for SendSkipGrad, or for an earlier stage on this rank
            run.skip_grads[name, i] = grad
        if not stage.is_first:
            assert grad_input is not None  # a stage after the first has an input that needs a gradient
            run.outgoing[SendGrad(index, i)] = grad_input

    def _update(self, instruction: Update, run: RunState) -> None:
        begin = time.perf_counter()
        self.versions[instruction.stage].update(self._step_optimizer)
        end = time.perf_counter()
        self.stages[instruction.stage].backward_busy += end - begin  # compute: counted as busy
        recorder = events.active()
        if recorder is not None:
            recorder.add("update", begin, end, index=instruction.microbatch, stage=instruction.stage)
