"""DataParallel: a module wrapper whose backward leaves every gradient averaged over the ranks, as DDP's does."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
import torch.utils._pytree as pytree
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.compress import check_powersgd_rank
from mpipar.comm.reducer import CommStats, GradientReducer, average_buffers, check_one_device, layout_signature
from mpipar.comm.topology import spans_nodes
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import agree_on, collective_check

__all__ = ["DataParallel", "CommStats"]

_IDLE, _ARMED, _ACCUMULATING, _REDUCED = "idle", "armed", "accumulating", "reduced"


class DataParallel(nn.Module):
    """Wrap ``module`` for synchronous data-parallel training over ``comm``.

    Semantics follow PyTorch DDP: construction broadcasts parameters and buffers
    from ``root``; after ``loss.backward()`` returns, every parameter's ``.grad``
    holds the average over the ranks of ``comm``, weighted by each rank's sample
    count m_k: sum(m_k g_k) / sum(m_k), so unequal shards and short last batches
    give the gradient of the whole global batch (the local loss must be a mean over
    local samples, as ``cross_entropy`` is by default). The reduction is a
    :class:`~mpipar.comm.reducer.GradientReducer`: ``.grad`` are views into flat
    buckets whose non-blocking Allreduces start during backward.

    Exact in the cases DDP is: a parameter without a gradient on some ranks
    contributes zeros there; one no rank used keeps ``.grad`` None; frozen
    parameters (``requires_grad=False``, also when changed after wrapping on every
    rank) are left alone; tied parameters are reduced once. Errors raised on every
    rank: ``requires_grad`` differing between ranks (ValueError), a second backward
    after one forward, and a gradient accumulated twice in one backward (a parameter
    shared across a reentrant activation checkpoint) (RuntimeError).

    Collective contract: every rank of ``comm`` constructs the wrapper with the
    same parameter shapes and dtypes (checked, with the differing ranks named),
    and calls forward and backward the same number of times. One forward per
    backward; use :meth:`no_sync` to accumulate over several. Size 1 runs the same
    code and communicates nothing.

    Args:
        module: the model. Its parameters may be on CPU or one CUDA device.
        comm: the data-parallel communicator.
        bucket_cap_mb: target bucket size in MiB.
        root: rank whose initial parameters and buffers everyone takes.
        weighted: weight by sample counts (True) or take the plain mean.
        out_of_place: reduce each bucket from a separate send buffer (one more
            bucket-sized host buffer each); None (default): when ``comm`` spans nodes
            (see :class:`~mpipar.comm.reducer.GradientReducer`). The same on every rank.
        wire: None, or ``torch.bfloat16`` / ``torch.float16``: buckets travel in 16 bits and are added in
            fp32 (the reducer's ``wire``, ``--grad-wire``). The same on every rank.
        compress: None, or a PowerSGD rank: matrix gradients summed as low-rank factors with error
            feedback (the reducer's ``compress``, ``--compress powersgd:RANK``; not with ``wire``). The
            same on every rank; a rank that compresses no parameter is a ValueError on every rank.

    Raises:
        ValueError: on every rank, when the ranks' models differ, some rank's parameters
            are on more than one device, or ``compress`` is a rank no parameter can take.
    """

    def __init__(self, module: nn.Module, comm: MPI.Intracomm, *, bucket_cap_mb: float = 25.0,
                 root: int = 0, weighted: bool = True, out_of_place: Optional[bool] = None,
                 wire: Optional[torch.dtype] = None, compress: Optional[int] = None):
        super().__init__()
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.module = module
        self.comm = comm
        self.weighted = weighted
        self.bucket_cap_mb = bucket_cap_mb
        self.wire = wire
        self.compress = compress
        self.stats = CommStats()
        self._size = comm.Get_size()
        def check() -> None:
            check_one_device(p.device for p in module.parameters())
            if compress is not None:
                if wire is not None:
                    raise ValueError("PowerSGD (--compress) sends its factors in the gradients' dtype; it does "
                                     "not combine with a 16-bit wire (--grad-wire)")
                check_powersgd_rank([p.shape for p in module.parameters() if p.requires_grad], compress)
        collective_check(comm, check, "DataParallel")
        layout: List[tuple] = [(name, tuple(p.shape), str(p.dtype), p.requires_grad)
                               for name, p in module.named_parameters()]
        layout += [(name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]
        agree_on(comm, "model parameters and buffers (name, shape, dtype, requires_grad)", layout,
                 hint="build the same model on every rank")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                mpi_tensor.bcast_(tensor.data, comm, root)
        self.out_of_place = spans_nodes(comm) if out_of_place is None else out_of_place
        self._hooked: set = set()
        self._trainable: tuple = ()
        self._reducer: Optional[GradientReducer] = None
        self._rebuild_if_frozen_changed()
        self._sync = True
        self._phase = _IDLE
        self._finish_queued = False
        self._samples_since_sync = 0

    @property
    def buckets(self) -> list:
        """The gradient buckets, in launch order (last layer first)."""
        return self._built.buckets

    @property
    def _built(self) -> GradientReducer:
        """The reducer: built by the constructor, rebuilt when the parameters' requires_grad flags change."""
        assert self._reducer is not None
        return self._reducer

    # -- which parameters are reduced ------------------------------------------------

    def _rebuild_if_frozen_changed(self) -> None:
        """(Re)build the reducer over the parameters that require grad now. Local:
        every rank rebuilds when its own flags changed; :meth:`forward` then checks
        in the step's sample-count Allreduce that all ranks have the same flags."""
        params = list(self.module.parameters())  # tied parameters appear once
        trainable = tuple(p.requires_grad for p in params)
        if trainable == self._trainable and self._reducer is not None:
            return
        self._trainable = trainable
        reduced = [p for p in params if p.requires_grad]
        for p in reduced:
            if id(p) not in self._hooked:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
                self._hooked.add(id(p))
        self._reducer = GradientReducer(reduced, self.comm, bucket_cap_mb=self.bucket_cap_mb,
                                        out_of_place=self.out_of_place, wire=self.wire, compress=self.compress)
        self._reducer.stats = self.stats  # one account across rebuilds
        self._reduced_ids = {id(p) for p in reduced}

    # -- forward ------------------------------------------------------------------

    def forward(self, *inputs, num_samples: Optional[int] = None, **kwargs):
        """Run the module. ``num_samples`` is this rank's sample count for the weighted
        average; by default the length of the first tensor argument, positional or keyword."""
        if torch.is_grad_enabled():
            if num_samples is None and self.weighted:
                num_samples = _first_tensor_length(inputs, kwargs)
            self._prepare_backward(num_samples)
        output = self.module(*inputs, **kwargs)
        if self._phase == _ARMED:
            self._queue_finish_on(output)
        return output

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the context
        reduces everything accumulated, weighted by all samples since the last sync."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _prepare_backward(self, num_samples: Optional[int]) -> None:
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if self._phase == _ARMED:  # the previous forward's backward never ran: forget it
            self._built.abandon()
            self._samples_since_sync = 0
        if self._phase in (_IDLE, _REDUCED):
            self._rebuild_if_frozen_changed()
        self._samples_since_sync += num_samples or 0
        self._finish_queued = False
        if not self._sync:
            self._phase = _ACCUMULATING
            return
        self._phase = _ARMED
        self._built.begin(self._samples_since_sync if self.weighted else None,
                          signature=layout_signature(self._trainable))

    def _queue_finish_on(self, output) -> None:
        """Finish the reduction when the backward that starts from ``output`` ends: a
        hook on the output runs in that (outermost) backward, so a nested backward
        (a reentrant activation checkpoint) cannot end the reduction early."""
        for tensor in pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(self._queue_finish)
                return

    def _queue_finish(self, grad=None):
        if self._phase == _ARMED and not self._finish_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._finish_queued = True
        return grad

    # -- backward -----------------------------------------------------------------

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if self._phase == _REDUCED and id(param) in self._reduced_ids:
            raise RuntimeError("backward ran twice after one forward (retain_graph=True?): the first backward's "
                               "gradients were already averaged. Run forward again before each backward, or "
                               "accumulate inside DataParallel.no_sync()")
        if self._phase != _ARMED or id(param) not in self._reduced_ids:
            return
        self._queue_finish()  # outputs without a grad hook (none required grad) finish from here
        self._built.mark_ready(param)

    def _finish_backward(self) -> None:
        """Runs when autograd finishes: launch what is left, wait for everything."""
        try:
            self._built.finish()
        finally:
            self._phase = _REDUCED
            self._samples_since_sync = 0

    # -- state --------------------------------------------------------------------

    def sync_buffers(self) -> None:
        """Average floating-point buffers (e.g. BatchNorm running statistics) over
        ``comm``; integer buffers are taken from rank 0. Collective."""
        average_buffers(self.module, self.comm)

    def gather_buffers(self, root: int = 0) -> Optional[List[dict]]:
        """Every rank's buffers (replicas' BatchNorm statistics drift apart between
        :meth:`sync_buffers` calls), as a list by rank on ``root``; None elsewhere.
        Collective. A checkpoint that stores them, instead of averaging first,
        leaves the run exactly as it would have gone without the checkpoint."""
        mine = {name: buf.detach().cpu().clone() for name, buf in self.module.named_buffers()}
        return collectives.gather(self.comm, mine, "buffers", root=root)

    def load_rank_buffers(self, by_rank: List[dict]) -> bool:
        """Load this rank's entry of :meth:`gather_buffers`'s list. Local. Returns
        False (and loads nothing) when the list is for another number of ranks."""
        if len(by_rank) != self._size:
            return False
        with torch.no_grad():
            own = by_rank[self.comm.Get_rank()]
            for name, buf in self.module.named_buffers():
                buf.copy_(own[name])
        return True

    def gather_compress_state(self, root: int = 0) -> Optional[List[dict]]:
        """Every rank's PowerSGD warm starts and errors (the errors differ by rank), as a list by rank
        on ``root``; None elsewhere. Collective (nothing is sent without ``compress``)."""
        if self.compress is None:
            return None
        return collectives.gather(self.comm, self._built.compress_state(), "PowerSGD state", root=root)

    def load_compress_state(self, by_rank: List[dict]) -> bool:
        """Load :meth:`gather_compress_state`'s list. Local. Each rank takes its own entry when the list
        has one per rank and returns True; on another number of ranks rank 0 takes the sum of every saved
        rank's error and the others zero (the sums depend on the errors only through their sum, so the run
        goes on as it would have), every rank rank 0's warm starts (equal on every rank), and it returns
        False."""
        if len(by_rank) == self._size:
            self._built.load_compress_state(by_rank[self.comm.Get_rank()])
            return True
        first = self.comm.Get_rank() == 0
        merged = {index: {"q": entry["q"],
                          "error": sum(state[index]["error"] for state in by_rank) if first
                          else torch.zeros_like(entry["error"])}
                  for index, entry in by_rank[0].items()}
        self._built.load_compress_state(merged)
        return False

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)


def _first_tensor_length(inputs: tuple, kwargs: dict) -> int:
    """The batch size: the length of the first tensor argument, positional or keyword."""
    for value in (*inputs, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return len(value)
    raise ValueError("DataParallel could not infer this rank's sample count: no tensor argument; pass "
                     "num_samples=<samples in this rank's batch> to the call")
