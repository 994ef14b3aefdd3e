"""One state dict of the whole model from a checkpoint, whatever the strategy that wrote it.

The strategy comes from the checkpoint (its ``strategy`` entry, or for older files the entry its
state adds, :func:`mpipar.registry.for_checkpoint`); its registered ``consolidate`` function merges
the files. The layouts here serve the strategies that share them. :func:`whole_model`: rank 0's file
holds the whole model (data parallelism; a parameter server, whose ranks all hold every server's
share when a checkpoint is written). :func:`merge_stages`: one file per rank with that rank's stages;
the stages of the first pipeline (the grid's first ``stages`` ranks in its node-by-node order,
``grid_order`` in the files: replicas hold the same parameters) are merged under the unsplit
``nn.Sequential``'s names (a parameter several stages share, ``shared_parameters`` in the files, is
taken once, from its first stage). :func:`merge_shards`: one file per rank with that rank's shards of every
layer; the shards of the first group (the grid's first ``tp`` ranks) are concatenated along the
dimension each was cut (rows of a column-parallel layer, columns of a row-parallel one; padding
dropped), as the files' ``tp_layout`` records. Local SGD's files per rank are averaged
(``mpipar/local_sgd/consolidate.py``). Either way ``model.load_state_dict(model_state(path)[0])``
works on the unsplit model the job built.

Command line::

    mpipar-consolidate runs/pp                  # latest checkpoint -> runs/pp/model.pt
    mpipar-consolidate runs/pp/checkpoints/step-000000100 -o model.pt

Local: no MPI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mpipar import registry
from mpipar.run.checkpoint import read_state, verify_file

__all__ = ["find_checkpoint", "model_state", "training_state", "read_rank", "whole_model", "merge_stages",
           "merge_shards", "main"]


def find_checkpoint(path) -> Path:
    """``path`` itself when it is a checkpoint (holds ``meta.json``), else the newest complete
    checkpoint in ``path/checkpoints`` or ``path``. Raises FileNotFoundError saying what was looked at."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            complete = sorted(entry for entry in directory.iterdir()
                              if entry.name.startswith("step-") and ".tmp-" not in entry.name
                              and (entry / "meta.json").is_file())
            if complete:
                return complete[-1]
    raise FileNotFoundError(f"no complete checkpoint at {path} (a step-NNNNNNNNN directory with meta.json, "
                            f"or a run directory holding checkpoints/)")


def read_rank(checkpoint: Path, meta: dict, rank: int) -> dict:
    """Rank ``rank``'s file of ``checkpoint``, verified against ``meta.json`` (``meta``) and loaded
    safely (``weights_only``). Raises FileNotFoundError or ValueError."""
    file = checkpoint / f"rank-{rank}.pt"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing")
    files = meta.get("files")
    problem = f"{file.name} is not listed in meta.json" if files is not None and file.name not in files else \
        verify_file(file, None if files is None else files[file.name])
    if problem:
        raise ValueError(f"{file.parent}: {problem}")
    return read_state(file)


def model_state(checkpoint) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The whole model's state dict and the checkpoint's run information.

    Returns:
        ``(state_dict, info)``; ``info`` holds ``step``, ``config``, ``strategy`` and, for a
        partitioned model, ``placement`` (pipelines) or ``tp`` (tensor parallelism).

    Raises:
        FileNotFoundError: no checkpoint or a rank's file missing.
        ValueError: a rank file that does not match the others, or a checkpoint the strategy cannot merge.
    """
    checkpoint = find_checkpoint(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    first = read_rank(checkpoint, meta, 0)
    spec = registry.for_checkpoint(first, per_rank=bool(meta.get("per_rank")))
    info = {"step": first.get("step"), "config": first.get("config"), "checkpoint": str(checkpoint),
            "strategy": spec.name, **{key: first[key] for key in ("placement", "tp") if key in first}}
    return registry.resolve(spec.consolidate)(checkpoint, meta, first), info


def whole_model(checkpoint: Path, meta: dict, first: dict) -> Dict[str, torch.Tensor]:
    """Rank 0's model: the checkpoint's layout when rank 0 holds the whole model."""
    return dict(first["model"])


def merge_stages(checkpoint: Path, meta: dict, first: dict) -> Dict[str, torch.Tensor]:
    """The first pipeline's stages merged under the unsplit model's names."""
    if (first.get("config") or {}).get("tp", 1) > 1:
        raise ValueError(f"{checkpoint}: a pipeline whose stages are split over tensor-parallel ranks "
                         f"(tp {first['config']['tp']}) cannot be merged by mpipar-consolidate yet")
    return _merge_ranks(checkpoint, meta, first)[0]


def training_state(checkpoint) -> dict:
    """A partitioned checkpoint as one training state for another layout: rank 0's state
    (position, schedule, RNG, configuration), ``model`` under the unsplit model's names,
    and ``optimizer_by_name``: each parameter's optimizer state by the same names (the
    files must record ``parameter_names``, as pipeline checkpoints do). Local: no MPI."""
    checkpoint = find_checkpoint(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    first = read_rank(checkpoint, meta, 0)
    model, by_name = _merge_ranks(checkpoint, meta, first)
    return {**first, "model": model, "optimizer_by_name": by_name}


def _merge_ranks(checkpoint: Path, meta: dict, first: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The first pipeline's rank files merged: (model tensors, optimizer state) by unsplit names."""
    placement = first.get("placement")
    if placement is None:
        raise ValueError(f"{checkpoint}: rank 0's file records no pipeline placement: not a pipeline checkpoint")
    stages = max(placement) + 1  # the first pipeline: the grid's first `stages` ranks
    merged: Dict[str, torch.Tensor] = {}
    by_name: dict = {}
    for rank in _first_ranks(first, stages):
        state = first if rank == 0 else read_rank(checkpoint, meta, rank)
        if state.get("placement") != placement:
            raise ValueError(f"{checkpoint}: rank {rank} was written with placement {state.get('placement')}, "
                             f"rank 0 with {placement}")
        for key, value in state["model"].items():
            local_stage, _, name = key.partition(".")  # "<stage on this rank>.<layer name>.<tensor>"
            if not local_stage.isdigit() or not name:
                raise ValueError(f"{checkpoint}: rank {rank} holds {key!r}, not a pipeline stage's tensor")
            if name in merged:
                raise ValueError(f"{checkpoint}: {name} is held by more than one rank")
            merged[name] = value
        if "parameter_names" in state:  # the optimizer state of each parameter, by name
            optimizer = state["optimizer"]["state"]
            by_name.update((name, optimizer.get(index)) for index, name in enumerate(state["parameter_names"]))
    for names in first.get("shared_parameters", ()):  # one parameter of several stages: its first stage's copy
        for name in names[1:]:
            merged[name] = merged[names[0]]
    return merged, by_name


