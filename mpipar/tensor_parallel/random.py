"""Random streams for tensor parallelism: one shared by the group, one per rank for split regions.

Megatron's rule for dropout under tensor parallelism:

* replicated activations (outside a split region: the residual stream, a row-parallel
  layer's summed output) must be dropped with the SAME mask on every rank of the group,
  or the ranks' copies of the "same" activation diverge. They draw from torch's default
  generator, which every rank seeded alike (``torch.manual_seed(seed)`` everywhere, as
  ``Session`` does);
* split activations (a column-parallel layer's output shard, a rank's attention heads)
  must be dropped with DIFFERENT masks on each rank: rank r's mask is the r-th part of
  the full model's mask, and p copies of one mask would correlate the shards. They draw
  from this rank's own stream, seeded ``seed + offset + rank``, which
  :meth:`TensorParallelRNG.split_region` swaps in place of the default one and out again.

The split stream is used only inside ``split_region()``, and the default stream is
restored exactly on leaving it, so the number of split draws never shifts the
replicated stream: a run with and without dropout in split regions draws the same
replicated masks.

Activation recompute: ``torch.utils.checkpoint`` restores the default generators for the
recomputed forward, not this stream, so a block recomputed as it is would draw new split
masks. Checkpoint ``rng.recomputable(block)`` instead: its recompute replays the draws of its
forward. A split region entered in a backward pass otherwise raises.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.diagnostics.agree import agree_on
from mpipar.diagnostics.collectives import allgather
from mpipar.diagnostics.failure import agreed

__all__ = ["TensorParallelRNG", "ParallelDropout", "split_dropout", "SPLIT_SEED_OFFSET"]

SPLIT_SEED_OFFSET = 2718
"""Added to the seed of the split streams (Megatron's constant), so that rank 0's split stream is not the
default stream of a run seeded ``seed``."""


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (where a checkpoint recomputes)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class TensorParallelRNG:
    """This rank's random stream for split regions of the tensor-parallel group ``comm``.

    Rank r's stream starts from ``seed + offset + r`` (on CPU, and on each CUDA device the
    first time a split region is entered with it current), so streams differ between
    ranks and are reproducible from ``seed``. Inside :meth:`split_region` the default
    generators (CPU, and the current CUDA device's when CUDA is initialised) hold this
    stream; on leaving, its advanced state is kept here and the default generators get
    back exactly the state they had on entering.

    Collective contract: every rank of ``comm`` builds it together with the same seed
    (one small allgather checks it). Entering a region and drawing in it is local.

    Args:
        comm: the tensor-parallel group (only its rank and size are kept).
        seed: the run's seed, the same on every rank.
        offset: added to ``seed`` (default :data:`SPLIT_SEED_OFFSET`).

    Raises:
        ValueError: on every rank, when the ranks give different seeds or offsets.
    """

    def __init__(self, comm: MPI.Intracomm, seed: int, *, offset: int = SPLIT_SEED_OFFSET):
        agree_on(comm, "TensorParallelRNG seed and offset", (int(seed), int(offset)),
                 hint="every rank of the tensor-parallel group gives the run's seed")
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.seed = int(seed) + int(offset) + self.rank
        self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda_states: Dict[int, torch.Tensor] = {}
        self._inside = False
        self._replaying = False

    @contextlib.contextmanager
    def split_region(self) -> Iterator[None]:
        """Draw from this rank's split stream inside the block (``F.dropout``, ``torch.rand``, ...,
        anything using the default generators), and restore the default streams after it.

        Local. Not re-entrant (a nested region raises RuntimeError). CUDA: the current
        device's generator is swapped (the one ``F.dropout`` of a tensor on it uses).
        """
        if self._inside:
            raise RuntimeError("TensorParallelRNG.split_region() is already active (regions do not nest)")
        if not self._replaying and _in_backward():
            raise RuntimeError("a TensorParallelRNG split region was entered in a backward pass (an activation "
                               "recompute) and would draw other masks than its forward: checkpoint "
                               "rng.recomputable(function) instead of the function itself")
        device = torch.cuda.current_device() if _cuda_ready() else None
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(device) if device is not None else None
        self._inside = True
        torch.set_rng_state(self._cpu_state)
        if device is not None:
            if device not in self._cuda_states:
                torch.cuda.manual_seed(self.seed)  # the current device only
            else:
                torch.cuda.set_rng_state(self._cuda_states[device], device)
        try:
            yield
        finally:
            self._cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if device is not None and saved_cuda is not None:  # both or neither
                self._cuda_states[device] = torch.cuda.get_rng_state(device)
                torch.cuda.set_rng_state(saved_cuda, device)
            self._inside = False

    def recomputable(self, function: Callable) -> Callable:
        """``function`` for ``torch.utils.checkpoint`` (either ``use_reentrant``): its first call draws
        from the split stream as usual; every later call (the recompute) replays the first call's split
        draws and leaves the stream where it was. Local. Wrap anew for every forward, as in
        ``checkpoint(rng.recomputable(block), x, use_reentrant=False)``."""
        entry: list = []

        def run(*args, **kwargs):
            if not entry:
                entry.append(self._snapshot())
                return function(*args, **kwargs)
            live, self._replaying = self._snapshot(), True
            self._restore(entry[0])
            try:
                return function(*args, **kwargs)
            finally:
                self._restore(live)
                self._replaying = False

        return run

    def _snapshot(self) -> tuple:
        return self._cpu_state.clone(), {device: state.clone() for device, state in self._cuda_states.items()}

    def _restore(self, snapshot: tuple) -> None:
        self._cpu_state, self._cuda_states = snapshot[0].clone(), {d: v.clone() for d, v in snapshot[1].items()}

    def state_dict(self) -> Dict[str, Any]:
        """This rank's split-stream state (tensors and ints: loads with ``weights_only=True``), for a
        checkpoint of this rank or for replaying a region's draws."""
        return {"seed": self.seed, "cpu": self._cpu_state.clone(),
                "cuda": {device: state.clone() for device, state in self._cuda_states.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of this rank's stream (its seed must match)."""
        if state["seed"] != self.seed:
            raise ValueError(f"TensorParallelRNG: the state is of split seed {state['seed']}, this rank's "
                             f"stream has seed {self.seed} (another rank's or another run's state?)")
        self._cpu_state = state["cpu"].clone()
        self._cuda_states = {int(device): value.clone() for device, value in state["cuda"].items()}

    def check_replicated(self) -> None:
        """Raise RuntimeError on every rank unless the default generators (CPU, and CUDA where
        initialised) are in the same state on every rank of the group, as replicated dropout needs.

        Collective over ``comm`` (one small allgather of digests).
        """
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
        if _cuda_ready():
            digest.update(torch.cuda.get_rng_state().numpy().tobytes())
        every_rank = allgather(self.comm, digest.hexdigest()[:16], "TensorParallelRNG.check_replicated")
        differing = [rank for rank, value in enumerate(every_rank) if value != every_rank[0]]
        if differing:
            raise agreed(RuntimeError)(
                f"the default random generators differ between tensor-parallel ranks (ranks {differing} differ "
                f"from rank 0): dropout outside split regions would drop different elements of the replicated "
                f"activations; seed every rank alike (torch.manual_seed(seed)) and draw the same things on each")

    def __repr__(self) -> str:
        return f"TensorParallelRNG(rank={self.rank}, size={self.size}, split_seed={self.seed})"


def split_dropout(input: torch.Tensor, p: float, rng: Optional[TensorParallelRNG],
                  training: bool = True) -> torch.Tensor:
    """``F.dropout`` of a split activation, its mask drawn from this rank's split stream.

    Local. At size 1 it is plain dropout from the split stream. ``rng=None`` is allowed only
    where nothing is dropped (``p == 0`` or not ``training``).

    Raises:
        ValueError: ``rng`` is None while ``p > 0`` and ``training`` (a split activation would be dropped
            with the replicated stream: the same mask on every rank).
    """
    if not training or p == 0:
        return input
    if rng is None:
        raise ValueError("split_dropout: dropout of a split activation needs the group's TensorParallelRNG "
                         "(rng=None would draw the same mask on every rank)")
    if input.device.type == "meta":  # shape inference: no draw, from either stream
        return input.clone()
    with rng.split_region():
        return F.dropout(input, p, training=True)


class ParallelDropout(nn.Module):
    """``nn.Dropout`` for split activations (inside a split region): each rank drops its shard
    with its own mask from ``rng``'s split stream. For replicated activations use ``nn.Dropout``.

    Args:
        p: the drop probability.
        rng: the group's :class:`TensorParallelRNG`.
    """

    def __init__(self, p: float, rng: TensorParallelRNG):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ParallelDropout: p must be in [0, 1], got {p}")
        self.p, self.rng = float(p), rng

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return split_dropout(input, self.p, self.rng, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rng.rank}"
