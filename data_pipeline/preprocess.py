"""Ingest Criteo-format click logs into Parquet shards with a manifest and a rejects log.

``ingest(inputs, out_dir)`` writes::

    out_dir/part-00000.parquet ...   rows_per_file rows each (the last may be short), row groups of
                                     row_group_size rows, schema data_pipeline.schema.parquet_schema(), snappy
    out_dir/manifest.json            sources (sha256, rows in/ok/rejected), files (rows, sha256), null counts,
                                     positives, split info; no timestamps, so a re-run is byte-identical
    out_dir/rejects.jsonl            one JSON object per rejected line: source, line, reason, kind, raw

With ``valid_fraction > 0`` the part files go to ``out_dir/train/`` and ``out_dir/valid/`` instead, each
with its own manifest.json; the top-level manifest.json and rejects.jsonl stay at the top.

The pipeline streams in three overlapping stages so memory stays bounded by a few chunks whatever the
input size: a reader thread (read, decompress, hash, Arrow parse), the calling thread (validate and convert,
see data_pipeline.sources), and a writer thread (Parquet encoding and compression). Everything is written
to a hidden temporary directory next to ``out_dir`` and renamed into place at the end, so a failed or
killed ingest leaves no partial ``out_dir``.

Choices worth knowing:

- Blank lines are rejected (reason "blank line") rather than skipped, so every physical line is accounted
  for: per source, rows_in == rows_ok + rows_rejected, checked and written to the manifest.
- An empty input file (or one that decompresses to nothing, or a CSV with only its header) is an
  IngestError rather than an empty dataset: it is almost always a failed download or a wrong path. So is an
  ingest in which no line at all is accepted.
- The time split puts the last ``round(valid_fraction * rows)`` accepted rows (by row_id = file order =
  time) into valid. It needs the total first, so every row is written under train/ and, at the end, the
  one part file that straddles the cut and the ones after it are re-read and re-written into train/ and
  valid/: a rewrite of about valid_fraction of the data, with memory still bounded by a row group.
- The hash split decides per row with :func:`hash_split_is_valid` (splitmix64 of row_id and seed), so
  other code can recompute membership from row_id alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import shutil
import threading
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data_pipeline.schema import (
    DENSE_COLUMNS,
    LABEL_COLUMN,
    ROW_ID_COLUMN,
    SCHEMA_VERSION,
    SPARSE_COLUMNS,
    parquet_schema,
)
from data_pipeline.sources import (
    DEFAULT_CHUNK_BYTES,
    IngestError,
    SourceFormat,
    SourceReader,
    convert_chunk,
    detect_format,
)

__all__ = ["IngestError", "export_tsv", "hash_split_is_valid", "ingest"]

# snappy, with dictionary encoding for the label and dense columns only: the ids are mostly distinct within
# a row group, so a dictionary costs them hashing time for little gain. Measured per 1M Criteo rows (real
# toy_train and synthetic alike): this 0.7 CPU-s and ~80 MB; zstd with dictionaries everywhere 1.3 CPU-s and
# ~60 MB. Parquet encoding is single-threaded in pyarrow and the slowest stage of the ingest, so we take
# the speed; both codecs decode fast.
COMPRESSION = "snappy"
DICTIONARY_COLUMNS = [LABEL_COLUMN, *DENSE_COLUMNS]
# Min/max/null-count statistics only where a reader can use them (row_id ranges for lookups and splits);
# the per-column null counts are in the manifest. Saves ~10% of the encoding time.
STATISTICS_COLUMNS = [ROW_ID_COLUMN, LABEL_COLUMN]
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
PART_PATTERN = "part-{:05d}.parquet"
SPLIT_DIRS = ("train", "valid")

# How many parsed chunks may wait for conversion, and converted chunks for the writer (bounds memory).
_QUEUE_DEPTH = 2

_SCHEMA = parquet_schema()
_STAT_COLUMNS = (LABEL_COLUMN, *DENSE_COLUMNS, *SPARSE_COLUMNS)

T = TypeVar("T")


def _created_by() -> str:
    """Names our version and pyarrow's, since both decide the bytes of the output."""
    try:
        from importlib.metadata import version

        ours = version("recsys-codistill")
    except Exception:  # not installed (e.g. run from a source checkout without `pip install -e .`)
        ours = "unknown"
    return f"recsys-codistill {ours} data_pipeline.preprocess; pyarrow {pa.__version__}"


