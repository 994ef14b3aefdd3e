"""What a step's settings change in the cost model: optimizer, precision, gradient wire, compression, recompute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

__all__ = ["TrainingOptions", "OPTIMIZER_STATE_BYTES", "PRECISIONS", "GRAD_WIRES", "RECOMPUTE",
           "ASSUMED_COMPUTE_RATIO", "ASSUMED_ACTIVATION_RATIO", "ASSUMED_MATMUL_FLOPS", "compute_ratio"]

OPTIMIZER_STATE_BYTES = {"sgd": 4, "adamw": 8}  # per fp32 parameter: SGD's momentum; AdamW's two moments
PRECISIONS = ("fp32", "bf16", "fp16")
GRAD_WIRES = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "full")
# Assumptions where the machine file measured nothing (labelled as such wherever they are used):
ASSUMED_COMPUTE_RATIO = 1.0  # a 16-bit autocast step takes as long as fp32 (CPUs without bf16 units)
ASSUMED_ACTIVATION_RATIO = 0.5  # autocast's saved activations are 16-bit: half of fp32's
ASSUMED_MATMUL_FLOPS = 5e9  # PowerSGD's thin fp32 matrix products: 5 GFLOP/s on one core


@dataclass(frozen=True)
class TrainingOptions:
    """The settings of a step the cost model prices beyond the strategy and layout. Raises ValueError.

    Attributes:
        optimizer: ``sgd`` (momentum: 4 bytes of state per parameter) or ``adamw`` (8 bytes).
        precision: autocast dtype (``fp32``: none); master weights, gradients and state stay fp32.
        grad_wire: the dtype gradients travel in (``bf16``/``fp16``: Alltoall + Allgather of 16-bit chunks).
        recompute: ``none`` or ``full`` (each layer's forward run again in the backward; only its input kept).
        powersgd_rank: PowerSGD's rank r (0: no compression).
    """

    optimizer: str = "sgd"
    precision: str = "fp32"
    grad_wire: str = "fp32"
    recompute: str = "none"
    powersgd_rank: int = 0

    def __post_init__(self):
        for name, value, allowed in (("optimizer", self.optimizer, tuple(OPTIMIZER_STATE_BYTES)),
                                     ("precision", self.precision, PRECISIONS),
                                     ("grad-wire", self.grad_wire, GRAD_WIRES),
                                     ("recompute", self.recompute, RECOMPUTE)):
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {list(allowed)} for the cost model, got {value!r}")
        if self.powersgd_rank < 0:
            raise ValueError(f"the PowerSGD rank must be >= 1 (0: none), got {self.powersgd_rank}")
        if self.powersgd_rank and self.grad_wire != "fp32":
            raise ValueError("PowerSGD and a 16-bit gradient wire are two ways of compressing: choose one")

    @property
    def state_bytes(self) -> int:
        """Optimizer state per fp32 parameter, in bytes."""
        return OPTIMIZER_STATE_BYTES[self.optimizer]

    @property
    def compression(self) -> str:
        """How gradients are compressed on the wire: ``""``, ``"bf16 wire"`` or ``"powersgd:R"``."""
        if self.powersgd_rank:
            return f"powersgd:{self.powersgd_rank}"
        return "" if self.grad_wire == "fp32" else f"{self.grad_wire} wire"

    @classmethod
    def from_settings(cls, config: Any) -> TrainingOptions:
        """The options of a run's config (any object with some of ``optimizer``, ``precision``,
        ``grad_wire``, ``recompute``, ``compress`` such as ``"powersgd:4"``); absent ones keep their default.
        Raises ValueError for what the cost model does not know (e.g. ``recompute="selective"``)."""
        compress = str(getattr(config, "compress", "") or "none")
        name, _, rank = compress.partition(":")
        if compress != "none" and (name != "powersgd" or not rank.isdigit()):
            raise ValueError(f"the cost model knows no compression {compress!r} (only powersgd:RANK)")
        return cls(getattr(config, "optimizer", "sgd"), getattr(config, "precision", "fp32") or "fp32",
                   getattr(config, "grad_wire", "fp32") or "fp32", getattr(config, "recompute", "none") or "none",
                   int(rank or 0))


def compute_ratio(ratios: Dict[str, float], precision: str) -> Tuple[float, bool]:
    """(seconds of a layer under ``precision``'s autocast / under fp32, whether measured): the machine
    file's ``compute_ratio`` when it has the precision, else :data:`ASSUMED_COMPUTE_RATIO`. Pure."""
    if precision == "fp32":
        return 1.0, True
    if precision in ratios:
        return float(ratios[precision]), True
    return ASSUMED_COMPUTE_RATIO, False
