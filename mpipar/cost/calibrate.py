"""``mpipar-calibrate``: measure message costs and layer times on the communicator given; write a machine file.

Launch: ``mpirun -n 4 mpipar-calibrate --model resnet-small --out machine.json`` (about a minute; ``--quick``
a few seconds). Ranks that share memory (``COMM_TYPE_SHARED``) are one node; with several nodes the links
across them are measured too.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from mpi4py import MPI

from mpipar import registry
from mpipar.comm import mpi_tensor
from mpipar.comm.topology import node_indices, spans_nodes
from mpipar.cost.allreduce import binomial_rounds
from mpipar.cost.machine import Band, LayerCost, Link, Machine, ModelProfile, fit_bands
from mpipar.cost.profile import profile_layers
from mpipar.diagnostics import collectives

__all__ = ["ping_pong", "allreduce_times", "reduce_seconds_per_byte", "matmul_flops", "measure_link", "profile_model",
           "strategy_profiles", "calibrate", "main"]

SIZES = tuple(2**k for k in range(3, 27, 2)) + (2**26,)  # 8 B ... 64 MiB, every factor of 4
QUICK_SIZES = tuple(2**k for k in range(3, 21, 2))  # 8 B ... 256 KiB


def _repeats(nbytes: int, budget: float) -> int:
    """More repetitions for small messages (their times are short and noisy)."""
    return int(min(200, max(3, budget * 2**20 / max(nbytes, 1))))


def ping_pong(comm: MPI.Intracomm, peer_a: int, peer_b: int, sizes: Sequence[int], *, budget: float = 1.0
              ) -> List[float]:
    """Fastest one-way seconds (half a round trip) of a message of each size between ``peer_a`` and ``peer_b``
    (the fastest of the repetitions: load on a shared machine only ever adds time, as in the layer profiler).

    Collective over ``comm``: every rank calls it with the same arguments; ranks other than the two
    peers wait in the closing broadcast. Returns the same list on every rank.
    """
    rank = comm.Get_rank()
    result = []
    for nbytes in sizes:
        buffer = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
        times = []
        if rank in (peer_a, peer_b):
            other = peer_b if rank == peer_a else peer_a
            for _ in range(_repeats(nbytes, budget) + 1):
                begin = time.perf_counter()
                if rank == peer_a:
                    mpi_tensor.send(buffer, comm, other, tag=7)
                    mpi_tensor.recv_(buffer, comm, other, tag=7)
                else:
                    mpi_tensor.recv_(buffer, comm, other, tag=7)
                    mpi_tensor.send(buffer, comm, other, tag=7)
                times.append((time.perf_counter() - begin) / 2)
        result.append(float(min(times[1:])) if times else 0.0)
    return collectives.bcast(comm, result, "calibrate: ping-pong times", root=peer_a)


def allreduce_times(comm: MPI.Intracomm, sizes: Sequence[int], *, budget: float = 1.0,
                    gradient: bool = False) -> List[float]:
    """Seconds of an Allreduce (sum) of each size over ``comm``: the mean of back-to-back Allreduces after a
    Barrier (so the Barrier's skew between ranks is spread over them), the fastest of 3 such runs, the
    slowest rank's. ``gradient``: the non-blocking Allreduce as the gradient reducer starts and waits for
    it (out of place when ``comm`` spans nodes), instead of the blocking in-place one. Collective."""
    source = None
    if gradient and spans_nodes(comm):
        source = torch.zeros(max(max(sizes) // 4, 1), dtype=torch.float32)

    def reduce(buffer):
        if not gradient:
            return mpi_tensor.allreduce_(buffer, comm)
        return mpi_tensor.iallreduce_(buffer, comm, source=None if source is None else
                                      source[:buffer.numel()]).wait()

    result = []
    for nbytes in sizes:
        buffer = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
        count = max(1, _repeats(nbytes, budget) // 3)
        reduce(buffer)  # warm-up
        runs = []
        for _ in range(3):
            comm.Barrier()
            begin = time.perf_counter()
            for _ in range(count):
                reduce(buffer)
            runs.append((time.perf_counter() - begin) / count)
        result.append(float(min(runs)))
    return np.max(collectives.allgather(comm, result, "calibrate: Allreduce times"), axis=0).tolist()


def reduce_seconds_per_byte(nbytes: int = 2**25, repeats: int = 5) -> float:
    """Seconds per byte of adding one float32 buffer into another on one core (what an MPI reduction
    does with each received piece; the size of a gradient bucket, beyond the caches), the fastest of
    ``repeats``. Local (each rank measures its own core)."""
    into, received = np.ones(nbytes // 4, np.float32), np.ones(nbytes // 4, np.float32)
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        np.add(into, received, out=into)
        times.append(time.perf_counter() - begin)
    return min(times[1:]) / nbytes


def matmul_flops(n: int = 1024, m: int = 1024, rank: int = 4, repeats: int = 5) -> float:
    """fp32 floating-point operations per second of PowerSGD's thin product ``M Q`` (``n x m`` by
    ``m x rank``, ``2 n m rank`` operations; memory-bound, as its products are), the fastest of ``repeats``.
    Local (each rank measures its own core, at the thread count it runs with)."""
    matrix, thin = torch.randn(n, m), torch.randn(m, rank)
    out = torch.empty(n, rank)
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        torch.matmul(matrix, thin, out=out)
        times.append(time.perf_counter() - begin)
    return 2 * n * m * rank / max(min(times[1:]), 1e-9)


def measure_link(comm: MPI.Intracomm, peer_a: int, peer_b: int, ring: Optional[MPI.Intracomm], sizes: Sequence[int],
                 description: str, *, budget: float = 1.0, gradient: bool = False) -> Tuple[Link, dict]:
    """The :class:`Link` between ``peer_a`` and ``peer_b`` (ping-pong) and of Allreduces on ``ring``
    (blocking; with ``gradient`` also the reducer's in-place non-blocking one, as binomial levels).

    Collective over ``comm``; ``ring`` is this rank's group whose Allreduce is timed (its ranks call
    together; None on ranks outside every timed group). Every rank returns the same link, fitted on
    ``peer_a``, and the raw times.
    """
    one_way = ping_pong(comm, peer_a, peer_b, sizes, budget=budget)
    reduce_times = allreduce_times(ring, sizes, budget=budget) if ring is not None else None
    gradient_times = allreduce_times(ring, sizes, budget=budget, gradient=True) if gradient and ring is not None \
        else None
    ranks = ring.Get_size() if ring is not None else 0
    reduce_times, gradient_times, ranks = collectives.bcast(
        comm, (reduce_times, gradient_times, ranks), "calibrate: Allreduce fit", root=peer_a)
    p2p = fit_bands(sizes, one_way)
    gradient_bands: Tuple[Band, ...] = ()
    if ranks > 1:
        allreduce = fit_bands(sizes, reduce_times, scale_alpha=2 * (ranks - 1), scale_beta=2 * (ranks - 1) / ranks)
        if gradient_times:
            levels = binomial_rounds(ranks)
            gradient_bands = fit_bands(sizes, gradient_times, scale_alpha=levels, scale_beta=levels)
    else:  # a ring of one rank: a ring of two over this link
        allreduce = tuple(Band(b.max_bytes, b.alpha, b.beta) for b in p2p)
    raw = {"sizes": list(sizes), "p2p_seconds": one_way, "allreduce_seconds": reduce_times,
           "gradient_allreduce_seconds": gradient_times, "allreduce_ranks": ranks}
    return Link(p2p, allreduce, max(ranks, 2), description, gradient_bands), raw


def profile_model(model_name: str, sizes: Sequence[int], *, repeats: int = 5) -> ModelProfile:
    """Each layer's forward and backward at each micro-batch size (the pipeline's layer profiler,
    :func:`~mpipar.cost.profile.profile_layers`: the fastest round) and the whole model's training
    step (the median of ``repeats``). A model that is not a sequence of layers (a vision transformer) is
    timed by the strategy that profiles it (:func:`strategy_profiles`). Local."""
    from mpipar import models

    factories: Dict[str, Callable[..., torch.nn.Module]] = {**models.IMAGE_MODELS, "mlp": models.image_mlp}
    if model_name not in factories:
        found = strategy_profiles(model_name, sizes, repeats=repeats)
        if model_name in found:
            return found[model_name]
    if model_name not in factories:
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted([*factories, *models.VIT_MODELS])}")
    model = factories[model_name](in_channels=1, num_classes=10, image_size=28)
    if not isinstance(model, torch.nn.Sequential):
        raise ValueError(f"model {model_name!r} is not a sequence of layers; the profiler needs one")
    return profile_layers_and_step(model_name, model, sizes, (1, 28, 28), 10, repeats=repeats)


def strategy_profiles(model_name: str, sizes: Sequence[int], *, ranks: int = 1,
                      repeats: int = 5) -> Dict[str, ModelProfile]:
    """The profiles of ``model_name`` the strategies take themselves (each one's registered ``profiles``
    entry point, :mod:`mpipar.registry`: tensor parallelism's ``MODEL/tpT`` of a vision transformer, and
    the vision transformer itself), in registration order. Local."""
    found: Dict[str, ModelProfile] = {}
    for spec in registry.specs():
        if spec.profiles is not None:
            found.update(registry.resolve(spec.profiles)(model_name, sizes, ranks=ranks, repeats=repeats))
    return found


def profile_layers_and_step(name: str, model: torch.nn.Sequential, sizes: Sequence[int], image_shape: Sequence[int],
                            num_classes: int, *, repeats: int = 5) -> ModelProfile:
    """The :class:`ModelProfile` named ``name`` of ``model`` (a sequence of layers) on random images of
    ``image_shape`` at each batch size of ``sizes``: each child's forward and backward (the fastest
    round) and the training step with cross-entropy and SGD (the median, as a run's metrics report it).
    Local."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    layers, steps = {}, {}
    for size in sizes:
        sample = torch.randn(size, *image_shape)
        profiles = profile_layers(model, sample, repeats=repeats)
        layers[size] = tuple(LayerCost(p.name, p.forward_time, p.backward_time,
                                       tuple(q.numel() * q.element_size() for q in child.parameters()
                                             if q.requires_grad), p.activation_bytes, p.saved_bytes,
                                       tuple(tuple(q.shape) for q in child.parameters() if q.requires_grad))
                             for p, child in zip(profiles, model.children()))
        labels = torch.randint(0, num_classes, (size,))
        times = []
        for _ in range(repeats + 1):
            begin = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(sample), labels).backward()
            optimizer.step()
            times.append(time.perf_counter() - begin)
        steps[size] = float(np.median(times[1:]))
    return ModelProfile(name, layers, steps)


