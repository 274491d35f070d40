"""Arrow rows -> torchrec batches: the DLRM dense transform and the categorical id -> table row mapping.

Everything is vectorised numpy on whole columns, then ``torch.from_numpy`` (no per-row Python), because the
loader must outrun the trainer on a single core.

Conventions (Criteo's, as DLRM uses them):

- dense ``[B, 13]`` float32: missing -> 0, negative -> 0, then ``log1p``.
- sparse: a :class:`KeyedJaggedTensor` with keys ``C1..C26``, one id per key and row (lengths all 1),
  values laid out key-major (all of C1's ids, then C2's, ...) as KJT expects. Row 0 of each table is
  reserved for "missing"; a present 32-bit id goes to ``1 + id % (size - 1)`` (``"mod"``) or
  ``1 + mix64(id, feature, hash_seed) % (size - 1)`` (``"hash"``).
- optional dense buckets (``dense_buckets = N > 0``): 13 more keys ``I1_bucket..I13_bucket`` after C26,
  each dense value binned into an N-row table (:func:`bucketize_dense`): missing -> 0, negative -> 1,
  0, 1, 2 -> 2, 3, 4, ``v > 2`` -> ``4 + floor(ln(v)^2)``, capped at N - 1 (N = 466 bins every int32
  apart). The dense transform above drops whether a value was missing and how it falls in fine bins; a
  learned vector per bin gives the model both (what the classic hashed logistic-regression baseline sees).
- labels ``[B]`` float32 (a null label, as in unlabelled test files, becomes 0).
- row_ids ``[B]`` int64, ``-1`` for padding rows (which have label 0 and every feature missing).

The id mapping is part of the *model*: a table row means the same id only if training and prediction use
the same ``id_mapping``, table sizes and ``hash_seed`` (never tie ``hash_seed`` to a data-order seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import (
    DENSE_COLUMNS,
    LABEL_COLUMN,
    NUM_DENSE,
    NUM_SPARSE,
    ROW_ID_COLUMN,
    SPARSE_COLUMNS,
)
from data_pipeline.vocab import IdVocabulary

IdMapping = Literal["mod", "hash"]
SPARSE_KEYS: list[str] = list(SPARSE_COLUMNS)
BUCKET_KEYS: list[str] = [f"{c}_bucket" for c in DENSE_COLUMNS]
_INT32_MAX = 2**31 - 1


@dataclass
class RowBatch(Batch):
    """A torchrec :class:`Batch` that also carries each row's ``row_id`` (-1 for padding rows).

    ``to``/``pin_memory``/``record_stream`` are overridden so the row ids survive the device copies that
    torchrec's train pipelines make (they call ``batch.to(device)``).
    """

    row_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> RowBatch:
        return RowBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            row_ids=self.row_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.row_ids.record_stream(stream)

    def pin_memory(self) -> RowBatch:
        return RowBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            row_ids=self.row_ids.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---------------------------------------------------------------------------------------------------
# Id mapping


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrap-around arithmetic). Frozen: changing it remaps every id."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feature_salt(feature: int, hash_seed: int) -> np.uint64:
    with np.errstate(over="ignore"):
        key = np.array([(hash_seed & 0xFFFFFFFF) << 32 | (feature & 0xFFFFFFFF)], dtype=np.uint64)
        return _mix64(key)[0]


def map_ids(
    ids: np.ndarray,
    valid: np.ndarray | None,
    size: int,
    feature: int,
    id_mapping: IdMapping = "mod",
    hash_seed: int = 0,
    rare: np.ndarray | None = None,
) -> np.ndarray:
    """Map raw 32-bit ids of feature ``feature`` (0-based) to rows of a ``size``-row table (int32).

    ``valid`` is the non-null mask (None = all present); missing values map to the reserved row 0.
    ``rare`` (with a frequency threshold, see :mod:`data_pipeline.vocab`) marks ids outside the vocabulary:
    they map to the reserved row 1, and kept ids to rows ``2 .. size - 1``.
    """
    reserved = 1 if rare is None else 2
    if size < reserved + 1:
        raise ValueError(
            f"table C{feature + 1} has {size} rows; it needs >= {reserved + 1} "
            f"(row 0 is reserved for missing{', row 1 for rare ids' if rare is not None else ''})"
        )
    if size - 1 > _INT32_MAX:
        raise ValueError(f"table C{feature + 1} has {size} rows; at most 2^31 are supported")
    if id_mapping == "mod":
        # uint32 arithmetic is exact here (ids < 2^32, size - 1 < 2^31) and ~2x faster than int64.
        out = (np.asarray(ids, dtype=np.uint32) % np.uint32(size - reserved)).astype(np.int32)
    elif id_mapping == "hash":
        h = _mix64(np.asarray(ids, dtype=np.uint64) ^ _feature_salt(feature, hash_seed))
        out = (h % np.uint64(size - reserved)).astype(np.int32)
    else:
        raise ValueError(f"id_mapping must be 'mod' or 'hash', got {id_mapping!r}")
    out += reserved
    if rare is not None:
        out[rare] = 1
    if valid is not None:
        out[~valid] = 0
    return out


def sparse_keys(dense_buckets: int = 0) -> list[str]:
    """The KJT keys a batch carries: ``C1..C26``, then ``I1_bucket..I13_bucket`` when dense buckets are on."""
    return SPARSE_KEYS + BUCKET_KEYS if dense_buckets else list(SPARSE_KEYS)


def bucketize_dense(values: np.ndarray, valid: np.ndarray | None, num_buckets: int) -> np.ndarray:
    """Bin raw integer dense values into rows of a ``num_buckets``-row table (int32).

    missing -> 0, negative -> 1, ``0, 1, 2`` -> ``2, 3, 4``, ``v > 2`` -> ``4 + floor(ln(v)^2)`` capped at
    ``num_buckets - 1`` (``ln(2^31)^2 < 462``: 466 rows give every int32 its bin, 464 every value below
    2e9). This is the binning of the Criteo challenge's winning entry: small counts keep their own bins,
    large ones merge on a squared-log scale.
    """
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        large = 4.0 + np.floor(np.square(np.log(v)))
    bins = np.where(v > 2, large, v + 2.0)
    out = np.minimum(bins, num_buckets - 1).astype(np.int32)
    out[v < 0] = 1
    if valid is not None:
        out[~valid] = 0
    return out


def check_dense_buckets(dense_buckets: int) -> None:
    if dense_buckets != 0 and not 3 <= int(dense_buckets) <= _INT32_MAX:
        raise ValueError(
            f"dense_buckets = {dense_buckets}; expected 0 (off) or >= 3 (missing, negative and >= 1 bin of v >= 0)"
        )


# ---------------------------------------------------------------------------------------------------
# Decoded rows: compact numpy arrays a loader can gather batches from


def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _filled(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """(values with nulls as 0, validity mask or None when nothing is null)."""
    if arr.null_count == 0:
        return arr.to_numpy(zero_copy_only=False), None
    values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    return values, arr.is_valid().to_numpy(zero_copy_only=False)


@dataclass
class DecodedRows:
    """Rows already transformed for the model, stored row-major so a batch is one gather per array."""

    row_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13], transformed
    sparse: np.ndarray  # int32 [n, 26] (or [n, 39] with dense buckets), table rows

    def __len__(self) -> int:
        return len(self.row_ids)

    @staticmethod
    def empty(n: int, dense_buckets: int = 0) -> DecodedRows:
        """``n`` padding rows: row_id -1, label 0, dense 0 (= missing), every id missing (row 0)."""
        return DecodedRows(
            row_ids=np.full(n, -1, dtype=np.int64),
            labels=np.zeros(n, dtype=np.float32),
            dense=np.zeros((n, NUM_DENSE), dtype=np.float32),
            sparse=np.zeros((n, len(sparse_keys(dense_buckets))), dtype=np.int32),
        )

    def take(self, idx: np.ndarray | slice) -> DecodedRows:
        return DecodedRows(self.row_ids[idx], self.labels[idx], self.dense[idx], self.sparse[idx])

    @staticmethod
    def concat(parts: Sequence[DecodedRows]) -> DecodedRows:
        if len(parts) == 1:
            return parts[0]
        return DecodedRows(
            np.concatenate([p.row_ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.sparse for p in parts]),
        )

    def to_batch(self) -> RowBatch:
        """A :class:`RowBatch` of these rows (copies into fresh, contiguous tensors)."""
        n = len(self)
        # Key-major values: transpose [n, F] -> [F, n], flatten; int64 is what the embedding kernels take.
        values = torch.from_numpy(np.ascontiguousarray(self.sparse.T, dtype=np.int64).reshape(-1))
        num_keys = self.sparse.shape[1]
        kjt = KeyedJaggedTensor(
            keys=SPARSE_KEYS if num_keys == NUM_SPARSE else SPARSE_KEYS + BUCKET_KEYS,
            values=values,
            lengths=torch.ones(num_keys * n, dtype=torch.int32),
            stride=n,
        )
        return RowBatch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
            row_ids=torch.from_numpy(np.ascontiguousarray(self.row_ids)),
        )


def decode_into(
    table: pa.Table | pa.RecordBatch,
    out: DecodedRows,
    offset: int,
    table_sizes: Sequence[int],
    id_mapping: IdMapping = "mod",
    hash_seed: int = 0,
    dense_buckets: int = 0,
    vocab: IdVocabulary | None = None,
) -> None:
    """Transform ``table`` (ingested Parquet schema) into ``out`` rows ``[offset, offset + len(table))``.

    ``out`` must have been made with the same ``dense_buckets`` (its sparse width is 26 or 39)."""
    n = table.num_rows
    sl = slice(offset, offset + n)
    out.row_ids[sl] = _column(table, ROW_ID_COLUMN).to_numpy(zero_copy_only=False)
    labels, _ = _filled(_column(table, LABEL_COLUMN))
    out.labels[sl] = labels
    dense = out.dense[sl]
    sparse = out.sparse[sl]
    for j, name in enumerate(DENSE_COLUMNS):
        # Missing -> 0 is fill_null(0); negatives -> 0 is the max; both before log1p (DLRM convention).
        values, valid = _filled(_column(table, name))
        dense[:, j] = np.maximum(values, 0)
        if dense_buckets:
            sparse[:, NUM_SPARSE + j] = bucketize_dense(values, valid, dense_buckets)
    np.log1p(dense, out=dense)
    for f, name in enumerate(SPARSE_COLUMNS):
        values, valid = _filled(_column(table, name))
        rare = None if vocab is None else ~vocab.is_kept(f, values)
        sparse[:, f] = map_ids(values, valid, table_sizes[f], f, id_mapping, hash_seed, rare)


def decode(
    table: pa.Table | pa.RecordBatch,
    table_sizes: Sequence[int],
    id_mapping: IdMapping = "mod",
    hash_seed: int = 0,
    dense_buckets: int = 0,
    vocab: IdVocabulary | None = None,
) -> DecodedRows:
    """Transform a whole Arrow table/record batch (ingested Parquet schema) into :class:`DecodedRows`."""
    check_table_sizes(table_sizes, vocab)
    check_dense_buckets(dense_buckets)
    out = DecodedRows.empty(table.num_rows, dense_buckets)
    decode_into(table, out, 0, table_sizes, id_mapping, hash_seed, dense_buckets, vocab)
    return out


def table_to_batch(
    table: pa.Table | pa.RecordBatch,
    table_sizes: Sequence[int],
    id_mapping: IdMapping = "mod",
    hash_seed: int = 0,
    dense_buckets: int = 0,
    vocab: IdVocabulary | None = None,
) -> RowBatch:
    """One :class:`RowBatch` holding every row of ``table`` (e.g. a slice of a record batch)."""
    return decode(table, table_sizes, id_mapping, hash_seed, dense_buckets, vocab).to_batch()


def check_table_sizes(table_sizes: Sequence[int], vocab: IdVocabulary | None = None) -> None:
    if len(table_sizes) != NUM_SPARSE:
        raise ValueError(f"table_sizes has {len(table_sizes)} entries; expected {NUM_SPARSE} (C1..C26)")
    low, why = (2, "row 0 = missing") if vocab is None else (3, "row 0 = missing, row 1 = rare ids")
    for f, s in enumerate(table_sizes):
        if not low <= int(s) <= _INT32_MAX:
            raise ValueError(f"table_sizes[{f}] (C{f + 1}) = {s}; expected {low} .. 2^31-1 ({why})")