# --------------------------------------------------------------------------------------------------------
# Hash split
# --------------------------------------------------------------------------------------------------------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def hash_split_is_valid(row_ids: np.ndarray, valid_fraction: float, seed: int) -> np.ndarray:
    """True for the rows of the hash split's valid part: a seeded splitmix64 of row_id, compared with
    valid_fraction on its top 53 bits. Depends only on (row_id, seed, valid_fraction)."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    h = _splitmix64(np.asarray(row_ids, dtype=np.int64).view(np.uint64) ^ key)
    threshold = _U64(int(valid_fraction * 2**53))
    return (h >> _U64(11)) < threshold


# --------------------------------------------------------------------------------------------------------
# Writing Parquet shards
# --------------------------------------------------------------------------------------------------------


@dataclass
class _FileStats:
    path: Path
    rows: int = 0
    positives: int = 0
    first_row_id: int | None = None
    last_row_id: int | None = None
    null_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STAT_COLUMNS, 0))
    sha256: str = ""
    bytes: int = 0

    def add(self, table: pa.Table) -> None:
        row_ids = table.column(ROW_ID_COLUMN)
        if self.first_row_id is None:
            self.first_row_id = row_ids[0].as_py()
        self.last_row_id = row_ids[-1].as_py()
        self.rows += table.num_rows
        self.positives += pc.sum(table.column(LABEL_COLUMN)).as_py() or 0
        for name in _STAT_COLUMNS:
            self.null_counts[name] += table.column(name).null_count

    def describe(self, root: Path) -> dict[str, Any]:
        return {
            "path": self.path.relative_to(root).as_posix(),
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_row_id": self.first_row_id,
            "last_row_id": self.last_row_id,
            "positives": self.positives,
        }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """Writes tables into ``directory/part-NNNNN.parquet`` files of exactly rows_per_file rows (the last
    may be short), in row groups of exactly row_group_size rows (the last of a file may be short), whatever
    the sizes of the tables it is given. Only one file is open at a time."""

    def __init__(self, directory: Path, rows_per_file: int, row_group_size: int, first_index: int = 0) -> None:
        self.directory = directory
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.files: list[_FileStats] = []
        self._next_index = first_index
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._current: _FileStats | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._flush(final=False)

    def close(self) -> list[_FileStats]:
        self._flush(final=True)
        self._close_file()
        return self.files

    def _group_target(self) -> int:
        in_file = self._current.rows if self._current is not None else 0
        return min(self.row_group_size, self.rows_per_file - in_file)

    def _flush(self, final: bool) -> None:
        if self._pending_rows < self._group_target() and not (final and self._pending_rows):
            return
        buffered = pa.concat_tables(self._pending)
        offset = 0
        while True:
            target = self._group_target()
            remaining = buffered.num_rows - offset
            if remaining < target and not (final and remaining):
                break
            group = buffered.slice(offset, min(target, remaining))
            self._write_group(group)
            offset += group.num_rows
        rest = buffered.slice(offset)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _write_group(self, group: pa.Table) -> None:
        if self._writer is None:
            path = self.directory / PART_PATTERN.format(self._next_index)
            self._next_index += 1
            self._current = _FileStats(path)
            self._writer = pq.ParquetWriter(
                path,
                _SCHEMA,
                compression=COMPRESSION,
                use_dictionary=DICTIONARY_COLUMNS,
                write_statistics=STATISTICS_COLUMNS,
            )
        assert self._current is not None
        self._writer.write_table(group, row_group_size=group.num_rows)
        self._current.add(group)
        if self._current.rows >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is None or self._current is None:
            return
        self._writer.close()
        self._current.sha256 = _sha256_file(self._current.path)
        self._current.bytes = self._current.path.stat().st_size
        self.files.append(self._current)
        self._writer = None
        self._current = None


class _WriteBehind:
    """Runs calls on one background thread, in submission order, with at most `depth` waiting; the first
    error is re-raised in the caller at its next submit() or at drain()."""

    def __init__(self, depth: int = _QUEUE_DEPTH) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-writer")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_END = object()


@dataclass
class _Failure:
    """An exception raised on the producer thread, carried to the consumer."""

    error: BaseException


def _prefetch(make_iterator: Callable[[], Iterator[T]], depth: int = _QUEUE_DEPTH) -> Iterator[T]:
    """Runs an iterator on a background thread, `depth` items ahead; errors surface in the consumer.
    Stopping early (an error downstream) stops the producer and closes its iterator."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = make_iterator()
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="ingest-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------------------------------------
# Routing rows to splits
# --------------------------------------------------------------------------------------------------------


