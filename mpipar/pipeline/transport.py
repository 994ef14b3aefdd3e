"""A pipeline's messages: tags, receives posted ahead per stream, non-blocking sends and their waits, each
recorded in a sampled step, and the loss broadcast."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import List, Optional, Sequence, Tuple, Union

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import events
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.stage import TensorSpec
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
    earlier tick of the rank programs, so waiting for receives in program order cannot deadlock; each stream of
    receives keeps :attr:`receives_ahead` posted ahead (:meth:`_post_receives`); sends complete in
    :meth:`_wait_sends`."""

    receives_ahead: int = 2  # receives kept posted per stream (0: each posted when the program reaches it)

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

    def _stream(self, instruction: Instruction) -> tuple:
        """The stream a receive belongs to: one kind of message from one peer into one stage (or skip)."""
        return type(instruction), instruction.stage, getattr(instruction, "skip", None)

    def _receive_spec(self, instruction: Instruction, count: int) -> Tuple[int, int, TensorSpec, str]:
        """Source, tag (micro-batches numbered modulo ``count``), agreed shape and dtype, and a description
        of the message a receive takes."""
        if isinstance(instruction, SkipInstruction):
            name, grad = self.stage_skips[instruction.skip].name, isinstance(instruction, RecvSkipGrad)
            source, tag = self._skip_peer_and_tag(instruction, count)
            return source, tag, self._skip_specs[name], (
                f"{'gradient of ' if grad else ''}skip {name!r} of micro-batch {instruction.microbatch} "
                f"for stage {instruction.stage}")
        grad = isinstance(instruction, RecvGrad)
        source, tag = self._peer_and_tag(instruction, count)
        spec = (self._output_specs if grad else self._input_specs)[instruction.stage]
        assert spec is not None  # agreed before the first receive (a failed agreement raised on every rank)
        return source, tag, spec, (f"{'gradient' if grad else 'activation'} of micro-batch "
                                   f"{instruction.microbatch} for stage {instruction.stage}")

    def _post_receive(self, instruction: Instruction, run: RunState) -> mpi_tensor.PendingOp:
        source, tag, spec, detail = self._receive_spec(instruction, run.tag_count or run.microbatches)
        op = mpi_tensor.irecv_(spec.empty(self.stages[instruction.stage].device), self.comm, source, tag,
                               detail=detail)
        self._posted[instruction] = op
        return op

    def _post_receives(self, program: Sequence[Instruction], run: RunState) -> None:
        """Before running ``program`` (its micro-batches numbered as it runs them): post the first
        :attr:`receives_ahead` receives of each stream, into buffers of the agreed shapes; the next of a
        stream is posted when one completes (:meth:`_take_received`), so each stream keeps that many
        outstanding. Receives from one peer with one tag are posted in the order its sends are (the
        program's), so MPI's non-overtaking rule matches them; a receive never blocks a rank, so posting
        early cannot deadlock a program that cannot deadlock with blocking receives. Local."""
        for op in self._posted.values():  # a failed step's
            op.cancel()
        self._posted.clear()
        self._queued.clear()
        if self.receives_ahead < 1:
            return
        for instruction in program:
            if isinstance(instruction, (RecvActivation, RecvGrad, RecvSkip, RecvSkipGrad)):
                self._queued.setdefault(self._stream(instruction), deque()).append(instruction)
        for queue in self._queued.values():
            for _ in range(min(self.receives_ahead, len(queue))):
                self._post_receive(queue.popleft(), run)

    def _take_received(self, instruction: Instruction, run: RunState, event: str) -> torch.Tensor:
        """Wait for the receive of ``instruction`` (posted ahead, or now), politely (polling, then
        napping: :func:`~mpipar.comm.mpi_tensor.wait_any`); post the next of its stream. Local."""
        op = self._posted.get(instruction) or self._post_receive(instruction, run)
        recorder = events.active()
        begin = time.perf_counter() if recorder is not None else 0.0
        with run.clock.communicating():
            arrived = op.test()  # a message here already costs a copy at most: communication
        if not arrived:
            op.wait()  # waiting for the peer: idle time
        del self._posted[instruction]
        queue = self._queued.get(self._stream(instruction))
        if queue:
            self._post_receive(queue.popleft(), run)
        if recorder is not None:
            source, buffer = self._receive_spec(instruction, run.tag_count or run.microbatches)[0], op.tensor
            recorder.add(event, begin, time.perf_counter(), nbytes=buffer.numel() * buffer.element_size(),
                         peer=source, peer_comm=self.comm, index=instruction.microbatch, stage=instruction.stage)
        return op.tensor

    def _receive(self, instruction: Union[RecvActivation, RecvGrad], run: RunState) -> None:
        grad = isinstance(instruction, RecvGrad)
        run.received[instruction] = self._take_received(instruction, run, "recv_grad" if grad else "recv_activation")

    def _send(self, instruction: Union[SendActivation, SendGrad], run: RunState) -> None:
        dest, tag = self._peer_and_tag(instruction, run.tag_count or run.microbatches)
        spec = (self._input_specs if isinstance(instruction, SendGrad) else self._output_specs)[instruction.stage]
        tensor = self._as_agreed(run.outgoing.pop(instruction), spec)
        run.bytes_sent += self._post(tensor, dest, tag, run, instruction,
                                     "send_grad" if isinstance(instruction, SendGrad) else "send_activation")

    @staticmethod
    def _as_agreed(tensor: torch.Tensor, spec: Optional[TensorSpec]) -> torch.Tensor:
        """``tensor`` in the dtype agreed for its message (under autocast a float32 output crosses in 16 bits)."""
        return tensor if spec is None or tensor.dtype == spec.dtype else tensor.to(spec.dtype)

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
        name, grad = self.stage_skips[instruction.skip].name, isinstance(instruction, RecvSkipGrad)
        (run.skip_grads if grad else run.skips)[name, instruction.microbatch] = self._take_received(
            instruction, run, "recv_skip_grad" if grad else "recv_skip")

    def _send_skip(self, instruction: Union[SendSkip, SendSkipGrad], run: RunState) -> None:
        name, i = self.stage_skips[instruction.skip].name, instruction.microbatch
        dest, tag = self._skip_peer_and_tag(instruction, run.tag_count or run.microbatches)
        grad = isinstance(instruction, SendSkipGrad)
        tensor = self._as_agreed((run.skip_grads if grad else run.skips).pop((name, i)), self._skip_specs[name])
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
