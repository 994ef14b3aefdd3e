"""Mixed precision for the loop: autocast, and fp16 loss scaling whose overflow verdict every rank shares."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor

__all__ = ["PRECISIONS", "autocast_dtype", "check_precision", "check_strategy_precision", "check_strategy_compress",
           "autocast", "LossScaler"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--precision`` names -> the autocast dtype (None: no autocast)."""


def autocast_dtype(name: str) -> Optional[torch.dtype]:
    """The autocast dtype of a ``--precision`` name. Pure. Raises ValueError naming the choices."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


def check_precision(name: str, device: torch.device) -> None:
    """Raise ValueError when ``device`` cannot run ``--precision name``: autocast unavailable there, or
    a small linear layer's forward and backward fail under it. Local (callers agree on the verdict)."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return
    device = torch.device(device)
    hint = "use --precision fp32, or another --device"
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"--precision {name}: torch has no autocast for {device.type} devices; {hint}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         f"use --precision fp16 or fp32")
    try:
        layer = torch.nn.Linear(4, 2).to(device)
        with torch.autocast(device.type, dtype=dtype):
            out = layer(torch.ones(3, 4, device=device))
        out.float().sum().backward()
        if out.dtype != dtype:
            raise RuntimeError(f"a linear layer gave {out.dtype}")
    except RuntimeError as error:
        raise ValueError(f"--precision {name} does not run on {device}: {error}; {hint}") from None


def check_strategy_precision(name: str, strategy) -> None:
    """Raise ValueError when ``strategy`` cannot train at ``--precision name``: the strategy lists what it
    takes in ``precisions`` (absent: fp32 only), and fp16 needs the loop's loss scaling, which a strategy
    that steps its own optimizer (asynchronous pipelines, parameter servers, local SGD, ZeRO) or has no
    ``bind_loss_scaler`` cannot take. Local (the same on every rank)."""
    offered = tuple(getattr(strategy, "precisions", ("fp32",)))
    if name not in offered:
        raise ValueError(f"{strategy.name} cannot train with --precision {name} (it takes {', '.join(offered)})")
    if name == "fp16" and (getattr(strategy, "steps_optimizer", False)
                           or not hasattr(strategy, "bind_loss_scaler")):
        raise ValueError(f"--precision fp16 needs loss scaling, which the loop does around its optimizer step; "
                         f"{strategy.name} cannot take it (it steps its own optimizer or scales no loss); use "
                         f"--precision bf16 (no scaling) or fp32")


def check_strategy_compress(name: str, strategy) -> None:
    """Raise ValueError when ``strategy`` does not apply ``--compress name``: a strategy that compresses
    says so in ``compress`` (the flag's value it was built with; absent: none). Data parallelism does;
    ZeRO, local SGD, the parameter server, pipelines and tensor parallelism do not. Local (the same on
    every rank)."""
    taken = getattr(strategy, "compress", None)
    if taken is None and name != "none":
        raise ValueError(f"{strategy.name} cannot take --compress {name} (PowerSGD compresses the gradients of "
                         f"plain data parallelism; use --compress none here)")
    if taken is not None and name != taken:
        raise ValueError(f"{strategy.name} was built with compress={taken!r}, the run asks for --compress {name}: "
                         f"build it with the run's (session.config.compress)")


def autocast(name: str, device: torch.device):
    """The autocast context of ``--precision name`` on ``device`` (a null context for fp32). Local."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class LossScaler:
    """Dynamic loss scaling for fp16, as ``torch.amp.GradScaler`` does it, with one overflow verdict for all.

    A step: the strategy backpropagates :meth:`scale` ``(loss)``; after the gradients are reduced,
    :meth:`unscale` divides them by the scale and returns whether any rank of ``comm`` found an inf
    or NaN (one Allreduce MAX of this rank's flag over ``comm``, the world: data, pipeline and
    tensor-parallel ranks skip the same step); the caller skips the optimizer step then; :meth:`update`
    halves the scale after an overflow and doubles it after ``growth_interval`` clean steps.

    Collective contract: every rank of ``comm`` calls :meth:`unscale` once per step, together.
    Size 1: nothing is communicated.
    """

    def __init__(self, comm: MPI.Intracomm, *, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError(f"loss scaling needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                             f"growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.comm = comm
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (backpropagate this). Local."""
        return loss * self.scale_value

    def unscale(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale; True when some rank of ``comm`` has an inf or NaN in one.
        Collective over ``comm`` (one Allreduce MAX of a flag)."""
        inverse = 1.0 / self.scale_value
        found = False
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inverse)
                    found = found or not bool(torch.isfinite(p.grad).all())
        flag = torch.tensor([float(found)])
        mpi_tensor.allreduce_(flag, self.comm, op=MPI.MAX)
        return bool(flag.item() > 0)

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow, grow after ``growth_interval`` steps without one. Local."""
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self.growth_tracker = float(state["scale"]), int(state["growth_tracker"])
