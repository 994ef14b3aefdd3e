"""Tensor parallelism in the cost model: what one rank of a split vision transformer computes, timed
(:func:`profile_tensor_parallel`, :func:`tensor_profiles`), and a dp x tp grid's step predicted from it
(:func:`predict_tensor_grid`).

A rank of ``tp`` splitting a :class:`~mpipar.models.vit.VisionTransformer` computes the whole patch and
position embedding, LayerNorms, head and loss, and every block with ``heads / tp`` heads and
``hidden / tp`` MLP features. Its profile is stored in the machine file as one more
:class:`~mpipar.cost.machine.ModelProfile` named ``MODEL/tpT`` (``tp`` 1: the model's own name), whose layers
are ``embed``, ``block0`` ... and ``head``. The predictions are pure (no torch, no MPI); only the profiling
imports torch, when it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import Dict, List, Optional, Sequence

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import (
    Layout,
    Prediction,
    layers_at,
    predict_data_parallel,
    step_overhead,
    tensor_parallel_allreduces,
)

__all__ = ["TensorPrediction", "profile_name", "tensor_degrees", "model_degrees", "profile_tensor_parallel",
           "tensor_profiles", "predict_tensor_grid", "BLOCK_PREFIX", "MAX_CALIBRATED_TP"]

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
            text += (f", replicas' Allreduce {share(self.exposed_comm - self.tp_comm)} exposed"
                     + (f" on {self.dp_link}" if self.dp_link else ""))
        return text


def predict_tensor_grid(machine: Machine, model: str, batch: int, layout: Layout, *,
                        bucket_mb: float = 25.0) -> TensorPrediction:
    """``layout.dp`` replicas of ``layout.tp`` ranks splitting ``model`` (``layout.pp`` 1), ``batch`` samples
    per replica. Pure.

    Per step: the rank's layers from the ``MODEL/tpT`` profile (interpolated to ``batch``) and the step's
    overhead; each block adds its 2 forward and 2 backward blocking Allreduces of its output activation
    (``batch x tokens x width x 4`` bytes) over the tp group, on the link ``layout.tp_across()`` picks;
    then the rank's gradients (replicated and split parameters) are averaged over the replicas by
    the data-parallel bucket model (:func:`~mpipar.cost.model.predict_data_parallel`, with the blocks'
    backward including their Allreduces). Memory: 3 x the rank's parameters + its saved activations.

    Raises:
        ValueError: without the profile, a pipeline in ``layout``, or a link across nodes the machine lacks.
    """
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
    dp = predict_data_parallel(at_batch, batch, layout, machine, bucket_mb=bucket_mb)
    dp_link = machine.link(not layout.dp_across()).description if layout.dp > 1 else ""
    strategy = "DP" if layout.tp == 1 else "TP" if layout.dp == 1 else "TP x DP"
    links = [] if layout.tp == 1 else [tp_link.description]
    links += [dp_link] if dp_link and dp_link not in links else []
    return TensorPrediction(strategy, layout, dp.step, dp.compute - tp_comm, dp.exposed_comm + tp_comm,
                            memory_bytes=dp.memory_bytes, link=" / ".join(link for link in links if link),
                            tp_comm=tp_comm, tp_link=tp_link.description if layout.tp > 1 else "", dp_link=dp_link)


# --- profiling (torch, local) ------------------------------------------------------------------------------


def _vit_shape(model_name: str) -> dict:
    """The vision transformer's sizes (as the jobs build it: 1x28x28 images, 10 classes)."""
    from mpipar import models

    if model_name not in models.VIT_MODELS:
        raise ValueError(f"tensor-parallel profiles are of the vision transformers {sorted(models.VIT_MODELS)}, "
                         f"not {model_name!r}")
    full = models.VIT_MODELS[model_name](in_channels=1, num_classes=10, image_size=28)
    block = full.blocks[0]
    return {"in_channels": 1, "num_classes": 10, "image_size": 28, "patch_size": full.patch_size, "dim": full.dim,
            "depth": len(full.blocks), "heads": block.attention.num_heads, "hidden": block.fc1.out_features}


def model_degrees(model_name: str, limit: int = MAX_CALIBRATED_TP) -> List[int]:
    """The tensor-parallel degrees up to ``limit`` that divide ``model_name``'s heads and hidden features
    (1 included); [] for a model that is not a vision transformer. Local."""
    from mpipar import models

    if model_name not in models.VIT_MODELS:
        return []
    shape = _vit_shape(model_name)
    return [t for t in range(1, limit + 1) if shape["heads"] % t == 0 and shape["hidden"] % t == 0]


