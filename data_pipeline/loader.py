"""A streaming, exactly resumable reader of ingested Parquet: :class:`CriteoStream`.

Data layout: ``data_dir/manifest.json`` lists the Parquet files (``{"files": [{"path", "rows"}, ...]}``;
only those keys are read) in dataset order. Each worker ``(group, rank)`` gets its row groups from
:mod:`data_pipeline.sharding`.

The stream of one worker, epoch by epoch:

1. The worker's row groups in a permutation seeded by ``(seed, epoch, group, rank)`` (dataset order when
   ``shuffle=False``), cut into *windows* of ``shuffle_window`` row groups.
2. Each window is read whole, decoded once into compact numpy arrays (:class:`DecodedRows`), and its rows
   are visited in a permutation seeded by ``(seed, epoch, group, rank, window)``.
3. An epoch contributes ``epoch_rows`` rows; batches of ``batch_size`` rows are cut from the concatenated
   epochs, so a partial batch at the end of an epoch continues with the next epoch's rows.

Equal step counts: every worker that shares this data (all ``num_groups x world_size`` of them) yields the
same number of batches, because torchrec's collectives hang if one rank runs out early and lockstep
codistillation would wait for a peer that has finished:

- ``drop_last=True`` (training): each epoch is cut to ``m`` = the smallest worker's row count (the
  dropped rows are the tail of that epoch's shuffled stream, so different rows each epoch when
  shuffling), and the final partial batch is dropped.
- ``drop_last=False`` (prediction): every real row appears exactly once per epoch; the end is padded with
  padding rows (row_id -1, label 0, all features missing) up to the largest worker's batch count.

Exact resume: the state is just the number of batches yielded (plus derived position fields and a
fingerprint of everything that defines the stream). Because every permutation is a pure function of the
seeds, a fresh stream that loads the state recomputes the position and yields exactly the remaining
batches of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset

from data_pipeline.batching import (
    DecodedRows,
    IdMapping,
    RowBatch,
    check_dense_buckets,
    check_table_sizes,
    decode_into,
)
from data_pipeline.manifest import DatasetError, read_manifest
from data_pipeline.schema import parquet_schema
from data_pipeline.sharding import RowGroup, assign_row_groups, cap_rows, rows_per_worker
from data_pipeline.vocab import IdVocabulary

STATE_VERSION = 1
# Tags that keep the RNG streams of different purposes apart.
_RNG_ORDER = 0x0DE7
_RNG_WINDOW = 0x5A1D


def describe_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``"key: saved -> now; ..."`` for every key of ``now`` whose value differs from ``saved`` ("" if none):
    the one formatter of "this was saved under other settings" errors."""
    return "; ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v)


def _open_checked(path: Path, manifest_path: Path, expected_rows: int) -> pq.ParquetFile:
    """Open a Parquet file and check it against the schema contract and the manifest's row count."""
    if not path.is_file():
        raise DatasetError(f"{path}: Parquet file listed in {manifest_path} is missing")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: unreadable Parquet file ({e})") from e
    schema = pf.schema_arrow
    for field in parquet_schema():
        if field.name not in schema.names:
            raise DatasetError(f"{path}: column {field.name!r} is missing (expected {field.type})")
        found = schema.field(field.name).type
        if found != field.type:
            raise DatasetError(f"{path}: column {field.name!r} has type {found}; expected {field.type}")
    if pf.metadata.num_rows != expected_rows:
        raise DatasetError(
            f"{path}: has {pf.metadata.num_rows} rows but {manifest_path} says {expected_rows}"
        )
    return pf