class _Sink:
    """Where converted rows go: one writer, or train/valid writers (hash split: decided per row; time
    split: everything goes to train first and is re-split by _finish_time_split)."""

    def __init__(
        self, root: Path, valid_fraction: float, split: str, seed: int, rows_per_file: int, row_group_size: int
    ) -> None:
        self.root = root
        self.valid_fraction = valid_fraction
        self.split = split if valid_fraction > 0 else None
        self.seed = seed
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        if self.split is None:
            self.writers = {"": _ShardWriter(root, rows_per_file, row_group_size)}
        else:
            self.writers = {name: _ShardWriter(root / name, rows_per_file, row_group_size) for name in SPLIT_DIRS}

    def write(self, table: pa.Table) -> None:
        """Runs on the writer thread."""
        if self.split == "hash":
            row_ids = table.column(ROW_ID_COLUMN).to_numpy()
            is_valid = hash_split_is_valid(row_ids, self.valid_fraction, self.seed)
            self.writers["train"].write(table.filter(pa.array(~is_valid)))
            self.writers["valid"].write(table.filter(pa.array(is_valid)))
        elif self.split == "time":
            self.writers["train"].write(table)
        else:
            self.writers[""].write(table)

    def close(self, total_rows: int) -> dict[str, list[_FileStats]]:
        files = {name: writer.close() for name, writer in self.writers.items()}
        if self.split == "time":
            files = self._finish_time_split(files["train"], total_rows)
        return files

    def _finish_time_split(self, written: list[_FileStats], total_rows: int) -> dict[str, list[_FileStats]]:
        n_train = total_rows - round(self.valid_fraction * total_rows)
        keep = [f for f in written if f.last_row_id is not None and f.last_row_id < n_train]
        redo = written[len(keep) :]
        # Move the files to re-split out of the way: the train writer re-creates the first one's name.
        scratch = self.root / "_resplit"
        scratch.mkdir()
        moved = []
        for f in redo:
            target = scratch / f.path.name
            os.replace(f.path, target)
            moved.append(target)
        train = _ShardWriter(self.root / "train", self.rows_per_file, self.row_group_size, first_index=len(keep))
        valid = _ShardWriter(self.root / "valid", self.rows_per_file, self.row_group_size)
        for path in moved:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.row_group_size):
                table = pa.Table.from_batches([batch]).cast(_SCHEMA)
                in_valid = pc.greater_equal(table.column(ROW_ID_COLUMN), n_train)
                train.write(table.filter(pc.invert(in_valid)))
                valid.write(table.filter(in_valid))
            path.unlink()
        scratch.rmdir()
        return {"train": keep + train.close(), "valid": valid.close()}


# --------------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------------


def _schema_description() -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in _SCHEMA]


