"""Pipelines (layer-partitioned model parallelism, GPipe, 1F1B, PipeDream, 2BW), replicated over a process grid,
as a strategy."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.reducer import CommStats
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.topology import ProcessGrid
from mpipar.comm.wire import wire_dtype
from mpipar.data.arrays import ImageDataset
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import agreed
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.executor import Pipeline
from mpipar.pipeline.microbatch import check_microbatches
from mpipar.pipeline.partition import auto_balance, format_report, gather_stage_times, stage_memory, stage_sums
from mpipar.pipeline.placement import Placement, even_balance
from mpipar.pipeline.schedule import ASYNC_SCHEDULES, Schedule, placement_bubble
from mpipar.pipeline.timing import bubble_per_step
from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.run.consolidate import training_state
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter, Table
from mpipar.run.recompute import RECOMPUTES, apply_recompute, recompute_units
from mpipar.run.strategy import StepRecord, Strategy
from mpipar.sharded.consolidate import GRID_KEY, grid_optimizer
from mpipar.sharded.optimizer import ShardedUpdate

__all__ = ["PipelineStrategy", "choose_placement", "full_optimizer"]

LAYOUT = ("stages", "balance", "placement", "virtual_stages")
DEFAULTS = {"virtual_stages": 1}  # a layout setting newer than some checkpoints: their value


def _new_layout(state: dict, config: PipelineConfig, grid: ProcessGrid) -> bool:
    """Whether ``state`` must be re-laid out: written by another number of ranks, with other
    layout settings, or with the ranks on the nodes in another order (the grid's positions moved)."""
    saved = state.get("config", {})
    order = state.get("grid_order", list(range(len(grid.order))))  # before node-aware grids: rank order
    return (bool(state.get("relayout")) or list(order) != grid.order
            or any(_plain(saved.get(key, DEFAULTS.get(key))) != _plain(getattr(config, key)) for key in LAYOUT))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def choose_placement(model: nn.Sequential, config: PipelineConfig, comm: MPI.Intracomm,
                     sample: Optional[torch.Tensor], say: Callable[[str], None]) -> tuple:
    """The placement ``config`` asks for, and the profiled per-layer seconds (``auto`` only).

    Collective over ``comm`` (``auto`` profiles on its rank 0, which must pass
    ``sample``, and broadcasts, so every replica gets the same placement). ``auto``
    keeps every stage within ``config.stage_memory_mb`` (when set) with the
    micro-batches the schedule keeps in flight on it, and prints the split with the
    predicted time and memory of every stage.
    """
    if config.placement is not None:
        return Placement(config.placement), None
    v = config.chunks_per_rank  # virtual stages: chunk c on c % stages; zbv: 2 in a V
    chunks = config.stages * v
    kind = schedule_kind(config.schedule)  # places the chunks (zbv: a V)
    if config.balance == "even":
        return kind.placement(even_balance(len(model), chunks), config.stages), None
    if config.balance == "auto":
        schedule = Schedule(config.schedule, chunks, config.microbatches, virtual_stages=v)
        in_flight = [schedule.max_in_flight(stage) for stage in range(chunks)]
        limit = config.stage_memory_mb * 2**20 if config.stage_memory_mb else None
        balance, profiles = auto_balance(model, sample, chunks, comm, in_flight=in_flight, memory_limit=limit)
        times = [p.time for p in profiles]
        memory = stage_memory(profiles, balance, in_flight)
        say(f"auto balance {balance} ({len(model)} layers) from per-layer ms {[round(1e3 * t, 2) for t in times]}; "
            f"predicted ms per micro-batch {[round(1e3 * t, 2) for t in stage_sums(times, balance)]}, MiB per stage "
            f"({config.schedule}: {in_flight} micro-batches in flight) {[round(m / 2**20, 1) for m in memory]}")
        return kind.placement(balance, config.stages), times
    assert not isinstance(config.balance, str)  # "even" or "auto" (PipelineConfig checks), handled above
    return kind.placement(config.balance, config.stages), None


def _check_tensor_parallel(config: PipelineConfig, grid: ProcessGrid, state: Optional[dict], split_layers) -> None:
    """What tensor parallelism inside the stages cannot do yet: raised on every rank (all have
    the same settings and checkpoint)."""
    if split_layers is None:
        raise agreed(ValueError)(f"--tp {config.tp}: this job's model has no tensor-parallel split; use --tp 1")
    if config.balance == "auto":
        raise agreed(ValueError)("--balance auto profiles the layers on one rank, which split layers cannot run "
                                 "alone; with --tp > 1 use --balance even or N,N,...")
    if state is not None and _new_layout(state, config, grid):
        raise agreed(ValueError)("a checkpoint with tensor-parallel stages resumes only on the layout that wrote it "
                                 "(same ranks, --stages, --tp and balance)")


def _check_asynchronous(config: PipelineConfig, grid: ProcessGrid, state: Optional[dict], world_size: int) -> None:
    """What the schedules that never flush cannot do yet: raised on every rank (same settings everywhere)."""
    if grid.replicas > 1 or config.tp > 1:
        raise agreed(ValueError)(f"--schedule {config.schedule} updates each stage on its own and cannot average "
                                 f"gradients over replicas or split layers yet; use --stages = the world size "
                                 f"({world_size}) and --tp 1, or a flushing schedule")
    if state is not None and _new_layout(state, config, grid):
        raise agreed(ValueError)(f"a {config.schedule} checkpoint (stashed weight versions per stage) resumes only "
                                 f"on the layout that wrote it (same ranks, --stages and balance)")


class PipelineStrategy:
    """Pipelines of ``config.stages`` stages of ``config.tp`` ranks each, ``world size / (stages tp)``
    data-parallel replicas (a :class:`ProcessGrid`).

    Each replica runs the model as a :class:`Pipeline` (its schedule, micro-batches
    and placement) on its share of every global batch; each pipeline position's
    gradients are averaged over its replicas by a :class:`ReplicaAverager`, whose
    Allreduces start during the last micro-batch's backward. Every rank checkpoints
    its own stages. With ``config.tp > 1`` the model's layers are first split over each
    stage's tensor-parallel group by ``split_layers`` (every rank of a stage then runs
    its shard of the stage, and the tensor-parallel ranks of consecutive stages form the
    pipelines); one rank per group counts the loss. With ``config.zero == 1`` (flushing schedules)
    each position's optimizer state is sharded over its replicas (:class:`ShardedUpdate` over the
    data-parallel communicator): the loop's optimizer is built on this rank's pieces and stepped here
    after the average (``steps_optimizer``), then the replicas all-gather; the files carry the pieces
    (``zero_shard``) and a re-layout puts each parameter's optimizer state together from every file.
    Collective over ``world``, like the loop.

    The asynchronous schedules (``pipedream``, ``2bw``; one pipeline, no tensor parallelism)
    map onto the loop as follows: a loop step takes one batch of ``microbatches`` into the
    pipeline and returns once this rank's part of it is done, leaving each stage's last
    ``stages - stage - 1`` micro-batches in flight for the next step, so in steady state no
    stage waits for a flush. The pipeline steps the loop's optimizer itself
    (``steps_optimizer``, :meth:`bind_optimizer`) at every update the schedule makes, with
    the learning rate the one-cycle schedule has then. The pipeline is drained (the
    backwards in flight finished and applied, a collective) at every epoch end (before
    evaluation) and at every checkpoint; since the weight version each micro-batch uses is
    fixed by the schedule's rule, not by timing, a drain changes no result, and the
    checkpoint holds the stashed versions that later forwards will use
    (``pipeline_async``), so a resumed run is bitwise the uninterrupted one. Per step and
    rank the metrics get ``stash_bytes``, ``weight_versions``, ``updates`` and
    ``staleness_mean``; the table ``/pipeline_updates`` gets every update at the flush after it
    (step, rank, stage, micro-batch, forward and applied version, staleness, with a histogram
    of the staleness). The loss of an asynchronous step is counted on the last
    stage's rank only (no per-step broadcast).

    Args:
        world: the job's ranks.
        model: the whole model (every rank builds it; each keeps its stages).
        config: split and schedule.
        batch_size: samples per pipeline per step (checked to split into micro-batches).
        bucket_mb: gradient bucket size for the replicas' Allreduce.
        grad_wire: ``--grad-wire``: the replicas' buckets in fp32, or sent in bf16/fp16 and summed in fp32.
        state: the checkpoint being resumed or None. Its placement is kept when the
            layout settings are the same (``auto`` does not profile again); otherwise
            (other ``stages``, ``balance`` or ``placement``, or another number of ranks)
            the model and optimizer state are re-laid out from every rank's file of
            ``checkpoint`` onto the new placement.
        checkpoint: the directory ``state`` came from.
        sample: a batch of inputs for ``balance="auto"`` profiling (rank 0).
        say: prints on rank 0.
        device: where this rank's stages go (the rest of ``model`` stays where it is).
        split_layers: ``split_layers(model, tp_comm, stats)``, the model with its layers split
            over ``tp_comm`` as an ``nn.Sequential`` (e.g. :func:`mpipar.tensor_parallel.split_mlp`);
            needed when ``config.tp > 1``, applied whenever given (at ``tp == 1`` the split layers
            compute what the plain ones do).
    """

    full_steps_only = True
    recomputes = RECOMPUTES  # --recompute, through bind_recompute
    checkpoint_per_rank = True

    def __init__(self, world: MPI.Intracomm, model: nn.Sequential, config: PipelineConfig, *, batch_size: int,
                 bucket_mb: float = 25.0, state: Optional[dict] = None, checkpoint=None,
                 sample: Optional[torch.Tensor] = None, say: Callable[[str], None] = print,
                 device: torch.device | str = "cpu", grad_wire: str = "fp32",
                 split_layers: Optional[Callable[[nn.Sequential, MPI.Intracomm, CommStats], nn.Sequential]] = None):
        collective_check(world, lambda: check_microbatches(batch_size, config.microbatches),
                         "--batch-size and --microbatches")
        self.world, self.config = world, config
        self.grid = ProcessGrid(world, config.stages, tp=config.tp)
        self.asynchronous = config.schedule in ASYNC_SCHEDULES
        if self.asynchronous:
            _check_asynchronous(config, self.grid, state, world.Get_size())
        self.steps_optimizer = self.asynchronous  # the loop then calls bind_optimizer, never optimizer.step()
        # --precision: flushing schedules under autocast (activations cross in its 16 bits), fp16 with the loop's
        # loss scaling (bind_loss_scaler); the asynchronous ones step their own optimizer: fp32 only for now
        self.precisions = ("fp32",) if self.asynchronous else ("fp32", "bf16", "fp16")
        self.loss_scaler = None
        self._step = 0 if state is None else int(state["step"])
        self._updates: List[tuple] = []  # (step, stage, micro-batch, forward version, applied version)
        self.tp_stats = CommStats()
        parameter_count = sum(p.numel() for p in model.parameters())
        if config.tp > 1:
            _check_tensor_parallel(config, self.grid, state, split_layers)
        if split_layers is not None:  # at tp 1 the split layers are the ordinary ones
            model = split_layers(model, self.grid.tp_comm, self.tp_stats)
        self.model = model
        self._relayout: Optional[dict] = None
        if state is not None and not _new_layout(state, config, self.grid):  # auto balance could profile another
            self.placement = Placement(tuple(state["placement"]), tuple(state.get("stage_boundaries", ())))
            self.predicted = state.get("layer_seconds")
        else:
            self.placement, self.predicted = choose_placement(model, config, world, sample, say)
            if state is not None:
                self._relayout = collective_check(world, lambda: training_state(checkpoint), "re-laying out")
                if state.get(GRID_KEY):  # ZeRO-1 files: each replica holds its pieces of the optimizer state
                    self._relayout["optimizer_by_name"] = collective_check(
                        world, lambda: grid_optimizer(checkpoint), "re-laying out")
                model.load_state_dict(self._relayout["model"])  # before the pipeline takes its stages
                say(f"re-laid out the checkpoint's placement {state['placement']} as {list(self.placement.ranks)}")
        self.device = torch.device(device)
        self.pipe = Pipeline(model, self.grid.pipeline_comm, self.placement, schedule=config.schedule,
                             microbatches=config.microbatches, loss_fn=F.cross_entropy, device=self.device)
        self.averager = ReplicaAverager(self.pipe.local_module, self.grid.data_comm, bucket_cap_mb=bucket_mb,
                                        wire=wire_dtype(grad_wire))
        names = {id(p): name for name, p in model.named_parameters()}
        self.parameter_names = [names[id(p)] for p in self.pipe.parameters()]
        self.update: Optional[ShardedUpdate] = None  # --zero 1: this replica's shard of the optimizer state
        if config.zero:
            self.update = ShardedUpdate([(names[id(p)], p) for p in self.pipe.parameters()], self.grid.data_comm)
            self.steps_optimizer = True
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.name = "pipeline" if self.grid.replicas == 1 and config.tp == 1 else "pipeline_hybrid"
        self.replicas, self.replica = self.grid.replicas, self.grid.replica
        self.counts = self.pipe.holds_last_stage and self.grid.tp_rank == 0  # one rank of a group counts
        stages, tp = config.stages, config.tp
        self.wait_groups = [[self.grid.rank_of(replica, stage, t) for replica in range(self.replicas)]
                            for stage in range(stages) for t in range(tp)]
        self.ideal = placement_bubble(self.pipe.schedule, self.pipe.stage_ranks)
        self.metrics_attrs = {
            "parameters": parameter_count, "tp": tp, "zero": config.zero, "schedule": config.schedule,
            "stages": self.pipe.num_stages, "virtual_stages": self.pipe.schedule.virtual_stages,
            "microbatches": config.microbatches, "replicas": self.replicas,
            "placement": json.dumps(list(self.placement.ranks)), "bubble_ideal": self.ideal,
            **({"stage_boundaries": json.dumps(list(self.placement.boundaries))} if self.placement.boundaries else {}),
            **self.grid.metrics_attrs()}
        if self.asynchronous:
            self.metrics_attrs.update(staleness_per_stage=json.dumps(self.pipe.schedule.staleness()),
                                      weight_versions_per_stage=json.dumps(self.pipe.schedule.weight_versions()))
        self.metrics_tables = [Table("pipeline_updates", self._take_updates, histograms=("staleness",), attrs={
            "schedule": config.schedule, "staleness_per_stage": json.dumps(self.pipe.schedule.staleness())})] \
            if self.asynchronous else []
        self._stage_seconds: Dict[int, List[float]] = {index: [0.0, 0.0] for index in self.pipe.stages}

    def parameters(self):
        """What the loop's optimizer steps: this rank's stages' parameters, or (``--zero 1``) its pieces."""
        return list(self.pipe.parameters()) if self.update is None else self.update.parameters()

    def describe(self) -> str:
        return (f"{self.metrics_attrs['parameters']:,} parameters, {len(self.model)} layers"
                f"{' after the tensor-parallel split' if self.config.tp > 1 else ''}; {self.grid}; "
                f"{self.placement}; {self.pipe.schedule}; ideal bubble {self.ideal:.3f}\n{self.grid.describe()}")

    def needs_batch(self) -> bool:
        return self.pipe.holds_first_stage or self.pipe.holds_last_stage

    def bind_recompute(self, mode: str) -> None:
        """``--recompute full``: each local stage keeps only its input per micro-batch in flight and runs its
        forward again in the backward (:class:`~mpipar.pipeline.stage.Stage`); ``selective``: each block's
        attention core checkpointed (the whole model checked for one, every rank alike). Local."""
        recompute_units(self.model, mode)  # raises for a model without such units
        for stage in self.pipe.stages.values():
            if mode == "full":
                stage.recompute = True
            else:
                apply_recompute(stage.module, mode, strict=False)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The loop's optimizer, stepped by an asynchronous pipeline at each update, or (``--zero 1``) here."""
        if self.asynchronous:
            self.pipe.bind_optimizer(optimizer)
        self.optimizer = optimizer

    def _async_step(self, images, labels) -> StepRecord:
        result = self.pipe.step(images, labels)
        times = result.times
        for index, (forward, backward) in result.stage_times.items():
            self._stage_seconds[index][0] += forward
            self._stage_seconds[index][1] += backward
        self._updates += [(self._step, *update) for update in result.updates]
        staleness = [applied - used for _, _, used, applied in result.updates]
        self._step += 1
        return StepRecord(  # the loss on the last stage's rank only: a broadcast would stall every stage
            loss=result.loss if self.counts else 0.0, samples=len(labels) if self.counts else 0,
            loss_weight=None if self.counts else 0, compute_time=times.busy, comm_time=times.comm,
            bytes_sent=result.bytes_sent,
            extra=dict(pipeline_busy=times.busy, pipeline_wall=times.wall, activation_bytes=result.activation_bytes,
                       stash_bytes=result.stash_bytes, weight_versions=max(result.weight_versions.values(), default=0),
                       updates=len(staleness),
                       staleness_mean=float(np.mean(staleness)) if staleness else float("nan")))

    def _drain(self) -> None:
        """Finish what the pipeline holds (collective); its updates count for the last step."""
        self.pipe.drain()
        self._updates += [(self._step - 1, *update) for update in self.pipe.take_updates()]

    def bind_loss_scaler(self, scaler) -> None:
        """fp16: the last stage backpropagates its loss times ``scaler``'s scale (the loop unscales, checks
        every rank for an overflow and steps)."""
        self.loss_scaler = scaler

    def train_step(self, batch) -> StepRecord:
        images, labels = batch if batch is not None else (None, None)
        if self.asynchronous:
            return self._async_step(images, labels)
        self.pipe.loss_scale = 1.0 if self.loss_scaler is None else self.loss_scaler.scale_value
        self.averager.begin_step()  # replicas' gradients are reduced during the last micro-batch's backward
        result = self.pipe.step(images, labels, before_last_backward=self.averager.stage_finishing)
        self.averager.average()
        memory: dict = {}
        if self.update is not None:
            assert self.optimizer is not None, "bind_optimizer before train_step (the loop does)"
            memory = self.update.step_after(self.optimizer, self.averager.stats,
                                          [bucket.buffer for bucket in self.averager.buckets])
        reduced, split = self.averager.stats.take(), self.tp_stats.take()
        times = result.times
        for index, (forward, backward) in result.stage_times.items():
            self._stage_seconds[index][0] += forward
            self._stage_seconds[index][1] += backward
        samples = len(labels) if self.counts and labels is not None else 0  # counts: holds the targets
        compute = times.busy - split.wait_time  # the stages' busy time includes their tensor-parallel Allreduces
        return StepRecord(  # moved to waits, for the bubble too
            loss=result.loss, samples=samples, compute_time=compute, comm_time=times.comm,
            wait_time=reduced.wait_time + split.wait_time,
            bytes_sent=reduced.bytes_sent + result.bytes_sent + split.bytes_sent,
            extra=dict(pipeline_busy=compute, pipeline_wall=times.wall, activation_bytes=result.activation_bytes,
                       **memory))

    def end_epoch(self) -> None:
        self._drain()
        self.averager.sync_buffers(self.pipe.local_module)

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        """Loss and accuracy over ``dataset``, each replica taking a share (the forward schedule).
        Collective over the world; every rank gets the same result."""

        def outputs(images, labels):
            micro = math.gcd(len(labels), self.pipe.microbatches)  # a short last batch
            return self.pipe.evaluate(images, labels, microbatches=micro).outputs

        result = evaluate(self.model, dataset, self.world, shards=self.replicas, shard=self.replica, outputs=outputs,
                          counts=self.counts, device=self.device)
        self.tp_stats.take()  # the evaluation's tensor-parallel Allreduces: not the next step's communication
        return result

    def state_dict(self) -> dict:
        """This rank's stages; an asynchronous pipeline is drained first (collective) and adds its
        stashed weight versions and counters (``pipeline_async``)."""
        state = {"model": self.pipe.local_module.state_dict(), "placement": list(self.placement.ranks),
                 "parameter_names": self.parameter_names, "layer_seconds": self.predicted,
                 "grid_order": self.grid.order, "shared_parameters": [list(s.names) for s in self.pipe.shared.shared],
                 **({"stage_boundaries": list(self.placement.boundaries)} if self.placement.boundaries else {})}
        if self.asynchronous:
            self._drain()
            state["model"] = self.pipe.local_module.state_dict()  # after the drain's updates
            state["pipeline_async"] = self.pipe.async_state_dict()
        if self.update is not None:  # the layout of this rank's pieces, which the optimizer state follows
            state[GRID_KEY] = self.update.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """This rank's stages; after a re-layout (loaded at construction), ``state["optimizer"]``
        becomes this rank's parameters' (or ``--zero 1``: pieces') optimizer state, taken by parameter name.
        Collective over the world (``--zero 1``: the shard layout checked)."""
        update = self.update
        if self._relayout is None:
            if update is not None:
                collective_check(self.world, lambda: _same_pieces(update, state.get(GRID_KEY)), "--resume")
            self.pipe.local_module.load_state_dict(state["model"])
            if self.asynchronous:
                self.pipe.load_async_state_dict(state["pipeline_async"])
            return
        by_name, group = self._relayout["optimizer_by_name"], self._relayout["optimizer"]["param_groups"][0]
        if update is not None:
            state["optimizer"] = update.optimizer_state(by_name, group)
            return
        state["optimizer"] = {
            "state": {i: by_name[name] for i, name in enumerate(self.parameter_names) if by_name.get(name)},
            "param_groups": [{**group, "params": list(range(max(1, len(self.parameter_names))))}]}

    def _take_updates(self) -> Dict[str, np.ndarray]:
        """The rows of ``/pipeline_updates`` since the last call (this rank's updates). Local."""
        rows = np.array(self._updates, dtype=np.int64).reshape(-1, 5)
        self._updates = []
        rank = self.world.Get_rank()
        return {"step": rows[:, 0], "rank": np.full(len(rows), rank, np.int64), "stage": rows[:, 1],
                "microbatch": rows[:, 2], "forward_version": rows[:, 3], "applied_version": rows[:, 4],
                "staleness": rows[:, 4] - rows[:, 3]}

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Write the measured bubble (``/steps/bubble_measured`` and the root attributes
        ``bubble_measured``, ``bubble_bound``, ``peak_activation_bytes_per_rank``), print the
        per-stage report and the bubble's parts, and free the grid. Collective over the world."""
        if self.asynchronous:
            self._drain()
            metrics.write_tables()  # the drain's updates, after the loop's last flush
        comm = self.grid.pipeline_comm
        forward = gather_stage_times(comm, {i: s[0] for i, s in self._stage_seconds.items()}, self.pipe.num_stages)
        backward = gather_stage_times(comm, {i: s[1] for i, s in self._stage_seconds.items()}, self.pipe.num_stages)
        bound = float("nan")
        stage_attrs = {"stage_layers": json.dumps(self.placement.balance())}
        if self.predicted is not None:
            predicted = stage_sums(self.predicted, self.placement.balance())
            stage_attrs["stage_seconds_predicted"] = json.dumps(predicted)
        if steps_run:
            per_microbatch = steps_run * self.pipe.microbatches
            stage_times = [(f / per_microbatch, b / per_microbatch) for f, b in zip(forward, backward)]
            bound = placement_bubble(self.pipe.schedule, self.pipe.stage_ranks, stage_times)
            stage_attrs["stage_seconds_measured"] = json.dumps([f + b for f, b in stage_times])
            if self.predicted is not None:
                say("per-stage time per micro-batch (replica 0):\n" + format_report(
                    self.placement.balance(), predicted, [f + b for f, b in stage_times]))
        stages = self.config.stages

        def bubble(steps: dict) -> tuple:
            attrs = {"bubble_ideal": self.ideal, "bubble_bound": bound, "bubble_measured": float("nan"), **stage_attrs}
            if "pipeline_busy" not in steps:
                return {}, attrs
            world = self.world.Get_size()  # steps of this layout (a resumed run may have had another)
            ours = steps["world_size"] == world if "world_size" in steps else np.ones(len(steps["pipeline_busy"]), bool)
            per_step = np.full(len(ours), np.nan)
            logical = self.grid.order  # bubble_per_step reads the columns in the grid's logical order
            per_step[ours] = bubble_per_step(steps["pipeline_busy"][ours][:, logical],
                                             steps["pipeline_wall"][ours][:, logical], stages, self.config.tp)
            measured = per_step[ours][1:] if ours.sum() > 1 else per_step[ours]  # the first step warms up
            attrs["bubble_measured"] = float(measured.mean()) if len(measured) else float("nan")
            attrs["peak_activation_bytes_per_rank"] = json.dumps(np.nanmax(steps["activation_bytes"], 0).tolist())
            if "stash_bytes" in steps:
                attrs["peak_stash_bytes_per_rank"] = json.dumps(np.nanmax(steps["stash_bytes"], 0).tolist())
            return {"bubble_measured": per_step}, attrs

        attrs = metrics.write_derived(bubble)
        measured = attrs["bubble_measured"]
        say(f"pipeline bubble: measured {measured:.3f}; ideal {self.ideal:.3f} with equal stages, {bound:.3f} with "
            f"the measured stage times (the rest, {measured - bound:+.3f}, is communication and overhead)")
        self.pipe.shared.free()
        self.grid.free()


def full_optimizer(checkpoint) -> Dict[str, dict]:
    """Each parameter's whole optimizer state by the unsplit model's names (``mpipar-consolidate``): put
    together from every rank's pieces when the files carry them (``--zero 1``), else the first pipeline's.
    Local: no MPI."""
    state = training_state(checkpoint)
    return grid_optimizer(checkpoint) if state.get(GRID_KEY) else state["optimizer_by_name"]


def _same_pieces(update: ShardedUpdate, saved: Optional[dict]) -> None:
    if not update.same_layout(saved):
        raise ValueError("the checkpoint's ZeRO-1 shard layout is not this rank's (another model or placement); "
                         "resume on the layout that wrote it")


if TYPE_CHECKING:
    def _is_a_strategy(strategy: PipelineStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
