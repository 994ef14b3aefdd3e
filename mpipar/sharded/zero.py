"""ShardedDataParallel: ZeRO stages 1, 2 and 3 over MPI; any torch optimizer steps this rank's shard."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.buckets import LaunchOrder
from mpipar.comm.reducer import CommStats, average_buffers, check_one_device, layout_signature
from mpipar.comm.wire import WireReduceScatter
from mpipar.data_parallel.wrapper import DataParallel, _first_tensor_length
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.sharded.layout import FlatLayout
from mpipar.sharded.optimizer import (
    allgather_shards,
    flatten_into,
    memory_record,
    piece_parameters,
    step_pieces,
    tensor_bytes,
)
from mpipar.sharded.units import UnitGather, assign_units

__all__ = ["ShardedDataParallel", "STAGES"]

STAGES = (1, 2, 3)
"""The ZeRO stages implemented: 1 (optimizer state sharded), 2 (and gradients), 3 (and parameters)."""


@dataclass
class _Bucket:
    group: int
    begin: int  # flat range of the group's buffer, whole parameters
    end: int
    params: List[int]  # indices into ShardedDataParallel.params
    pending: Union[mpi_tensor.PendingOp, WireReduceScatter, None] = None


class ShardedDataParallel:
    """Data parallelism over ``comm`` with the optimizer state (stage 1) and the gradients (stage 2)
    sharded, as ZeRO does.

    The trainable parameters live in one flat buffer per dtype, padded to a multiple of the
    ranks (the model's parameters are views into it); rank r owns the r-th contiguous shard.
    :meth:`parameters` are this rank's *pieces*: one ``nn.Parameter`` per model parameter that
    overlaps the shard (views into the buffer), so any elementwise torch optimizer built on
    them keeps shard-sized state and treats each piece as DataParallel's optimizer treats its
    parameter (a parameter no rank used has ``.grad`` None and is skipped, step counts and all).
    A step is ``loss = f(sdp(inputs))``, ``loss.backward()``, :meth:`step` (the reduction is
    finished, the optimizer steps the pieces, the shards are all-gathered into the buffers).

    Gradients: stage 1 averages them with :class:`DataParallel` (bucketed, overlapped Allreduce)
    and each piece takes its slice; stage 2 reduce-scatters them (``Ireduce_scatter``, one per
    bucket of whole parameters, started from the gradient hooks during backward in the same order
    on every rank), each rank receiving only its shard, weighted m_k / sum(m) as DataParallel
    weights them; the full gradient buffer exists only from the forward to :meth:`step`, and the
    model's ``.grad`` are None after it. Frozen parameters are left alone; tied ones appear once.

    Stage 3 also shards the parameters: each unit (``units``, default the model's direct children)
    has its own flat buffers, gathered before the unit's forward and backward and freed after
    (:class:`~mpipar.sharded.units.UnitGather`, on a duplicate of ``comm``); one reduce-scatter per
    unit and dtype (``bucket_cap_mb`` unused). Between steps a rank holds only its shards: read the
    whole model inside :meth:`full_parameters`.

    Collective contract: every rank constructs it with the same parameter names, shapes, dtypes
    and ``requires_grad`` (checked: a ValueError on every rank), calls forward, backward and
    :meth:`step` together, and keeps ``requires_grad`` as it was at construction (checked in the
    step, on every rank). Size 1 runs the same code (the collectives copy).

    Args:
        module: the model (on one device; moved there before wrapping).
        comm: the data-parallel communicator.
        stage: 1, 2 or 3.
        bucket_cap_mb: target gradient bucket size in MiB.
        root: rank whose initial parameters and buffers everyone takes.
        units: stage 3: the modules gathered as one (each trainable parameter in exactly one).
        wire: None (default): gradients reduced in their own dtype; ``torch.bfloat16`` or ``torch.float16``:
            floating-point gradients travel in that dtype and are added in fp32 (stage 1: DataParallel's
            :class:`~mpipar.comm.wire.WireSum`; stages 2 and 3: :class:`~mpipar.comm.wire.WireReduceScatter`,
            one per dtype buffer, stage 2 then starting each when its whole buffer is ready, not by
            ``bucket_cap_mb``): half the bytes, each rank's weighted contribution rounded to 16 bits. Equal on
            every rank; ignored at size 1.
    """

    def __init__(self, module: nn.Module, comm: MPI.Intracomm, *, stage: int, bucket_cap_mb: float = 25.0,
                 root: int = 0, units: Optional[Sequence[nn.Module]] = None, wire: Optional[torch.dtype] = None):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r} (0 is DataParallel)")
        if wire not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"the gradient wire is None (each buffer's own dtype), torch.bfloat16 or "
                             f"torch.float16, got {wire}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if units is not None and stage != 3:
            raise ValueError(f"units= is for ZeRO stage 3 (parameters gathered per unit), got stage {stage}")
        self.module, self.comm, self.stage = module, comm, stage
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.wire = wire if self.size > 1 else None
        self.stats = CommStats()
        self.calls: List[Tuple[str, int]] = []  # (collective, bytes of the buffer it covers) until take_calls
        collective_check(comm, lambda: check_one_device(p.device for p in module.parameters()), "ShardedDataParallel")
        described = [(name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in module.named_parameters()]
        described += [(name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]
        agree_on(comm, "model parameters and buffers (name, shape, dtype, requires_grad)", described,
                 hint="build the same model on every rank")
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # tied: once
        unit_of: Dict[int, int] = {}
        if stage == 3:
            self.units, unit_of = collective_check(comm, lambda: assign_units(module, units), "ZeRO-3 units")
            named.sort(key=lambda item: unit_of[id(item[1])])  # stable: model order within a unit
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [tuple(p.shape) for p in self.params]
        self._index = {id(p): index for index, p in enumerate(self.params)}
        self.aliases = {alias: self.names[self._index[id(p)]] for alias, p in
                        module.named_parameters(remove_duplicate=False) if p.requires_grad}
        self._flags = layout_signature(p.requires_grad for p in module.parameters())
        self.layout = FlatLayout([(name, p.numel(), str(p.dtype)) + ((unit_of[id(p)],) if stage == 3 else ())
                                  for name, p in named], self.size)
        self.flats = flatten_into(self.params, self.layout)
        self._offsets: Dict[int, Tuple[int, int]] = {  # param index -> (group, offset)
            index: (g, offset) for g, group in enumerate(self.layout.groups)
            for index, offset in zip(group.params, group.offsets)}
        with torch.no_grad():
            for flat in self.flats:
                mpi_tensor.bcast_(flat, comm, root)
            for tensor in [p for p in module.parameters() if not p.requires_grad] + list(module.buffers()):
                mpi_tensor.bcast_(tensor.data, comm, root)
        self.shards = [flat[self.rank * g.shard:(self.rank + 1) * g.shard]  # views: all-gathered in place
                       for flat, g in zip(self.flats, self.layout.groups)]
        self.unit_gather: Optional[UnitGather] = None
        if stage == 3:  # the shards are the parameters' only copy between uses
            self.shards = [shard.clone() for shard in self.shards]
            unit_groups = [[g for g, group in enumerate(self.layout.groups) if group.unit == u]
                           for u in range(len(self.units))]
            self._param_comm = comm.Dup()
            params_of = [[self.params[index] for index in group.params] for group in self.layout.groups]
            self.unit_gather = UnitGather(self.units, unit_groups, params_of, self.flats, self.shards,
                                          self._param_comm, self.calls, self.stats, self.progress,
                                          rooted=self.units[0] is module if self.units else False)
            self.unit_gather.free_all()
            self._unit_params = [sum(len(self.layout.groups[g].params) for g in groups) for groups in unit_groups]
        self.pieces = self.layout.pieces(self.rank)
        self.shard_params = piece_parameters(self.shards, self.pieces)
        self.dp: Optional[DataParallel] = None
        self.grad_shards: List[torch.Tensor] = []
        self.buckets: List[_Bucket] = []
        if stage == 1:
            self.dp = DataParallel(module, comm, bucket_cap_mb=bucket_cap_mb, root=root, wire=self.wire)
            self.stats = self.dp.stats  # one account: its reducer's Allreduces (it holds this one) and the gathers
        else:
            self.grad_shards = [torch.zeros(g.shard, dtype=flat.dtype, device=flat.device)
                                for flat, g in zip(self.flats, self.layout.groups)]
            self.buckets = self._build_buckets(bucket_cap_mb * 2**20) if stage == 2 and self.wire is None else \
                [_Bucket(g, 0, group.total, list(group.params)) for g, group in reversed(list(enumerate(
                    self.layout.groups)))]  # stage 3 (or a wire): one per unit and dtype, last unit first
            self._bucket_of = {index: b for b, bucket in enumerate(self.buckets) for index in bucket.params}
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._order = LaunchOrder([len(bucket.params) for bucket in self.buckets])
        self._grad_flats: Optional[List[Optional[torch.Tensor]]] = None
        self._views: List[torch.Tensor] = []
        self._accumulated: set = set()
        self._counts = torch.zeros(3, dtype=torch.int64)
        self._counts_request: Optional[mpi_tensor.PendingOp] = None
        self._samples: Optional[int] = None
        self._weight = 1.0
        self.closed = False

    @property
    def launched_early(self) -> int:
        """Reduce-scatters started from the gradient hooks (during backward), since construction."""
        return self._order.early

    def _build_buckets(self, cap: float) -> List[_Bucket]:
        """Buckets of whole parameters, contiguous in their group's buffer, filled last parameter
        first (the order backward produces them); launched in list order."""
        buckets: List[_Bucket] = []
        open_by_group: Dict[int, _Bucket] = {}
        for index in reversed(range(len(self.params))):
            group, offset = self._offsets[index]
            size = self.params[index].numel() * self.params[index].element_size()
            bucket = open_by_group.get(group)
            if bucket is not None and (bucket.end - bucket.begin) * self.params[index].element_size() + size > cap:
                buckets.append(open_by_group.pop(group))
                bucket = None
            if bucket is None:
                bucket = open_by_group[group] = _Bucket(group, offset, offset, [])
            bucket.begin = offset
            if not bucket.params:
                bucket.end = offset + self.params[index].numel()
            bucket.params.append(index)
        buckets += [bucket for bucket in open_by_group.values()]
        return buckets

    def parameters(self) -> List[nn.Parameter]:
        """This rank's pieces: what its optimizer steps."""
        return list(self.shard_params)

    # -- forward and backward -----------------------------------------------------

    def __call__(self, *inputs, num_samples: Optional[int] = None, **kwargs):
        """Run the module; ``num_samples`` (this rank's sample count, for the weighting) defaults to the
        length of the first tensor argument. Collective (non-blocking) when gradients are enabled."""
        if self.closed and torch.is_grad_enabled():
            raise RuntimeError("ShardedDataParallel.close() ended its training; build a new wrapper to train on")
        if self.dp is not None:
            return self.dp(*inputs, num_samples=num_samples, **kwargs)
        if not torch.is_grad_enabled():
            with self.full_parameters():
                return self.module(*inputs, **kwargs)
        self._begin(_first_tensor_length(inputs, kwargs) if num_samples is None else num_samples)
        if self.unit_gather is None:
            return self.module(*inputs, **kwargs)
        self.unit_gather.begin_forward()
        output = self.module(*inputs, **kwargs)
        self.unit_gather.end_forward()
        return output

    def _begin(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self._complete_started()  # a forward whose backward never ran
        params = [] if self.unit_gather is not None else self.params  # stage 3: a unit's buffer at its launch
        self._grad_flats = [torch.zeros(g.total, dtype=flat.dtype, device=flat.device) if params else None
                            for flat, g in zip(self.flats, self.layout.groups)]
        self._views = []
        for index, p in enumerate(params):
            group, offset = self._offsets[index]
            view = self._grad_flats[group][offset:offset + p.numel()].view_as(p)
            self._views.append(view)
            p.grad = view
        for bucket in self.buckets:
            bucket.pending = None
        self._order.reset()
        self._accumulated.clear()
        if self.unit_gather is not None:
            self._unit_left = list(self._unit_params)
        self._samples = num_samples
        flags = layout_signature(p.requires_grad for p in self.module.parameters())
        self._counts.copy_(torch.tensor([num_samples, flags, flags * flags]))
        self._counts_request = mpi_tensor.iallreduce_(self._counts, self.comm)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if self._grad_flats is None:  # not in a step (a backward without forward through the wrapper)
            return
        index = self._index[id(param)]
        bucket = self.buckets[self._bucket_of[index]]
        if not self._order.mark(self._bucket_of[index], index):
            raise RuntimeError(f"{self.names[index]} received its gradient more than once in one backward (shared "
                               f"across a reentrant activation checkpoint?); use use_reentrant=False")
        self._accumulated.add(index)
        if self.unit_gather is not None:
            self._keep_unit_grad(index, param)
            unit = self.layout.groups[bucket.group].unit
            self._unit_left[unit] -= 1
            if not self._unit_left[unit]:
                self.unit_gather.done(unit)
        self._launch_ready(force=False)

    def _keep_unit_grad(self, index: int, param: nn.Parameter) -> None:
        """Stage 3: move ``param``'s fresh ``.grad`` into its unit's flat gradient buffer (allocated at the
        unit's first gradient) and drop it, so a unit's gradient exists once, as the buffer its
        reduce-scatter sends."""
        group, offset = self._offsets[index]
        flat = self._grad_flats[group]
        if flat is None:
            flat = self._grad_flats[group] = torch.zeros(self.layout.groups[group].total, dtype=param.dtype,
                                                         device=param.device)
        with torch.no_grad():
            flat[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        param.grad = None

    def _launch_ready(self, force: bool) -> None:
        """Start the buckets :class:`LaunchOrder` releases, then progress the started ones (no progress
        thread assumed); stage 3 frees a unit's gradient buffer as soon as its reduce-scatter is complete."""
        for b in self._order.take(force):
            self._launch(self.buckets[b])
        self.progress()

    def progress(self) -> None:
        """Test the reduce-scatters in flight; forget the completed ones (stage 3: and their unit's full
        gradient buffer). Local."""
        for bucket in self.buckets[:self._order.started]:
            if bucket.pending is not None and bucket.pending.test():
                bucket.pending = None
                if self.unit_gather is not None and self._grad_flats is not None:
                    self._grad_flats[bucket.group] = None

    def _wait_counts(self) -> None:
        if self._counts_request is None:
            return
        begin = time.perf_counter()
        self._counts_request.wait()
        self.stats.wait_time += time.perf_counter() - begin
        self._counts_request = None
        total, flags, squares = (int(v) for v in self._counts)
        if self.size * squares != flags * flags or flags != self.size * self._flags:
            self._grad_flats = None
            raise ValueError("requires_grad changed after ShardedDataParallel was built (its shards are fixed "
                             "then); freeze parameters before wrapping, the same on every rank")
        if total <= 0:
            raise RuntimeError("no rank had samples in this step; nothing to average")
        self._weight = self._samples / total

    def _launch(self, bucket: _Bucket) -> None:
        self._wait_counts()
        if self.unit_gather is not None:
            self._take_unit_grads(bucket)
        group = self._grad_flats[bucket.group]
        with torch.no_grad():
            for index in bucket.params if self.unit_gather is None else ():
                p, view = self.params[index], self._views[index]
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)  # .grad replaced after the forward (zero_grad between forward and backward)
                    self._accumulated.add(index)
            region = group[bucket.begin:bucket.end]
            region.mul_(self._weight)
        counts = self.layout.counts(bucket.group, bucket.begin, bucket.end)
        shard = self.layout.groups[bucket.group].shard
        low = max(bucket.begin, self.rank * shard) - self.rank * shard if counts[self.rank] else 0
        output = self.grad_shards[bucket.group][low:low + counts[self.rank]]
        if self.wire is not None and region.is_floating_point():  # whole buffers: its chunks are the shards
            wired = WireReduceScatter(output, region, self.comm, self.wire)
            bucket.pending = wired
            self.calls.append(("reduce_scatter", region.numel() * wired.incoming.element_size()))
            self.stats.bytes_sent += wired.bytes_sent
            if self.unit_gather is not None:
                self._grad_flats[bucket.group] = None  # stage 3: sent from the wire's own 16-bit copy
            return
        bucket.pending = mpi_tensor.ireduce_scatter_(output, region, counts, self.comm)
        nbytes = region.numel() * region.element_size()
        self.calls.append(("reduce_scatter", nbytes))
        self.stats.bytes_sent += (self.size - 1) / self.size * nbytes

    def _take_unit_grads(self, bucket: _Bucket) -> None:
        """Stage 3, at the launch: the unit's gradient buffer (zeros for a unit this rank did not use), with
        any ``.grad`` set outside the hooks added in and dropped."""
        assert self._grad_flats is not None  # in a step
        g = self.layout.groups[bucket.group]
        if self._grad_flats[bucket.group] is None:
            self._grad_flats[bucket.group] = torch.zeros(g.total, dtype=self.flats[bucket.group].dtype,
                                                         device=self.flats[bucket.group].device)
        flat = self._grad_flats[bucket.group]
        with torch.no_grad():
            for index, offset in zip(g.params, g.offsets):
                p = self.params[index]
                if p.grad is not None:
                    flat[offset:offset + p.grad.numel()].add_(p.grad.reshape(-1))
                    self._accumulated.add(index)
                    p.grad = None

    def _complete_started(self) -> None:
        """Complete every request started (a step abandoned or failed on every rank alike)."""
        for bucket in self.buckets:
            if bucket.pending is not None:
                bucket.pending.wait()
                bucket.pending = None
        if self._counts_request is not None:
            self._counts_request.wait()
            self._counts_request = None

    def _finish_reduce_scatter(self) -> List[bool]:
        """Launch the buckets left, wait for all; returns which parameters some rank used."""
        if self._grad_flats is None:
            raise RuntimeError("step() without a forward and backward since the last step")
        with torch.no_grad():
            for index, p in enumerate(self.params):  # a .grad replaced after the forward, never hooked
                if p.grad is not None and (not self._views or p.grad.data_ptr() != self._views[index].data_ptr()):
                    self._accumulated.add(index)
        self._launch_ready(force=True)
        used = torch.tensor([int(i in self._accumulated) for i in range(len(self.params))], dtype=torch.int32)
        begin = time.perf_counter()
        if self.size > 1:
            mpi_tensor.allreduce_(used, self.comm)
        self._complete_started()
        self.stats.wait_time += time.perf_counter() - begin
        for p in self.params:
            p.grad = None
        self._grad_flats, self._views = None, []
        return [bool(u) for u in used.tolist()]

    # -- the step -----------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Finish the gradient reduction, step ``optimizer`` (built on :meth:`parameters`) and
        all-gather the updated shards into the model. Collective over ``comm``.

        Raises:
            ValueError: on every rank, when ``requires_grad`` changed since construction.
        """
        grads: Optional[List[Optional[torch.Tensor]]] = None  # stage 1: the slices of DataParallel's averages
        if self.dp is None:
            if self.unit_gather is not None:
                self.unit_gather.settle()
            used = self._finish_reduce_scatter()
            grads = [self.grad_shards[pc.group][pc.shard_offset:pc.shard_offset + pc.stop - pc.start]
                     if used[pc.param] else None for pc in self.pieces]
        elif layout_signature(p.requires_grad for p in self.module.parameters()) != self._flags:
            # DataParallel checked in the backward that every rank has the same flags
            raise ValueError("requires_grad changed after ShardedDataParallel was built (its shards are "
                             "fixed then); freeze parameters before wrapping, the same on every rank")
        step_pieces(optimizer, self.pieces, self.shard_params, self.params, grads)  # DataParallel's buckets stay
        if self.unit_gather is None:
            self.gather()

    def gather(self) -> None:
        """All-gather every rank's shard into the flat buffers (the model's parameters). Collective."""
        allgather_shards(self.flats, self.comm, self.calls, self.stats)

    @contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        """The whole model inside the block (stage 3 gathers every unit, frees them after; reads only:
        a change is lost). Collective for stage 3; stages 1 and 2 hold the whole model anyway."""
        if self.unit_gather is None:
            yield self.module
            return
        self.unit_gather.settle()
        self.unit_gather.gather_all()
        try:
            yield self.module
        finally:
            self.unit_gather.free_all()

    def close(self) -> None:
        """End training: stage 3 frees its communicator of the gathers (the model stays sharded, as big as
        it was: :meth:`full_parameters` and a forward without gradients still gather it, over ``comm``).
        Collective; no training step after it (RuntimeError); a second call does nothing."""
        if self.unit_gather is not None and not self.closed:
            self.unit_gather.settle()
            self._param_comm.Free()
            self.unit_gather.comm = self.comm  # no reduce-scatter to interleave with any more
        self.closed = True

    def take_calls(self) -> List[Tuple[str, int]]:
        """The sharded collectives (name, bytes of the buffer covered) since the last call; resets them."""
        calls = list(self.calls)
        self.calls.clear()  # in place: stage 3's gathers record into this list
        return calls

    # -- state --------------------------------------------------------------------

    def memory(self, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, float]:
        """Bytes this rank holds between steps: parameters (the full buffers, whose shard the optimizer
        steps in place, and frozen parameters), gradients (stage 1: DataParallel's buckets; stage 2: the shard) and the
        optimizer's state. Local."""
        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        grads = [bucket.buffer for bucket in self.dp.buckets] if self.dp is not None else self.grad_shards
        params = tensor_bytes([*self.flats, *frozen])
        if self.unit_gather is not None:  # the shards, and whichever units' full buffers are held now
            params = tensor_bytes([*self.shards, *frozen]) + float(sum(f.untyped_storage().nbytes()
                                                                       for f in self.flats))
        return memory_record(params, grads, optimizer)

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm statistics) over ``comm``. Collective."""
        average_buffers(self.module, self.comm)

    def load_shards(self, shards: List[torch.Tensor]) -> None:
        """Take this rank's ``shards`` (one per dtype group) and all-gather them. Collective."""
        with torch.no_grad():
            for own, new in zip(self.shards, shards):
                own.copy_(new)
        if self.unit_gather is None:
            self.gather()
        self.take_calls()
