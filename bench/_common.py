"""Shared set-up of the single-rank training benchmarks (not a benchmark itself: `make bench` skips _*.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def single_rank_world(threads: int, port: int) -> None:
    """A 1-rank gloo world in this process, TorchRec's log noise off, ``threads`` intra-op threads."""
    from recsys_codistill.train.sharding import quiet_library_logs

    torch.set_num_threads(threads)
    quiet_library_logs()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)


def synthetic_parquet(prefix: str, rows: int, row_group_size: int) -> tuple[Path, Path]:
    """(temp dir, data dir) with ``rows`` synthetic rows in the ingested layout; remove the temp dir after."""
    from data_pipeline.synthetic import generate_parquet

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    generate_parquet(tmp / "data", rows, seed=0, row_group_size=row_group_size)
    return tmp, tmp / "data"
