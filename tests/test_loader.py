"""CriteoStream and the Arrow -> RowBatch conversion: values, balance, padding, resume, determinism, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.batching import RowBatch, decode, map_ids, table_to_batch
from data_pipeline.loader import CriteoStream, DatasetError
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_schema

SIZES = [100] * 26


def _stream(data_dir: Path, **kw) -> CriteoStream:
    kw.setdefault("batch_size", 8)
    kw.setdefault("table_sizes", SIZES)
    return CriteoStream(data_dir, **kw)


def _row_ids(batches: list[RowBatch]) -> list[list[int]]:
    return [b.row_ids.tolist() for b in batches]


def _same(a: list[RowBatch], b: list[RowBatch]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if not (
            torch.equal(x.row_ids, y.row_ids)
            and torch.equal(x.labels, y.labels)
            and torch.equal(x.dense_features, y.dense_features)
            and torch.equal(x.sparse_features.values(), y.sparse_features.values())
            and torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
        ):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# Arrow -> RowBatch


def _hand_table() -> pa.Table:
    cols: dict[str, list] = {"row_id": [10, 11, 12], "label": [1, 0, None]}
    for j, name in enumerate(DENSE_COLUMNS):
        cols[name] = [j, None, -5] if name != "I13" else [2**31 - 1, 0, 7]
    for f, name in enumerate(SPARSE_COLUMNS):
        cols[name] = [f, None, 2**32 - 1]
    return pa.table(cols).cast(parquet_schema())


def test_batch_shapes_dtypes_and_transform() -> None:
    sizes = [5 + f for f in range(26)]
    b = table_to_batch(_hand_table(), sizes)
    assert isinstance(b, RowBatch) and len(b) == 3
    assert b.dense_features.dtype == torch.float32 and b.dense_features.shape == (3, 13)
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == [1.0, 0.0, 0.0]  # null label -> 0
    assert b.row_ids.dtype == torch.int64 and b.row_ids.tolist() == [10, 11, 12]
    dense = b.dense_features.numpy()
    # Row 0: I_j = j-1 ... log1p; row 1: missing -> 0; row 2: -5 -> 0 -> log1p(0) = 0.
    expected0 = np.log1p(np.array([*range(12), 2**31 - 1], dtype=np.float32))
    np.testing.assert_allclose(dense[0], expected0, rtol=1e-6)
    np.testing.assert_array_equal(dense[1], 0.0)
    np.testing.assert_allclose(dense[2], [0.0] * 12 + [math.log1p(7)], rtol=1e-6)
    kjt = b.sparse_features
    assert kjt.keys() == list(SPARSE_COLUMNS)
    assert kjt.values().dtype == torch.int64 and kjt.values().shape == (26 * 3,)
    assert kjt.lengths().tolist() == [1] * 78 and kjt.stride() == 3
    for f, name in enumerate(SPARSE_COLUMNS):
        size = sizes[f]
        # present id -> 1 + id % (size - 1); missing -> reserved row 0; key-major layout.
        want = [1 + f % (size - 1), 0, 1 + (2**32 - 1) % (size - 1)]
        assert kjt[name].values().tolist() == want
        assert kjt.values()[3 * f : 3 * f + 3].tolist() == want


def test_hash_mapping() -> None:
    ids = np.arange(10_000, dtype=np.uint32) * 7919
    valid = np.ones(len(ids), dtype=bool)
    valid[5] = False
    a = map_ids(ids, valid, 1000, 0, "hash")
    assert a[5] == 0 and a.dtype == np.int32
    assert 1 <= a[valid].min() and a.max() <= 999
    assert len(np.unique(a[valid])) > 990  # spreads over the table
    np.testing.assert_array_equal(a, map_ids(ids, valid, 1000, 0, "hash"))  # deterministic
    assert (a != map_ids(ids, valid, 1000, 1, "hash")).mean() > 0.9  # per feature
    assert (a != map_ids(ids, valid, 1000, 0, "hash", hash_seed=1)).mean() > 0.9  # per seed
    with pytest.raises(ValueError, match="C1"):
        map_ids(ids, None, 1, 0)


def test_rowbatch_to_keeps_row_ids() -> None:
    b = table_to_batch(_hand_table(), SIZES)
    c = b.to(torch.device("cpu"))
    assert isinstance(c, RowBatch) and torch.equal(c.row_ids, b.row_ids)
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        assert isinstance(b.pin_memory(), RowBatch)


def test_decode_padding_rows() -> None:
    from data_pipeline.batching import DecodedRows

    p = DecodedRows.empty(4).to_batch()
    assert p.row_ids.tolist() == [-1] * 4 and p.labels.sum() == 0 and p.dense_features.abs().sum() == 0
    assert p.sparse_features.values().tolist() == [0] * 104
    d = decode(_hand_table(), SIZES)
    assert d.sparse.shape == (3, 26)


# ---------------------------------------------------------------------------------------------------
# Stream


def test_every_row_once_per_epoch_and_carry_over(tiny_parquet: Path) -> None:
    s = _stream(tiny_parquet, epochs=3, drop_last=True)
    assert s.num_batches() == 3 * 60 // 8 == 22 and s.rows_dropped_at_end == 4
    batches = list(s)
    assert len(batches) == 22 and all(len(b) == 8 for b in batches)
    flat = [r for ids in _row_ids(batches) for r in ids]
    # Epochs 1 and 2 are complete permutations; the partial batch at the end of epoch 1 continues into 2.
    assert sorted(flat[:60]) == list(range(60)) and sorted(flat[60:120]) == list(range(60))
    assert flat[:60] != flat[60:120]  # a fresh order each epoch
    b = batches[0]
    assert b.labels.dtype == torch.float32 and b.dense_features.shape == (8, 13)


def test_values_match_the_files(tiny_parquet: Path) -> None:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(tiny_parquet.glob("part-*.parquet"))])
    ref = decode(table, SIZES)
    for b in _stream(tiny_parquet, shuffle=True, seed=3):
        idx = b.row_ids.numpy()
        np.testing.assert_array_equal(b.dense_features.numpy(), ref.dense[idx])
        np.testing.assert_array_equal(b.labels.numpy(), ref.labels[idx])
        np.testing.assert_array_equal(b.sparse_features.values().numpy(), ref.sparse[idx].T.reshape(-1))


@pytest.mark.parametrize(
    "num_groups,world_size,shared", [(1, 2, False), (1, 3, False), (2, 2, False), (2, 3, True)]
)
def test_equal_batch_counts(tiny_parquet: Path, num_groups: int, world_size: int, shared: bool) -> None:
    counts, dropped = [], []
    for g in range(num_groups):
        for r in range(world_size):
            s = _stream(tiny_parquet, batch_size=4, group=g, num_groups=num_groups, rank=r,
                        world_size=world_size, shared=shared, epochs=2)  # fmt: skip
            n = sum(1 for _ in s)
            assert n == s.num_batches()
            counts.append(n)
            dropped.append(s.rows_dropped_per_epoch)
            assert s.worker_rows - s.rows_dropped_per_epoch == s.epoch_rows
    assert len(set(counts)) == 1, counts
    assert min(dropped) == 0  # the smallest worker loses nothing


@pytest.mark.parametrize("world_size,shuffle", [(1, False), (2, False), (3, True)])
def test_padding_path_returns_every_row_once(tiny_parquet: Path, world_size: int, shuffle: bool) -> None:
    seen: list[int] = []
    counts = []
    for r in range(world_size):
        s = _stream(
            tiny_parquet, batch_size=7, rank=r, world_size=world_size, shuffle=shuffle, drop_last=False
        )
        batches = list(s)
        counts.append(len(batches))
        for b in batches:
            pad = b.row_ids == -1
            assert (b.labels[pad] == 0).all() and (b.dense_features[pad] == 0).all()
            seen += b.row_ids[~pad].tolist()
        if not shuffle:
            assert _row_ids(batches) == _row_ids(list(s))  # a fixed order, repeatable
    assert sorted(seen) == list(range(60))
    assert len(set(counts)) == 1
    if world_size == 1 and not shuffle:
        assert seen == list(range(60))  # dataset order


@pytest.mark.parametrize("k", [1, 3, 7, 8, 13])  # mid-window, window edges, across epoch boundaries
def test_exact_resume(tiny_parquet: Path, k: int) -> None:
    kw = dict(batch_size=8, epochs=3, shuffle_window=2, seed=5)
    full = list(_stream(tiny_parquet, **kw))
    first = _stream(tiny_parquet, **kw)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON round trip
    assert state["batches_yielded"] == k
    del it
    resumed = _stream(tiny_parquet, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _same(head + rest, full)
    assert resumed.state_dict()["batches_yielded"] == len(full)


def test_resume_positions_and_state_at(tiny_parquet: Path) -> None:
    s = _stream(tiny_parquet, batch_size=8, epochs=2, shuffle_window=2)
    st = s.state_at(8)  # row 64 of 2 x 60: epoch 1, 4 rows in
    assert (
        st["epoch"] == 1 and st["rows_into_epoch"] == 4 and st["window"] == 0 and st["rows_into_window"] == 4
    )
    assert all(isinstance(v, int) for k, v in st.items() if k != "fingerprint")
    with pytest.raises(ValueError, match="seed"):
        _stream(tiny_parquet, batch_size=8, epochs=2, shuffle_window=2, seed=1).load_state_dict(st)


def test_resume_in_padding_path(tiny_parquet: Path) -> None:
    kw = dict(batch_size=7, rank=1, world_size=3, drop_last=False, shuffle=True)
    full = list(_stream(tiny_parquet, **kw))
    s = _stream(tiny_parquet, **kw)
    s.load_state_dict(_stream(tiny_parquet, **kw).state_at(len(full) - 1))
    assert _same(list(s), full[-1:])


def test_iterating_again_and_finished_state(tiny_parquet: Path) -> None:
    s = _stream(tiny_parquet, shuffle=False)
    a, b = list(s), list(s)
    assert _same(a, b)  # a finished stream starts a new pass (e.g. a validation loop)
    done = s.state_dict()
    t = _stream(tiny_parquet, shuffle=False)
    t.load_state_dict(done)
    assert list(t) == []  # resuming a finished run yields nothing ...
    assert len(list(t)) == len(a)  # ... and the pass after that starts over
    # Breaking out early and iterating again continues where it stopped.
    u = _stream(tiny_parquet, shuffle=False)
    it = iter(u)
    next(it)
    assert _same([next(iter(u))], a[1:2])


def test_determinism_and_orders(tiny_parquet: Path) -> None:
    base = _row_ids(list(_stream(tiny_parquet, seed=1)))
    assert base == _row_ids(list(_stream(tiny_parquet, seed=1)))
    assert base != _row_ids(list(_stream(tiny_parquet, seed=2)))
    # With shared data, two groups see the same rows in different orders.
    kw = dict(seed=1, num_groups=2, shared=True, batch_size=6)  # 60 rows = 10 batches: nothing dropped
    g0 = _row_ids(list(_stream(tiny_parquet, group=0, **kw)))
    g1 = _row_ids(list(_stream(tiny_parquet, group=1, **kw)))
    assert g0 != g1 and sorted(sum(g0, [])) == sorted(sum(g1, []))


def test_max_rows_is_a_global_prefix(tiny_parquet: Path) -> None:
    seen: list[int] = []
    for r in range(2):
        s = _stream(tiny_parquet, batch_size=5, rank=r, world_size=2, max_rows=25, drop_last=False)
        seen += [i for b in s for i in b.row_ids.tolist() if i >= 0]
    assert sorted(seen) == list(range(25))


def test_too_little_data_is_an_error(tiny_parquet: Path) -> None:
    with pytest.raises(DatasetError, match="no full batch"):
        _stream(tiny_parquet, batch_size=64)


# ---------------------------------------------------------------------------------------------------
# Bad data


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="manifest.json"):
        _stream(tmp_path)


def test_missing_parquet_file(tiny_parquet: Path) -> None:
    (tiny_parquet / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="part-00001.parquet.*missing"):
        _stream(tiny_parquet)


def test_unreadable_parquet_file(tiny_parquet: Path) -> None:
    (tiny_parquet / "part-00000.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DatasetError, match="part-00000.parquet.*unreadable"):
        _stream(tiny_parquet)


def test_wrong_schema(tiny_parquet: Path) -> None:
    path = tiny_parquet / "part-00001.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("C5"), "C5", t["C5"].cast(pa.int64()))
    pq.write_table(t, path)
    with pytest.raises(
        DatasetError, match=r"part-00001.parquet: column 'C5' has type int64; expected uint32"
    ):
        _stream(tiny_parquet)


def test_row_count_mismatch(tiny_parquet: Path) -> None:
    m = json.loads((tiny_parquet / "manifest.json").read_text())
    m["files"][0]["rows"] = 36
    (tiny_parquet / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="part-00000.parquet: has 37 rows"):
        _stream(tiny_parquet)


@pytest.mark.parametrize(
    "entry",
    [
        "../outside.parquet",
        "/etc/passwd",
        "sub/../../outside.parquet",
        "./part-00000.parquet",
        "a//b.parquet",
        "",
        "C:\\data\\x.parquet",
        "..\\outside.parquet",
    ],
)
def test_manifest_entry_outside_the_directory_is_refused(tiny_parquet: Path, entry: str) -> None:
    """A manifest is data: it must not make the loader (or the vocabulary count) read files outside."""
    from data_pipeline.vocab import build

    (tiny_parquet.parent / "outside.parquet").write_bytes((tiny_parquet / "part-00000.parquet").read_bytes())
    m = json.loads((tiny_parquet / "manifest.json").read_text())
    m["files"][0]["path"] = entry
    (tiny_parquet / "manifest.json").write_text(json.dumps(m))
    expected = rf"manifest.json: files entry {re.escape(repr(entry))} .*expected a relative path inside"
    with pytest.raises(DatasetError, match=expected):
        _stream(tiny_parquet)
    with pytest.raises(DatasetError, match=expected):
        build(tiny_parquet, 1)


def test_manifest_entry_in_a_subdirectory_is_fine(tiny_parquet: Path) -> None:
    """A split data set's top manifest lists train/part-... and valid/part-...: paths inside are fine."""
    (tiny_parquet / "train").mkdir()
    (tiny_parquet / "part-00001.parquet").rename(tiny_parquet / "train" / "part-00001.parquet")
    m = json.loads((tiny_parquet / "manifest.json").read_text())
    m["files"][1]["path"] = "train/part-00001.parquet"
    (tiny_parquet / "manifest.json").write_text(json.dumps(m))
    assert _stream(tiny_parquet, shuffle=False).total_rows == 60


