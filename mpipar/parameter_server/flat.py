"""A model's trainable parameters as one flat buffer per server: weights and gradients are views."""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

from mpipar.parameter_server.placement import assign_to_servers

__all__ = ["FlatShares"]


class FlatShares:
    """The trainable parameters of ``model`` grouped by server (:func:`assign_to_servers`), each
    group one contiguous buffer: ``weights[s]`` and ``grads[s]``, with every parameter's ``.data``
    and ``.grad`` a view into them, so a server's share moves in one message. ``present[s][i]`` is
    1 once parameter i of server s received a gradient since :meth:`zero_grads` (a hook), 0 for a
    parameter the backward never reached. Local; every rank of a job builds it from the same model
    and gets the same grouping.

    Raises:
        ValueError: when the trainable parameters differ in dtype or device, or there are
            fewer of them than servers.
    """

    def __init__(self, model: nn.Module, servers: int):
        params, owner = self.check(model, servers)
        self.params: List[List[nn.Parameter]] = [[p for p, o in zip(params, owner) if o == s]
                                                 for s in range(servers)]
        self.weights: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []
        with torch.no_grad():
            for group in self.params:
                weights = torch.cat([p.detach().reshape(-1) for p in group])
                grads = torch.zeros_like(weights)
                offset = 0
                for p in group:
                    p.data = weights[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                self.weights.append(weights)
                self.grads.append(grads)
        self.present: List[np.ndarray] = [np.zeros(len(group)) for group in self.params]
        for flags, group in zip(self.present, self.params):
            for index, p in enumerate(group):
                p.register_post_accumulate_grad_hook(lambda _, flags=flags, index=index: flags.__setitem__(index, 1.0))
        self.attach_grads()

    @staticmethod
    def check(model: nn.Module, servers: int):
        """The trainable parameters and their servers; raises ValueError as the class does. Local."""
        params = [p for p in model.parameters() if p.requires_grad]
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"the parameter server needs one dtype and device for all trainable parameters, "
                             f"got {sorted(map(str, kinds))}")
        return params, assign_to_servers([p.numel() for p in params], servers)

    def attach_grads(self, server=None, present=None) -> None:
        """Make every parameter's ``.grad`` (of one server's share, or all) a view into ``grads``
        (after an optimizer's ``zero_grad`` set them to None); with ``present`` (one server's
        flags), None where its flag is 0, so an optimizer leaves that parameter alone."""
        for s in (range(len(self.params)) if server is None else [server]):
            offset = 0
            for index, p in enumerate(self.params[s]):
                keep = present is None or present[index]
                p.grad = self.grads[s][offset:offset + p.numel()].view_as(p) if keep else None
                offset += p.numel()

    def zero_grads(self) -> None:
        """Zero every gradient and presence flag (before a backward)."""
        for grads, flags in zip(self.grads, self.present):
            grads.zero_()
            flags[:] = 0.0

    def numel(self, server: int) -> int:
        return self.weights[server].numel()