def _summary(files: list[_FileStats], labelled: bool) -> dict[str, Any]:
    rows = sum(f.rows for f in files)
    positives = sum(f.positives for f in files) if labelled else None
    nulls = {name: sum(f.null_counts[name] for f in files) for name in _STAT_COLUMNS}
    return {
        "rows": rows,
        "positives": positives,
        "positive_rate": (positives / rows if rows else None) if labelled else None,
        "null_counts": nulls,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@dataclass
class _SourceCount:
    fmt: SourceFormat
    sha256: str = ""
    rows_in: int = 0
    rows_ok: int = 0
    rows_rejected: int = 0
    first_row_id: int = 0
    rejects_by_kind: Counter[str] = field(default_factory=Counter)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.fmt.name,
            "bytes": self.fmt.size,
            "sha256": self.sha256,
            "format": self.fmt.describe(),
            "rows_in": self.rows_in,
            "rows_ok": self.rows_ok,
            "rows_rejected": self.rows_rejected,
            "first_row_id": self.first_row_id,
            "rejects_by_kind": dict(sorted(self.rejects_by_kind.items())),
        }


# --------------------------------------------------------------------------------------------------------
# ingest
# --------------------------------------------------------------------------------------------------------


def ingest(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.0,
    split: Literal["time", "hash"] = "time",
    seed: int = 0,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Ingest Criteo TSV/CSV inputs (plain or gzip, concatenated in the given order) into Parquet shards
    under ``out_dir``; returns the manifest (also written to ``out_dir/manifest.json``).

    Raises IngestError for unusable input (missing, unreadable, empty, truncated gzip, labelled and
    unlabelled inputs mixed, nothing accepted) or an existing ``out_dir`` without ``overwrite``; on any
    error no ``out_dir`` is created or changed. Bad lines do not raise: they go to rejects.jsonl.
    """
    if isinstance(inputs, (str, Path)):  # a lone path is a Sequence of characters; take it as one input
        inputs = [inputs]
    if not inputs:
        raise IngestError("no input files given")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if split not in ("time", "hash"):
        raise ValueError(f"split must be 'time' or 'hash', got {split!r}")
    if rows_per_file < 1 or row_group_size < 1:
        raise ValueError("rows_per_file and row_group_size must be positive")

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    formats = [detect_format(p) for p in inputs]  # all inputs checked before any work
    labelled = _common_labelling(formats)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        manifest = _ingest_into(
            tmp,
            formats,
            labelled,
            valid_fraction=valid_fraction,
            split=split,
            seed=seed,
            rows_per_file=rows_per_file,
            row_group_size=row_group_size,
            progress=progress,
        )
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise IngestError(f"{out}: already exists (pass overwrite=True to replace it)")
        if not out.is_dir():
            raise IngestError(f"{out}: exists and is not a directory; refusing to replace it")


def _common_labelling(formats: list[SourceFormat]) -> bool:
    labelled = [f for f in formats if f.labelled]
    unlabelled = [f for f in formats if not f.labelled]
    if labelled and unlabelled:
        raise IngestError(
            f"cannot mix labelled and unlabelled inputs in one ingest: {labelled[0].name} has labels "
            f"(40 fields), {unlabelled[0].name} has none (39 fields)"
        )
    return bool(labelled)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place. With overwrite, the old dir is moved aside first and
    deleted after, so out_dir is never a mix of old and new files."""
    _check_out_dir(out, overwrite)  # again: something may have appeared while we worked
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _ingest_into(
    root: Path,
    formats: list[SourceFormat],
    labelled: bool,
    *,
    valid_fraction: float,
    split: str,
    seed: int,
    rows_per_file: int,
    row_group_size: int,
    progress: bool,
) -> dict[str, Any]:
    sink = _Sink(root, valid_fraction, split, seed, rows_per_file, row_group_size)
    writer = _WriteBehind()
    counts: list[_SourceCount] = []
    next_row_id = 0
    total_bytes = sum(f.size for f in formats)
    # disable=None: tqdm shows the bar only when stderr is a terminal (no noise in logs and tests).
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="ingest", disable=None if progress else True)
    try:
        with open(root / REJECTS_NAME, "w", encoding="utf-8", newline="\n") as rejects_out:
            for fmt in formats:
                count = _SourceCount(fmt, first_row_id=next_row_id)
                reader = SourceReader(fmt, DEFAULT_CHUNK_BYTES)
                shown = 0
                with closing(_prefetch(reader.chunks)) as chunks:
                    for parsed in chunks:
                        typed = convert_chunk(parsed, labelled)
                        n = typed.table.num_rows
                        row_ids = pa.array(np.arange(next_row_id, next_row_id + n, dtype=np.int64))
                        table = pa.Table.from_arrays([row_ids, *typed.table.columns], schema=_SCHEMA)
                        next_row_id += n
                        writer.submit(sink.write, table)
                        _log_rejects(rejects_out, typed.rejects, count)
                        count.rows_in += typed.lines_in
                        count.rows_ok += n
                        bar.update(reader.bytes_read - shown)
                        shown = reader.bytes_read
                bar.update(fmt.size - shown)
                assert reader.sha256 is not None
                count.sha256 = reader.sha256
                if count.rows_in != count.rows_ok + count.rows_rejected:
                    raise IngestError(
                        f"{fmt.name}: line accounting broken: {count.rows_in} lines in, {count.rows_ok} "
                        f"accepted + {count.rows_rejected} rejected (this is a bug)"
                    )
                counts.append(count)
        writer.drain()
        if next_row_id == 0:
            raise IngestError(
                "no valid rows in " + ", ".join(f.name for f in formats) + f" (see {REJECTS_NAME} for why)"
            )
        files = sink.close(next_row_id)
    finally:
        writer.shutdown()
        bar.close()
    return _write_manifests(root, counts, files, labelled, valid_fraction, split, seed, rows_per_file, row_group_size)


