"""Tensor parallelism in the cost model: a dp x tp grid's step predicted (:func:`predict_tensor_grid`) from
what one rank of a split vision transformer computes, timed by the strategy's own profiler
(:mod:`mpipar.tensor_parallel.profile`, which ``mpipar-calibrate`` reaches through the registry).

A rank of ``tp`` splitting a :class:`~mpipar.models.vit.VisionTransformer` computes the whole patch and
position embedding, LayerNorms, head and loss, and every block with ``heads / tp`` heads and
``hidden / tp`` MLP features. Its profile is stored in the machine file as one more
:class:`~mpipar.cost.machine.ModelProfile` named ``MODEL/tpT`` (``tp`` 1: the model's own name), whose layers
are ``embed``, ``block0`` ... and ``head``. The predictions are pure (no torch, no MPI); the model's sizes
(:func:`model_degrees`) import torch, when they run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, cast

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import (
    DEFAULT,
    Layout,
    Prediction,
    layers_at,
    predict_data_parallel,
    step_overhead,
    tensor_parallel_allreduces,
)
from mpipar.cost.options import TrainingOptions
from mpipar.cost.sharded import predict_sharded

__all__ = ["TensorPrediction", "profile_name", "tensor_degrees", "model_degrees", "vit_shape", "predict_tensor_grid",
           "BLOCK_PREFIX", "MAX_CALIBRATED_TP"]

BLOCK_PREFIX = "block"  # the profile's split layers; each costs the Megatron block's Allreduces
MAX_CALIBRATED_TP = 4  # mpipar-calibrate times every degree up to this (or the rank count, if larger)


def profile_name(model: str, tp: int) -> str:
    """The machine file's key of ``model`` as one of ``tp`` tensor-parallel ranks runs it."""
    return model if tp == 1 else f"{model}/tp{tp}"


def tensor_degrees(machine: Machine, model: str) -> List[int]:
    """The tensor-parallel degrees > 1 the machine file has profiles of for ``model``, ascending. Pure."""
    prefix = f"{model}/tp"
    return sorted(int(name[len(prefix):]) for name in machine.models
                  if name.startswith(prefix) and name[len(prefix):].isdigit())


@dataclass(frozen=True)
class TensorPrediction(Prediction):
    """A :class:`Prediction` of ``layout.dp`` replicas of ``layout.tp`` ranks. ``exposed_comm`` is
    ``tp_comm`` (the blocks' blocking Allreduces) plus the replicas' exposed gradient Allreduce."""

    tp_comm: float = 0.0
    tp_link: str = ""
    dp_link: str = ""

    def why(self) -> str:
        if self.layout.tp == 1:
            return super().why()

        share = self.share
        text = f"TP Allreduce {share(self.tp_comm)}" + (f" on {self.tp_link}" if self.tp_link else "")
        if self.layout.dp > 1:
            reduce = "reduce-scatter" if self.variant.startswith("ZeRO-2") else "Allreduce"
            gather = f", all-gather {share(self.gathers)}" if self.gathers else ""
            text += (f", replicas' {reduce} {share(self.exposed_comm - self.tp_comm - self.gathers)} exposed{gather}"
                     + (f" on {self.dp_link}" if self.dp_link else ""))
        return text