# ---------------------------------------------------------------------------------------------------
# Dense buckets


def test_bucketize_dense_bins() -> None:
    from data_pipeline.batching import bucketize_dense

    v = np.array([-7, -1, 0, 1, 2, 3, 4, 5, 7, 100, 2**31 - 1, 9], dtype=np.int32)
    valid = np.ones(len(v), dtype=bool)
    valid[-1] = False
    # missing 0, negative 1, 0/1/2 -> 2/3/4, v > 2 -> 4 + floor(ln(v)^2): ln3^2 = 1.2, ln5^2 = 2.6, ln7^2 = 3.8
    assert bucketize_dense(v, valid, 464).tolist() == [1, 1, 2, 3, 4, 5, 5, 6, 7, 25, 463, 0]
    assert bucketize_dense(v, None, 6).tolist() == [1, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5]  # capped
    with pytest.raises(ValueError, match="dense_buckets"):
        decode(_hand_table(), SIZES, dense_buckets=2)


def test_dense_buckets_ride_as_13_more_sparse_keys(tiny_parquet: Path) -> None:
    from data_pipeline.batching import BUCKET_KEYS

    b = table_to_batch(_hand_table(), SIZES, dense_buckets=464)
    kjt = b.sparse_features
    assert kjt.keys() == list(SPARSE_COLUMNS) + BUCKET_KEYS and kjt.stride() == 3
    # Hand table: row 0 has I_j = j - 1 (I13 = 2^31 - 1), row 1 missing (I13 = 0), row 2 -5 (I13 = 7).
    assert kjt["I1_bucket"].values().tolist() == [2, 0, 1]
    assert kjt["I4_bucket"].values().tolist() == [5, 0, 1]
    assert kjt["I13_bucket"].values().tolist() == [463, 2, 7]  # I13 is 0 (not missing) in row 1
    # The dense tensor is unchanged by the option.
    assert torch.equal(b.dense_features, table_to_batch(_hand_table(), SIZES).dense_features)
    # The stream carries them, padding rows included.
    batches = list(_stream(tiny_parquet, dense_buckets=16, shuffle=False, drop_last=False, batch_size=16))
    assert all(x.sparse_features.keys()[-1] == "I13_bucket" for x in batches)
    assert batches[-1].sparse_features.values().numel() == 39 * 16


