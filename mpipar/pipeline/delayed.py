"""The delayed-gradient reference: one process applies each stage's gradients with a given staleness."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from mpipar.models.skip import SkipSequential
from mpipar.pipeline.versions import step_with_decay_share
from mpipar.pipeline_plan.schedule import Schedule

__all__ = ["DelayedGradientSGD"]


class DelayedGradientSGD:
    """Trains ``model`` on one process as an asynchronous pipeline would, without a pipeline.

    The layers are cut into stages (``balance`` layers each). Update ``u`` of stage ``s``
    applies the gradient of the mean loss over the micro-batches of its group (each
    ``update_every`` consecutive micro-batches, loss divided by ``microbatches`` as in a
    pipeline) computed with stage ``s`` at weight version ``max(0, u - staleness[s])``
    (``u`` updates applied), to the newest weights, version ``u``, with the stage's own
    optimizer, its weight decay scaled by the update's part of a batch (``update_every /
    microbatches``); parameters no gradient reached keep ``.grad`` None. ``pipedream`` is
    ``update_every=1, staleness=[p-1, ..., 0]``; ``2bw`` ``update_every=m, staleness=[1, ...]``
    (:meth:`for_schedule`). With every staleness
    0 and ``update_every=m`` it is ordinary SGD with micro-batch gradient accumulation,
    bitwise. Nothing here communicates.

    Args:
        model: an ``nn.Sequential`` (or :class:`SkipSequential`); its parameters are the newest weights.
        balance: layers per stage.
        staleness: per stage, how many versions behind the newest a gradient is computed.
        update_every: micro-batches per update.
        microbatches: micro-batches per batch (:meth:`step` splits its batch into them).
        optimizer: ``optimizer(parameters)`` makes one stage's optimizer.
        loss_fn: ``loss_fn(output, target)``, a mean over samples.

    Raises:
        ValueError: balance not covering the model, a staleness per stage missing or negative.
    """

    def __init__(self, model: nn.Sequential, balance: Sequence[int], staleness: Sequence[int], *, update_every: int,
                 microbatches: int, optimizer: Callable[[List[nn.Parameter]], torch.optim.Optimizer],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if sum(balance) != len(model) or min(balance) < 1:
            raise ValueError(f"balance {list(balance)} must split the {len(model)} layers into stages of >= 1")
        if len(staleness) != len(balance) or min(staleness) < 0:
            raise ValueError(f"need a staleness >= 0 for each of {len(balance)} stages, got {list(staleness)}")
        bounds = [sum(balance[:s]) for s in range(len(balance) + 1)]
        self.parts = [model[bounds[s]:bounds[s + 1]] for s in range(len(balance))]
        self.staleness, self.update_every, self.microbatches = list(staleness), update_every, microbatches
        self.loss_fn = loss_fn
        self.optimizers = [optimizer(list(part.parameters())) for part in self.parts]
        self.updates = 0  # per stage alike: every stage applies update u after the same micro-batches
        self.seen = 0  # micro-batches processed
        self.history: List[Dict[int, Dict[str, torch.Tensor]]] = [{} for _ in self.parts]
        self._gradients: List[Optional[List[Optional[torch.Tensor]]]] = [None] * len(self.parts)

    @classmethod
    def for_schedule(cls, model: nn.Sequential, balance: Sequence[int], schedule: Schedule, **kwargs):
        """The reference with ``schedule``'s steady-state staleness and update period."""
        return cls(model, balance, schedule.staleness(), update_every=schedule.update_period,
                   microbatches=schedule.microbatches, **kwargs)

    def _weights(self, stage: int, version: int) -> Dict[str, torch.Tensor]:
        history = self.history[stage]
        if version not in history:
            if version != self.updates:
                raise RuntimeError(f"stage {stage}: version {version} was not kept (newest {self.updates})")
            history[version] = {name: p.detach().clone().requires_grad_(p.requires_grad)
                                for name, p in self.parts[stage].named_parameters()}
        return history[version]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One batch, micro-batch by micro-batch; returns its mean loss."""
        losses = []
        for x, target in zip(inputs.chunk(self.microbatches), targets.chunk(self.microbatches)):
            version = self.updates  # this micro-batch's gradient goes to update ``updates``
            weights = [self._weights(s, max(0, version - self.staleness[s])) for s in range(len(self.parts))]
            skips: Dict[str, torch.Tensor] = {}
            for part, w in zip(self.parts, weights):
                x = functional_call(part, w, (x, skips) if isinstance(part, SkipSequential) else (x,))
            loss = self.loss_fn(x, target)
            losses.append(loss.detach())
            (loss / self.microbatches).backward()
            for s, w in enumerate(weights):
                grads = [t.grad for t in w.values()]
                for t in w.values():
                    t.grad = None
                accumulated = self._gradients[s]
                self._gradients[s] = grads if accumulated is None else [
                    g if a is None else a if g is None else a.add_(g) for a, g in zip(accumulated, grads)]
            self.seen += 1
            if self.seen % self.update_every == 0:
                self._update()
        return float(torch.stack(losses).double().mean())

    def _update(self) -> None:
        for s, (part, optimizer) in enumerate(zip(self.parts, self.optimizers)):
            params, gradients = list(part.parameters()), self._gradients[s]
            assert gradients is not None  # every part has had a backward since the last update
            for p, g in zip(params, gradients):
                p.grad = g
            step_with_decay_share(optimizer, self.update_every / self.microbatches)
            for p in params:
                p.grad = None
            self._gradients[s] = None
        self.updates += 1
        for s, history in enumerate(self.history):  # keep the versions later micro-batches use, the new one too
            oldest = max(0, self.updates - self.staleness[s])
            self.history[s] = {v: w for v, w in history.items() if v >= oldest}
            self._weights(s, self.updates)