def predict_tensor_grid(machine: Machine, model: str, batch: int, layout: Layout, *, bucket_mb: float = 25.0,
                        zero: int = 0, options: TrainingOptions = DEFAULT) -> TensorPrediction:
    """``layout.dp`` replicas of ``layout.tp`` ranks splitting ``model`` (``layout.pp`` 1), ``batch`` samples
    per replica. Pure.

    Per step: the rank's layers from the ``MODEL/tpT`` profile (interpolated to ``batch``) and the step's
    overhead; each block adds its 2 forward and 2 backward blocking Allreduces of its output activation
    (``batch x tokens x width x 4`` bytes) over the tp group, on the link ``layout.tp_across()`` picks;
    then the rank's gradients (replicated and split parameters) are averaged over the replicas by
    the data-parallel bucket model (:func:`~mpipar.cost.model.predict_data_parallel`, with the blocks'
    backward including their Allreduces). Memory: the rank's parameters, gradients and optimizer state
    (``options.optimizer``'s; the rest of ``options`` is not modelled here) + its saved activations.

    ``zero`` 1 or 2 (``docs/sharded.md`` "Grids"), over the replicas of each tensor-parallel rank: the
    same rank's layers priced by :func:`~mpipar.cost.sharded.predict_sharded` (1: the replicas' Allreduce,
    then the all-gather of the rank's flat parameter buffer; 2: reduce-scatters from the backward instead
    of the Allreduce, then the all-gather), and its memory: the state (and for 2 the gradients) / ``dp``.

    Raises:
        ValueError: without the profile, a pipeline in ``layout``, ``zero`` not 0-2, or a link across nodes
        the machine lacks.
    """
    if zero not in (0, 1, 2):
        raise ValueError(f"tensor parallelism shards over its replicas with --zero 1 or 2 (or 0: none), got {zero}")
    if layout.pp != 1:
        raise ValueError(f"tensor parallelism is predicted for dp x tp grids without pipelines, got {layout.shape}")
    name = profile_name(model, layout.tp)
    if name not in machine.models:
        raise ValueError(f"the machine file has no layer times of {model} split over {layout.tp} tensor-parallel "
                         f"ranks ({name}; it has {sorted(machine.models)}); mpipar-calibrate --model {model} "
                         f"writes them for the vision transformers")
    profile = machine.profile(name)
    layers = layers_at(profile, batch)
    overhead = step_overhead(profile, batch)
    tp_link = machine.link(not layout.tp_across())
    forward_count, backward_count = tensor_parallel_allreduces(1, "transformer")
    with_comm, tp_comm = [], 0.0
    for layer in layers:
        if layer.name.startswith(BLOCK_PREFIX):
            one = tp_link.allreduce_seconds(layer.activation_bytes, layout.tp)
            layer = dataclasses.replace(layer, forward=layer.forward + forward_count * one,
                                        backward=layer.backward + backward_count * one)
            tp_comm += (forward_count + backward_count) * one
        with_comm.append(layer)
    # one calibrated size (this batch): the DP model takes these layers and this overhead as they are
    at_batch = ModelProfile(name, {batch: tuple(with_comm)},
                            {batch: overhead + sum(layer.forward + layer.backward for layer in with_comm)})
    state = TrainingOptions(optimizer=options.optimizer)
    dp = predict_sharded(at_batch, batch, layout, machine, zero=zero, bucket_mb=bucket_mb, options=state) if (
        zero and layout.dp > 1) else predict_data_parallel(at_batch, batch, layout, machine, bucket_mb=bucket_mb,
                                                           options=state)
    dp_link = machine.link(not layout.dp_across()).description if layout.dp > 1 else ""
    strategy = "DP" if layout.tp == 1 else "TP" if layout.dp == 1 else "TP x DP"
    links = [] if layout.tp == 1 else [tp_link.description]
    links += [dp_link] if dp_link and dp_link not in links else []
    return TensorPrediction(strategy, layout, dp.step, dp.compute - tp_comm, dp.exposed_comm + tp_comm,
                            memory_bytes=dp.memory_bytes, link=" / ".join(link for link in links if link),
                            variant=f"ZeRO-{zero}" if zero and layout.dp > 1 else "", gathers=dp.gathers,
                            tp_comm=tp_comm, tp_link=tp_link.description if layout.tp > 1 else "", dp_link=dp_link)


# --- profiling (torch, local) ------------------------------------------------------------------------------


def vit_shape(model_name: str) -> dict:
    """The vision transformer's sizes (as the jobs build it: 1x28x28 images, 10 classes)."""
    from mpipar import models
    from mpipar.models.vit import TransformerBlock

    if model_name not in models.VIT_MODELS:
        raise ValueError(f"tensor-parallel profiles are of the vision transformers {sorted(models.VIT_MODELS)}, "
                         f"not {model_name!r}")
    full = models.VIT_MODELS[model_name](in_channels=1, num_classes=10, image_size=28)
    block = cast(TransformerBlock, full.blocks[0])
    return {"in_channels": 1, "num_classes": 10, "image_size": 28, "patch_size": full.patch_size, "dim": full.dim,
            "depth": len(full.blocks), "heads": block.attention.num_heads, "hidden": block.fc1.out_features}


def model_degrees(model_name: str, limit: int = MAX_CALIBRATED_TP) -> List[int]:
    """The tensor-parallel degrees up to ``limit`` that divide ``model_name``'s heads and hidden features
    (1 included); [] for a model that is not a vision transformer. Local."""
    from mpipar import models

    if model_name not in models.VIT_MODELS:
        return []
    shape = vit_shape(model_name)
    return [t for t in range(1, limit + 1) if shape["heads"] % t == 0 and shape["hidden"] % t == 0]