def calibrate(comm: MPI.Intracomm, *, model_names: Sequence[str] = ("resnet-small",),
              microbatch_sizes: Sequence[int] = (8, 32, 128), quick: bool = False,
              say=print) -> Tuple[Machine, dict]:
    """Measure ``comm``'s links and the models' layers: the same ``(Machine, raw times)`` on every rank.

    Collective over ``comm``. Ranks on one node (``COMM_TYPE_SHARED``) give the link within a node
    (ping-pong between its first two ranks, Allreduce over the node's ranks); with several nodes,
    the first ranks of two nodes give the link across (Allreduce over one rank per node). Every rank
    profiles the models at once, so each has the share of the machine it has in training; the median
    over ranks is kept. Size 1 measures compute only (the links are then those of a ring of two
    ranks on the same node, with no time).
    """
    sizes = QUICK_SIZES if quick else SIZES
    budget = 0.05 if quick else 1.0
    rank, nodes = comm.Get_rank(), node_indices(comm)
    per_node = max(nodes.count(node) for node in set(nodes))
    node_comm = cast(MPI.Intracomm, comm.Split(nodes[rank], rank))  # an Intracomm's Split (stubs say Comm)
    first_of = {node: nodes.index(node) for node in set(nodes)}
    leaders = cast(MPI.Intracomm, comm.Split(0 if first_of[nodes[rank]] == rank else MPI.UNDEFINED, rank))
    try:
        zero = (Band(None, 0.0, 0.0),)
        within, raw = Link(zero, zero, 2, "shared memory"), {}
        mates = [r for r in range(comm.Get_size()) if nodes[r] == nodes[0]]
        if len(mates) > 1:
            say(f"calibrate: within a node, ranks {mates[0]} and {mates[1]}; Allreduce over {len(mates)} ranks")
            within, raw["within"] = measure_link(comm, mates[0], mates[1], node_comm if nodes[rank] == nodes[0]
                                                 else None, sizes, "shared memory", budget=budget, gradient=True)
        across = None
        if len(set(nodes)) > 1:
            say(f"calibrate: across nodes, ranks {first_of[0]} and {first_of[1]}; Allreduce over "
                f"{len(set(nodes))} ranks (one per node)")
            across, raw["across"] = measure_link(comm, first_of[0], first_of[1],
                                                 leaders if leaders != MPI.COMM_NULL else None, sizes,
                                                 "the measured network", budget=budget)
        reduce_cost = float(np.median(collectives.allgather(
            comm, reduce_seconds_per_byte(repeats=2 if quick else 5), "calibrate: reduction cost")))
        profiles = {}
        for name in model_names:
            say(f"calibrate: profiling {name} at micro-batches {list(microbatch_sizes)} on every rank")
            extra = strategy_profiles(name, microbatch_sizes, ranks=comm.Get_size(), repeats=2 if quick else 5)
            mine = extra.pop(name) if name in extra else profile_model(name, microbatch_sizes,
                                                                       repeats=2 if quick else 5)
            gathered = collectives.allgather(comm, mine, f"calibrate: {name} profiles")
            profiles[name] = _median_profile(gathered)
            for key, split in extra.items():  # a vision transformer: one rank of each tp too
                profiles[key] = _median_profile(collectives.allgather(comm, split, f"calibrate: {key} profiles"))
        ratios = {}
        if model_names:
            say(f"calibrate: {model_names[0]}'s step under bf16 and fp16 autocast against fp32 at micro-batch "
                f"{min(microbatch_sizes)}, on every rank")
            mine_ratios = autocast_ratios(model_names[0], min(microbatch_sizes), repeats=1 if quick else 3)
            every = collectives.allgather(comm, mine_ratios, "calibrate: autocast ratios")
            ratios = {key: float(np.median([r[key] for r in every])) for key in mine_ratios
                      if all(key in r for r in every)}
        memory = min(collectives.allgather(comm, physical_memory(), "calibrate: memory"))
        flops = float(np.median(collectives.allgather(comm, matmul_flops(repeats=2 if quick else 5),
                                                      "calibrate: matrix product rate")))
    finally:
        node_comm.Free()
        if leaders != MPI.COMM_NULL:
            leaders.Free()
    host = collectives.bcast(comm, socket.gethostname(), "calibrate: host")
    return Machine(within, across, profiles, comm.Get_size(), per_node, host,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), reduce_cost, ratios, memory, flops), raw


