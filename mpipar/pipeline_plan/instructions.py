"""The instructions of a pipeline schedule's streams: small named steps, each for one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Instruction", "RecvActivation", "Forward", "SendActivation", "RecvGrad", "Backward", "SendGrad",
           "BackwardInput", "BackwardWeight", "Update", "SkipInstruction", "SendSkip", "RecvSkip", "SendSkipGrad",
           "RecvSkipGrad"]


@dataclass(frozen=True)
class Instruction:
    """One step of a stage's stream, for one micro-batch."""

    stage: int
    microbatch: int
    code = "?"

    def __str__(self) -> str:
        return f"{self.code}{self.microbatch}"


@dataclass(frozen=True)
class RecvActivation(Instruction):
    """Receive the input activation of ``microbatch`` from stage ``stage - 1``."""

    code = "ra"


@dataclass(frozen=True)
class Forward(Instruction):
    """Run the stage's layers on ``microbatch`` (and the loss, on the last stage)."""

    code = "F"


@dataclass(frozen=True)
class SendActivation(Instruction):
    """Send the output activation of ``microbatch`` to stage ``stage + 1``."""

    code = "sa"


@dataclass(frozen=True)
class RecvGrad(Instruction):
    """Receive the gradient of this stage's output from stage ``stage + 1``."""

    code = "rg"


@dataclass(frozen=True)
class Backward(Instruction):
    """Back-propagate ``microbatch`` through the stage, accumulating into ``.grad``."""

    code = "B"


@dataclass(frozen=True)
class SendGrad(Instruction):
    """Send the gradient of this stage's input to stage ``stage - 1``."""

    code = "sg"


@dataclass(frozen=True)
class BackwardInput(Instruction):
    """The first half of a split backward (zero-bubble): the gradient of the stage's input only, on the
    critical path; the graph is kept for :class:`BackwardWeight`."""

    code = "I"


@dataclass(frozen=True)
class BackwardWeight(Instruction):
    """The second half of a split backward: the gradients of the stage's weights (into ``.grad``), deferred
    into the bubble; frees what the micro-batch held. No peer."""

    code = "W"


@dataclass(frozen=True)
class Update(Instruction):
    """Apply the gradient that the backward of ``microbatch`` completed on ``stage`` (asynchronous
    schedules): the stage's weights become their next version. No peer."""

    code = "U"


@dataclass(frozen=True)
class SkipInstruction(Instruction):
    """A skip tensor (or its gradient) of ``microbatch`` between ``stage`` and stage ``peer``.

    ``skip`` numbers the skip among those that cross stages (the executor's list).
    """

    skip: int = 0
    peer: int = 0

    def __str__(self) -> str:
        return f"{self.code}{self.microbatch}.{self.skip}"


@dataclass(frozen=True)
class SendSkip(SkipInstruction):
    """Send skip ``skip`` of ``microbatch``, saved on ``stage``, to the later stage ``peer`` that uses it."""

    code = "ss"


@dataclass(frozen=True)
class RecvSkip(SkipInstruction):
    """Receive skip ``skip`` of ``microbatch`` for ``stage`` from the earlier stage ``peer`` that saved it."""

    code = "rs"


@dataclass(frozen=True)
class SendSkipGrad(SkipInstruction):
    """Send the gradient of skip ``skip`` of ``microbatch`` from ``stage`` (its user) back to stage ``peer``."""

    code = "sk"


@dataclass(frozen=True)
class RecvSkipGrad(SkipInstruction):
    """Receive the gradient of skip ``skip`` of ``microbatch`` for ``stage`` (which saved it) from stage ``peer``."""

    code = "rk"
