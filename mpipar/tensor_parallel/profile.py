"""One rank of ``tp`` splitting a vision transformer, built and timed in one process for the cost model's
machine file (``MODEL/tpT`` profiles; ``mpipar-calibrate`` reaches :func:`calibration_profiles` through this
strategy's registered ``profiles`` entry point). Local: no communication."""

from __future__ import annotations

from collections import OrderedDict
from functools import cache
from typing import Dict, List, Optional, Sequence, cast

from mpi4py import MPI
from torch import nn

from mpipar import models
from mpipar.comm.reducer import CommStats
from mpipar.cost.calibrate import profile_layers_and_step
from mpipar.cost.machine import ModelProfile
from mpipar.cost.tensor import BLOCK_PREFIX, MAX_CALIBRATED_TP, model_degrees, profile_name, vit_shape
from mpipar.diagnostics import debug
from mpipar.models.vit import TransformerBlock
from mpipar.tensor_parallel.attention import ParallelTransformerBlock

__all__ = ["rank_model", "profile_tensor_parallel", "tensor_profiles", "calibration_profiles"]


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
        MPI.COMM_SELF.Allreduce(send, receive, op=MPI.SUM if op is None else op)

    def Iallreduce(self, send, receive, op=None):  # noqa: N802
        return MPI.COMM_SELF.Iallreduce(send, receive, op=MPI.SUM if op is None else op)


@cache
def _modules():
    """The whole parts of a rank's model as torch modules (classes defined once, on first use)."""

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
    shape = vit_shape(model_name)
    if tp < 1 or shape["heads"] % tp or shape["hidden"] % tp:
        raise ValueError(f"{model_name}: tp {tp} does not divide {shape['heads']} heads and {shape['hidden']} hidden "
                         f"features; use one of {model_degrees(model_name, shape['heads'])}")
    full = models.VIT_MODELS[model_name](in_channels=shape["in_channels"], num_classes=shape["num_classes"],
                                         image_size=shape["image_size"])
    group = cast(MPI.Intracomm, _RankZeroOf(tp))  # stands in for the group's communicator
    stats = CommStats()
    embed, head = _modules()
    layers = [("embed", embed(full))]
    layers += [(f"{BLOCK_PREFIX}{i}", ParallelTransformerBlock(block.attention, block.fc1, block.fc2, block.norm1,
                                                               block.norm2, group, stats=stats))
               for i, block in enumerate(cast(List[TransformerBlock], list(full.blocks)))]
    layers.append(("head", head(full)))
    return nn.Sequential(OrderedDict(layers))


def profile_tensor_parallel(model_name: str, sizes: Sequence[int], tp: int, *, repeats: int = 5) -> ModelProfile:
    """The layers one of ``tp`` ranks computes (:func:`rank_model`) at each micro-batch size: forward and
    backward per layer by the pipeline's layer profiler (the fastest round), and the rank's whole step
    (forward, loss, backward, SGD step; the median of ``repeats``), named :func:`profile_name`. Local: one
    process, no communication."""

    saved_hooks = debug.hooks
    debug.hooks = None  # the stand-in group's calls are no collectives for debug mode or a watchdog to follow
    try:
        shape = vit_shape(model_name)
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


def calibration_profiles(model_name: str, sizes: Sequence[int], *, ranks: int = 1,
                         repeats: int = 5) -> Dict[str, ModelProfile]:
    """The registered ``profiles`` entry point: for a vision transformer, the whole model as one rank of
    tensor parallelism 1 runs it (named ``model_name``: not a sequence of layers, the plain profiler cannot
    time it) and :func:`tensor_profiles`; {} for another model. Local."""
    if not model_degrees(model_name):
        return {}
    return {model_name: profile_tensor_parallel(model_name, sizes, 1, repeats=repeats),
            **tensor_profiles(model_name, sizes, ranks=ranks, repeats=repeats)}
