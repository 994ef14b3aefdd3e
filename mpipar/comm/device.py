"""Which device each rank computes on: one GPU per rank, chosen by the node-local rank."""

from __future__ import annotations

import os
from typing import Any

import torch
from mpi4py import MPI

from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check

__all__ = ["DEVICE_CHOICES", "select_device", "node_rank", "to_device", "describe", "module_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def node_rank(comm: MPI.Intracomm) -> tuple:
    """(this rank's index among the ranks of ``comm`` on its node, how many there are). Collective."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def select_device(comm: MPI.Intracomm, requested: str = "auto") -> torch.device:
    """This rank's device. Collective over ``comm``; errors are raised on every rank.

    ``cpu``: the CPU. ``cuda``: GPU number (node-local rank mod visible GPUs), so
    ranks of a node spread over its GPUs; ``CUDA_VISIBLE_DEVICES`` and Slurm's GPU
    binding (``--gpus-per-task=1``/``--gpu-bind``, one visible GPU per task) are
    respected because only visible GPUs are counted. The GPU is made current
    (``torch.cuda.set_device``). ``auto``: ``cuda`` when every rank sees a GPU,
    else ``cpu`` on every rank.

    Raises:
        ValueError: an unknown choice, or ``cuda`` while some rank sees no GPU
            (those ranks are named).
    """
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")
    local, _ = node_rank(comm)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    counts = collectives.allgather(comm, visible, "visible GPUs")
    if requested == "auto":
        requested = "cuda" if min(counts) > 0 else "cpu"

    def check() -> None:
        without = [rank for rank, count in enumerate(counts) if count == 0]
        if requested == "cuda" and without:
            built = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no visible GPU"
            visible_env = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
            raise ValueError(f"cuda asked for, but rank(s) {without} see no GPU (rank {comm.Get_rank()}: {built}, "
                             f"CUDA_VISIBLE_DEVICES={visible_env}); use --device cpu or auto")

    collective_check(comm, check, "--device")
    if requested == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", local % visible)
    torch.cuda.set_device(device)
    return device


def describe(comm: MPI.Intracomm, device: torch.device) -> str:
    """One line for the log: the devices of all ranks and how many ranks share each. Collective."""
    if device.type == "cpu":
        mine = "cpu"
    else:
        mine = f"{MPI.Get_processor_name()}:{device} ({torch.cuda.get_device_name(device)})"
    everyone = collectives.allgather(comm, mine, "devices")
    if set(everyone) == {"cpu"}:
        return "device: cpu on every rank"
    shared = {name: everyone.count(name) for name in dict.fromkeys(everyone)}
    parts = [f"{name} x{count}" if count > 1 else name for name, count in shared.items()]
    note = "; ranks share a GPU (slower than one each)" if any(c > 1 for c in shared.values()) else ""
    return f"devices: {', '.join(parts)}{note}"


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s first parameter or buffer is; the CPU when it has none."""
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
