"""What the benchmarks share: the checkout on ``sys.path``, a gloo process group set up from MPI, DDP as
the benchmarks configure it, timed SGD steps, resident memory, one launch per variant, ABBA round order and
the summary of paired per-round ratios.

A benchmark imports it before mpipar (``from _bench import ...``; the benchmark's own folder is on
``sys.path`` when it runs as ``python benchmarks/NAME.py``), which finds mpipar in a checkout that
was not installed.
"""

import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI

from mpipar.run.metrics import peak_resident_bytes


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def init_gloo(comm, timeout=None) -> None:
    """``torch.distributed``'s gloo group over TCP, rank and size taken from ``comm`` (rendezvous via
    MASTER_ADDR/MASTER_PORT: rank 0 picks a free port and broadcasts it with its address: localhost when
    every rank is on its node, else the address its host name resolves to, e.g. an emulated node's)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = comm.allreduce(int(node.Get_size() == comm.Get_size()), op=MPI.MIN) == 1
    node.Free()
    if comm.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else
                                                    socket.gethostbyname(socket.gethostname()))
        rendezvous = (address, free_port(address))
    os.environ["MASTER_ADDR"], port = comm.bcast(rendezvous if comm.Get_rank() == 0 else None, root=0)
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size(), timeout=timeout)


def gloo_world(threads: int):
    """``(MPI.COMM_WORLD, rank, size)`` with torch at ``threads`` threads and the gloo group up (:func:`init_gloo`):
    a benchmark's start. Collective over COMM_WORLD."""
    comm = MPI.COMM_WORLD
    torch.set_num_threads(threads)
    init_gloo(comm)
    return comm, comm.Get_rank(), comm.Get_size()


def ddp_no_buffer_sync() -> dict:
    """DDP's keyword for no buffer broadcast in every forward (``broadcast_buffers`` renamed in newer torch)."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def ddp(model, bucket_mb: float, **options):
    """torch's DDP with the advantages mpipar has: ``gradient_as_bucket_view`` (no copies into buckets) and no
    buffer broadcast in every forward; ``options`` (``process_group``, ``device_ids``) go on to it."""
    return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True,
                                                     **ddp_no_buffer_sync(), **options)


def mpi_library() -> str:
    """The MPI library's name and version, e.g. ``Open MPI v5.0.8``."""
    return MPI.Get_library_version().split(",")[0].strip()


def sleeping_barrier(comm, interval: float = 0.001) -> None:
    """A barrier that sleeps while it waits (Open MPI's blocking one spins and would take a core from the
    rank that works)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(interval)


def time_steps(model, wrapped, batches, lr=0.01, sync=lambda: None, warmed=lambda: None) -> float:
    """Seconds for SGD (momentum 0.9) steps over ``batches[1:]``, after one warm-up step on ``batches[0]``;
    ``sync`` (e.g. the device's synchronize) runs before each clock reading, ``warmed`` after the warm-up
    step, before the clock starts (e.g. to reset counters)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(images, labels):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(images), labels).backward()
        optimizer.step()

    step(*batches[0])
    warmed()
    sync()
    start = time.perf_counter()
    for images, labels in batches[1:]:
        step(images, labels)
    sync()
    return time.perf_counter() - start


def current_rss() -> int:
    """This process's resident set now, bytes (``/proc/self/statm``; Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident set so far, bytes (``ru_maxrss``, as the metrics file's ``max_rss_bytes``)."""
    return int(peak_resident_bytes())


def warm_up(optimizer_class, **options) -> None:
    """One step of ``optimizer_class`` (with ``options``) on a tiny layer: the lazy imports of a first step
    (AdamW's: torch._dynamo, ~40 MiB) are then in the RSS before the model, not counted as any variant's memory."""
    layer = torch.nn.Linear(4, 4)
    optimizer = optimizer_class(layer.parameters(), **options)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()


def launch_result(command, variant: str, env=None) -> dict:
    """Run one launch (``command``, an mpirun line) of ``variant``; the JSON its rank 0 printed after ``RESULT ``,
    or ``{"variant", "error"}`` with how the launch exited and its last line on stderr."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": variant, "error": f"launch exited {done.returncode}: {tail}"}


def launch_rounds(variants, rounds: int, launch, render, out=None) -> str:
    """A driver's rounds: ``launch(variant)`` (a dict) for every variant, ``rounds`` times in ABBA order, each
    result printed; after every round the report ``render(results, load_start, load_end, seconds)`` (``results``:
    variant -> its rounds' dicts; load averages; seconds so far) is written to ``out``, so a run stopped early
    keeps the rounds it finished. Returns the last report."""
    load_start, started = os.getloadavg(), time.time()
    results = {variant: [] for variant in variants}
    report = ""
    for round_index in range(rounds):
        for variant in abba(variants, round_index):
            result = launch(variant)
            results[variant].append(result)
            print(f"round {round_index} {variant}: " + json.dumps(result), flush=True)
        report = render(results, load_start, os.getloadavg(), time.time() - started)
        if out:
            Path(out).write_text(report)
    return report


def abba(items, round_index: int) -> list:
    """``items`` in order in even rounds and reversed in odd ones (ABBA), so that drift in machine load hits
    all of them alike."""
    items = list(items)
    return items if round_index % 2 == 0 else items[::-1]


class Paired(NamedTuple):
    """Median and range of the paired per-round ratios, and how many rounds."""

    median: float
    low: float
    high: float
    count: int

    def verdict(self, faster: str, slower: str) -> str:
        """"no measurable difference" when the range includes 1, else ``faster`` (ratio above 1) or ``slower``."""
        return "no measurable difference" if self.low <= 1.0 <= self.high else (faster if self.low > 1.0 else slower)

    def text(self, faster: str, slower: str) -> str:
        return f"{self.median:.3f} (range {self.low:.3f}-{self.high:.3f}): {self.verdict(faster, slower)}"


def paired(numerators, denominators, trim: bool = True) -> Paired:
    """The per-round ratios numerator / denominator: their median and range, [min-max], or with ``trim`` the
    extreme tenth dropped on each side (nothing dropped under 10 rounds)."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    cut = len(ratios) // 10 if trim else 0
    return Paired(statistics.median(ratios), ratios[cut], ratios[-1 - cut], len(ratios))
