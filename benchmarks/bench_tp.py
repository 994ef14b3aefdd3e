"""Benchmark: mpipar tensor parallelism vs torch.distributed.tensor.parallel (gloo) vs one process.

Usage:
    mpirun -n 2 python benchmarks/bench_tp.py
    mpirun -n 2 python benchmarks/bench_tp.py --hidden 2048 --tokens 512 --layers 4 --rounds 12

The same stack of residual MLP blocks ``x = x + fc2(gelu(fc1(x)))`` (fc1: hidden ->
ffn-mult x hidden), the same weights and the same batch of tokens, three ways:

* one process: rank 0 trains the whole stack while the other ranks wait (in a
  sleeping poll, so they leave the cores to it) with --single-threads torch threads
  (default --threads: one core per rank, the convention of the other benchmarks;
  give it all the cores with --single-threads N to compare with the machine's best);
* mpipar: a stack of ``mpipar.tensor_parallel.ParallelMLP`` (fc1 column-parallel, fc2
  row-parallel; one Allreduce forward and one backward per block, over MPI);
* torch: ``parallelize_module`` with ``ColwiseParallel`` on fc1 and ``RowwiseParallel``
  on fc2 on a CPU ``DeviceMesh`` (gloo over TCP on localhost; rendezvous via
  MASTER_ADDR/MASTER_PORT, rank and size taken from MPI).

A step is ``zero_grad``, forward, MSE loss, backward, SGD ``step``. Rounds alternate
the order ABBA (one process, mpipar, torch in even rounds, reversed in odd ones) so
that drift in machine load hits all alike; each round times --steps steps after one
warm-up step (the slowest rank's time). Rank 0 prints time per step, the speedup over
one process and the ratio to torch (medians of the paired per-round ratios, with their
range; "no measurable difference" when the range includes 1), mpipar's communication
share (its CommStats wait time / step time, mean over ranks), and memory per rank:
parameters exactly (local numel x element size) and activations as the bytes of the
tensors autograd saves for backward in one forward (counted once per storage, by a
``saved_tensors_hooks`` pair; parameters excluded).
"""

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench import abba, gloo_world, mpi_library, paired, sleeping_barrier  # before mpipar: the checkout on sys.path
from mpi4py import MPI
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import mpipar
from mpipar.comm.reducer import CommStats
from mpipar.tensor_parallel import ParallelMLP


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class ParallelBlock(nn.Module):
    def __init__(self, block: Block, comm, stats: CommStats):
        super().__init__()
        self.mlp = ParallelMLP(block.fc1, block.fc2, comm, nn.GELU(), stats=stats)

    def forward(self, x):
        return x + self.mlp(x)


def local_bytes(tensors) -> int:
    return sum(getattr(t, "_local_tensor", t).numel() * t.element_size() for t in tensors)


