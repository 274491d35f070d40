"""Loader throughput on ONE core: CriteoStream over >= 1M synthetic rows, B=2048, shuffled.

Writes the data once with ``data_pipeline.synthetic.generate_parquet`` (Criteo-like value distributions,
so Parquet encodings are realistic; independent of the ingester), pins this process to one CPU, limits
torch and pyarrow to one thread, and times a full pass (Parquet read + decode + batching). Prints one
JSON line with examples/s and its ratio to the 110k ex/s goal and to the ~22k ex/s trainer (measured on a 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 110_000
TRAINER = 22_000


def _one_core() -> int | None:
    """Pin to one CPU (the first allowed); returns it, or None where affinity is unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_048_576)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--row-group-size", type=int, default=131_072)
    ap.add_argument("--table-size", type=int, default=100_000)
    ap.add_argument("--id-mapping", choices=("mod", "hash"), default="mod")
    ap.add_argument("--data-dir", default="", help="reuse/keep the data here (default: a temp dir)")
    a = ap.parse_args()

    import pyarrow as pa
    import torch

    from data_pipeline.loader import CriteoStream
    from data_pipeline.synthetic import generate_parquet

    tmp = None
    data_dir = Path(a.data_dir) if a.data_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_loader_"))
    t0 = time.perf_counter()
    if not (data_dir / "manifest.json").is_file():
        generate_parquet(data_dir, a.rows, seed=0, row_group_size=a.row_group_size)
    gen_s = time.perf_counter() - t0

    cpu = _one_core()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    from data_pipeline.vocab import build

    def timed_pass(**options: object) -> tuple[float, int, CriteoStream]:
        stream = CriteoStream(
            data_dir, batch_size=a.batch_size, table_sizes=[a.table_size] * 26, shuffle=True,
            shuffle_window=4, seed=0, id_mapping=a.id_mapping, **options,
        )  # fmt: skip
        t0 = time.perf_counter()
        n = 0
        for batch in stream:
            n += batch.labels.shape[0]
        return n / (time.perf_counter() - t0), n, stream

    eps, n, stream = timed_pass()
    secs = n / eps
    # The two model-input options of configs/criteo_sample.toml: 13 binned dense features as extra keys and
    # the rare-id vocabulary (counting it is a one-off cost at launch, timed separately).
    t0 = time.perf_counter()
    vocab = build(data_dir, 2)
    vocab_s = time.perf_counter() - t0
    eps_opt, _, _ = timed_pass(dense_buckets=464, vocab=vocab)
    print(json.dumps({
        "bench": "loader", "examples_per_s": round(eps), "vs_goal_110k": round(eps / GOAL, 2),
        "vs_trainer_22k": round(eps / TRAINER, 2), "examples": n, "batches": stream.num_batches(),
        "batch_size": a.batch_size, "seconds": round(secs, 2), "rows": stream.total_rows,
        "row_group_size": a.row_group_size, "shuffle_window": 4, "id_mapping": a.id_mapping,
        "threads": 1, "cpu": cpu, "data_gen_s": round(gen_s, 1),
        "with_dense_buckets_and_vocab_examples_per_s": round(eps_opt),
        "ratio_with_options_vs_plain": round(eps_opt / eps, 3),
        "vocab_build_s": round(vocab_s, 2), "vocab_kept_ids": sum(vocab.sizes().values()),
    }))  # fmt: skip
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
