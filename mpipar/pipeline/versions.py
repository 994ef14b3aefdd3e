"""Weight versions of one stage under an asynchronous schedule: the stash, gradients, updates, staleness."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from mpipar.pipeline.schedule import Schedule

__all__ = ["WeightVersions", "step_with_decay_share"]


def step_with_decay_share(optimizer: torch.optim.Optimizer, share: float) -> None:
    """``optimizer.step()`` with each group's ``weight_decay`` scaled by ``share``, the update's part of
    a batch (restored after), so decay per batch does not depend on how many updates a batch makes."""
    decays = [group.get("weight_decay", 0.0) for group in optimizer.param_groups]
    try:
        for group, decay in zip(optimizer.param_groups, decays):
            if decay:
                group["weight_decay"] = decay * share
        optimizer.step()
    finally:
        for group, decay in zip(optimizer.param_groups, decays):
            if decay:
                group["weight_decay"] = decay


class WeightVersions:
    """The weights of stage ``index`` as versions (version ``v``: ``v`` updates applied).

    The stage's parameters are the newest version, the one the optimizer steps. A forward
    runs on a stashed copy of the version the schedule gives it
    (:meth:`Schedule.forward_version`), as leaves that collect its gradient in the backward,
    so forward and backward of a micro-batch see the same weights however many updates
    happen in between (weight stashing); one whose forward and backward both see the newest
    version (no update in between: :meth:`in_place`) runs on the parameters, no copy. Only
    trainable parameters (``requires_grad``) have
    versions; frozen ones are used as they are. A copy lives while an in-flight micro-batch uses it
    or a later forward will: at most :meth:`Schedule.weight_versions` versions in steady
    state, newest included. Nothing here communicates.

    Args:
        index: the stage.
        module: its layers (the parameters are the newest version).
        schedule: an asynchronous schedule.
    """

    def __init__(self, index: int, module: nn.Module, schedule: Schedule):
        self.index, self.schedule = index, schedule
        self.named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # frozen: no versions
        self.live = 0            # updates applied
        self.forwarded = 0       # next micro-batch (run-wide number) to forward
        self.stash: Dict[int, Dict[str, torch.Tensor]] = {}  # version -> parameter copies (leaves)
        self.users: Dict[int, int] = {}  # in-flight micro-batch -> its version
        self.direct: Set[int] = set()  # in-flight micro-batches on the parameters themselves (in_place)
        self.gradient: Optional[List[Optional[torch.Tensor]]] = None  # since the last update (None: none came)
        self.waiting: List[Tuple[int, int]] = []  # (micro-batch, forward version) in ``gradient``
        self.records: List[Tuple[int, int, int]] = []  # (micro-batch, forward version, applied version)
        self.peak_versions, self.peak_bytes = 1, 0

    def _copy(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach().clone().requires_grad_() for name, p in self.named}

    @property
    def versions(self) -> int:
        """Versions held now: the stashed ones and the newest."""
        return len(set(self.stash) | {self.live})

    @property
    def stash_bytes(self) -> int:
        """Bytes of the stashed copies (the newest version's own parameters not counted)."""
        return sum(t.numel() * t.element_size() for weights in self.stash.values() for t in weights.values())

    def _note_peaks(self) -> None:
        self.peak_versions = max(self.peak_versions, self.versions)
        self.peak_bytes = max(self.peak_bytes, self.stash_bytes)

    def reset_peaks(self) -> None:
        self.peak_versions, self.peak_bytes = self.versions, self.stash_bytes

    def in_place(self, microbatch: int) -> bool:
        """Whether ``microbatch``'s forward and backward both see the newest weights: its forward version
        is the one applied when its backward runs (the updates after the backwards before it; e.g. the last
        stage of ``pipedream``, staleness 0). Such a micro-batch runs on the parameters themselves, no copy."""
        return self.schedule.forward_version(self.index, microbatch) == microbatch // self.schedule.update_period

    def weights_for(self, microbatch: int) -> Optional[Dict[str, torch.Tensor]]:
        """The weights the forward of ``microbatch`` runs on (kept for its backward); None: the
        parameters themselves (:meth:`in_place`), which then collect its gradient.

        Raises:
            RuntimeError: forwards out of order, or the version is neither stashed nor the newest.
        """
        if microbatch != self.forwarded:
            raise RuntimeError(f"stage {self.index}: forward of micro-batch {microbatch}, expected {self.forwarded}")
        version = self.schedule.forward_version(self.index, microbatch)
        if version not in self.stash and version != self.live:
            raise RuntimeError(f"stage {self.index}: micro-batch {microbatch} needs weight version {version}, "
                               f"which was not kept (newest {self.live}, stashed {sorted(self.stash)})")
        self.users[microbatch] = version
        self.forwarded += 1
        if version not in self.stash and self.in_place(microbatch):
            self.direct.add(microbatch)
            self._note_peaks()
            return None
        if version not in self.stash:
            self.stash[version] = self._copy()
        self._note_peaks()
        return self.stash[version]

    def take_gradient(self, microbatch: int) -> None:
        """After the backward of ``microbatch``: move its gradient off the stashed leaves into the
        gradient of the next update (None for a parameter no gradient reached)."""
        version = self.users.pop(microbatch)
        leaves = [p for _, p in self.named] if microbatch in self.direct else list(self.stash[version].values())
        self.direct.discard(microbatch)
        grads = []
        for leaf in leaves:
            grads.append(leaf.grad)
            leaf.grad = None
        self.gradient = grads if self.gradient is None else [
            g if a is None else a if g is None else a.add_(g) for a, g in zip(self.gradient, grads)]
        self.waiting.append((microbatch, version))

    def update(self, step: Callable[[List[nn.Parameter], float], None]) -> None:
        """Apply the accumulated gradient: ``step(parameters, share)`` with their ``.grad`` set (None where
        no gradient came) and ``share`` the update's part of a batch (micro-batches / ``m``: the optimizer,
        its weight decay scaled by it), making the next version; copies no longer needed are dropped."""
        if self.gradient is None:
            raise RuntimeError(f"stage {self.index}: an update without a gradient")
        needed_later = self.schedule.forward_version(self.index, self.forwarded)
        if self.live >= needed_later and self.live not in self.stash:  # a later forward runs on it (after a drain)
            self.stash[self.live] = self._copy()
        params = [p for _, p in self.named]
        for p, g in zip(params, self.gradient):
            p.grad = g
        step(params, len(self.waiting) / self.schedule.microbatches)
        for p in params:
            p.grad = None
        self.records += [(microbatch, version, self.live) for microbatch, version in self.waiting]
        self.gradient, self.waiting = None, []
        self.live += 1
        keep = set(self.users.values())
        self.stash = {v: w for v, w in self.stash.items()
                      if v in keep or v >= self.schedule.forward_version(self.index, self.forwarded)}
        self._note_peaks()

    def take_records(self) -> List[Tuple[int, int, int]]:
        """``(micro-batch, forward version, applied version)`` of the updates since the last call."""
        records, self.records = self.records, []
        return records

    def state_dict(self) -> dict:
        """Counters and stashed copies (after a drain: the versions later forwards will use)."""
        if self.users or self.waiting:
            raise RuntimeError(f"stage {self.index}: micro-batches in flight; drain the pipeline first")
        return {"live": self.live, "forwarded": self.forwarded,
                "stash": {v: {name: t.detach().clone() for name, t in w.items()} for v, w in self.stash.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.live, self.forwarded = int(state["live"]), int(state["forwarded"])
        params = dict(self.named)
        self.stash = {int(v): {name: t.to(params[name].device).requires_grad_()  # frozen: in older files
                               for name, t in w.items() if name in params} for v, w in state["stash"].items()}
        self.users, self.gradient, self.waiting, self.direct = {}, None, [], set()
        self.reset_peaks()