def _log_rejects(out: TextIO, rejects: list[Any], count: _SourceCount) -> None:
    for reject in rejects:
        out.write(reject.to_json() + "\n")
        count.rejects_by_kind[reject.kind] += 1
    count.rows_rejected += len(rejects)


def _write_manifests(
    root: Path,
    counts: list[_SourceCount],
    files: dict[str, list[_FileStats]],
    labelled: bool,
    valid_fraction: float,
    split: str,
    seed: int,
    rows_per_file: int,
    row_group_size: int,
) -> dict[str, Any]:
    all_files = [f for name in sorted(files) for f in files[name]]
    rows_in = sum(c.rows_in for c in counts)
    rows_ok = sum(c.rows_ok for c in counts)
    rows_rejected = sum(c.rows_rejected for c in counts)
    written = sum(f.rows for f in all_files)
    if rows_in != rows_ok + rows_rejected or written != rows_ok:
        raise IngestError(
            f"row accounting broken: {rows_in} in, {rows_ok} ok, {rows_rejected} rejected, {written} written "
            "(this is a bug)"
        )
    common = {
        "schema_version": SCHEMA_VERSION,
        "created_by": _created_by(),
        "schema": _schema_description(),
        "labelled": labelled,
    }
    split_info: dict[str, Any] | None = None
    if valid_fraction > 0:
        split_info = {"method": split, "valid_fraction": valid_fraction}
        if split == "hash":
            split_info["seed"] = seed
            split_info["rule"] = "hash_split_is_valid(row_id, valid_fraction, seed) -> valid"
        else:
            split_info["rule"] = "the last round(valid_fraction * rows) rows by row_id -> valid"
        for name in SPLIT_DIRS:
            part = files[name]
            if not part:
                warnings.warn(
                    f"the {name} split is empty ({rows_ok} rows, valid_fraction={valid_fraction}, {split} split)",
                    stacklevel=3,
                )
            split_info[name] = {"dir": name, "rows": sum(f.rows for f in part), "files": len(part)}
            sub = {
                **common,
                "split": name,
                "split_info": {k: v for k, v in split_info.items() if k not in SPLIT_DIRS},
                **_summary(part, labelled),
                "files": [f.describe(root / name) for f in part],
                "parent": f"../{MANIFEST_NAME}",
            }
            _write_json(root / name / MANIFEST_NAME, sub)

    rejects_by_kind: Counter[str] = Counter()
    for c in counts:
        rejects_by_kind.update(c.rejects_by_kind)
    manifest = {
        **common,
        "options": {
            "rows_per_file": rows_per_file,
            "row_group_size": row_group_size,
            "compression": COMPRESSION,
            "dictionary_columns": DICTIONARY_COLUMNS,
            "statistics_columns": STATISTICS_COLUMNS,
        },
        "sources": [c.describe() for c in counts],
        "rows_in": rows_in,
        "rows_ok": rows_ok,
        "rows_rejected": rows_rejected,
        **_summary(all_files, labelled),
        "files": [f.describe(root) for f in all_files],
        "split": split_info,
        "rejects": {"path": REJECTS_NAME, "rows": rows_rejected, "by_kind": dict(sorted(rejects_by_kind.items()))},
    }
    _write_json(root / MANIFEST_NAME, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------
# export_tsv
# --------------------------------------------------------------------------------------------------------

_HEX_CHARS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


def _hex8(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """uint32 -> 8 lower-case hex digits; null -> empty string (an empty TSV field)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    valid = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), dtype=bool)
    values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)[valid]
    chars = np.take(_HEX_CHARS, (values[:, None] >> _NIBBLE_SHIFTS) & 0xF)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(valid * 8, out=offsets[1:])
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def _dataset_is_labelled(directory: Path, files: list[Path]) -> bool:
    manifest = directory / MANIFEST_NAME
    if manifest.exists():
        return bool(json.loads(manifest.read_text(encoding="utf-8"))["labelled"])
    # No manifest: unlabelled iff every label is null (read from the Parquet statistics, not the data).
    for path in files:
        meta = pq.ParquetFile(path).metadata
        index = meta.schema.to_arrow_schema().get_field_index(LABEL_COLUMN)
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(index)
            if chunk.statistics is None or chunk.statistics.null_count != chunk.num_values:
                return True
    return False


def export_tsv(parquet_dir: str | Path, out_path: str | Path) -> int:
    """Write the ``part-*.parquet`` files of ``parquet_dir`` (in name order) back as Criteo TSV:
    ``label \\t I1..I13 \\t C1..C26`` (no label for unlabelled data), empty fields for nulls, categoricals
    as 8 lower-case hex digits, LF line endings; gzip if out_path ends with ``.gz``. Returns the row count.

    For the usual Criteo files this reproduces the ingested input byte for byte (after decompression).
    """
    directory = Path(parquet_dir)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        hint = " (a split dataset: export train/ and valid/ separately)" if (directory / "train").is_dir() else ""
        raise IngestError(f"{directory}: no part-*.parquet files to export{hint}")
    labelled = _dataset_is_labelled(directory, files)
    value_columns = [*((LABEL_COLUMN,) if labelled else ()), *DENSE_COLUMNS, *SPARSE_COLUMNS]
    out_schema = pa.schema(
        [pa.field(c, pa.string() if c in SPARSE_COLUMNS else _SCHEMA.field(c).type) for c in value_columns]
    )
    options = pv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    path = Path(out_path)
    sink: pa.NativeFile = (
        pa.CompressedOutputStream(str(path), "gzip") if path.name.endswith(".gz") else pa.OSFile(str(path), "wb")
    )
    rows = 0
    with sink, pv.CSVWriter(sink, out_schema, write_options=options) as writer:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=65536, columns=value_columns):
                arrays = [_hex8(batch.column(c)) if c in SPARSE_COLUMNS else batch.column(c) for c in value_columns]
                writer.write_table(pa.Table.from_arrays(arrays, schema=out_schema))
                rows += batch.num_rows
    return rows
