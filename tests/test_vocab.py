"""The rare-id vocabulary: exact counts, the threshold, a lossless file, and how ids then map to rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.batching import decode, map_ids
from data_pipeline.loader import CriteoStream
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_schema
from data_pipeline.vocab import IdVocabulary, build


def _repetitive(data_dir: Path, rows: int = 300, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Ids drawn from a small, skewed pool (so counts vary from 1 to many) over 3 files, some nulls."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True)
    raw = {c: rng.zipf(1.5, rows).astype(np.uint64) % 2**32 for c in SPARSE_COLUMNS}
    null = {c: rng.random(rows) < 0.1 for c in SPARSE_COLUMNS}
    files, bounds = [], [0, 100, 220, rows]
    for i in range(3):
        lo, hi = bounds[i], bounds[i + 1]
        cols = {"row_id": np.arange(lo, hi), "label": (rng.random(hi - lo) < 0.3).astype(np.int8)}
        cols |= {c: pa.array(np.full(hi - lo, 1, np.int32)) for c in DENSE_COLUMNS}
        cols |= {c: pa.array(raw[c][lo:hi].astype(np.uint32), mask=null[c][lo:hi]) for c in SPARSE_COLUMNS}
        pq.write_table(
            pa.table(cols).cast(parquet_schema()), data_dir / f"part-{i}.parquet", row_group_size=50
        )
        files.append({"path": f"part-{i}.parquet", "rows": hi - lo})
    (data_dir / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": files, "rows": rows}))
    present = {c: raw[c][~null[c]].astype(np.uint32) for c in SPARSE_COLUMNS}
    return data_dir, present


@pytest.mark.parametrize("min_count", [1, 2, 5])
def test_build_keeps_exactly_the_ids_seen_min_count_times(tmp_path, min_count):
    data, present = _repetitive(tmp_path / "d")
    vocab = build(data, min_count)
    assert vocab.rows_counted == 300
    for f, c in enumerate(SPARSE_COLUMNS):
        values, counts = np.unique(present[c], return_counts=True)
        np.testing.assert_array_equal(vocab.kept[f], values[counts >= min_count])
        probe = np.concatenate([values, np.array([0, 2**32 - 1], dtype=np.uint32)])
        want = np.isin(probe, values[counts >= min_count])
        np.testing.assert_array_equal(vocab.is_kept(f, probe), want)


def test_save_load_round_trip_and_bad_files(tmp_path):
    data, _ = _repetitive(tmp_path / "d")
    vocab = build(data, 2)
    vocab.save(tmp_path / "v" / "vocab.parquet")
    again = IdVocabulary.load(tmp_path / "v" / "vocab.parquet")
    assert again.min_count == 2 and again.source == str(data) and again.sizes() == vocab.sizes()
    assert all(
        np.array_equal(a, b) and b.dtype == np.uint32 for a, b in zip(vocab.kept, again.kept, strict=True)
    )
    assert not list((tmp_path / "v").glob("*.tmp"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="other.parquet: not a recsys-codistill id vocabulary"):
        IdVocabulary.load(tmp_path / "other.parquet")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build(tmp_path / "nowhere", 2)
    with pytest.raises(ValueError, match="min_count"):
        IdVocabulary(0, vocab.kept)


def test_rare_ids_share_row_1_and_kept_ids_never_reach_it():
    ids = np.arange(1000, dtype=np.uint32) * 7919
    valid = np.ones(1000, dtype=bool)
    valid[:10] = False
    rare = np.zeros(1000, dtype=bool)
    rare[10:500] = True
    for mapping in ("mod", "hash"):
        rows = map_ids(ids, valid, 50, 3, mapping, rare=rare)
        assert (rows[:10] == 0).all() and (rows[10:500] == 1).all()
        assert rows[500:].min() >= 2 and rows[500:].max() <= 49
    np.testing.assert_array_equal(map_ids(ids, None, 50, 3, "mod", rare=np.zeros(1000, bool)), 2 + ids % 48)
    with pytest.raises(ValueError, match="row 1 for rare ids"):
        map_ids(ids, None, 2, 0, rare=rare)


def test_stream_with_vocabulary_maps_rare_ids_to_row_1(tmp_path):
    data, _ = _repetitive(tmp_path / "d")
    vocab = build(data, 3)
    sizes = [1000] * 26
    rows = decode(pq.read_table(data / "part-0.parquet"), sizes, vocab=vocab)
    table = pq.read_table(data / "part-0.parquet")
    for f, c in enumerate(SPARSE_COLUMNS):
        col = table[c]
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        ids = col.fill_null(0).to_numpy()
        kept = vocab.is_kept(f, ids)
        got = rows.sparse[:, f]
        assert (got[~valid] == 0).all() and (got[valid & ~kept] == 1).all() and (got[valid & kept] >= 2).all()
    batches = list(
        CriteoStream(data, batch_size=64, table_sizes=sizes, vocab=vocab, shuffle=False, drop_last=False)
    )
    assert sum(int((b.row_ids >= 0).sum()) for b in batches) == 300
    with pytest.raises(ValueError, match="row 1 = rare ids"):
        CriteoStream(data, batch_size=64, table_sizes=[2] * 26, vocab=vocab)


def test_stream_batches_equal_direct_decoding_with_both_options(tmp_path):
    # The loader must apply the options, not just carry the keys: unshuffled, one batch holding every row
    # equals decoding the files directly.
    from data_pipeline.batching import table_to_batch

    data, _ = _repetitive(tmp_path / "d")
    vocab = build(data, 2)
    sizes = [97] * 26
    (batch,) = list(
        CriteoStream(
            data,
            batch_size=300,
            table_sizes=sizes,
            dense_buckets=16,
            vocab=vocab,
            shuffle=False,
            drop_last=False,
        )
    )
    table = pa.concat_tables([pq.read_table(data / f"part-{i}.parquet") for i in range(3)])
    want = table_to_batch(table, sizes, dense_buckets=16, vocab=vocab)
    assert batch.sparse_features.keys() == want.sparse_features.keys()
    assert torch.equal(batch.sparse_features.values(), want.sparse_features.values())
    assert torch.equal(batch.dense_features, want.dense_features) and torch.equal(batch.row_ids, want.row_ids)
    plain = table_to_batch(table, sizes)
    assert (batch.sparse_features["C1"].values() == 1).any()  # some rare ids, on row 1
    assert not torch.equal(batch.sparse_features["C1"].values(), plain.sparse_features["C1"].values())
