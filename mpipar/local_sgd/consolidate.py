"""A local-SGD checkpoint as one model: the average the ranks' models would next be replaced by."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from mpipar.run.consolidate import read_rank

__all__ = ["averaged_model"]


def averaged_model(checkpoint: Path, meta: dict, first: dict) -> Dict[str, torch.Tensor]:
    """The model of a local-SGD checkpoint (its ``consolidate`` entry point). At an average (an epoch
    end, an averaging step) every rank holds the same model: rank 0's. Between averages each rank's
    file holds its own; the result is their average weighted by the samples each read since the last
    one, as :func:`~mpipar.comm.averaging.average_tensors` makes it (floating-point tensors; others
    rank 0's). Local: no MPI.

    Raises:
        ValueError: a checkpoint between averages of a run with an outer optimizer (its model is the
            outer step the next average takes), or rank files at different points of the schedule.
    """
    position = first["local_sgd"]
    if not position["steps_since_average"]:
        return dict(first["model"])
    if position["outer"] is not None:
        raise ValueError(f"{checkpoint}: written {position['steps_since_average']} steps after an average by a run "
                         f"with an outer optimizer (DiLoCo): its model is the next outer step; consolidate a "
                         f"checkpoint written at an average (an epoch end's)")
    states = [first] + [read_rank(checkpoint, meta, rank) for rank in range(1, meta["world_size"])]
    for rank, state in enumerate(states):
        if state["local_sgd"]["steps_since_average"] != position["steps_since_average"]:
            raise ValueError(f"{checkpoint}: rank {rank} was written {state['local_sgd']['steps_since_average']} "
                             f"steps after an average, rank 0 {position['steps_since_average']}")
    weights = [float(state["local_sgd"]["samples_since_average"]) for state in states]
    merged = {}
    for name, value in first["model"].items():
        if not value.is_floating_point():
            merged[name] = value
            continue
        work_dtype = torch.promote_types(value.dtype, torch.float32)
        total = sum(state["model"][name].to(work_dtype) * weight for state, weight in zip(states, weights))
        merged[name] = (total / sum(weights)).to(value.dtype)
    return merged
