"""A pipeline's messages: tags, blocking receives (after a watched ``Probe``), non-blocking sends and their waits,
each recorded in a sampled step, and the loss broadcast."""

from __future__ import annotations

import math
import time
from typing import List, Tuple, Union

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug, events
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.step_state import RunState
from mpipar.pipeline_plan.instructions import (
    Instruction,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    RecvSkipGrad,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    SkipInstruction,
)

__all__ = ["Transport"]


class Transport(PipelineParts):
    """:class:`~mpipar.pipeline.executor.Pipeline`'s point-to-point messages. A receive's peer posts its send at an
    earlier tick of the rank programs, so the blocking receives cannot deadlock; sends complete in
    :meth:`_wait_sends`."""

    def _check_tags(self, microbatches: int) -> None:
        top = self._skip_tag(len(self.stage_skips), False, 0, microbatches)
        tag_ub = self.comm.Get_attr(MPI.TAG_UB) or 32767  # not set on COMM_SELF or Split comms
        if top > tag_ub:
            raise ValueError(f"{self.num_stages} stages x {microbatches} micro-batches need MPI tags up "
                             f"to {top}, above this MPI's limit {tag_ub}; use fewer micro-batches")

    def _tag(self, boundary: int, grad: bool, microbatch: int, microbatches: int) -> int:
        return 1 + (2 * boundary + int(grad)) * microbatches + microbatch

    def _skip_tag(self, skip: int, grad: bool, microbatch: int, microbatches: int) -> int:
        """Tags above every activation tag: a skip message can never match an activation receive."""
        return 1 + (2 * self.num_stages + 2 * skip + int(grad)) * microbatches + microbatch

    def _peer_and_tag(self, instruction: Instruction, microbatches: int) -> Tuple[int, int]:
        """The rank on the other end of a send or receive, and the message's tag."""
        grad = isinstance(instruction, (RecvGrad, SendGrad))
        upstream = isinstance(instruction, (RecvActivation, SendGrad))  # the peer holds stage - 1
        peer_stage = instruction.stage - 1 if upstream else instruction.stage + 1
        boundary = min(instruction.stage, peer_stage)
        return self.stage_ranks[peer_stage], self._tag(boundary, grad, instruction.microbatch % microbatches,
                                                       microbatches)

    def _receive(self, instruction: Union[RecvActivation, RecvGrad], run: RunState) -> None:
        index, i = instruction.stage, instruction.microbatch
        grad = isinstance(instruction, RecvGrad)
        source, tag = self._peer_and_tag(instruction, run.tag_count or run.microbatches)
        spec = (self._output_specs if grad else self._input_specs)[index]
        assert spec is not None  # agreed before the first receive (a failed agreement raised on every rank)
        buffer = spec.empty(self.stages[index].device)
        recorder = events.active()
        begin = time.perf_counter() if recorder is not None else 0.0
        with debug.watched(self.comm, "recv", peer=source, tag=tag, detail=(
                f"{'gradient' if grad else 'activation'} of micro-batch {i} for stage {index}")):
            self.comm.Probe(source=source, tag=tag)  # waiting for the peer: idle time
        with run.clock.communicating():
            run.received[instruction] = mpi_tensor.recv_(buffer, self.comm, source, tag)
        if recorder is not None:
            recorder.add("recv_grad" if grad else "recv_activation", begin, time.perf_counter(),
                         nbytes=buffer.numel() * buffer.element_size(), peer=source, peer_comm=self.comm, index=i,
                         stage=index)

    def _send(self, instruction: Union[SendActivation, SendGrad], run: RunState) -> None:
        dest, tag = self._peer_and_tag(instruction, run.tag_count or run.microbatches)
        tensor = run.outgoing.pop(instruction)
        run.bytes_sent += self._post(tensor, dest, tag, run, instruction,
                                     "send_grad" if isinstance(instruction, SendGrad) else "send_activation")

    def _post(self, tensor: torch.Tensor, dest: int, tag: int, run: RunState, instruction: Instruction,
              event: str) -> int:
        """Post a non-blocking send (its completion: :meth:`_wait_sends`); in a sampled step remember
        its event. Returns its bytes."""
        size = tensor.numel() * tensor.element_size()
        with run.clock.communicating():
            posted = time.perf_counter()
            op = mpi_tensor.isend(tensor, self.comm, dest, tag)
        run.sends.append(op)
        recorder = events.active()
        if recorder is not None:
            self._traced_sends[op] = (recorder, recorder.step, event, posted, size, dest, instruction.microbatch,
                                      instruction.stage)
        return size

    def _wait_sends(self, ops: List[mpi_tensor.PendingOp]) -> None:
        """Complete posted sends; a send posted in a sampled step becomes its event (posted to seen
        completed here, on the step that posted it) and, in a sampled step, the wait an event too."""
        recorder = events.active()
        begin = time.perf_counter()
        for op in ops:
            op.wait()
            traced = self._traced_sends.pop(op, None) if self._traced_sends else None
            if traced is not None:
                owner, step, event, posted, size, dest, microbatch, stage = traced
                owner.add(event, posted, time.perf_counter(), nbytes=size, peer=dest, peer_comm=self.comm,
                          index=microbatch, stage=stage, step=step)
        if recorder is not None and ops:
            recorder.add("wait_sends", begin, time.perf_counter())

    def _skip_peer_and_tag(self, instruction: SkipInstruction, microbatches: int) -> Tuple[int, int]:
        grad = isinstance(instruction, (SendSkipGrad, RecvSkipGrad))
        return (self.stage_ranks[instruction.peer],
                self._skip_tag(instruction.skip, grad, instruction.microbatch % microbatches, microbatches))

    def _receive_skip(self, instruction: Union[RecvSkip, RecvSkipGrad], run: RunState) -> None:
        name, i = self.stage_skips[instruction.skip].name, instruction.microbatch
        grad = isinstance(instruction, RecvSkipGrad)
        source, tag = self._skip_peer_and_tag(instruction, run.tag_count or run.microbatches)
        buffer = self._skip_specs[name].empty(self.stages[instruction.stage].device)
        recorder = events.active()
        begin = time.perf_counter() if recorder is not None else 0.0
        with debug.watched(self.comm, "recv", peer=source, tag=tag, detail=(
                f"{'gradient of ' if grad else ''}skip {name!r} of micro-batch {i} for stage {instruction.stage}")):
            self.comm.Probe(source=source, tag=tag)  # waiting for the peer: idle time
        with run.clock.communicating():
            (run.skip_grads if grad else run.skips)[name, i] = mpi_tensor.recv_(buffer, self.comm, source, tag)
        if recorder is not None:
            recorder.add("recv_skip_grad" if grad else "recv_skip", begin, time.perf_counter(),
                         nbytes=buffer.numel() * buffer.element_size(), peer=source, peer_comm=self.comm, index=i,
                         stage=instruction.stage)

    def _send_skip(self, instruction: Union[SendSkip, SendSkipGrad], run: RunState) -> None:
        name, i = self.stage_skips[instruction.skip].name, instruction.microbatch
        dest, tag = self._skip_peer_and_tag(instruction, run.tag_count or run.microbatches)
        grad = isinstance(instruction, SendSkipGrad)
        tensor = (run.skip_grads if grad else run.skips).pop((name, i))
        size = self._post(tensor, dest, tag, run, instruction, "send_skip_grad" if grad else "send_skip")
        run.bytes_sent += size
        run.skip_bytes_sent += size

    def _broadcast_loss(self) -> float:
        value = torch.full((1,), math.nan, dtype=torch.float64)
        if self.holds_last_stage:
            mean = self.stages[self.num_stages - 1].mean_loss()
            value[0] = math.nan if mean is None else mean
        mpi_tensor.bcast_(value, self.comm, root=self.last_stage_rank)
        return float(value[0])