def saved_activation_bytes(model, x, target) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once, parameters excluded)."""
    params = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        local = getattr(tensor, "_local_tensor", tensor)  # a DTensor: this rank's part
        storage = local.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.mse_loss(model(x), target)
    del loss
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn-mult", type=int, default=4, help="fc1's outputs = ffn-mult x hidden")
    parser.add_argument("--layers", type=int, default=2, help="MLP blocks")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the batch (batch x sequence)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and contender")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--single-threads", type=int, default=None, help="threads of the one process "
                        "(default: --threads)")
    args = parser.parse_args()
    single_threads = args.threads if args.single_threads is None else args.single_threads

    comm, rank, size = gloo_world(args.threads)
    mesh = init_device_mesh("cpu", (size,))

    torch.manual_seed(0)
    ffn = args.ffn_mult * args.hidden
    base = nn.Sequential(*[Block(args.hidden, ffn) for _ in range(args.layers)])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=generator)
    target = torch.randn(args.tokens, args.hidden, generator=generator)

    single = copy.deepcopy(base)
    stats = CommStats()
    ours = nn.Sequential(*[ParallelBlock(block, comm, stats) for block in copy.deepcopy(base)])
    theirs = parallelize_module(copy.deepcopy(base), mesh, {
        f"{index}.{name}": style for index in range(args.layers)
        for name, style in (("fc1", ColwiseParallel()), ("fc2", RowwiseParallel()))})

    with torch.no_grad():  # the three compute the same thing
        reference = base(x)
        error = max((ours(x) - reference).abs().max().item(), (theirs(x) - reference).abs().max().item())
    error = comm.allreduce(error, op=MPI.MAX)

    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3)
                  for name, model in (("one process", single), ("mpipar", ours), ("torch", theirs))}
    models = {"one process": single, "mpipar": ours, "torch": theirs}

    def step(name):
        optimizers[name].zero_grad()
        F.mse_loss(models[name](x), target).backward()
        optimizers[name].step()

    def timed(name) -> float:
        """Seconds per step of ``name`` (slowest rank), after one warm-up step."""
        if name == "one process":
            seconds = 0.0
            if rank == 0:
                torch.set_num_threads(single_threads)
                step(name)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(name)
                seconds = (time.perf_counter() - start) / args.steps
                torch.set_num_threads(args.threads)
            sleeping_barrier(comm, interval=0.002)
            return comm.bcast(seconds, root=0)
        step(name)
        comm.Barrier()
        stats.take()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(name)
        seconds = (time.perf_counter() - start) / args.steps
        waited = stats.take().wait_time / args.steps
        if name == "mpipar":
            shares.append(comm.allreduce(waited / seconds) / size)
        return comm.allreduce(seconds, op=MPI.MAX)

    names = list(models)
    seconds = {name: [] for name in names}
    shares = []
    for round_index in range(args.rounds):
        for name in abba(names, round_index):
            seconds[name].append(timed(name))

    memory = {}
    for name, model in models.items():
        params = local_bytes(model.parameters())
        activations = saved_activation_bytes(model, x, target) if (name != "one process" or rank == 0) else 0
        memory[name] = comm.bcast((params, activations), root=0)

    if rank == 0:
        mib = 2.0 ** 20
        total = sum(p.numel() for p in base.parameters())
        print(f"{args.layers} MLP blocks {args.hidden}->{ffn}->{args.hidden} ({total:,} parameters), {args.tokens} "
              f"tokens, fp32, {size} ranks x {args.threads} threads (one process: {single_threads} threads), "
              f"{args.steps} steps x {args.rounds} ABBA rounds; mpipar {mpipar.__version__} over "
              f"{mpi_library()} vs torch {torch.__version__} tensor parallel "
              f"over gloo (TCP, localhost); outputs agree to {error:.1e}")
        for name, values in seconds.items():
            print(f"{name:>11}: ms/step per round " + " ".join(f"{1e3 * v:7.1f}" for v in values)
                  + f" | median {1e3 * statistics.median(values):7.1f}")
        for name in ("mpipar", "torch"):  # ranges: the extreme tenth dropped each side
            print(f"speedup of {name} over one process (paired rounds): "
                  + paired(seconds["one process"], seconds[name]).text(f"{name} faster", "one process faster"))
        print("mpipar / torch steps/s (paired rounds): "
              + paired(seconds["torch"], seconds["mpipar"]).text("mpipar faster", "torch faster"))
        print(f"mpipar communication share (CommStats wait / step time, mean over ranks, median of rounds): "
              f"{statistics.median(shares):.3f}")
        for name, (params, activations) in memory.items():
            print(f"{name:>11}: memory per rank: parameters {params / mib:7.1f} MiB, saved activations "
                  f"{activations / mib:7.1f} MiB")
        print(f"note: {size} ranks on {os.cpu_count()} cores: tensor parallelism cuts parameters (and their "
              f"gradients and optimizer state) per rank by {size}x and the split activations with them; any speed "
              f"gain over one process comes from using more cores, and is bounded by them")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
