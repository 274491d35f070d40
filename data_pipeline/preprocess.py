"""Ingest Criteo-format click logs into Parquet shards with a manifest and a rejects log.

``ingest(inputs, out_dir)`` writes::

    out_dir/part-00000.parquet ...   rows_per_file rows each (the last may be short), row groups of
                                     row_group_size rows, schema data_pipeline.schema.parquet_schema(), snappy
    out_dir/manifest.json            sources (sha256, rows in/ok/rejected), files (rows, sha256), null counts,
                                     positives, split info; no timestamps, so a re-run is byte-identical
    out_dir/rejects.jsonl            one JSON object per rejected line: source, line, reason, kind, raw
    out_dir/.recsys-codistill-dataset  the ownership marker (JSON, created_by): proof that ingest made the
                                     directory; named in the manifest ("marker"), not a data file

With ``valid_fraction > 0`` the part files go to ``out_dir/train/`` and ``out_dir/valid/`` instead, each
with its own manifest.json; the top-level manifest.json and rejects.jsonl stay at the top.

The pipeline streams in three overlapping stages so memory stays bounded by a few chunks whatever the
input size: a reader thread (read, decompress, hash, Arrow parse), the calling thread (validate and convert,
see data_pipeline.sources), and a writer thread (Parquet encoding and compression). Everything is written
to a hidden temporary directory next to ``out_dir`` and renamed into place at the end, so a failed or
killed ingest leaves no partial ``out_dir``.

What ingest deletes (README, "Trust model"): only what it created and can prove it created.
``overwrite`` replaces an existing ``out_dir`` only if it carries the marker (or, for data sets written
before the marker, a manifest.json naming ingest as its writer) and holds nothing but ingest's own files;
never if it is or contains an input, the working directory, the home directory, or is a filesystem root.
A killed ingest's temp dir (``.<name>.tmp-<pid>-<hex>``, marker written first thing) is removed by the
next ingest into the same ``out_dir`` once that pid is gone; nothing else is.

Choices worth knowing:

- Blank lines are rejected (reason "blank line") rather than skipped, so every physical line is accounted
  for: per source, rows_in == rows_ok + rows_rejected, checked and written to the manifest.
- An input with more than ``max_reject_fraction`` (default 0.5) of its lines rejected fails the ingest:
  that many rejects means a wrong format, not a few damaged lines.
- The same file given twice (same path, a link to it, or a byte-identical copy) is an IngestError.
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
import re
import secrets
import shutil
import socket
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
# Written into every directory ingest creates (first thing, also into its temp dir): the proof that
# ingest --overwrite, and the clean-up of a killed ingest's temp dir, need before they delete anything.
# manifest.json stays the data contract (readers list files from it); the manifest names the marker.
MARKER_NAME = ".recsys-codistill-dataset"
_CREATED_BY_PREFIX = "recsys-codistill "
_CREATED_BY_MODULE = "data_pipeline.preprocess"
# ingest fails (publishing nothing) when more than this share of one input's lines is rejected. Real Criteo
# files reject ~0 lines; a wrong format or a mis-detected labelling rejects ~all of them. Half sits far
# from both, so a data set with a damaged stretch still goes through (its rejects logged) while a file
# that is mostly not what we think it is stops the ingest instead of "succeeding" with exit code 0.
DEFAULT_MAX_REJECT_FRACTION = 0.5
REJECTS_NAME = "rejects.jsonl"
PART_PATTERN = "part-{:05d}.parquet"
SPLIT_DIRS = ("train", "valid")
#: ``ingest(days=N)``: out_dir/day00 ... day{N-1}, equal row counts in row_id (= file = time) order.
MAX_DAYS = 100


def day_dir(day: int) -> str:
    return f"day{day:02d}"


def day_dirs(days: int) -> list[str]:
    return [day_dir(d) for d in range(days)]


def day_cuts(total_rows: int, days: int) -> list[int]:
    """The first row_id of days 1..N-1: day d holds row ids [c_d, c_{d+1}) with c_d = floor(d n / N + 1/2)
    (integer arithmetic: the same cut on every machine)."""
    return [(2 * d * total_rows + days) // (2 * days) for d in range(1, days)]


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
    return f"{_CREATED_BY_PREFIX}{ours} {_CREATED_BY_MODULE}; pyarrow {pa.__version__}"


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

    def __init__(
        self, directory: Path, rows_per_file: int, row_group_size: int, first_index: int = 0
    ) -> None:
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
        self,
        root: Path,
        valid_fraction: float,
        split: str,
        seed: int,
        rows_per_file: int,
        row_group_size: int,
        days: int = 0,
    ) -> None:
        self.root = root
        self.valid_fraction = valid_fraction
        self.split = "days" if days > 1 else split if valid_fraction > 0 else None
        self.days = days
        self.seed = seed
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        if self.split is None:
            self.writers = {"": _ShardWriter(root, rows_per_file, row_group_size)}
        elif self.split == "days":  # everything into the first day, re-split at the end (like "time")
            self.writers = {day_dir(0): _ShardWriter(root / day_dir(0), rows_per_file, row_group_size)}
        else:
            self.writers = {
                name: _ShardWriter(root / name, rows_per_file, row_group_size) for name in SPLIT_DIRS
            }

    def write(self, table: pa.Table) -> None:
        """Runs on the writer thread."""
        if self.split == "hash":
            row_ids = table.column(ROW_ID_COLUMN).to_numpy()
            is_valid = hash_split_is_valid(row_ids, self.valid_fraction, self.seed)
            self.writers["train"].write(table.filter(pa.array(~is_valid)))
            self.writers["valid"].write(table.filter(pa.array(is_valid)))
        elif self.split == "time":
            self.writers["train"].write(table)
        elif self.split == "days":
            self.writers[day_dir(0)].write(table)
        else:
            self.writers[""].write(table)

    def close(self, total_rows: int) -> dict[str, list[_FileStats]]:
        files = {name: writer.close() for name, writer in self.writers.items()}
        if self.split == "time":
            n_train = total_rows - round(self.valid_fraction * total_rows)
            files = self._resplit(files["train"], [n_train], list(SPLIT_DIRS))
        elif self.split == "days":
            files = self._resplit(files[day_dir(0)], day_cuts(total_rows, self.days), day_dirs(self.days))
        return files

    def _resplit(
        self, written: list[_FileStats], cuts: list[int], names: list[str]
    ) -> dict[str, list[_FileStats]]:
        """Route every row by row_id to segment ``searchsorted(cuts, row_id, 'right')``: the files wholly
        before the first cut stay, the rest are re-read and re-written into their segments."""
        first = cuts[0]
        keep = [f for f in written if f.last_row_id is not None and f.last_row_id < first]
        redo = written[len(keep) :]
        # Move the files to re-split out of the way: the train writer re-creates the first one's name.
        scratch = self.root / "_resplit"
        scratch.mkdir()
        moved = []
        for f in redo:
            target = scratch / f.path.name
            os.replace(f.path, target)
            moved.append(target)
        writers = [
            _ShardWriter(
                self.root / name,
                self.rows_per_file,
                self.row_group_size,
                first_index=len(keep) if i == 0 else 0,
            )
            for i, name in enumerate(names)
        ]
        edges = np.asarray(cuts, dtype=np.int64)
        for path in moved:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=self.row_group_size):
                table = pa.Table.from_batches([batch]).cast(_SCHEMA)
                segment = np.searchsorted(edges, table.column(ROW_ID_COLUMN).to_numpy(), side="right")
                for i, w in enumerate(writers):
                    w.write(table.filter(pa.array(segment == i)))
            path.unlink()
        scratch.rmdir()
        out = {name: w.close() for name, w in zip(names, writers, strict=True)}
        out[names[0]] = keep + out[names[0]]
        return out


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
    examples: dict[str, Any] = field(default_factory=dict)  # kind -> its first Reject (for error messages)

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
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
    progress: bool = True,
    days: int = 0,
) -> dict:
    """Ingest Criteo TSV/CSV inputs (plain or gzip, concatenated in the given order) into Parquet shards
    under ``out_dir``; returns the manifest (also written to ``out_dir/manifest.json``).

    Raises IngestError for unusable input (missing, unreadable, empty, truncated gzip, labelled and
    unlabelled inputs mixed, the same file given twice, nothing accepted, more than
    ``max_reject_fraction`` of one input's lines rejected), an unwritable output (the message names the path
    and the OS's reason), or an existing ``out_dir`` without ``overwrite``; on any error no ``out_dir`` is
    created or changed. Bad lines do not raise: they go to rejects.jsonl.

    ``overwrite`` replaces only a directory this project can prove it made (see _check_out_dir): never one
    that holds an input, the working directory, the home directory, a filesystem root, or anything else.
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
    if not 0.0 <= max_reject_fraction <= 1.0:  # also refuses nan
        raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction}")
    if days and not 2 <= days <= MAX_DAYS:
        raise ValueError(f"days must be 0 (no day split) or in [2, {MAX_DAYS}], got {days}")
    if days and valid_fraction > 0:
        raise ValueError(
            f"days = {days} and valid_fraction = {valid_fraction}: a day split has no separate hold-out "
            "(each day is the next one's hold-out); use one or the other"
        )

    # One spelling of the output for every check, the temp dir and the rename: the real path of its parent
    # plus its own name. Checking one spelling and renaming another (``link/../x`` is ``x`` to
    # os.path.abspath but ``<link target>/../x`` to the kernel) could delete a directory never checked.
    _check_out_dir(Path(out_dir), overwrite, inputs)  # first as given, so errors name the user's path
    out = canonical_path(out_dir)
    out_abs = out
    _check_out_dir(out, overwrite, inputs)
    formats = [detect_format(p) for p in inputs]  # all inputs checked before any work
    _check_distinct(formats)
    labelled = _common_labelling(formats)

    try:
        out_abs.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out_abs)
        tmp = out_abs.parent / f".{out_abs.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise _os_error(out, "cannot create the output directory", e) from e
    try:
        try:
            # The marker goes in first, so that a killed ingest leaves a temp dir the next one can prove
            # is ours (and remove).
            _write_marker(tmp, temporary=True)
            manifest = _ingest_into(
                tmp,
                formats,
                labelled,
                valid_fraction=valid_fraction,
                split=split,
                seed=seed,
                rows_per_file=rows_per_file,
                row_group_size=row_group_size,
                max_reject_fraction=max_reject_fraction,
                progress=progress,
                days=days,
            )
            _write_marker(tmp, temporary=False)  # no pid or host: a re-run stays byte-identical
            _publish(tmp, out, overwrite, inputs)
        except OSError as e:  # input read errors are IngestErrors already: this is the output side
            raise _os_error(out, "cannot write the dataset", e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _os_error(out: Path, what: str, err: OSError) -> IngestError:
    """An IngestError naming out_dir, the path the OS complained about, and its reason (disk full,
    read-only file system, permission denied), instead of a traceback."""
    reason = err.strerror or str(err)
    where = f" ({err.filename}: {reason})" if err.filename else f": {reason}"
    return IngestError(f"{out}: {what}{where}")


# --------------------------------------------------------------------------------------------------------
# What ingest may replace or remove
# --------------------------------------------------------------------------------------------------------


def _marker_content(temporary: bool) -> dict[str, Any]:
    content: dict[str, Any] = {
        "created_by": _created_by(),
        "what": "a data set written by recsys-codistill ingest; ingest --overwrite may replace this directory",
    }
    if temporary:  # lets a later ingest tell a dead ingest's leftovers from a live one's
        content.update(what="ingest's temporary directory", pid=os.getpid(), host=socket.gethostname())
    return content


def _write_marker(directory: Path, *, temporary: bool) -> None:
    _write_json(directory / MARKER_NAME, _marker_content(temporary))


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in a regular file (not a symlink), or None if there is none or it is not one."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _made_by_ingest(info: dict[str, Any] | None) -> bool:
    """Whether a marker or manifest names ingest as its writer: the project's name is not enough, since
    other parts of it (checkpoints, teacher versions) write manifests of their own."""
    created_by = info.get("created_by") if info else None
    return (
        isinstance(created_by, str)
        and created_by.startswith(_CREATED_BY_PREFIX)
        and _CREATED_BY_MODULE in created_by
    )


def _is_relative_to(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _why_protected(out: Path, inputs: Sequence[str | Path]) -> str | None:
    """Why an existing out_dir must never be replaced whatever it holds, or None. Checked on the path as
    given (made absolute) and with symlinks resolved, so neither a symlink nor '..' gets around it."""
    given = Path(os.path.abspath(out))
    real = out.resolve()
    if real.parent == real or given.parent == given:
        return "it is a filesystem root"
    protected: list[tuple[Path, str]] = [(Path.cwd(), "the current working directory")]
    try:
        protected.append((Path.home(), "your home directory"))
    except RuntimeError:  # no HOME and no passwd entry
        pass
    for path, what in protected:
        for candidate in {path, path.resolve()}:
            if _is_relative_to(candidate, real) or _is_relative_to(candidate, given):
                return f"it is (or contains) {what}"
    for name in inputs:
        for candidate in {Path(os.path.abspath(name)), Path(name).resolve()}:
            if _is_relative_to(candidate, real) or _is_relative_to(candidate, given):
                return f"it is or contains the input file {name}"
    return None


def _foreign_entries(directory: Path, manifest: dict[str, Any] | None, limit: int = 5) -> list[str]:
    """Up to `limit` entries of directory (relative paths) that an ingest does not write."""
    split = manifest.get("split") if manifest else None
    known_dirs = set(split.get("dirs", SPLIT_DIRS)) if isinstance(split, dict) else set()
    known = {MANIFEST_NAME, REJECTS_NAME, MARKER_NAME, *(f"{d}/{MANIFEST_NAME}" for d in known_dirs)}
    files = manifest.get("files") if manifest else None
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            known.add(entry["path"])
    foreign: list[str] = []
    for root, dirs, names in os.walk(directory):  # does not follow symlinked directories
        rel_root = Path(root).relative_to(directory)
        for name in sorted(dirs):
            rel = (rel_root / name).as_posix()
            if rel not in known_dirs or (Path(root) / name).is_symlink():
                foreign.append(rel + "/")
                dirs.remove(name)  # no need to look inside
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if rel not in known:
                foreign.append(rel)
        if len(foreign) >= limit:
            break
    return foreign[:limit]


def _why_not_ours(out: Path) -> str | None:
    """None if out_dir is a data set this project made and holds nothing else; else why not. Proof is our
    marker, or (for data sets written before the marker existed) a manifest.json naming us as its maker."""
    manifest = _read_json_object(out / MANIFEST_NAME)
    marker = _read_json_object(out / MARKER_NAME)
    if marker is not None:
        if not _made_by_ingest(marker):
            return f"its {MARKER_NAME} was not written by recsys-codistill"
    elif not _made_by_ingest(manifest):
        return (
            f"it has no {MARKER_NAME} marker and no {MANIFEST_NAME} written by recsys-codistill ingest, so it "
            "is not a data set this project made"
        )
    foreign = _foreign_entries(out, manifest)
    if foreign:
        return "it holds files ingest did not write: " + ", ".join(foreign)
    return None


def canonical_path(path: str | Path) -> Path:
    """``realpath(parent) / name``: absolute, every symlink and ``..`` of the parent resolved as the kernel
    resolves them, the last component kept (a symlink there is seen, not followed). ``.``, ``..`` and
    paths ending in them are resolved whole."""
    p = Path(os.path.expanduser(str(path)))
    if p.name in ("", ".", ".."):
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(p.parent)) / p.name


def _check_out_dir(out: Path, overwrite: bool, inputs: Sequence[str | Path]) -> None:
    """Refuse an existing out_dir unless overwrite and this project made it; never one that is protected
    (see _why_protected). The rule: only delete what we created and can prove we created."""
    if not (out.exists() or out.is_symlink()):
        return
    why = _why_protected(out, inputs)
    if why:
        raise IngestError(
            f"{out}: refusing to write the data set there: {why}; choose another output directory"
        )
    if not overwrite:
        raise IngestError(
            f"{out}: already exists (pass overwrite=True to replace it)",
            cli_message=f"{out}: already exists (pass --overwrite to replace it)",
        )
    if out.is_symlink():
        raise IngestError(f"{out}: is a symbolic link; refusing to replace it (name the directory itself)")
    if not out.is_dir():
        raise IngestError(f"{out}: exists and is not a directory; refusing to replace it")
    why = _why_not_ours(out)
    if why:
        raise IngestError(
            f"{out}: refusing to replace it with overwrite=True: {why}. Remove it yourself or choose another "
            "output directory",
            cli_message=f"{out}: refusing to replace it with --overwrite: {why}. Remove it yourself or choose "
            "another output directory",
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we could have written: treat as alive, i.e. leave the directory alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Remove the temp (and moved-aside old) dirs of killed ingests into the same out_dir: only entries
    named exactly as ingest names them, that are real directories, whose marker is ours and names the pid
    in the name and this host, and whose pid is not running. Anything else is left alone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-([0-9]+)-[0-9a-f]{{8}}")
    host = socket.gethostname()
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group(1))
        marker = _read_json_object(entry / MARKER_NAME)
        if (
            not _made_by_ingest(marker)
            or marker is None
            or marker.get("pid") != pid
            or marker.get("host") != host
        ):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            shutil.rmtree(entry)
        except OSError as e:
            warnings.warn(
                f"{entry}: could not remove a killed ingest's temporary directory: {e}", stacklevel=3
            )


def _check_distinct(formats: list[SourceFormat]) -> None:
    """The same file twice (same path, a link to it, or a copy) would put every row in twice."""
    for i, a in enumerate(formats):
        for b in formats[:i]:
            if os.path.abspath(a.path) == os.path.abspath(b.path):
                raise IngestError(f"input {a.name} is given twice; each of its rows would be ingested twice")
            if os.path.samefile(a.path, b.path):
                raise IngestError(
                    f"inputs {b.name} and {a.name} are the same file; each of its rows would be ingested twice"
                )
    # Copies: only files of equal size can be equal, so only those are hashed up front (usually none).
    by_size: dict[int, list[SourceFormat]] = {}
    for f in formats:
        by_size.setdefault(f.size, []).append(f)
    for group in by_size.values():
        if len(group) > 1:
            _check_distinct_content({f.name: _sha256_file(f.path) for f in group})


def _check_distinct_content(digests: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, digest in digests.items():
        if digest in seen:
            raise IngestError(
                f"inputs {seen[digest]} and {name} have the same content (sha256 {digest[:16]}...); each row "
                "would be ingested twice"
            )
        seen[digest] = name


def _common_labelling(formats: list[SourceFormat]) -> bool:
    labelled = [f for f in formats if f.labelled]
    unlabelled = [f for f in formats if not f.labelled]
    if labelled and unlabelled:
        raise IngestError(
            f"cannot mix labelled and unlabelled inputs in one ingest: {labelled[0].name} has labels "
            f"(40 fields), {unlabelled[0].name} has none (39 fields)"
        )
    return bool(labelled)


def _publish(tmp: Path, out: Path, overwrite: bool, inputs: Sequence[str | Path]) -> None:
    """Rename the finished temp dir into place. With overwrite, the old dir is moved aside first and
    deleted after, so out_dir is never a mix of old and new files."""
    _check_out_dir(out, overwrite, inputs)  # again: something may have appeared while we worked
    target = Path(os.path.abspath(out))
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)  # put the old data set back rather than leave none
            raise
        try:  # so that a kill during the rmtree leaves a dir the next ingest can prove is ours
            _write_marker(old, temporary=True)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
    max_reject_fraction: float,
    progress: bool,
    days: int = 0,
) -> dict[str, Any]:
    sink = _Sink(root, valid_fraction, split, seed, rows_per_file, row_group_size, days)
    writer = _WriteBehind()
    counts: list[_SourceCount] = []
    next_row_id = 0
    total_bytes = sum(f.size for f in formats)
    # disable=None: tqdm shows the bar only when stderr is a terminal (no noise in logs and tests).
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="ingest", disable=None if progress else True
    )
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
                # A copy of an earlier input that the up-front check could not see (e.g. a different
                # size on disk because it changed since): refuse before its rows are published twice.
                _check_distinct_content({c.fmt.name: c.sha256 for c in [*counts, count]})
                _check_reject_fraction(count, max_reject_fraction)
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
    return _write_manifests(
        root, counts, files, labelled, valid_fraction, split, seed, rows_per_file, row_group_size, days
    )


