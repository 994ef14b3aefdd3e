"""DiLoCo's outer optimizer: SGD with Nesterov momentum on the global weights, along global - average."""

from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["OuterOptimizer"]


class OuterOptimizer:
    """The global weights of the last average and the SGD that moves them (DiLoCo).

    :meth:`step` is called with ``params`` holding the ranks' average: the outer
    gradient is ``global - average`` (the descent direction the ranks found since the
    last average, as a gradient), the global weights take one SGD step with it
    (``lr``, Nesterov ``momentum``), and ``params`` become the new global weights. With
    lr 1 and momentum 0 that is the average itself; lr < 1 stays short of it, momentum
    carries on in the direction of earlier averages.

    Local: no communication (every rank keeps the same global weights and momentum,
    since every rank steps them with the same average).

    Args:
        params: the parameters that are averaged (the model's trainable ones).
        lr: outer learning rate.
        momentum: outer Nesterov momentum (0: plain SGD).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], *, lr: float, momentum: float):
        self.params = list(params)
        self.global_params: List[torch.Tensor] = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.SGD(self.global_params or [torch.zeros(0)], lr=lr, momentum=momentum,
                                         nesterov=momentum > 0)

    @torch.no_grad()
    def reset(self) -> None:
        """Take the parameters as they are as the global weights (e.g. after synchronous warm-up steps)."""
        for global_param, param in zip(self.global_params, self.params):
            global_param.copy_(param)

    @torch.no_grad()
    def step(self) -> None:
        """``params`` hold the average: step the global weights along global - average and put
        the result into ``params``."""
        for global_param, param in zip(self.global_params, self.params):
            global_param.grad = global_param - param
        self.optimizer.step()
        for global_param, param in zip(self.global_params, self.params):
            param.copy_(global_param)
            global_param.grad = None

    def state_dict(self) -> dict:
        return {"global": [t.detach().cpu().clone() for t in self.global_params],
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for global_param, saved in zip(self.global_params, state["global"]):
            global_param.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