def _first_ranks(first: dict, count: int) -> List[int]:
    """The ranks at the grid's first ``count`` positions (rank 0's file records the grid's
    node-by-node order; files written before it had none: rank order)."""
    return list(first.get("grid_order") or range(count))[:count]


def merge_shards(checkpoint: Path, meta: dict, first: dict) -> Dict[str, torch.Tensor]:
    """The first tensor-parallel group's files (ranks ``0 .. tp-1``; replicas hold the same shards)
    merged into the unsplit model's tensors, by the files' ``tp_layout``."""
    tp, layout = first["tp"], first.get("tp_layout")
    if "tp_layout" not in first:
        raise ValueError(f"{checkpoint}: a tensor-parallel checkpoint without 'tp_layout' (written by an older "
                         f"mpipar); resume the run for a step or more, so that it writes one that records it")
    if layout is None:
        raise ValueError(f"{checkpoint}: this tensor-parallel checkpoint records no layout: its model's split "
                         f"cannot be merged by mpipar-consolidate (MLPs only, so far)")
    ranks = _first_ranks(first, tp)
    states = [first if rank == 0 else read_rank(checkpoint, meta, rank) for rank in ranks]
    for position, (rank, state) in enumerate(zip(ranks, states)):
        if (state.get("tp"), state.get("tp_rank"), state.get("tp_layout")) != (tp, position, layout):
            raise ValueError(f"{checkpoint}: rank {rank} was written as tensor-parallel rank {state.get('tp_rank')} "
                             f"of {state.get('tp')} with another layout than rank 0 (expected rank {position} of {tp})")
        if set(state["model"]) != set(layout):
            raise ValueError(f"{checkpoint}: rank {rank} holds tensors {sorted(set(state['model']) ^ set(layout))} "
                             f"that are not in the layout, or lacks them")
    merged: Dict[str, torch.Tensor] = {}
    for key, cut in layout.items():
        shards = [state["model"][key] for state in states]
        dim, size = cut["dim"], cut["size"]
        if dim is None:  # whole on every rank (a row-parallel layer's bias)
            value = shards[0]
        else:
            value = torch.cat(shards, dim=dim)
            if value.shape[dim] < size:
                raise ValueError(f"{checkpoint}: the shards of {key} hold {value.shape[dim]} features along "
                                 f"dimension {dim}, fewer than the layer's {size}")
            if value.shape[dim] > size:  # padding at the end of the last shards
                value = value.narrow(dim, 0, size).clone()
        if cut["name"] in merged:
            raise ValueError(f"{checkpoint}: {cut['name']} is the unsplit name of more than one tensor")
        merged[cut["name"]] = value
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("-o", "--output", help="file to write (default: RUN/model.pt)")
    args = parser.parse_args(argv)
    try:
        state, info = model_state(args.path)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"mpipar-consolidate: {exc}\n")
    checkpoint = Path(info["checkpoint"])
    output = Path(args.output) if args.output else checkpoint.parent.parent / "model.pt"
    merge_optimizer = registry.get(info["strategy"]).consolidate_optimizer
    optimizer = {} if merge_optimizer is None else {"optimizer_by_name": registry.resolve(merge_optimizer)(checkpoint)}
    torch.save({"model": state, **optimizer, **info}, output)
    print(f"{checkpoint} (step {info['step']}): {len(state)} tensors, "
          f"{sum(t.numel() for t in state.values()):,} values -> {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