def physical_memory() -> float:
    """This node's physical memory in bytes (0 when the system does not say). Local."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def autocast_ratios(model_name: str, size: int, *, repeats: int = 5) -> Dict[str, float]:
    """The median training step of ``model_name`` on a batch of ``size`` under bf16 and fp16 autocast
    (CPU) over the fp32 step's: ``{"bf16": r, "fp16": r}``, a precision torch cannot autocast here left
    out; {} for a model that is not one of the image models. Local."""
    from mpipar import models

    factories: Dict[str, Callable[..., torch.nn.Module]] = {**models.IMAGE_MODELS, "mlp": models.image_mlp}
    if model_name not in factories:
        return {}
    model = factories[model_name](in_channels=1, num_classes=10, image_size=28)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sample, labels = torch.randn(size, 1, 28, 28), torch.randint(0, 10, (size,))

    def step_seconds(dtype: Optional[torch.dtype]) -> float:
        times = []
        for _ in range(repeats + 1):
            begin = time.perf_counter()
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(sample), labels)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - begin)
        return float(np.median(times[1:]))

    fp32 = step_seconds(None)
    ratios = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            ratios[name] = step_seconds(dtype) / fp32
        except (RuntimeError, TypeError):  # no autocast of this dtype on this CPU / torch
            continue
    return ratios


def _median_profile(profiles: Sequence[ModelProfile]) -> ModelProfile:
    """Per layer and size, the median over ranks of forward and backward times."""
    first = profiles[0]
    layers = {}
    for size, costs in first.layers.items():
        layers[size] = tuple(LayerCost(
            cost.name, float(np.median([p.layers[size][i].forward for p in profiles])),
            float(np.median([p.layers[size][i].backward for p in profiles])), cost.param_bytes,
            cost.activation_bytes, cost.saved_bytes, cost.param_shapes) for i, cost in enumerate(costs))
    steps = {size: float(np.median([p.step_seconds[size] for p in profiles])) for size in first.step_seconds}
    return ModelProfile(first.name, layers, steps)


def _sizes(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes >= 1, got {text!r}")
    return values


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    parser = argparse.ArgumentParser(prog="mpipar-calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="machine.json", help="the machine file to write (JSON)")
    parser.add_argument("--model", action="append", help="a model whose layers to time (repeatable; "
                        "default resnet-small); a vision transformer (vit-tiny, vit-small) is also timed as one "
                        "rank of each tensor-parallel degree that divides it, up to 4 or the rank count "
                        "(entries MODEL/tpT)")
    parser.add_argument("--microbatch-sizes", type=_sizes, default=(8, 32, 128),
                        help="samples per micro-batch to time the layers at (default 8,32,128)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions: seconds, not a minute")
    args = parser.parse_args(argv)
    say = print if comm.Get_rank() == 0 else (lambda *_: None)
    begin = time.perf_counter()
    machine, raw = calibrate(comm, model_names=args.model or ["resnet-small"],
                             microbatch_sizes=args.microbatch_sizes, quick=args.quick, say=say)
    if comm.Get_rank() == 0:
        path = machine.save(args.out)
        raw_path = path.with_suffix(".raw.json")
        import json
        raw_path.write_text(json.dumps(raw, indent=1) + "\n")
        say(f"calibrate: {comm.Get_size()} ranks, {machine.ranks_per_node} per node, "
            f"{time.perf_counter() - begin:.1f} s -> {path} (raw times: {raw_path})")
        for name, link in (("within a node", machine.within), ("across nodes", machine.across)):
            if link is not None:
                say(f"  {name}: 8 B one-way {1e6 * link.p2p_seconds(8):.1f} us, 64 MiB "
                    f"{2**26 / link.p2p_seconds(2**26) / 1e9:.2f} GB/s")
    comm.Barrier()


if __name__ == "__main__":
    main()
