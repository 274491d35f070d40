"""Which Parquet row groups each data worker reads (data sharding, not model sharding).

A *worker* is one rank of one co-distilling group: ``(group, rank)`` with ``num_groups`` groups of
``world_size`` ranks each. Row groups are the unit of assignment (each is read whole), listed in dataset
order: files in manifest order, row groups in file order, which for Criteo is time order.

- ``shared=False`` (disjoint data, the paper's default): every row group belongs to exactly one worker.
  Row group ``i`` goes to group ``i % num_groups``; a group's own row groups go round-robin to its ranks.
  Interleaving (rather than contiguous blocks) gives every worker data from every time period, and a
  group's data does not depend on its world size.
- ``shared=True``: every group reads all row groups; within a group, ranks split them round-robin.

All functions here are pure (no I/O) so they are easy to test and reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group as the loader uses it."""

    file: int  # index of the file in the manifest's "files" list
    index: int  # row group index inside that file
    num_rows: int  # rows used: the group's size, or fewer when a row cap cuts it (a prefix is used)
    first_row: int  # position of its first row in dataset order (files in order, groups in order)


def _check(group: int, num_groups: int, rank: int, world_size: int) -> None:
    if num_groups < 1 or world_size < 1:
        raise ValueError(f"num_groups ({num_groups}) and world_size ({world_size}) must be >= 1")
    if not 0 <= group < num_groups:
        raise ValueError(f"group {group} is not in [0, {num_groups})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def assign_row_groups(
    row_groups: Sequence[T], group: int, num_groups: int, rank: int, world_size: int, shared: bool
) -> list[T]:
    """The row groups worker ``(group, rank)`` reads, in dataset order (see the module docstring).

    Disjoint and complete: with ``shared=False`` the lists of all ``(group, rank)`` pairs partition
    ``row_groups``; with ``shared=True`` the lists of one group's ranks partition it.
    """
    _check(group, num_groups, rank, world_size)
    if shared:
        return list(row_groups[rank::world_size])
    mine = row_groups[group::num_groups]
    return list(mine[rank::world_size])


def rows_per_worker(
    row_groups: Sequence[RowGroup], num_groups: int, world_size: int, shared: bool
) -> list[list[int]]:
    """Rows assigned to every worker: ``out[group][rank]``."""
    return [
        [sum(rg.num_rows for rg in assign_row_groups(row_groups, g, num_groups, r, world_size, shared))
         for r in range(world_size)]
        for g in range(num_groups)
    ]  # fmt: skip


def cap_rows(row_groups: Sequence[RowGroup], max_rows: int) -> list[RowGroup]:
    """Keep only the first ``max_rows`` rows of the dataset (0 = all), cutting the last group short.

    Capping *before* assignment keeps the same subset whatever the number of workers, so an evaluation
    on a capped validation set is comparable across world sizes.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    if max_rows == 0:
        return list(row_groups)
    out: list[RowGroup] = []
    left = max_rows
    for rg in row_groups:
        if left <= 0:
            break
        out.append(rg if rg.num_rows <= left else replace(rg, num_rows=left))
        left -= rg.num_rows
    return out
