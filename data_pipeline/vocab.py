"""Frequency threshold for categorical ids: ids seen fewer than ``min_count`` times in the training data
share one "rare" table row instead of each getting a row of its own.

An id seen once or twice in training gets an embedding trained on one or two examples: noise that the model
then applies, at full strength, to every future row carrying that id. Pooling rare ids into one row gives
them a learned "unseen/rare id" vector instead (the frequency threshold of the Criteo challenge's winning
entries, and of DLRM's Criteo preprocessing).

The set of kept ids is part of the *model*, like the table sizes and id mapping: it is computed once from
the training data (:func:`build`), saved with the run (:meth:`IdVocabulary.save`, a Parquet file, no
pickle) and reused unchanged for validation, prediction and a co-distilling peer's teacher copy.

Table rows with a vocabulary (see :func:`data_pipeline.batching.map_ids`): 0 = missing, 1 = rare,
kept ids -> ``2 + id % (size - 2)`` (or the seeded hash).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.manifest import MANIFEST, data_files
from data_pipeline.schema import SPARSE_COLUMNS

VOCAB_VERSION = 1


@dataclass(frozen=True)
class IdVocabulary:
    """Per feature (C1..C26), the sorted raw 32-bit ids seen at least ``min_count`` times."""

    min_count: int
    kept: tuple[np.ndarray, ...]  # 26 sorted uint32 arrays
    source: str = ""  # where the counts came from (for the record)
    rows_counted: int = 0

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count = {self.min_count}; expected >= 1")
        if len(self.kept) != len(SPARSE_COLUMNS):
            raise ValueError(f"{len(self.kept)} kept-id arrays; expected {len(SPARSE_COLUMNS)} (C1..C26)")

    def is_kept(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` (raw ids of feature ``feature``, 0-based) are in the vocabulary."""
        if self.kept[feature].size == 0:
            return np.zeros(len(ids), dtype=bool)
        # Arrow's hash-set lookup: ~4x faster than np.searchsorted on 100k kept ids (it is the loader's
        # largest cost with a vocabulary).
        ids = pa.array(np.asarray(ids, dtype=np.uint32))
        return pc.is_in(ids, value_set=self._value_sets[feature]).to_numpy(zero_copy_only=False)

    @functools.cached_property
    def _value_sets(self) -> tuple[pa.Array, ...]:
        return tuple(pa.array(k, type=pa.uint32()) for k in self.kept)

    def sizes(self) -> dict[str, int]:
        return {c: int(k.size) for c, k in zip(SPARSE_COLUMNS, self.kept, strict=True)}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file then rename) as Parquet: one row per kept (feature, id)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        feature = np.concatenate([np.full(k.size, f, dtype=np.int8) for f, k in enumerate(self.kept)])
        ids = np.concatenate(self.kept).astype(np.uint32)
        meta = {
            "version": VOCAB_VERSION,
            "min_count": self.min_count,
            "source": self.source,
            "rows_counted": self.rows_counted,
        }
        table = pa.table({"feature": feature, "id": ids}).replace_schema_metadata(
            {b"recsys_codistill.vocab": json.dumps(meta).encode()}
        )
        # A unique temp name: on several nodes, every launcher may write the same (identical) file at once.
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)

    @staticmethod
    def load(path: str | Path) -> IdVocabulary:
        path = Path(path)
        try:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[b"recsys_codistill.vocab"])
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a recsys-codistill id vocabulary ({e})") from e
        if meta.get("version") != VOCAB_VERSION:
            raise ValueError(f"{path}: vocabulary version {meta.get('version')!r}; expected {VOCAB_VERSION}")
        feature = table["feature"].to_numpy()
        ids = table["id"].to_numpy().astype(np.uint32)
        kept = tuple(np.sort(ids[feature == f]) for f in range(len(SPARSE_COLUMNS)))
        return IdVocabulary(
            int(meta["min_count"]), kept, str(meta.get("source", "")), int(meta.get("rows_counted", 0))
        )


def count_ids(files: Sequence[str | Path]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per feature, (distinct raw ids, their counts) over ``files`` (ingested Parquet), and the rows read.

    One column of one file at a time, merged into running per-id counts: memory follows the number of
    distinct ids, not the number of rows.
    """
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = 0
    for c in SPARSE_COLUMNS:
        total = pa.table({"id": pa.array([], pa.uint32()), "n": pa.array([], pa.int64())})
        rows = 0
        for f in files:
            col = pq.read_table(f, columns=[c])[c]
            rows += len(col)
            vc = pc.value_counts(col.drop_null().cast(pa.uint32()))
            part = pa.table({"id": vc.field("values"), "n": vc.field("counts").cast(pa.int64())})
            merged = pa.concat_tables([total, part]).group_by("id").aggregate([("n", "sum")])
            total = merged.select(["id", "n_sum"]).rename_columns(["id", "n"])
        counts[c] = (total["id"].to_numpy().astype(np.uint32), total["n"].to_numpy())
    return counts, rows


def build(data_dir: str | Path | Sequence[str | Path], min_count: int) -> IdVocabulary:
    """Count every categorical id in the ingested data set ``data_dir`` (or several, as one) and keep
    those seen ``min_count``+ times."""
    dirs = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
    files = []
    for d in dirs:
        manifest = d / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: is {d} an ingested data directory?")
        files += data_files(d)  # every entry checked: none may lead outside its directory
    counts, rows = count_ids(files)
    return from_counts(counts, min_count, source=", ".join(str(d) for d in dirs), rows_counted=rows)


def from_counts(
    counts: Mapping[str, tuple[np.ndarray, np.ndarray]],
    min_count: int,
    *,
    source: str = "",
    rows_counted: int = 0,
) -> IdVocabulary:
    kept = []
    for c in SPARSE_COLUMNS:
        values, n = counts[c]
        kept.append(np.sort(np.asarray(values, dtype=np.uint32)[np.asarray(n) >= min_count]))
    return IdVocabulary(min_count, tuple(kept), source, rows_counted)
