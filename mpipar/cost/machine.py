"""The machine file: message costs per size band (within and across nodes) and a model's layer times, as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from mpipar.cost.allreduce import allreduce_seconds, binomial_rounds, collective_seconds

__all__ = ["Band", "Link", "LayerCost", "ModelProfile", "Machine", "BAND_EDGES", "fit_bands", "interconnect"]

FORMAT = 1
# Upper ends of the size bands (bytes): Open MPI's shared-memory eager limit (4 KiB), TCP's (64 KiB counting
# its header, so a 64 KiB payload already takes the rendezvous path), then the cache sizes where a copy's
# bandwidth changes; the last band is open.
BAND_EDGES = (4096, 65535, 2**20, 2**24)


@dataclass(frozen=True)
class Band:
    """``seconds = alpha + beta * bytes`` for messages of at most ``max_bytes`` (None: any larger size)."""

    max_bytes: Optional[int]
    alpha: float
    beta: float

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"a band needs alpha, beta >= 0, got {self.alpha}, {self.beta}")


@dataclass(frozen=True)
class Link:
    """Costs between two ranks of one kind of link (``within`` a node or ``across`` nodes).

    ``p2p``: a one-way message (half a ping-pong). ``allreduce``: the blocking Allreduce as the ring
    model's per-step costs, so ``n`` bytes on ``p`` ranks take ``2 (p-1) alpha + 2 (p-1)/p n beta``
    (fitted to Allreduces measured on ``allreduce_ranks`` ranks). ``gradient``: the gradient reducer's
    in-place non-blocking Allreduce as a binomial tree's per-level costs, so ``p`` ranks take
    ``2 ceil(log2 p) (alpha + n beta)`` (fitted on the same ranks; empty when not measured).
    """

    p2p: Tuple[Band, ...]
    allreduce: Tuple[Band, ...]
    allreduce_ranks: int = 2
    description: str = ""
    gradient: Tuple[Band, ...] = ()

    def __post_init__(self):
        for name, bands in (("p2p", self.p2p), ("allreduce", self.allreduce), ("gradient", self.gradient)):
            if name == "gradient" and not bands:
                continue
            if not bands or bands[-1].max_bytes is not None:
                raise ValueError(f"{name} needs bands ending with an open one (max_bytes None), got {bands}")

    @staticmethod
    def _band(bands: Sequence[Band], nbytes: float) -> Band:
        return next(b for b in bands if b.max_bytes is None or nbytes <= b.max_bytes)

    def p2p_seconds(self, nbytes: float) -> float:
        """One message of ``nbytes`` from one rank to another (0 for an empty message)."""
        if nbytes <= 0:
            return 0.0
        band = self._band(self.p2p, nbytes)
        return band.alpha + band.beta * nbytes

    def gradient_seconds(self, nbytes: float, ranks: int) -> Optional[float]:
        """The reducer's in-place non-blocking Allreduce over ``ranks`` ranks on this link, from the
        fitted binomial levels; None when the link has no such fit."""
        if not self.gradient:
            return None
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        band = self._band(self.gradient, nbytes)
        return binomial_rounds(ranks) * (band.alpha + band.beta * nbytes)

    def allreduce_seconds(self, nbytes: float, ranks: int) -> float:
        """An Allreduce of ``nbytes`` per rank over ``ranks`` ranks (ring model; 0 on one rank)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        band = self._band(self.allreduce, nbytes)
        return 2 * (ranks - 1) * band.alpha + 2 * (ranks - 1) / ranks * nbytes * band.beta


@dataclass(frozen=True)
class LayerCost:
    """One layer at one micro-batch size: seconds and bytes (as :class:`~mpipar.pipeline.partition.LayerProfile`)."""

    name: str
    forward: float
    backward: float
    param_bytes: Tuple[int, ...]  # each trainable parameter, in the model's order
    activation_bytes: int  # the output of one micro-batch
    saved_bytes: int  # what autograd keeps of one micro-batch for the backward
    param_shapes: Tuple[Tuple[int, ...], ...] = ()  # each trainable parameter's shape (older files: none)


@dataclass(frozen=True)
class ModelProfile:
    """A model's layers timed at several micro-batch sizes, and its whole step.

    ``layers[b]``: the layers at micro-batch size ``b``; ``step_seconds[b]``: forward, loss, backward and
    optimizer step of the whole model on a batch of ``b`` (one process).
    """

    name: str
    layers: Dict[int, Tuple[LayerCost, ...]]
    step_seconds: Dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.layers:
            raise ValueError(f"model {self.name!r} needs layers at one micro-batch size at least")
        counts = {len(layers) for layers in self.layers.values()}
        if len(counts) != 1:
            raise ValueError(f"model {self.name!r} has different layer counts at different sizes: {sorted(counts)}")

    @property
    def sizes(self) -> Tuple[int, ...]:
        return tuple(sorted(self.layers))

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.layers.values())))


