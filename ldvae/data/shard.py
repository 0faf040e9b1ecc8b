"""Sharding by rank: each rank of a distributed job reads its own contiguous block of cells.

The communicator (an object with ``rank``, ``world_size`` and ``all_reduce_sum_numpy``) is
made by ``ldvae.distributed`` and handed down with :func:`use_communicator`; this layer
never imports the layers above it."""

from __future__ import annotations


def row_chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into contiguous ranges of ``size`` rows (the last may be shorter)."""
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


_COMM = None


def use_communicator(comm) -> None:
    """Make ``comm`` (an object with ``rank``, ``world_size`` and ``all_reduce_sum_numpy``)
    the one every pass shards over; ``None`` for a single process."""
    global _COMM
    _COMM = comm


def shard() -> tuple[int, int, object | None]:
    """(rank, world size, communicator) of the registered distributed job, or (0, 1, None)."""
    comm = _COMM
    return (0, 1, None) if comm is None else (comm.rank, comm.world_size, comm)


def shard_rows(n_cells: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of cells: ``[rank * n / W, (rank + 1) * n / W)``."""
    return rank * n_cells // world_size, (rank + 1) * n_cells // world_size
