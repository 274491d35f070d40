"""Data sharding: row groups -> (group, rank) workers, disjoint and complete, checked down to row ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.loader import CriteoStream
from data_pipeline.sharding import RowGroup, assign_row_groups, cap_rows, rows_per_worker

CASES = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (4, 4)]


def _groups(n: int, size: int = 10) -> list[RowGroup]:
    return [RowGroup(file=i // 3, index=i % 3, num_rows=size, first_row=i * size) for i in range(n)]


@pytest.mark.parametrize("num_groups,world_size", CASES)
def test_disjoint_partitions_all_row_groups(num_groups: int, world_size: int) -> None:
    rgs = _groups(23)
    owners: dict[RowGroup, tuple[int, int]] = {}
    for g in range(num_groups):
        for r in range(world_size):
            mine = assign_row_groups(rgs, g, num_groups, r, world_size, shared=False)
            assert mine == sorted(mine, key=lambda x: x.first_row)  # dataset order kept
            for rg in mine:
                assert rg not in owners, f"{rg} given to {owners[rg]} and {(g, r)}"
                owners[rg] = (g, r)
    assert set(owners) == set(rgs)


@pytest.mark.parametrize("num_groups,world_size", CASES)
def test_shared_each_group_gets_everything(num_groups: int, world_size: int) -> None:
    rgs = _groups(23)
    for g in range(num_groups):
        got = [
            rg for r in range(world_size) for rg in assign_row_groups(rgs, g, num_groups, r, world_size, True)
        ]
        assert sorted(got, key=lambda x: x.first_row) == rgs and len(set(got)) == len(got)


def test_interleaved_over_time_and_independent_of_world_size() -> None:
    rgs = _groups(40)
    for r in range(4):
        mine = assign_row_groups(rgs, 1, 2, r, 4, shared=False)
        assert mine[0].first_row < 100 and mine[-1].first_row >= 300  # early and late data
    # A group's data is the same whatever its world size (only the split among ranks changes).
    g1 = {rg for r in range(2) for rg in assign_row_groups(rgs, 1, 2, r, 2, False)}
    assert g1 == {rg for r in range(5) for rg in assign_row_groups(rgs, 1, 2, r, 5, False)}


def test_rows_per_worker_and_cap() -> None:
    rgs = _groups(5)
    # Group 0 gets row groups 0, 2, 4 (ranks: {0, 4}, {2}); group 1 gets 1, 3.
    assert rows_per_worker(rgs, 2, 2, False) == [[20, 10], [10, 10]]
    assert rows_per_worker(rgs, 2, 3, True) == [[20, 20, 10], [20, 20, 10]]
    capped = cap_rows(rgs, 25)
    assert [rg.num_rows for rg in capped] == [10, 10, 5]
    assert cap_rows(rgs, 0) == rgs


def test_bad_worker_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        assign_row_groups(_groups(3), 0, 1, 2, 2, False)
    with pytest.raises(ValueError, match="group"):
        assign_row_groups(_groups(3), 2, 2, 0, 1, False)


@pytest.mark.parametrize(
    "num_groups,world_size,shared", [(2, 2, False), (3, 1, False), (2, 3, True), (1, 4, False)]
)
def test_streams_cover_rows_exactly_once(
    tiny_parquet: Path, num_groups: int, world_size: int, shared: bool
) -> None:
    """End to end by row_id, prediction mode (nothing dropped): the union is complete and disjoint."""
    per_group: list[list[int]] = []
    for g in range(num_groups):
        ids: list[int] = []
        for r in range(world_size):
            s = CriteoStream(tiny_parquet, batch_size=4, table_sizes=[50] * 26, group=g, num_groups=num_groups,
                             rank=r, world_size=world_size, shared=shared, drop_last=False, seed=g)  # fmt: skip
            ids += [i for b in s for i in b.row_ids.tolist() if i >= 0]
        per_group.append(ids)
    if shared:
        assert all(sorted(ids) == list(range(60)) for ids in per_group)
    else:
        every = [i for ids in per_group for i in ids]
        assert sorted(every) == list(range(60))