def _check_reject_fraction(count: _SourceCount, max_fraction: float) -> None:
    """Stop, naming the file and the commonest reasons, when most of an input is rejected: that input is
    almost surely not what it was taken for, and an exit code 0 would hide it."""
    if count.rows_in == 0 or count.rows_rejected / count.rows_in <= max_fraction:
        return
    common = count.rejects_by_kind.most_common(2)
    examples = "; ".join(
        f"{kind} x{n}, e.g. line {count.examples[kind].line}: {count.examples[kind].reason}"
        for kind, n in common
    )
    what = "no valid rows: " if count.rows_ok == 0 else ""
    head = (
        f"{count.fmt.name}: {what}{count.rows_rejected} of {count.rows_in} lines rejected "
        f"({count.rows_rejected / count.rows_in:.1%})"
    )
    tail = f"; nothing was written. Rejected: {examples}"
    raise IngestError(
        f"{head}, more than max_reject_fraction={max_fraction} allows{tail}",
        cli_message=f"{head}, more than --max-reject-fraction {max_fraction} allows{tail}",
    )


def _log_rejects(out: TextIO, rejects: list[Any], count: _SourceCount) -> None:
    for reject in rejects:
        out.write(reject.to_json() + "\n")
        count.rejects_by_kind[reject.kind] += 1
        count.examples.setdefault(reject.kind, reject)
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
    days: int = 0,
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
    parts: Sequence[str] = ()
    if days > 1:
        parts = day_dirs(days)
        split_info = {
            "method": "days",
            "days": days,
            "dirs": list(parts),
            "rule": "day d = row ids [floor(d rows / days + 1/2), floor((d + 1) rows / days + 1/2)) in row_id order",
        }
    elif valid_fraction > 0:
        parts = SPLIT_DIRS
        split_info = {"method": split, "valid_fraction": valid_fraction}
        if split == "hash":
            split_info["seed"] = seed
            split_info["rule"] = "hash_split_is_valid(row_id, valid_fraction, seed) -> valid"
        else:
            split_info["rule"] = "the last round(valid_fraction * rows) rows by row_id -> valid"
    if split_info is not None:
        for name in parts:
            part = files[name]
            if not part:
                warnings.warn(
                    f"the {name} split is empty ({rows_ok} rows, valid_fraction={valid_fraction}, days={days}, "
                    f"{split_info['method']} split)",
                    stacklevel=3,
                )
            split_info[name] = {"dir": name, "rows": sum(f.rows for f in part), "files": len(part)}
            sub = {
                **common,
                "split": name,
                "split_info": {k: v for k, v in split_info.items() if k not in parts},
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
        "rejects": {
            "path": REJECTS_NAME,
            "rows": rows_rejected,
            "by_kind": dict(sorted(rejects_by_kind.items())),
        },
        # Not data: the proof that ingest made this directory (a file-set check must allow it).
        "marker": MARKER_NAME,
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


def export_tsv(parquet_dir: str | Path, out_path: str | Path, *, overwrite: bool = False) -> int:
    """Write the ``part-*.parquet`` files of ``parquet_dir`` (in name order) back as Criteo TSV:
    ``label \\t I1..I13 \\t C1..C26`` (no label for unlabelled data), empty fields for nulls, categoricals
    as 8 lower-case hex digits, LF line endings; gzip if out_path ends with ``.gz``. Returns the row count.

    For the usual Criteo files this reproduces the ingested input byte for byte (after decompression).
    The file is written next to out_path under a temporary name and renamed into place at the end, so a
    failed or killed export never leaves a partial out_path; an existing out_path is refused unless
    ``overwrite``. Write errors (disk full, read-only) are IngestErrors naming the path and the reason.
    """
    directory = Path(parquet_dir)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        hint = (
            " (a split dataset: export train/ and valid/ separately)"
            if (directory / "train").is_dir()
            else ""
        )
        raise IngestError(f"{directory}: no part-*.parquet files to export{hint}")
    path = canonical_path(out_path)  # one spelling for the checks and the rename (see ingest)
    _check_export_target(path, directory, overwrite)
    labelled = _dataset_is_labelled(directory, files)
    value_columns = [*((LABEL_COLUMN,) if labelled else ()), *DENSE_COLUMNS, *SPARSE_COLUMNS]
    out_schema = pa.schema(
        [pa.field(c, pa.string() if c in SPARSE_COLUMNS else _SCHEMA.field(c).type) for c in value_columns]
    )
    options = pv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    rows = 0
    try:
        sink: pa.NativeFile = (
            pa.CompressedOutputStream(str(tmp), "gzip")
            if path.name.endswith(".gz")
            else pa.OSFile(str(tmp), "wb")
        )
        with sink, pv.CSVWriter(sink, out_schema, write_options=options) as writer:
            for file in files:
                for batch in pq.ParquetFile(file).iter_batches(batch_size=65536, columns=value_columns):
                    arrays = [
                        _hex8(batch.column(c)) if c in SPARSE_COLUMNS else batch.column(c)
                        for c in value_columns
                    ]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=out_schema))
                    rows += batch.num_rows
        _check_export_target(path, directory, overwrite)  # again: it may have appeared meanwhile
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror or str(e)
        raise IngestError(f"{path}: cannot write the export: {reason}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours: we just created it under a name no one else uses
        raise
    return rows


def _check_export_target(path: Path, directory: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise IngestError(f"{path}: is a directory; expected the path of the .tsv (or .tsv.gz) file to write")
    if not path.parent.is_dir():
        raise IngestError(f"{path}: cannot write the export: no such directory {path.parent}")
    # A file inside the data set would change a directory whose manifest describes it.
    if _is_relative_to(path.parent.resolve(), directory.resolve()):
        raise IngestError(f"{path}: is inside the data set {directory} being exported; write it elsewhere")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise IngestError(
            f"{path}: already exists (pass overwrite=True to replace it)",
            cli_message=f"{path}: already exists (pass --overwrite to replace it)",
        )