class CriteoStream(IterableDataset):
    """Fixed-size :class:`RowBatch` es from ingested Parquet for one worker ``(group, rank)``.

    Args:
        data_dir: directory with ``manifest.json`` and the Parquet files it lists, or several such
            directories, read in order as one data set (a window of days).
        batch_size: rows per batch *per rank*.
        table_sizes: 26 embedding table sizes (C1..C26); row 0 of each is reserved for missing ids.
        group, num_groups: this worker's co-distilling group and the number of groups.
        rank, world_size: this worker's rank in its group's world, and that world's size.
        shared: every group reads all data (True) or groups get disjoint parts (False).
        shuffle: shuffle row groups and rows within windows (False: dataset order).
        shuffle_window: row groups read and shuffled together (memory ~170 bytes x rows in a window).
        seed: data-order seed; the same seed reproduces every batch exactly.
        epochs: passes over this worker's data.
        id_mapping, hash_seed: how raw ids become table rows (see :mod:`data_pipeline.batching`);
            ``hash_seed`` is a model property, independent of ``seed``.
        dense_buckets: 0, or the row count of 13 extra tables ``I1_bucket..I13_bucket`` that every batch
            then carries as sparse features (see :func:`data_pipeline.batching.bucketize_dense`).
        vocab: frequency threshold (:mod:`data_pipeline.vocab`): ids outside it go to row 1 of their table.
        drop_last: True for training (equal truncated epochs); False for prediction (pad, lose nothing).
        max_rows: use only the first ``max_rows`` rows of the dataset (0 = all), before sharding.
        use_threads: let pyarrow decode columns on several threads (off by default so the loader does not
            compete with the trainer's threads).

    Iteration resumes from the current position (see :meth:`state_dict`); a stream that ran to its end
    starts a new pass on the next ``iter()`` unless a state was just loaded. Keep one live iterator at a
    time. With a ``DataLoader``, use ``num_workers`` 0 (or 1, and then save :meth:`state_at` of the batches
    you consumed: the worker's copy of the stream advances, not yours); more workers would duplicate data.
    """

    def __init__(
        self,
        data_dir: str | Path | Sequence[str | Path],
        *,
        batch_size: int,
        table_sizes: Sequence[int],
        group: int = 0,
        num_groups: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shared: bool = False,
        shuffle: bool = True,
        shuffle_window: int = 4,
        seed: int = 0,
        epochs: int = 1,
        id_mapping: IdMapping = "mod",
        drop_last: bool = True,
        max_rows: int = 0,
        hash_seed: int = 0,
        use_threads: bool = False,
        dense_buckets: int = 0,
        vocab: IdVocabulary | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_window < 1 or epochs < 1:
            raise ValueError("shuffle_window and epochs must be >= 1")
        if id_mapping not in ("mod", "hash"):
            raise ValueError(f"id_mapping must be 'mod' or 'hash', got {id_mapping!r}")
        check_table_sizes(table_sizes, vocab)
        check_dense_buckets(dense_buckets)
        dirs = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
        if not dirs:
            raise DatasetError("no data directory given")
        self.where = ", ".join(str(d) for d in dirs)  # for messages
        self.batch_size = int(batch_size)
        self.table_sizes = tuple(int(s) for s in table_sizes)
        self.group, self.num_groups = int(group), int(num_groups)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shared = bool(shared)
        self.shuffle = bool(shuffle)
        self.shuffle_window = int(shuffle_window)
        self.seed = int(seed)
        self.epochs = int(epochs)
        self.id_mapping: IdMapping = id_mapping
        self.drop_last = bool(drop_last)
        self.max_rows = int(max_rows)
        self.hash_seed = int(hash_seed)
        self.use_threads = bool(use_threads)
        self.dense_buckets = int(dense_buckets)
        self.vocab = vocab

        # several directories are one data set: their files in the given order (a window of days)
        listed = [(d, *read_manifest(d)) for d in dirs]
        entries = [(d / f["path"], manifest_path, f) for d, manifest_path, files in listed for f in files]
        self._paths = [path for path, _, _ in entries]
        row_groups: list[RowGroup] = []
        offset = 0
        for i, (path, manifest_path, entry) in enumerate(entries):
            meta = _open_checked(path, manifest_path, entry["rows"]).metadata
            for k in range(meta.num_row_groups):
                n = meta.row_group(k).num_rows
                row_groups.append(RowGroup(file=i, index=k, num_rows=n, first_row=offset))
                offset += n
        self.total_rows = offset
        self._all_row_groups = cap_rows(row_groups, self.max_rows)
        self._row_groups = assign_row_groups(
            self._all_row_groups, self.group, self.num_groups, self.rank, self.world_size, self.shared
        )
        counts = [n for per_group in rows_per_worker(
            self._all_row_groups, self.num_groups, self.world_size, self.shared) for n in per_group]  # fmt: skip
        self.worker_rows = sum(rg.num_rows for rg in self._row_groups)
        B = self.batch_size
        if self.drop_last:
            self.epoch_rows = min(counts)
            self._num_batches = self.epochs * self.epoch_rows // B
            self.rows_dropped_per_epoch = self.worker_rows - self.epoch_rows
            self.rows_dropped_at_end = self.epochs * self.epoch_rows - self._num_batches * B
            if self._num_batches == 0:
                raise DatasetError(
                    f"{self.where}: worker (group {group}, rank {rank}) would get no full batch: the "
                    f"smallest of {len(counts)} workers has {self.epoch_rows} rows per epoch "
                    f"({len(self._all_row_groups)} row groups) for batch_size {B} x {epochs} epochs"
                )
        else:
            self.epoch_rows = self.worker_rows
            self._num_batches = max(-(-self.epochs * n // B) for n in counts)
            self.rows_dropped_per_epoch = 0
            self.rows_dropped_at_end = 0
        self._files: dict[int, pq.ParquetFile] = {}
        self._batches_yielded = 0
        self._state_loaded = False

    # ------------------------------------------------------------------------------------------------
    # Sizes

    def num_batches(self) -> int:
        """Batches over all epochs; the same for every worker of this data (see the module docstring)."""
        return self._num_batches

    def __len__(self) -> int:
        return self._num_batches

    @property
    def row_groups(self) -> list[RowGroup]:
        """This worker's row groups, in dataset order."""
        return list(self._row_groups)

    # ------------------------------------------------------------------------------------------------
    # Deterministic order

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.group, self.rank, *tags])

    def _windows(self, epoch: int) -> list[list[RowGroup]]:
        rgs = self._row_groups
        if self.shuffle:
            order = self._rng(_RNG_ORDER, epoch).permutation(len(rgs))
            rgs = [rgs[i] for i in order]
        W = self.shuffle_window
        return [rgs[i : i + W] for i in range(0, len(rgs), W)]

    def _window_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        if self.shuffle:
            return self._rng(_RNG_WINDOW, epoch, window).permutation(n)
        return np.arange(n)

    def _position(self, batches: int) -> dict[str, int]:
        """Where batch number ``batches`` starts: epoch, window, rows into the window and into the epoch."""
        pos = batches * self.batch_size
        real = self.epochs * self.epoch_rows
        if pos >= real or self.epoch_rows == 0:
            return {"epoch": self.epochs, "window": 0, "rows_into_window": 0, "rows_into_epoch": pos - real}
        epoch, off = divmod(pos, self.epoch_rows)
        start = 0
        for w, rgs in enumerate(self._windows(epoch)):
            n = sum(rg.num_rows for rg in rgs)
            if off < start + n:
                return {"epoch": epoch, "window": w, "rows_into_window": off - start, "rows_into_epoch": off}
            start += n
        raise AssertionError("position beyond the epoch's windows")  # pragma: no cover

    # ------------------------------------------------------------------------------------------------
    # Reading

    def _file(self, i: int) -> pq.ParquetFile:
        pf = self._files.get(i)
        if pf is None:
            try:
                pf = pq.ParquetFile(self._paths[i])
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{self._paths[i]}: unreadable Parquet file ({e})") from e
            self._files[i] = pf
        return pf

    def _read_window(self, rgs: Sequence[RowGroup]) -> DecodedRows:
        out = DecodedRows.empty(sum(rg.num_rows for rg in rgs), self.dense_buckets)
        offset = 0
        for rg in rgs:
            try:
                table = self._file(rg.file).read_row_group(rg.index, use_threads=self.use_threads)
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{self._paths[rg.file]}: cannot read row group {rg.index} ({e})") from e
            if table.num_rows != rg.num_rows:
                table = table.slice(0, rg.num_rows)  # a max_rows cap uses a prefix of the group
            decode_into(
                table,
                out,
                offset,
                self.table_sizes,
                self.id_mapping,
                self.hash_seed,
                self.dense_buckets,
                self.vocab,
            )
            offset += rg.num_rows
        return out

    def _pieces(self, start_row: int) -> Iterator[tuple[DecodedRows, np.ndarray | slice]]:
        """(rows, index) pieces of this worker's stream from row ``start_row`` on: real rows, then padding."""
        real = self.epochs * self.epoch_rows
        if start_row < real:
            epoch0, off = divmod(start_row, self.epoch_rows)
            for epoch in range(epoch0, self.epochs):
                start = 0
                for w, rgs in enumerate(self._windows(epoch)):
                    n = sum(rg.num_rows for rg in rgs)
                    usable = min(n, self.epoch_rows - start)  # drop_last cuts each epoch to epoch_rows
                    if usable <= 0:
                        break
                    if start + usable > off:  # skip windows wholly before the resume point unread
                        order = self._window_order(epoch, w, n)[:usable]
                        yield self._read_window(rgs), order[max(off - start, 0) :]
                    start += n
                off = 0
        if not self.drop_last:
            pad = self._num_batches * self.batch_size - max(start_row, real)
            if pad > 0:
                yield DecodedRows.empty(pad, self.dense_buckets), slice(0, pad)

    def _batches(self, first_batch: int) -> Iterator[RowBatch]:
        B = self.batch_size
        k = first_batch
        if k >= self._num_batches:
            return
        parts: list[DecodedRows] = []
        have = 0
        for rows, index in self._pieces(k * B):
            n = len(range(len(rows))[index]) if isinstance(index, slice) else len(index)
            i = 0
            while i < n:
                take = min(B - have, n - i)
                sub = index[i : i + take] if isinstance(index, np.ndarray) else _subslice(index, i, take)
                parts.append(rows.take(sub))
                have += take
                i += take
                if have == B:
                    yield DecodedRows.concat(parts).to_batch()
                    parts, have = [], 0
                    k += 1
                    if k == self._num_batches:
                        return

    def __iter__(self) -> Iterator[RowBatch]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "CriteoStream already shards by (group, rank); a DataLoader with num_workers > 1 would "
                "yield every batch several times. Use num_workers=0 or 1."
            )
        if self._batches_yielded >= self._num_batches and not self._state_loaded:
            self._batches_yielded = 0  # a finished stream starts a new pass (e.g. a repeated eval loop)
        self._state_loaded = False
        for batch in self._batches(self._batches_yielded):
            # Count before handing the batch out: the state then covers every batch the caller holds.
            self._batches_yielded += 1
            yield batch

    # ------------------------------------------------------------------------------------------------
    # Resume

    def _fingerprint(self) -> dict[str, int]:
        """Everything that defines the stream, as ints (JSON-safe); a resumed stream must match it."""
        return {
            "batch_size": self.batch_size,
            "group": self.group,
            "num_groups": self.num_groups,
            "rank": self.rank,
            "world_size": self.world_size,
            "shared": int(self.shared),
            "shuffle": int(self.shuffle),
            "shuffle_window": self.shuffle_window,
            "seed": self.seed,
            "epochs": self.epochs,
            "drop_last": int(self.drop_last),
            "max_rows": self.max_rows,
            "total_rows": self.total_rows,
            "num_row_groups": len(self._all_row_groups),
            "num_batches": self._num_batches,
        }

    def state_at(self, batches_yielded: int) -> dict[str, Any]:
        """The state after ``batches_yielded`` batches (for pipelines that prefetch ahead of training)."""
        if not 0 <= batches_yielded <= self._num_batches:
            raise ValueError(f"batches_yielded {batches_yielded} not in [0, {self._num_batches}]")
        return {
            "version": STATE_VERSION,
            "batches_yielded": int(batches_yielded),
            **self._position(batches_yielded),
            "fingerprint": self._fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-int state (JSON-serialisable) after the batches yielded so far."""
        return self.state_at(self._batches_yielded)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``iter()`` yields exactly the batches an uninterrupted stream would yield next."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported CriteoStream state version {state.get('version')!r}")
        changes = describe_changes(dict(state.get("fingerprint", {})), self._fingerprint())
        if changes:
            raise ValueError(f"CriteoStream state was saved for a different stream; (saved, now): {changes}")
        k = int(state["batches_yielded"])
        if not 0 <= k <= self._num_batches:
            raise ValueError(f"batches_yielded {k} not in [0, {self._num_batches}]")
        self._batches_yielded = k
        self._state_loaded = True

    def __getstate__(self) -> dict[str, Any]:
        # Open ParquetFile handles do not pickle (DataLoader with a worker process); reopen lazily.
        d = self.__dict__.copy()
        d["_files"] = {}
        return d


def _subslice(s: slice, i: int, n: int) -> slice:
    start = (s.start or 0) + i
    return slice(start, start + n)
