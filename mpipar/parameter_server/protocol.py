"""The messages between workers and servers: tags and the fixed-size control records (float64)."""

from __future__ import annotations

import numpy as np

from mpipar.comm import mpi_tensor

__all__ = ["wait_any", "TAG_CONTROL", "TAG_GRADIENT", "TAG_REPLY", "TAG_WEIGHTS", "PUSH", "REQUEST", "PULL",
           "control", "reply", "Control", "Reply"]

# Tags by message type; a pair of ranks never confuses one type for another.
TAG_CONTROL, TAG_GRADIENT, TAG_REPLY, TAG_WEIGHTS = 7101, 7102, 7103, 7104

# Control kinds (bit flags: a push to server 0 also asks for the next ticket).
PUSH = 1     # a gradient follows (TAG_GRADIENT)
REQUEST = 2  # to server 0: a ticket of this step, please (the reply carries weights when granted)
PULL = 4     # to the other servers, after a grant: the current weights, please

CONTROL_FIELDS = ("kind", "step", "shard", "base_version", "samples", "loss", "step_samples")
REPLY_FIELDS = ("version", "transfer", "ticket_step", "ticket_shard", "staleness")


def control(kind: int, step: int = -1, shard: int = -1, base_version: int = -1, samples: int = 0,
            loss: float = 0.0, step_samples: int = 0, present=()) -> np.ndarray:
    """A worker's control record: what it sends, for which ticket (``samples`` of the step's
    ``step_samples``), from which version; a push ends with a flag per parameter of the server's
    share (1: it has a gradient)."""
    return np.array([kind, step, shard, base_version, samples, loss, step_samples, *present], dtype=np.float64)


def reply(version: int, transfer: float, ticket=None, staleness: int = -1) -> np.ndarray:
    """A server's answer: its version, seconds it spent receiving the worker's pushed gradients
    since its last answer to that worker (their transfer: communication), the granted ticket
    (``(-1, -1)``: none; weights follow on TAG_WEIGHTS only when a ticket or a pull is answered),
    and the staleness the worker's last push was applied with (-1: no push)."""
    step, shard = ticket if ticket is not None else (-1, -1)
    return np.array([version, transfer, step, shard, staleness], dtype=np.float64)


class Control:
    """A received control record, by field name."""

    def __init__(self, record: np.ndarray):
        self.kind, self.step, self.shard, self.base_version, self.samples = (int(v) for v in record[:5])
        self.loss, self.step_samples = float(record[5]), int(record[6])
        self.present = record[len(CONTROL_FIELDS):] > 0  # a push's flags (other records: stale, unused)


class Reply:
    """A received reply, by field name."""

    def __init__(self, record: np.ndarray):
        self.version, self.ticket_step, self.ticket_shard, self.staleness = (
            int(record[0]), int(record[2]), int(record[3]), int(record[4]))
        self.transfer = float(record[1])

    @property
    def ticket(self):
        return None if self.ticket_step < 0 else (self.ticket_step, self.ticket_shard)


SPIN_SECONDS, NAP_SECONDS = 5e-5, 2e-4


def wait_any(requests) -> int:
    """:func:`mpipar.comm.mpi_tensor.wait_any` with the protocol's short spin and nap: a server or worker
    waiting for messages leaves its core to the ranks that compute. Returns the index."""
    return mpi_tensor.wait_any(requests, spin=SPIN_SECONDS, nap=NAP_SECONDS)