class _RankZeroOf:
    """A tensor-parallel group of ``size`` ranks as its rank 0 sees it, with the other ranks and the
    communication taken out: the checks' allgathers return this rank's value ``size`` times and every
    Allreduce is an Allreduce over ``MPI.COMM_SELF`` (the call, no message; the prediction adds the
    messages' time from the link). Lets :class:`~mpipar.tensor_parallel.ParallelTransformerBlock` build
    and run rank 0's shard in one process (with debug mode's hooks off: :func:`profile_tensor_parallel`)."""

    def __init__(self, size: int):
        self.size = size

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's names
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return 0

    def allgather(self, value):
        return [value] * self.size

    def Allreduce(self, send, receive, op=None):  # noqa: N802
        from mpi4py import MPI

        MPI.COMM_SELF.Allreduce(send, receive, op=MPI.SUM if op is None else op)

    def Iallreduce(self, send, receive, op=None):  # noqa: N802
        from mpi4py import MPI

        return MPI.COMM_SELF.Iallreduce(send, receive, op=MPI.SUM if op is None else op)


@cache
def _modules():
    """The whole parts of a rank's model as torch modules (defined on first use: importing this module
    needs no torch)."""
    from torch import nn

    class Embed(nn.Module):
        """Patches -> tokens + position, as ``VisionTransformer.forward`` begins (the model's own modules)."""

        def __init__(self, model):
            super().__init__()
            self.patch_embed, self.position = model.patch_embed, model.position

        def forward(self, images):
            images = images.to(self.patch_embed.weight.dtype)
            return self.patch_embed(images).flatten(2).transpose(1, 2) + self.position

    class Head(nn.Module):
        """Mean over tokens -> LayerNorm -> linear, as ``VisionTransformer.forward`` ends."""

        def __init__(self, model):
            super().__init__()
            self.norm, self.head = model.norm, model.head

        def forward(self, x):
            return self.head(self.norm(x.mean(1)))

    return Embed, Head


def rank_model(model_name: str, tp: int):
    """``model_name`` as rank 0 of ``tp`` tensor-parallel ranks computes it: an ``nn.Sequential`` of ``embed``,
    ``block0`` ... (each the project's ``ParallelTransformerBlock`` built over :class:`_RankZeroOf`, so its
    heads and hidden features are this rank's share) and ``head``. Local: no communication (build and run it
    outside debug mode, or as :func:`profile_tensor_parallel` does, with debug mode's hooks off).

    Raises:
        ValueError: when ``tp`` does not divide the heads and hidden features.
    """
    from collections import OrderedDict

    from torch import nn

    from mpipar import models
    from mpipar.comm.reducer import CommStats
    from mpipar.tensor_parallel.attention import ParallelTransformerBlock

    shape = _vit_shape(model_name)
    if tp < 1 or shape["heads"] % tp or shape["hidden"] % tp:
        raise ValueError(f"{model_name}: tp {tp} does not divide {shape['heads']} heads and {shape['hidden']} hidden "
                         f"features; use one of {model_degrees(model_name, shape['heads'])}")
    full = models.VIT_MODELS[model_name](in_channels=shape["in_channels"], num_classes=shape["num_classes"],
                                         image_size=shape["image_size"])
    group, stats = _RankZeroOf(tp), CommStats()
    embed, head = _modules()
    layers = [("embed", embed(full))]
    layers += [(f"{BLOCK_PREFIX}{i}", ParallelTransformerBlock(block.attention, block.fc1, block.fc2, block.norm1,
                                                               block.norm2, group, stats=stats))
               for i, block in enumerate(full.blocks)]
    layers.append(("head", head(full)))
    return nn.Sequential(OrderedDict(layers))


def profile_tensor_parallel(model_name: str, sizes: Sequence[int], tp: int, *, repeats: int = 5) -> ModelProfile:
    """The layers one of ``tp`` ranks computes (:func:`rank_model`) at each micro-batch size: forward and
    backward per layer by the pipeline's layer profiler (the fastest round), and the rank's whole step
    (forward, loss, backward, SGD step; the median of ``repeats``), named :func:`profile_name`. Local: one
    process, no communication."""
    from mpipar.cost.calibrate import profile_layers_and_step
    from mpipar.diagnostics import debug

    saved_hooks = debug.hooks
    debug.hooks = None  # the stand-in group's calls are no collectives for debug mode or a watchdog to follow
    try:
        shape = _vit_shape(model_name)
        return profile_layers_and_step(profile_name(model_name, tp), rank_model(model_name, tp), sizes,
                                       (shape["in_channels"], shape["image_size"], shape["image_size"]),
                                       shape["num_classes"], repeats=repeats)
    finally:
        debug.hooks = saved_hooks


def tensor_profiles(model_name: str, sizes: Sequence[int], *, ranks: int = 1, repeats: int = 5,
                    limit: Optional[int] = None) -> Dict[str, ModelProfile]:
    """``{MODEL/tpT: profile}`` for every degree T > 1 that divides the model, up to ``limit`` (default: 4 or
    ``ranks``, whichever is larger); {} for a model that is not a vision transformer. Local."""
    limit = max(MAX_CALIBRATED_TP, ranks) if limit is None else limit
    return {profile_name(model_name, t): profile_tensor_parallel(model_name, sizes, t, repeats=repeats)
            for t in model_degrees(model_name, limit) if t > 1}