def test_several_directories_are_one_data_set_in_order(tmp_path: Path) -> None:
    # Two "days" whose row ids continue (like ingest --days): read in order without shuffling, they are
    # the rows of day 0 then day 1; shuffled, every row of both once per epoch.
    from tests.conftest import write_tiny_parquet

    a = write_tiny_parquet(tmp_path / "day00", rows_per_file=(12, 9), row_group_size=5, seed=1)
    b = write_tiny_parquet(tmp_path / "day01", rows_per_file=(14,), row_group_size=5, seed=2)
    ids = lambda s: [r for ids in _row_ids(list(s)) for r in ids if r >= 0]  # noqa: E731 (-1: padding)
    plain_a = ids(_stream(a, shuffle=False, drop_last=False, batch_size=4))
    plain_b = ids(_stream(b, shuffle=False, drop_last=False, batch_size=4))
    both = _stream([a, b], shuffle=False, drop_last=False, batch_size=4)
    assert both.total_rows == 35 and ids(both) == plain_a + plain_b
    shuffled = _stream([a, b], batch_size=5, seed=3)
    assert sorted(ids(shuffled)) == sorted(plain_a + plain_b)
    with pytest.raises(DatasetError, match="no data directory"):
        _stream([])
    with pytest.raises(DatasetError, match="day02"):
        _stream([a, tmp_path / "day02"])
