"""A split backward (zero-bubble schedules): the input gradient now (``I``), the weight gradients later (``W``).

A stage of such a schedule runs its layers with the graph cut after layers (a forward hook hands the next layer,
and any skip saved there, a detached copy of the layer's output), so each piece between cuts is a graph of its
own: the cuts follow each layer with trainable parameters, the stage's last layer and each layer whose output a
``SaveSkip`` keeps (the layers without trainable parameters, e.g. activations or a residual addition, join the
piece of the next layer cut, with the skips they use as inputs of that piece: fewer autograd calls, the same
gradients).
``I`` walks the pieces back from the output gradient (and the gradients of the skips the stage saved), taking
only the gradients of each piece's inputs (``torch.autograd.grad``), summed per tensor; it keeps the graphs of
the pieces with trainable parameters together with their output gradients. ``W`` back-propagates those outputs
into the parameters only (``inputs=``), accumulating into ``.grad`` as an unsplit backward does, and frees the
graphs and what the stage kept of the micro-batch since its forward. Each gradient is computed once; the
results equal the unsplit backward's up to the order of additions.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from mpipar.diagnostics import events
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.skip import SaveSkip
from mpipar.pipeline.step_state import RunState
from mpipar.pipeline_plan.instructions import BackwardInput, BackwardWeight, SendGrad

__all__ = ["SplitBackward"]


class _Layer:
    """One layer of a recorded forward: its inputs that need gradients, its output in its own graph, the detached
    output the rest of the stage took, and whether it has trainable parameters."""

    __slots__ = ("inputs", "output", "detached", "trainable")

    def __init__(self, inputs: List[torch.Tensor], output: torch.Tensor, detached: torch.Tensor, trainable: bool):
        self.inputs, self.output, self.detached, self.trainable = inputs, output, detached, trainable


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class _Grads:
    """Gradients summed per tensor (a tensor may feed several layers: a saved skip and the next layer)."""

    def __init__(self):
        self._grads: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
        if grad is None:
            return
        held = self._grads.get(id(tensor))
        self._grads[id(tensor)] = (tensor, grad if held is None else held[1] + grad)

    def pop(self, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        held = self._grads.pop(id(tensor), None)
        return None if held is None else held[1]


def _input_grads(output: torch.Tensor, inputs: List[torch.Tensor], grad: Optional[torch.Tensor],
                 retain: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """``torch.autograd.grad(output, inputs, grad, retain_graph=retain, allow_unused=True)`` by autograd's engine
    directly where torch has it: the public call's checks of the gradient's shape (its ``_make_grads``) cost more
    than a small layer's backward, and a piece's output gradient comes from autograd (or the agreed message
    shape) already; the same engine call, so the same result."""
    if _ENGINE is None:
        return torch.autograd.grad(output, inputs, grad, retain_graph=retain, allow_unused=True)
    grads = (torch.ones_like(output),) if grad is None else (grad,)  # a scalar loss: d loss / d loss
    return _ENGINE.run_backward((output,), grads, retain, False, tuple(inputs), True, False)


def _weight_grads(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  params: Sequence[torch.Tensor]) -> None:
    """``torch.autograd.backward(outputs, grads, inputs=params)`` (accumulating into ``.grad``), by the engine
    directly where torch has it (see :func:`_input_grads`)."""
    if _ENGINE is None:
        torch.autograd.backward(outputs, grads, inputs=params)
    else:
        _ENGINE.run_backward(tuple(outputs), tuple(grads), False, False, tuple(params), True, True)


_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
if not hasattr(_ENGINE, "run_backward"):
    _ENGINE = None


def _forced_cuts(module: nn.Sequential) -> Set[int]:
    """The layers of a stage cut whether or not they have trainable parameters: the last, and each layer whose
    output a ``SaveSkip`` keeps (so every skip is a piece's output or the stage's input). Pure."""
    layers = list(module)
    forced = {id(layers[-1])} if layers else set()
    for position, layer in enumerate(layers):
        if isinstance(layer, SaveSkip):
            before = [other for other in layers[:position] if not isinstance(other, SaveSkip)]
            if before:
                forced.add(id(before[-1]))
    return forced


class SplitBackward(PipelineParts):
    """:class:`~mpipar.pipeline.executor.Pipeline`'s handlers of :class:`BackwardInput` and
    :class:`BackwardWeight` (compute on this rank; their messages are the schedule's ``RecvGrad`` / ``SendGrad``
    and skip messages)."""

    _recording: Optional[List[_Layer]]  # the layers of the training forward running on this rank
    _recorded: Dict[int, Dict[int, List[_Layer]]]  # stage -> id(stage input) -> its layers, from F to I
    _weight_work: Dict[int, Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]]]  # stage -> micro-batch -> (o, g)
    _trainable_layers: Dict[int, bool]  # id(layer) -> it has trainable parameters (found once per step)
    _piece_inputs: List[torch.Tensor]  # what the piece being recorded takes: the last cut's output, skips used
    _must_cut: Dict[int, Set[int]]  # stage -> id of layers cut whatever they are (the last; before a SaveSkip)
    _cutting: Set[int]  # the stage being recorded's _must_cut
    _input_versions: Dict[int, List[int]]  # id(layer) -> its inputs' versions as its forward began

    def _install_split_backward(self) -> None:
        """Cut every local stage's graph in training forwards (hooks on the stage's layers): after each layer with
        trainable parameters, the stage's last layer, and a layer whose output a ``SaveSkip`` keeps."""
        self._recording, self._recorded, self._weight_work = None, {}, {}
        self._trainable_layers, self._piece_inputs, self._must_cut = {}, [], {}
        self._input_versions, self._cutting = {}, set()
        hooked = set()
        for index, stage in self.stages.items():
            self._recorded[index], self._weight_work[index] = {}, {}
            self._must_cut[index] = _forced_cuts(stage.module)
            stage.module.register_forward_pre_hook(self._begin_record(index))
            stage.module.register_forward_hook(self._end_record(index))
            for position, layer in enumerate(stage.module):
                if id(layer) not in hooked:  # a layer placed twice is cut once per call
                    hooked.add(id(layer))
                    layer.register_forward_pre_hook(self._note_versions)
                    layer.register_forward_hook(self._cut(stage.start + position))

    def _reset_split_backward(self) -> None:
        """Forget what a previous (possibly failed) step left."""
        self._recording = None
        self._trainable_layers = {id(layer): _trainable(layer) for stage in self.stages.values()
                                  for layer in stage.module}
        for index in self._recorded:
            self._recorded[index].clear()
            self._weight_work[index].clear()

    def _begin_record(self, index: int):
        def begin(module, args) -> None:
            self._recording = [] if torch.is_grad_enabled() else None
            self._piece_inputs = [args[0]] if args and isinstance(args[0], torch.Tensor) else []
            self._cutting = self._must_cut[index]
        return begin

    def _end_record(self, index: int):
        def end(module, args, output):
            record, self._recording = self._recording, None
            stage = self.stages[index]
            if record is not None and (stage.recomputing or not stage.recompute):  # not the graph-less forward
                self._recorded[index][id(args[0])] = record
        return end

    def _note_versions(self, layer, args):
        self._input_versions[id(layer)] = [a._version for a in args if isinstance(a, torch.Tensor)]

    def _cut(self, number: int):
        def cut(layer, args, output):
            record = self._recording
            if record is None:
                return None
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if [a._version for a in tensors] != self._input_versions.get(id(layer)):
                raise RuntimeError(f"layer {number} ({type(layer).__name__}) changes its input in place, which a "
                                   f"split backward (zero-bubble: the graph cut between layers) cannot "
                                   f"differentiate; use its out-of-place form (e.g. nn.ReLU() for "
                                   f"nn.ReLU(inplace=True))")
            if len(tensors) > 1:  # a skip used (the first argument is the running activation)
                self._piece_inputs.extend(tensors[1:])
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            trainable = self._trainable_layers.get(id(layer))
            if trainable is None:
                trainable = _trainable(layer)
            if not trainable and id(layer) not in self._cutting:
                return None  # joins the piece of the next layer that is cut
            inputs, seen = [], set()
            for tensor in self._piece_inputs:
                if tensor.requires_grad and id(tensor) not in seen:
                    seen.add(id(tensor))
                    inputs.append(tensor)
            detached = output.detach().requires_grad_()
            record.append(_Layer(inputs, output, detached, trainable))
            self._piece_inputs = [detached]
            return detached
        return cut

    def _backward_input(self, instruction: BackwardInput, run: RunState) -> None:
        """The gradients of the stage's input and of the skips it used, for one micro-batch (sent by
        ``SendGrad`` / ``SendSkipGrad``); keeps the layers' graphs with trainable parameters and their output
        gradients for :meth:`_backward_weight`."""
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        grad_output = self._output_grad(index, i, run)
        skip_grads = {name: run.skip_grads.pop((name, i)) for name in self._saves[index]}
        x, top, used, saved = stage.held(i)  # kept until W (under recompute: its forward run again now)
        layers = self._recorded[index].pop(id(x))
        begin = time.perf_counter()
        grads = _Grads()
        if stage.is_last:  # ``top`` is the scaled loss; its graph starts at the last layer's detached output
            if layers and top.requires_grad:
                grads.add(layers[-1].detached, _input_grads(top, [layers[-1].detached], None, False)[0])
        else:
            grads.add(top, grad_output)
        for name, tensor in saved.items():
            if tensor.requires_grad:
                grads.add(tensor, skip_grads[name])
        kept: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for layer in reversed(layers):
            grad = grads.pop(layer.detached)
            if grad is None:  # nothing after the layer needs its output: no gradient flows through it
                continue
            if layer.trainable:
                kept.append((layer.output, grad))
            if layer.inputs:
                inputs = _input_grads(layer.output, layer.inputs, grad, layer.trainable)
                for tensor, input_grad in zip(layer.inputs, inputs):
                    grads.add(tensor, input_grad)
        self._weight_work[index][i] = kept
        for name, tensor in used.items():  # for SendSkipGrad, or for an earlier stage on this rank
            grad = grads.pop(tensor)
            run.skip_grads[name, i] = grad if grad is not None else torch.zeros_like(tensor)
        grad_input = grads.pop(x)
        end = time.perf_counter()
        stage.backward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("backward", begin, end, index=i, stage=index)
        if not stage.is_first:
            run.outgoing[SendGrad(index, i)] = grad_input if grad_input is not None else torch.zeros_like(x)

    def _backward_weight(self, instruction: BackwardWeight, run: RunState) -> None:
        """The weight gradients of one micro-batch into ``.grad``; frees its graphs and the stage's stash."""
        index, i = instruction.stage, instruction.microbatch
        stage = self.stages[index]
        kept = self._weight_work[index].pop(i)
        if run.before_last_backward is not None and instruction == run.last_backward[index]:
            run.before_last_backward(self._finishing[index])
        begin = time.perf_counter()
        params = [p for p in stage.module.parameters() if p.requires_grad]
        if kept and params:
            _weight_grads([out for out, _ in kept], [grad for _, grad in kept], params)
        stage._stash.pop(i)
        end = time.perf_counter()
        stage.backward_busy += end - begin
        recorder = events.active()
        if recorder is not None:
            recorder.add("backward_weight", begin, end, index=i, stage=index)

