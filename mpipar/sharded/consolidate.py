"""A sharded checkpoint as one state: the full model (``mpipar-consolidate``) and, for re-sharding, the
optimizer state of every parameter. Local: no MPI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mpipar.run.consolidate import find_checkpoint, read_rank

__all__ = ["full_model", "full_optimizer", "training_state", "merge_shards", "shard_optimizer_state", "merge_pieces",
           "grid_optimizer", "GRID_KEY"]

GRID_KEY = "zero_shard"
"""The entry of a grid strategy's checkpoint file (pipeline, tensor parallelism) with its ZeRO-1 layout."""


def _files(checkpoint: Path, meta: dict, first: dict) -> List[dict]:
    world = first["sharded"]["world_size"]
    if world != meta.get("world_size"):
        raise ValueError(f"{checkpoint}: rank 0 was written by {world} ranks, meta.json says {meta.get('world_size')}")
    states = [first] + [read_rank(checkpoint, meta, rank) for rank in range(1, world)]
    for rank, state in enumerate(states):
        layout = state.get("sharded", {})
        if layout.get("rank") != rank or layout.get("entries") != first["sharded"]["entries"]:
            raise ValueError(f"{checkpoint}: rank {rank}'s file holds shard {layout.get('rank')} of another layout "
                             f"than rank 0's")
    return states


def merge_shards(checkpoint: Path, states: List[dict]) -> Dict[str, torch.Tensor]:
    """The trainable parameters by name (aliases of tied ones included), from every rank's shards."""
    layout = states[0]["sharded"]
    entries, shapes = layout["entries"], layout["shapes"]
    by_dtype: Dict[str, List[int]] = {}
    for index, (_, _, *key) in enumerate(entries):  # dtype, and the unit for ZeRO-3
        by_dtype.setdefault(tuple(key), []).append(index)
    merged: Dict[str, torch.Tensor] = {}
    for group, params in enumerate(by_dtype.values()):
        flat = torch.cat([state["shards"][group] for state in states])
        offset = 0
        for index in params:
            name, numel = entries[index][:2]
            if offset + numel > flat.numel():
                raise ValueError(f"{checkpoint}: the shards hold {flat.numel()} elements, fewer than the layout's")
            merged[name] = flat[offset:offset + numel].reshape(shapes[index]).clone()
            offset += numel
    for alias, name in layout["aliases"].items():
        merged[alias] = merged[name]
    return merged


def full_model(checkpoint: Path, meta: dict, first: dict) -> Dict[str, torch.Tensor]:
    """The unsplit model's state dict: rank 0's buffers and frozen parameters, the shards merged."""
    return {**first["model"], **merge_shards(checkpoint, _files(checkpoint, meta, first))}


def training_state(checkpoint) -> dict:
    """Rank 0's state with ``model`` the whole model and ``optimizer_by_name``: each parameter's
    optimizer state (per-element tensors whole, flattened; scalars such as AdamW's ``step`` as they are)."""
    checkpoint = find_checkpoint(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    first = read_rank(checkpoint, meta, 0)
    states = _files(checkpoint, meta, first)
    by_name = merge_pieces([(state["sharded"], state["optimizer"]) for state in states])
    return {**first, "model": {**first["model"], **merge_shards(checkpoint, states)}, "optimizer_by_name": by_name}


def merge_pieces(files: List[Tuple[dict, dict]]) -> Dict[str, dict]:
    """Each parameter's whole optimizer state by name, from ``(layout, optimizer state dict)`` of every
    file: the layout's ``entries`` (name, numel, ...) and ``pieces`` (``[name, start, stop]``, in the
    optimizer's order). Per-element tensors are put together flattened; scalars (AdamW's ``step``) kept."""
    by_name: Dict[str, dict] = {}
    for layout, optimizer in files:
        numel = {name: count for name, count, *_ in layout["entries"]}
        for index, (name, start, stop) in enumerate(layout["pieces"]):
            for key, value in (optimizer["state"].get(index) or {}).items():
                entry = by_name.setdefault(name, {})
                if isinstance(value, torch.Tensor) and value.dim() >= 1:
                    whole = entry.setdefault(key, torch.zeros(numel[name], dtype=value.dtype))
                    whole[start:stop] = value.reshape(-1)
                else:
                    entry[key] = value
    return by_name


def grid_optimizer(checkpoint) -> Dict[str, dict]:
    """Each parameter's whole optimizer state by name, from a grid checkpoint whose files carry ZeRO-1
    shards (:data:`GRID_KEY`, written by ``ShardedUpdate.state_dict``): every rank's file is read, since
    each replica holds its own pieces. Raises ValueError when a file has no shard layout."""
    checkpoint = find_checkpoint(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    states = [read_rank(checkpoint, meta, rank) for rank in range(int(meta["world_size"]))]
    missing = [rank for rank, state in enumerate(states) if GRID_KEY not in state]
    if missing:
        raise ValueError(f"{checkpoint}: the files of ranks {missing} hold no ZeRO shard layout ({GRID_KEY})")
    return merge_pieces([(state[GRID_KEY], state["optimizer"]) for state in states])


def full_optimizer(checkpoint) -> Dict[str, dict]:
    """Each parameter's whole optimizer state by name (``mpipar-consolidate`` writes it)."""
    return training_state(checkpoint)["optimizer_by_name"]


def shard_optimizer_state(by_name: Dict[str, dict], pieces: List[Tuple[str, int, int]], group: dict) -> dict:
    """An optimizer state dict for ``pieces`` (``(name, start, stop)``, in the optimizer's order) cut
    from :func:`training_state`'s ``optimizer_by_name``; ``group``: the saved first param group."""
    state = {}
    for index, (name, start, stop) in enumerate(pieces):
        saved = by_name.get(name)
        if saved:
            state[index] = {key: value[start:stop].clone() if isinstance(value, torch.Tensor) and value.dim() >= 1
                            else value for key, value in saved.items()}
    return {"state": state, "param_groups": [{**group, "params": list(range(max(1, len(pieces))))}]}