@dataclass(frozen=True)
class Machine:
    """What ``mpipar-calibrate`` measured: links within and across nodes, and models' layer times.

    ``across`` is None when the calibration ran on one node (a plan for several nodes then needs
    ``--interconnect``). ``ranks``, ``ranks_per_node``: the calibration's layout.
    ``reduce_seconds_per_byte``: adding a received float32 buffer into another (one core).
    ``compute_ratio``: a layer's seconds under 16-bit autocast over fp32's, per precision (``bf16``,
    ``fp16``), where measured. ``memory_bytes``: a node's physical memory (0: unknown), which its ranks share.
    ``matmul_flops``: fp32 floating-point operations per second of a thin matrix product (PowerSGD's
    ``M Q``, one core; 0: not measured, :data:`~mpipar.cost.options.ASSUMED_MATMUL_FLOPS` assumed).
    """

    within: Link
    across: Optional[Link] = None
    models: Dict[str, ModelProfile] = field(default_factory=dict)
    ranks: int = 1
    ranks_per_node: int = 1
    host: str = ""
    date: str = ""
    reduce_seconds_per_byte: float = 0.0
    compute_ratio: Dict[str, float] = field(default_factory=dict)
    memory_bytes: float = 0.0
    matmul_flops: float = 0.0

    def collective_seconds(self, collective: str, nbytes: float, nodes: Sequence[int]) -> float:
        """A non-blocking reduce-scatter, all-gather or all-to-all of a buffer of ``nbytes`` over ranks on
        ``nodes`` (:func:`~mpipar.cost.allreduce.collective_seconds`: ring or pairwise rounds on the
        point-to-point links)."""
        return collective_seconds(collective, nbytes, nodes, self.within, self.across,
                                  reduce_seconds_per_byte=self.reduce_seconds_per_byte)

    def gradient_allreduce_seconds(self, nbytes: float, nodes: Sequence[int]) -> float:
        """The gradient reducer's non-blocking Allreduce of ``nbytes`` over ranks on ``nodes`` (``nodes[i]``:
        the node of the group's rank ``i``): in place inside a node, out of place across nodes, as
        :class:`~mpipar.comm.reducer.GradientReducer` calls it. Inside a node the calibrated fit of that
        call (``within.gradient``) when there is one; otherwise, and across nodes, its algorithm's rounds
        priced by :mod:`mpipar.cost.allreduce`."""
        if len(set(nodes)) <= 1:
            fitted = self.within.gradient_seconds(nbytes, len(nodes))
            if fitted is not None:
                return fitted
        return allreduce_seconds(nbytes, nodes, self.within, self.across,
                                 reduce_seconds_per_byte=self.reduce_seconds_per_byte,
                                 in_place=len(set(nodes)) <= 1)

    def link(self, same_node: bool) -> Link:
        """The link between two ranks; raises ValueError when nothing across nodes is known."""
        if same_node:
            return self.within
        if self.across is None:
            raise ValueError("the machine file has no link across nodes (calibrated on one node): describe one "
                             "with --interconnect, e.g. '1gbit,1ms' or 'ib-hdr'")
        return self.across

    def with_across(self, link: Link) -> Machine:
        return dataclasses.replace(self, across=link)

    def profile(self, model: str) -> ModelProfile:
        if model not in self.models:
            raise ValueError(f"the machine file has no layer times of model {model!r} (it has "
                             f"{sorted(self.models)}); run mpipar-calibrate --model {model}")
        return self.models[model]

    def to_json(self) -> dict:
        def link(value: Optional[Link]):
            return None if value is None else dataclasses.asdict(value)
        return {"format": FORMAT, "host": self.host, "date": self.date, "ranks": self.ranks,
                "ranks_per_node": self.ranks_per_node, "reduce_seconds_per_byte": self.reduce_seconds_per_byte,
                "within": link(self.within), "across": link(self.across),
                "compute_ratio": dict(self.compute_ratio), "memory_bytes": self.memory_bytes,
                "matmul_flops": self.matmul_flops,
                "models": {name: {"layers": {str(size): [dataclasses.asdict(layer) for layer in layers]
                                             for size, layers in profile.layers.items()},
                                  "step_seconds": {str(size): t for size, t in profile.step_seconds.items()}}
                           for name, profile in self.models.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Machine:
        if data.get("format") != FORMAT:
            raise ValueError(f"machine file format {data.get('format')!r} is not {FORMAT}; run mpipar-calibrate again")

        def link(value: dict) -> Link:
            return Link(p2p=tuple(Band(**b) for b in value["p2p"]),
                        allreduce=tuple(Band(**b) for b in value["allreduce"]),
                        allreduce_ranks=value["allreduce_ranks"], description=value["description"],
                        gradient=tuple(Band(**b) for b in value.get("gradient", ())))

        models = {name: ModelProfile(name, {int(size): tuple(LayerCost(**{
                      **layer, "param_bytes": tuple(layer["param_bytes"]),
                      "param_shapes": tuple(tuple(shape) for shape in layer.get("param_shapes", ()))})
                      for layer in layers) for size, layers in entry["layers"].items()},
                      {int(size): t for size, t in entry["step_seconds"].items()})
                  for name, entry in data["models"].items()}
        across = None if data["across"] is None else link(data["across"])
        return cls(within=link(data["within"]), across=across, models=models, ranks=data["ranks"],
                   ranks_per_node=data["ranks_per_node"], host=data["host"], date=data["date"],
                   reduce_seconds_per_byte=float(data.get("reduce_seconds_per_byte", 0.0)),
                   compute_ratio={k: float(v) for k, v in data.get("compute_ratio", {}).items()},
                   memory_bytes=float(data.get("memory_bytes", 0.0)),
                   matmul_flops=float(data.get("matmul_flops", 0.0)))

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> Machine:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the machine file {path}: {exc}; write one with mpipar-calibrate") from None


def fit_bands(sizes: Sequence[float], seconds: Sequence[float], *, scale_alpha: float = 1.0,
              scale_beta: float = 1.0, edges: Sequence[int] = BAND_EDGES) -> Tuple[Band, ...]:
    """Least-relative-error fit of ``seconds = scale_alpha * alpha + scale_beta * bytes * beta`` per band. Pure.

    Each band is fitted to the measurements inside it (with the nearest one on each side when it
    holds only one, so two points always pin a line); alpha and beta are kept >= 0. Bands with no measurement take
    the previous band's values. ``scale_alpha``, ``scale_beta``: the ring Allreduce's
    ``2 (p-1)`` and ``2 (p-1)/p``.
    """
    import numpy as np

    points = sorted(zip(map(float, sizes), map(float, seconds)))
    if len(points) < 2:
        raise ValueError(f"need at least 2 measurements to fit alpha and beta, got {len(points)}")
    # (upper edge, (alpha, beta)), or (upper edge, None) for a band without measurements
    fitted: List[Tuple[Optional[int], Optional[Tuple[float, float]]]] = []
    lower = 0
    for upper in [*edges, None]:
        inside = [i for i, (n, _) in enumerate(points) if n > lower and (upper is None or n <= upper)]
        if upper is not None:
            lower = upper
        if not inside:
            fitted.append((upper, None))
            continue
        chosen = inside if len(inside) >= 2 else sorted(
            set(inside) | {max(inside[0] - 1, 0), min(inside[-1] + 1, len(points) - 1)})
        n = np.array([points[i][0] for i in chosen])
        t = np.array([points[i][1] for i in chosen])
        design = np.stack([scale_alpha / t, scale_beta * n / t], axis=1)  # rows / t: relative error
        alpha, beta = np.linalg.lstsq(design, np.ones_like(t), rcond=None)[0]
        if alpha < 0:
            alpha, beta = 0.0, float(np.sum(n / t) / np.sum(n * n / (t * t))) / scale_beta
        elif beta < 0:
            alpha, beta = float(np.median(t)) / scale_alpha, 0.0
        fitted.append((upper, (float(alpha), float(beta))))
    known = [values for _, values in fitted if values is not None]
    bands, last = [], known[0]  # a band without measurements takes its neighbour's values
    for upper, values in fitted:
        last = values if values is not None else last
        bands.append(Band(upper, *last))
    return tuple(bands)


_PRESETS = {  # name: (bandwidth bits/s, latency s)
    "1gbit": (1e9, 50e-6), "10gbe": (10e9, 20e-6), "25gbe": (25e9, 10e-6), "100gbe": (100e9, 5e-6),
    "ib-edr": (100e9, 1.5e-6), "ib-hdr": (200e9, 1.5e-6), "ib-ndr": (400e9, 1.5e-6),
}
_UNITS = {"gbit": 1e9, "mbit": 1e6, "tbit": 1e12}
_TIMES = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def interconnect(text: str) -> Link:
    """A described link across nodes: a preset (``ib-hdr``, ``ib-ndr``, ``ib-edr``, ``10gbe``,
    ``25gbe``, ``100gbe``, ``1gbit``) or ``BANDWIDTH,LATENCY`` such as ``1gbit,1ms`` or ``100gbit,2us``.
    One band; the Allreduce is a ring over it. Raises ValueError with the accepted forms."""
    words = text.lower().replace(" ", "").split(",")
    try:
        if len(words) == 1 and words[0] in _PRESETS:
            bits, latency = _PRESETS[words[0]]
        elif len(words) == 2:
            unit = next(u for u in _UNITS if words[0].endswith(u))
            bits = float(words[0][:-len(unit)] or 1) * _UNITS[unit]
            time_unit = next(u for u in ("us", "ms", "s") if words[1].endswith(u))
            latency = float(words[1][:-len(time_unit)]) * _TIMES[time_unit]
        else:
            raise ValueError
    except (ValueError, StopIteration):
        raise ValueError(f"--interconnect must be one of {sorted(_PRESETS)} or BANDWIDTH,LATENCY such as "
                         f"'1gbit,1ms' or '100gbit,2us', got {text!r}") from None
    band = (Band(None, latency, 8.0 / bits),)
    return Link(p2p=band, allreduce=band, allreduce_ranks=2, description=text)
