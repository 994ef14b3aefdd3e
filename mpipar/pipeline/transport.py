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
from mpipar.diagnostics import debug, events
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

    def _receive_spec(self, instruction: Instruction, count: int) -> Tuple[int, int, TensorSpec]:
        """Source, tag (micro-batches numbered modulo ``count``) and agreed shape and dtype of the message a
        receive takes; found once per spec table (:attr:`_routes`)."""
        key = (self._stream(instruction), instruction.microbatch % count, count)
        route = self._routes.get(key)
        if route is None:
            if isinstance(instruction, SkipInstruction):
                source, tag = self._skip_peer_and_tag(instruction, count)
                spec = self._skip_specs[self.stage_skips[instruction.skip].name]
            else:
                source, tag = self._peer_and_tag(instruction, count)
                agreed = (self._output_specs if isinstance(instruction, RecvGrad) else self._input_specs)[
                    instruction.stage]
                assert agreed is not None  # agreed before the first receive (a failed one raised on every rank)
                spec = agreed
            route = self._routes[key] = (source, tag, spec)
        return route

    def _describe(self, instruction: Instruction) -> str:
        """The message a receive takes, in words (for a watchdog's or debug mode's report)."""
        if isinstance(instruction, SkipInstruction):
            grad = isinstance(instruction, RecvSkipGrad)
            return (f"{'gradient of ' if grad else ''}skip {self.stage_skips[instruction.skip].name!r} of "
                    f"micro-batch {instruction.microbatch} for stage {instruction.stage}")
        return (f"{'gradient' if isinstance(instruction, RecvGrad) else 'activation'} of micro-batch "
                f"{instruction.microbatch} for stage {instruction.stage}")

    def _post_receive(self, instruction: Instruction, run: RunState) -> mpi_tensor.PendingOp:
        source, tag, spec = self._receive_spec(instruction, run.tag_count or run.microbatches)
        detail = self._describe(instruction) if debug.hooks is not None else ""
        return mpi_tensor.irecv_(spec.empty(self.stages[instruction.stage].device), self.comm, source, tag,
                                 detail=detail)

    def _post_receives(self, program: Sequence[Instruction], run: RunState) -> None:
        """Before running ``program`` (its micro-batches numbered as it runs them): post the first
        :attr:`receives_ahead` receives of each stream, into buffers of the agreed shapes. A stream is topped
        up again (:meth:`_top_up`) whenever the rank is about to wait for a message that has not arrived (it is
        idle then), and a receive not posted by then is posted when the program reaches it, so posting
        costs the critical path nothing where messages are early. Receives from one peer with one tag are
        posted in the order its sends are (the program's), so MPI's non-overtaking rule matches them; a
        receive never blocks a rank, so posting early cannot deadlock a program that cannot deadlock with
        blocking receives. Local."""
        for op in self._posted.values():  # a failed step's
            op.cancel()
        self._posted.clear()
        self._queued.clear()
        self._outstanding.clear()
        if self.receives_ahead < 1:
            return
        for instruction in program:
            if isinstance(instruction, (RecvActivation, RecvGrad, RecvSkip, RecvSkipGrad)):
                self._queued.setdefault(self._stream(instruction), deque()).append(instruction)
        self._top_up(run)

    def _top_up(self, run: RunState) -> None:
        """Post the next receives of every stream until each has :attr:`receives_ahead` outstanding. Local."""
        for stream, queue in self._queued.items():
            outstanding = self._outstanding.get(stream, 0)
            while queue and outstanding < self.receives_ahead:
                instruction = queue.popleft()
                self._posted[instruction] = self._post_receive(instruction, run)
                outstanding += 1
            self._outstanding[stream] = outstanding

    def _take_received(self, instruction: Instruction, run: RunState, event: str) -> torch.Tensor:
        """Wait for the receive of ``instruction`` (posted ahead, or now), politely (polling, then
        napping: :func:`~mpipar.comm.mpi_tensor.wait_any`); before a wait, top the streams up. Local."""
        stream = self._stream(instruction)
        op = self._posted.pop(instruction, None)
        if op is None:  # not posted yet: the head of its stream's queue
            queue = self._queued.get(stream)
            if queue and queue[0] == instruction:
                queue.popleft()
            op = self._post_receive(instruction, run)
        else:
            self._outstanding[stream] -= 1
        recorder = events.active()
        begin = time.perf_counter()
        arrived = op.test()  # a message here already costs a copy at most: communication
        run.clock.comm += time.perf_counter() - begin
        if not arrived:
            self._top_up(run)  # idle until the message comes: post what the streams are owed meanwhile
            op.wait()  # waiting for the peer: idle time
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
        posted = time.perf_counter()
        op = mpi_tensor.isend(tensor, self.comm, dest, tag)
        run.clock.comm += time.perf_counter() - posted
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
