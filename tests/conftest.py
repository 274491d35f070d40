"""Shared fixtures: a tiny ingested-Parquet data set written straight from the schema contract."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_schema


def write_tiny_parquet(
    data_dir: Path,
    rows_per_file: Sequence[int] = (37, 23),
    row_group_size: int = 10,
    seed: int = 0,
) -> Path:
    """Write ``part-XXXXX.parquet`` files + a minimal ``manifest.json``; row_id = 0.. in file order.

    Values are random but Criteo-shaped: ~20% null dense values (I2 can be negative), ~10% null ids,
    ids over the full uint32 range, ~25% positive labels. Row groups have ``row_group_size`` rows (the last
    of each file fewer), so groups are uneven, as in real shards.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = parquet_schema()
    files = []
    first = 0
    for i, n in enumerate(rows_per_file):
        cols: dict[str, pa.Array] = {
            "row_id": pa.array(np.arange(first, first + n, dtype=np.int64)),
            "label": pa.array((rng.random(n) < 0.25).astype(np.int8)),
        }
        for name in DENSE_COLUMNS:
            v = rng.integers(-2 if name == "I2" else 0, 1000, n).astype(np.int32)
            cols[name] = pa.array(v, mask=rng.random(n) < 0.2)
        for name in SPARSE_COLUMNS:
            v = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
            cols[name] = pa.array(v, mask=rng.random(n) < 0.1)
        path = f"part-{i:05d}.parquet"
        pq.write_table(pa.table(cols).cast(schema), data_dir / path, row_group_size=row_group_size)
        files.append({"path": path, "rows": n})
        first += n
    manifest = {"schema_version": 1, "files": files, "rows": first}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


@pytest.fixture
def tiny_parquet(tmp_path: Path) -> Path:
    """A 60-row data set: 2 files (37 + 23 rows), row groups of 10 rows (7 groups: 10,10,10,7,10,10,3)."""
    return write_tiny_parquet(tmp_path / "tiny")
