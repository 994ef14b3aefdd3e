"""Which server holds which parameter: pure, no MPI."""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["assign_to_servers"]


def assign_to_servers(sizes: Sequence[int], servers: int) -> List[int]:
    """The server of every parameter (by element count): largest first onto the least loaded
    server, ties to the lower index, so every rank computes the same answer.

    Raises:
        ValueError: when there are fewer parameters than servers (a server would hold nothing).
    """
    if servers > len(sizes):
        raise ValueError(f"{servers} servers for {len(sizes)} trainable parameters: every server needs at "
                         f"least one; use --servers {max(1, len(sizes))} or fewer")
    load, owner = [0] * servers, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        server = min(range(servers), key=lambda s: (load[s], s))
        owner[index] = server
        load[server] += sizes[index]
    return owner
