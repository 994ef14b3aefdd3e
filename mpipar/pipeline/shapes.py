"""Shape agreement: a pipeline's batch checked on every rank, and each stage's activation and skip shapes and
dtypes passed down the pipeline once per input shape, before the first tensor is received."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug
from mpipar.diagnostics.agree import gather_checked
from mpipar.diagnostics.failure import agreed
from mpipar.pipeline.microbatch import check_microbatches
from mpipar.pipeline.parts import PipelineParts
from mpipar.pipeline.stage import TensorSpec

__all__ = ["ShapeAgreement", "SPEC_TAG", "autocast_key", "wire_spec"]

SPEC_TAG = 0  # shape agreement; data messages use tags >= 1


def autocast_key() -> Tuple[Tuple[str, str], ...]:
    """The autocast in force: ``(device type, dtype)`` of the CPU's and CUDA's (empty: none). Local."""
    return tuple((kind, str(torch.get_autocast_dtype(kind))) for kind in ("cpu", "cuda")
                 if torch.is_autocast_enabled(kind))


def wire_spec(spec: TensorSpec, device: torch.device) -> TensorSpec:
    """What crosses a stage boundary for an output of ``spec`` made on ``device``: under autocast, float32
    crosses in autocast's dtype (what its matmuls give; an output still float32, e.g. after a LayerNorm,
    is cast to it at the send, half the bytes), other dtypes as they are. Local."""
    kind = torch.device(device).type
    if spec.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return TensorSpec(spec.shape, torch.get_autocast_dtype(kind))
    return spec


class ShapeAgreement(PipelineParts):
    """:class:`~mpipar.pipeline.executor.Pipeline`'s agreement on a batch and its shapes (collective over
    ``comm``: every rank calls :meth:`_agree_batch` together); the spec tables it fills are what the
    receives allocate and what the sends cast to (under autocast: :func:`wire_spec`). Every rank must step
    under the same autocast (checked), which is part of the tables' key."""

    def _check_batch(self, inputs, targets, train: bool, microbatches: int) -> dict:
        self._program(train, microbatches)
        report: Dict[str, Any] = {"microbatches": microbatches, "autocast": autocast_key()}
        if train and self.schedule.is_async and self.stages and self._optimizer is None:
            raise ValueError(f"the {self.schedule.name} schedule steps an optimizer at each update: call "
                             f"pipe.bind_optimizer(optimizer) before the first step")
        if self.holds_first_stage:
            if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
                raise TypeError(f"rank {self.rank} holds the first stage and needs the input batch as a "
                                f"tensor with a batch dimension, got {type(inputs).__name__}")
            size = check_microbatches(inputs.shape[0], microbatches)
            report["batch"] = inputs.shape[0]
            report["spec"] = TensorSpec((size, *inputs.shape[1:]), inputs.dtype)
        if self.holds_last_stage and (train or targets is not None):
            if train and self.loss_fn is None:
                raise ValueError("Pipeline.step needs a loss_fn; pass loss_fn=... to the Pipeline")
            if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
                raise TypeError(f"rank {self.rank} holds the last stage and needs the targets as a tensor "
                                f"with a batch dimension, got {type(targets).__name__}")
            report["target_batch"] = targets.shape[0]
        return report

    def _agree_batch(self, inputs, targets, train: bool, microbatches: int) -> None:
        reports = gather_checked(self.comm, lambda: self._check_batch(inputs, targets, train, microbatches),
                                  "pipeline batch")
        first, last = reports[self.stage_ranks[0]], reports[self.last_stage_rank]
        counts = [report["microbatches"] for report in reports]
        casts = [report["autocast"] for report in reports]
        problem = None
        if len(set(counts)) > 1:
            problem = f"ranks ask for different micro-batch counts {counts}"
        elif len(set(casts)) > 1:
            problem = (f"ranks run under different autocast (device type, dtype) {casts}; run every rank's step "
                       f"under the same precision")
        elif "target_batch" in last and last["target_batch"] != first["batch"]:
            problem = (f"{first['batch']} inputs on rank {self.stage_ranks[0]} but {last['target_batch']} "
                       f"targets on rank {self.last_stage_rank}")
        if problem:
            raise agreed(ValueError)(f"pipeline batch: {problem}")
        self._batch_spec = (first["spec"], first["batch"])
        key = (first["spec"], train, casts[0])
        if key not in self._spec_tables:
            self._agree_shapes(first["spec"], train)
            self._spec_tables[key] = (dict(self._input_specs), dict(self._output_specs), dict(self._skip_specs))
        self._input_specs, self._output_specs, self._skip_specs = (dict(t) for t in self._spec_tables[key])
        if key != self._routes_key:  # the receives' shapes changed: find their routes again
            self._routes.clear()
            self._routes_key = key

    def _agree_shapes(self, input_spec: TensorSpec, train: bool) -> None:
        """Pass each stage's output shape and dtype down the pipeline (pickled metadata), with those of
        the skips saved so far and not used yet (a stage takes the ones it uses, adds the ones it saves)."""
        error = None
        self._skip_specs = {}
        handed: Any = None  # what a stage passes to the next when both are on this rank (no message)
        for index in sorted(self.stages):
            stage = self.stages[index]
            if stage.is_first:
                spec, live = input_spec, {}
            elif index - 1 in self.stages:
                spec, live = handed
            else:
                with debug.watched(self.comm, "recv", peer=self.stage_ranks[index - 1], tag=SPEC_TAG,
                                   detail=f"activation shape for stage {index}"):
                    spec, live = self.comm.recv(source=self.stage_ranks[index - 1], tag=SPEC_TAG)
            out = None
            if spec is not None and error is None:
                try:
                    used = {name: live[name] for name in self._uses[index]}
                    out, saved = stage.output_spec(spec, used)
                    out, saved = wire_spec(out, stage.device), {k: wire_spec(v, stage.device) for k, v in saved.items()}
                    if train and not stage.is_last and not out.dtype.is_floating_point:
                        raise TypeError(f"its output dtype {out.dtype} cannot carry gradients back")
                    mpi_tensor.mpi_datatype(out.dtype)
                    saved = {name: saved[name] for name in self._saves[index]}
                    for name, skip in saved.items():
                        if train and not skip.dtype.is_floating_point:
                            raise TypeError(f"skip {name!r} has dtype {skip.dtype}, which cannot carry gradients back")
                        mpi_tensor.mpi_datatype(skip.dtype)
                    self._skip_specs.update(used)
                    self._skip_specs.update(saved)
                    live = {**{k: v for k, v in live.items() if k not in used}, **saved}
                except Exception as exc:  # noqa: BLE001 - reported on every rank below
                    kind = next((k for k in (TypeError, ValueError) if isinstance(exc, k)), RuntimeError)
                    error = kind(f"stage {index} ({stage.layers}) on rank {self.rank} with input {spec}: "
                                 f"{type(exc).__name__}: {exc}")
            self._input_specs[index], self._output_specs[index] = spec, out
            if index + 1 in self.stages:
                handed = (out, live if out is not None else None)
            elif not stage.is_last:
                self.comm.send((out, live if out is not None else None), dest=self.stage_ranks[index + 1],
                               tag=SPEC_TAG)

        def raise_local():
            if error is not None:
                raise error

        gather_checked(self.comm, raise_local, "pipeline activation shapes")
