"""Run configuration: a frozen dataclass validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from mpipar.comm.compress import parse_compress

__all__ = ["TrainConfig", "OPTIMIZERS", "GRAD_WIRES", "PRECISIONS", "RECOMPUTES"]

OPTIMIZERS = ("sgd", "adamw")
GRAD_WIRES = ("fp32", "bf16", "fp16")
PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTES = ("none", "full", "selective")  # mpipar.run.recompute


@dataclass(frozen=True)
class TrainConfig:
    """What a training job was asked to do. Raises ValueError naming the bad field.

    ``batch_size`` is per rank; ``max_steps`` (optional) stops after that many
    optimizer steps in total; ``threads`` is torch's intra-op threads per rank;
    ``device``: ``cpu``, ``cuda`` (one GPU per rank) or ``auto`` (cuda when every rank has one);
    ``trace_steps``: ``(first, last)`` loop steps (0-based, inclusive) whose timed events are
    recorded in the metrics file's ``/events``, or None (none); ``augment``: image training samples
    cropped at random from a border of this many pixels and flipped half the time (None: as stored);
    ``recompute``: activation recompute (``none``, ``full``, ``selective``; :mod:`mpipar.run.recompute`).
    """

    data: str = "fashion-mnist"
    epochs: int = 5
    max_steps: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "runs/latest"
    threads: int = 1
    model: str = "resnet-small"
    bucket_mb: float = 25.0
    flush_every: int = 50
    log_every: float = 10.0
    checkpoint_every: int = 0
    device: str = "auto"
    trace_steps: Optional[Tuple[int, int]] = None
    optimizer: str = "sgd"
    augment: Optional[int] = None
    grad_wire: str = "fp32"
    precision: str = "fp32"
    recompute: str = "none"
    compress: str = "none"

    def __post_init__(self):
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "threads": self.threads, "bucket_mb": self.bucket_mb, "flush_every": self.flush_every}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"--momentum and --weight-decay must be >= 0, got {self.momentum}, {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.trace_steps is not None:
            first, last = self.trace_steps
            if not 0 <= first <= last:
                raise ValueError(f"--trace-steps must be FIRST-LAST with 0 <= FIRST <= LAST, got {first}-{last}")
        if self.augment is not None and self.augment < 0:
            raise ValueError(f"--augment must be >= 0 pixels of padding, got {self.augment}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.grad_wire not in GRAD_WIRES:
            raise ValueError(f"--grad-wire must be one of {', '.join(GRAD_WIRES)}, got {self.grad_wire!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.recompute not in RECOMPUTES:
            raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTES)}, got {self.recompute!r}")
        parse_compress(self.compress)  # ValueError naming --compress
        if self.compress != "none" and self.grad_wire != "fp32":
            raise ValueError(f"--compress {self.compress} sends factors in the gradients' dtype; it does not "
                             f"combine with --grad-wire {self.grad_wire}")
        if self.compress != "none" and self.precision == "fp16":
            raise ValueError(f"--compress {self.compress} keeps an error across steps, which fp16's loss scale "
                             f"changes and its skipped steps would spoil; use --precision bf16 or fp32")
        if self.log_every < 0:
            raise ValueError(f"--log-every must be >= 0, got {self.log_every}")

    def to_dict(self) -> dict:
        settings = dataclasses.asdict(self)
        if settings["optimizer"] == "sgd":  # the default: absent, as before the flag existed
            del settings["optimizer"]
        for name in ("grad_wire", "precision"):  # likewise
            if settings[name] == "fp32":
                del settings[name]
        if settings["recompute"] == "none":
            del settings["recompute"]
        if settings["compress"] == "none":  # likewise
            del settings["compress"]
        return settings
