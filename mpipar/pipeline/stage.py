"""One pipeline stage: a run of consecutive layers and what it keeps between forward and backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from mpipar.comm.device import module_device
from mpipar.cost.profile import counting_saved_bytes  # re-exported: it lived here
from mpipar.pipeline.skip import SkipSequential
from mpipar.run.recompute import nothing_saved, scratch_buffers

__all__ = ["Stage", "TensorSpec", "counting_saved_bytes"]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one micro-batch's activation crossing a stage boundary."""

    shape: Tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def __str__(self) -> str:
        return f"{tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"


class Stage:
    """Layers ``start:stop`` of the model as stage ``index`` of ``num_stages``.

    The stage runs one micro-batch at a time. ``forward`` keeps the input and the
    output (the loss, on the last stage) for ``backward``; nothing here
    communicates. A :class:`~mpipar.pipeline.skip.SkipSequential` stage also takes
    the skip tensors it uses from earlier stages and gives back those it saves for
    later ones; ``backward`` takes the gradients of the latter and returns those of
    the former. On the last stage the loss of each micro-batch is divided by the
    number of micro-batches, so gradients accumulated over the micro-batches equal
    those of the mean loss over the whole batch (the loss function must be a mean
    over samples and the micro-batches equal in size).

    With ``recompute`` (``--recompute full``) a training forward keeps only the stage's input and the skips
    it uses (and the RNG state): it runs with the saved tensors dropped, and ``backward`` runs it again
    (same RNG state, buffers not updated twice) before back-propagating, so one micro-batch's activations
    live at a time instead of one per micro-batch in flight; bitwise the same gradients. ``saved_bytes``
    is then what a micro-batch in flight keeps, ``recompute_bytes`` what its recompute saves.

    Args:
        index: position of the stage in the pipeline.
        num_stages: number of stages.
        module: the stage's layers (sharing parameters with the user's model).
        start: index of the first layer in the whole model (for messages).
        device: where the stage runs (default: where its first parameter or buffer is, else the CPU).
    """

    def __init__(self, index: int, num_stages: int, module: nn.Sequential, start: int = 0,
                 device: Optional[torch.device] = None):
        self.index = index
        self.num_stages = num_stages
        self.module = module
        self.start = start
        self._device = None if device is None else torch.device(device)
        self._found_device: Optional[torch.device] = None  # where the layers are, found once per step (reset)
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.uses_skips = isinstance(module, SkipSequential)
        # micro-batch -> (input, output or scaled loss, skips used, skips saved)
        self._stash: Dict[int, Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor],
                                     Dict[str, torch.Tensor]]] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.losses: Dict[int, torch.Tensor] = {}
        self.peak_in_flight = 0
        self.saved_bytes = 0  # autograd-saved activation bytes of one micro-batch (kept while it is in flight)
        self.recompute = False  # --recompute full: keep the input, run the forward again in the backward
        self.recompute_bytes = 0  # autograd-saved bytes of one micro-batch's recompute (one at a time)
        self.recomputing = False  # inside a recompute (a split backward records only this forward's graph)
        self._replays: Dict[int, Tuple[Callable[[], None], Optional[Dict[str, torch.Tensor]],
                                       Optional[torch.Tensor], Optional[Callable], float]] = {}
        self.forward_busy = 0.0   # seconds of forward in the current step
        self.backward_busy = 0.0  # seconds of backward in the current step

    @property
    def layers(self) -> str:
        stop = self.start + len(self.module) - 1
        return f"layer {self.start}" if stop == self.start else f"layers {self.start}-{stop}"

    @property
    def activation_peak_bytes(self) -> int:
        """Estimated peak bytes of activations saved for backward: one micro-batch's ``saved_bytes`` per
        micro-batch in flight, plus one recompute's."""
        return self.peak_in_flight * self.saved_bytes + self.recompute_bytes

    @property
    def busy(self) -> float:
        """Seconds of forward and backward in the current step."""
        return self.forward_busy + self.backward_busy

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if self._found_device is None:  # looked up once per step: each receive buffer asks
            self._found_device = module_device(self.module)
        return self._found_device

    def output_spec(self, input_spec: TensorSpec, skip_specs: Optional[Dict[str, TensorSpec]] = None
                    ) -> Tuple[TensorSpec, Dict[str, TensorSpec]]:
        """The output of one micro-batch and the skips the stage saves for later stages, given its input
        and the skips it uses; found on the meta device (no compute, no state change)."""
        meta = torch.device("meta")
        state = {name: torch.empty_like(t, device=meta)
                 for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]}
        skips = {name: spec.empty(meta) for name, spec in (skip_specs or {}).items()}
        with torch.no_grad():
            args = (input_spec.empty(meta), skips) if self.uses_skips else (input_spec.empty(meta),)
            out = functional_call(self.module, state, args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"stage {self.index} ({self.layers}) returns {type(out).__name__}; pipeline "
                            f"stages must pass a single tensor to the next stage")
        return TensorSpec.of(out), {name: TensorSpec.of(t) for name, t in skips.items()}

    def _call(self, x: torch.Tensor, skips: Dict[str, torch.Tensor],
              weights: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        args = (x, skips) if self.uses_skips else (x,)
        if weights is None:
            return self.module(*args)
        return functional_call(self.module, weights, args)  # the module's own buffers (BatchNorm statistics)

    def reset(self) -> None:
        """Forget what a previous (possibly failed) step left behind."""
        self._stash.clear()
        self._found_device = None  # the layers may have moved between steps
        self._replays.clear()
        self.outputs.clear()
        self.losses.clear()
        self.forward_busy = self.backward_busy = 0.0

    def forward(self, microbatch: int, x: torch.Tensor, *, train: bool,
                target: Optional[torch.Tensor] = None,
                loss_fn: Optional[Callable] = None, scale: float = 1.0,
                skips: Optional[Dict[str, torch.Tensor]] = None,
                weights: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Run the stage on one micro-batch, using ``skips`` (those saved by earlier stages that
        this stage uses) and, when given, ``weights`` (parameter name -> tensor: a stashed weight
        version, which then gets the gradient instead of the parameters). Returns the output
        activation and the skips this stage saves for later stages."""
        used = dict(skips or {})
        saved = dict(used)  # the stage takes out what it uses and puts in what it saves
        if not train:
            with torch.no_grad():
                y = self._call(x, saved)
            if self.is_last:
                self.outputs[microbatch] = y
                if loss_fn is not None and target is not None:
                    self.losses[microbatch] = loss_fn(y, target).detach()
            return y, saved
        if not self.is_first and x.is_floating_point():
            x.requires_grad_(True)
        for tensor in used.values():
            if tensor.is_floating_point():
                tensor.requires_grad_(True)
        if self.recompute:
            return self._forward_to_recompute(microbatch, x, used, target, loss_fn, scale, weights)
        if microbatch == 0:
            y = self._forward_counting_saved(x, saved, weights)
        else:
            y = self._call(x, saved, weights)
        if self.is_last:
            assert loss_fn is not None  # a training step checks that the pipeline has one first
            loss = loss_fn(y, target)
            self.outputs[microbatch] = y.detach()
            self.losses[microbatch] = loss.detach()
            self._stash[microbatch] = (x, loss * scale, used, saved)
        else:
            self._stash[microbatch] = (x, y, used, saved)
        self.peak_in_flight = max(self.peak_in_flight, len(self._stash))
        return y, saved

    def _forward_to_recompute(self, microbatch: int, x: torch.Tensor, used: Dict[str, torch.Tensor],
                              target: Optional[torch.Tensor], loss_fn: Optional[Callable], scale: float,
                              weights: Optional[Dict[str, torch.Tensor]]
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The forward of ``--recompute full``: the same operations as with the graph kept (grad mode), but
        nothing saved for the backward; the stash keeps the input, the skips used and how to restore the
        RNG state for :meth:`_recompute`."""
        restore_rng = _rng_restorer(x.device)
        saved = dict(used)
        with nothing_saved():
            y = self._call(x, saved, weights)
            if self.is_last:
                assert loss_fn is not None  # a training step checks that the pipeline has one first
                self.losses[microbatch] = loss_fn(y, target).detach()
        y = y.detach()
        if self.is_last:
            self.outputs[microbatch] = y
        self._stash[microbatch] = (x, y, used, {})
        self._replays[microbatch] = (restore_rng, weights, target, loss_fn, scale)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [x, *used.values()]}
        self.saved_bytes = sum(storages.values())
        self.peak_in_flight = max(self.peak_in_flight, len(self._stash))
        return y, {name: tensor.detach() for name, tensor in saved.items()}

    def _recompute(self, microbatch: int, x: torch.Tensor, used: Dict[str, torch.Tensor]
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Micro-batch ``microbatch``'s forward again, with its graph: the forward's RNG state (the live
        one put back after), the buffers left as the forward left them. Returns the output (the scaled
        loss on the last stage) and the skips saved."""
        restore_rng, weights, target, loss_fn, scale = self._replays.pop(microbatch)
        saved = dict(used)
        live_rng = _rng_restorer(x.device)
        restore_rng()
        self.recomputing = True
        try:
            with scratch_buffers(self.module):
                with counting_saved_bytes([*self.module.parameters(), *(weights or {}).values()]) as seen:
                    y = self._call(x, saved, weights)  # counted as without recompute: the loss not
                if self.is_last:
                    assert loss_fn is not None
                    y = loss_fn(y, target) * scale
        finally:
            self.recomputing = False
            live_rng()
        if microbatch == 0:
            self.recompute_bytes = sum(seen.values())
        return y, saved

    def _forward_counting_saved(self, x: torch.Tensor, skips: Dict[str, torch.Tensor],
                                weights: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        with counting_saved_bytes([*self.module.parameters(), *(weights or {}).values()]) as seen:
            y = self._call(x, skips, weights)
        self.saved_bytes = sum(seen.values())
        return y

    def held(self, microbatch: int) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor],
                                             Dict[str, torch.Tensor]]:
        """What a backward of ``microbatch`` starts from (still held): its input, output (the scaled loss on the
        last stage), skips used and skips saved, with their graph: under recompute the forward is run again
        here, once. Local."""
        x, y, used, saved = self._stash[microbatch]
        if microbatch in self._replays:
            y, saved = self._recompute(microbatch, x, used)
            self._stash[microbatch] = (x, y, used, saved)
        return x, y, used, saved

    def backward(self, microbatch: int, grad_output: Optional[torch.Tensor] = None,
                 skip_grads: Optional[Dict[str, torch.Tensor]] = None
                 ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Back-propagate one micro-batch from the output (with ``grad_output``, or the loss on the
        last stage) and from the skips the stage saved (with their ``skip_grads``), in one pass.

        Returns the gradient of the stage's input (None on the first stage) and of each skip it
        used (zeros where the input or a skip did not get one)."""
        x, y, used, saved = self.held(microbatch)
        del self._stash[microbatch]
        roots, grads = [], []
        if y.requires_grad:
            roots.append(y)
            grads.append(None if self.is_last else grad_output)
        for name, tensor in saved.items():
            if tensor.requires_grad:
                assert skip_grads is not None  # a stage whose saved skips need gradients is given them
                roots.append(tensor)
                grads.append(skip_grads[name])
        if roots:
            torch.autograd.backward(roots, grads)
        used_grads = {name: t.grad if t.grad is not None else torch.zeros_like(t) for name, t in used.items()}
        if self.is_first:
            return None, used_grads
        return (x.grad if x.grad is not None else torch.zeros_like(x)), used_grads

    def gathered_outputs(self) -> Optional[torch.Tensor]:
        """The last stage's outputs of all micro-batches, in order."""
        if not self.is_last or not self.outputs:
            return None
        return torch.cat([self.outputs[i] for i in sorted(self.outputs)])

    def mean_loss(self) -> Optional[float]:
        """Mean of the micro-batch losses (the full-batch mean for equal micro-batches)."""
        if not self.losses:
            return None
        values: List[torch.Tensor] = [self.losses[i] for i in sorted(self.losses)]
        return float(torch.stack(values).double().mean())


def _rng_restorer(device: torch.device) -> Callable[[], None]:
    """A function that puts back the CPU generator's state of now (and ``device``'s, if a CUDA device)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    return restore
