"""One registration point per strategy: its name, settings, jobs, checkpoint, consolidation and cost model.

Pure: imports nothing of mpipar, so every layer may read it. Each strategy folder registers one
:class:`StrategySpec` in its ``__init__.py``; the functions a spec names are entry points, dotted paths
(``"package.module:attribute"``) that :func:`resolve` imports when a consumer calls them, so a consumer in
a lower layer (``run/``, ``cost/``) never imports a strategy folder itself. The folders are named once, in
``STRATEGY_PACKAGES``; :func:`specs` and :func:`get` import them on first use. Local: no MPI.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["StrategySpec", "STRATEGY_PACKAGES", "register", "specs", "get", "for_settings", "for_checkpoint",
           "resolve"]

# the strategy folders, each registering its spec when imported: a new strategy adds its folder here
STRATEGY_PACKAGES = ("mpipar.data_parallel", "mpipar.local_sgd", "mpipar.parameter_server", "mpipar.pipeline",
                     "mpipar.tensor_parallel", "mpipar.sharded")

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class StrategySpec:
    """What the consumers of a strategy (CLI, ``mpipar-consolidate``, cost model, report, tests) know of it.

    Args:
        name: what its ``Strategy.name`` reports: the ``strategy`` of its metrics files and checkpoints.
        package: its folder, e.g. ``"mpipar.local_sgd"``.
        settings: ``"module:Class"`` of its settings (the ``settings`` a ``Session`` agrees on), or None
            when it takes none (data parallelism).
        checkpoint_key: the entry its ``state_dict()`` adds to every checkpoint file (``""``: none); how a
            checkpoint written before files recorded their strategy is recognised.
        consolidate: ``"module:function"``, ``function(checkpoint, meta, first)`` -> the unsplit model's
            state dict (``run/consolidate.py``: the checkpoint directory, its ``meta.json``, rank 0's state).
        predict: ``"module:function"``, ``function(machine, profile, *, model, batch_size, bucket_mb,
            settings, ranks, ranks_per_node)`` -> a cost-model ``Prediction``, or None for settings it does
            not model (``cost/run.py``); None: no cost model yet.
        profiles: ``"module:function"``, ``function(model_name, sizes, *, ranks, repeats)`` -> ``{name:
            ModelProfile}``, the layer-time profiles of ``model_name`` its cost model reads that the plain
            profiler cannot take (``mpipar-calibrate``, local on every rank; {} for other models); None: none.
        jobs: the ``jobs/`` scripts that run it.
        loop_cases: its cases in ``tests/test_loop.py`` (the loop on N ranks vs one process).
        aliases: other names its strategy reports (a pipeline with replicas: ``pipeline_hybrid``).
        consolidate_optimizer: ``"module:function"``, ``function(checkpoint)`` -> the whole optimizer
            state by parameter name, which ``mpipar-consolidate`` adds as ``optimizer_by_name``; None: not
            written (the strategy's optimizer state is not split, or not merged yet).
    """

    name: str
    package: str
    settings: Optional[str]
    checkpoint_key: str
    consolidate: str
    predict: Optional[str] = None
    profiles: Optional[str] = None
    jobs: Tuple[str, ...] = ()
    loop_cases: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()
    consolidate_optimizer: Optional[str] = None

    def __post_init__(self) -> None:
        for field in ("settings", "consolidate", "predict", "profiles", "consolidate_optimizer"):
            value = getattr(self, field)
            if value is not None and not _ENTRY_POINT.match(value):
                raise ValueError(f"strategy {self.name!r}: {field} must be 'package.module:attribute', got {value!r}")
        if not self.name.isidentifier():
            raise ValueError(f"a strategy's name is an identifier (it names metrics and checkpoints), "
                             f"got {self.name!r}")

    @property
    def names(self) -> Tuple[str, ...]:
        return (self.name, *self.aliases)


_REGISTRY: Dict[str, StrategySpec] = {}
_loaded = False


def register(spec: StrategySpec) -> StrategySpec:
    """Add ``spec`` (from its folder's ``__init__.py``). Raises ValueError when another spec has one
    of its names or its checkpoint key."""
    for other in _REGISTRY.values():
        if other == spec:
            return spec
        clash = set(other.names) & set(spec.names)
        if clash or (spec.checkpoint_key and spec.checkpoint_key == other.checkpoint_key):
            raise ValueError(f"strategy {spec.name!r} ({spec.package}) clashes with {other.name!r} "
                             f"({other.package}): {sorted(clash) or 'checkpoint key ' + repr(spec.checkpoint_key)}")
    _REGISTRY[spec.name] = spec
    return spec


def specs() -> Tuple[StrategySpec, ...]:
    """Every registered strategy, in ``STRATEGY_PACKAGES`` order."""
    global _loaded
    if not _loaded:
        for package in STRATEGY_PACKAGES:
            importlib.import_module(package)
        _loaded = True
    order = {package: index for index, package in enumerate(STRATEGY_PACKAGES)}
    return tuple(sorted(_REGISTRY.values(), key=lambda spec: order.get(spec.package, len(order))))


def get(name: str) -> StrategySpec:
    """The strategy that reports ``name`` (a metrics file's or checkpoint's ``strategy``). Raises
    ValueError naming the known strategies."""
    for spec in specs():
        if name in spec.names:
            return spec
    raise ValueError(f"no strategy named {name!r}; registered: {[n for spec in specs() for n in spec.names]}")


def for_settings(settings: Any) -> StrategySpec:
    """The strategy whose settings ``settings`` are (None: the one that takes none)."""
    path = None if settings is None else f"{type(settings).__module__}:{type(settings).__qualname__}"
    for spec in specs():
        if spec.settings == path:
            return spec
    raise ValueError(f"no registered strategy takes settings {path}")


def for_checkpoint(state: dict, per_rank: bool) -> StrategySpec:
    """The strategy that wrote a checkpoint whose rank 0 state is ``state``: its ``strategy`` entry,
    else (files written before they recorded it) the one spec whose ``checkpoint_key`` it holds, else
    data parallelism's (no key) when the checkpoint is rank 0's file alone. Raises ValueError."""
    if "strategy" in state:
        return get(state["strategy"])
    found = [spec for spec in specs() if spec.checkpoint_key and spec.checkpoint_key in state]
    if not found and not per_rank:
        found = [spec for spec in specs() if not spec.checkpoint_key]
    if len(found) != 1:
        raise ValueError(f"cannot tell which strategy wrote this checkpoint (no 'strategy' entry; strategies "
                         f"whose entries it holds: {[spec.name for spec in found]})")
    return found[0]


def resolve(entry_point: str) -> Any:
    """The object an entry point ``"package.module:attribute"`` names, importing its module."""
    module, _, attribute = entry_point.partition(":")
    return getattr(importlib.import_module(module), attribute)
