"""Reading Criteo-format click logs: format detection, chunked streaming with exact line numbers, and
vectorised validation/conversion of the raw text fields into the typed columns of ``data_pipeline.schema``.

Accepted inputs (detected per file, see :func:`detect_format`):

- Criteo TSV, 40 fields ``label, I1..I13, C1..C26`` (``train.txt``), plain or gzip;
- unlabelled Criteo TSV, 39 fields (``test.txt``): the label becomes null;
- the Kaggle CSV variant with a header ``Id,Label,I1..I13,C1..C26`` (or ``Id,I1..`` unlabelled), CRLF line
  endings; the ``Id`` column is dropped.

How a file is read (why it is built this way):

- The raw bytes are read in chunks of ``chunk_bytes`` that end on a line boundary, so every chunk knows the
  physical line number of its first line. pyarrow's CSV reader cannot tell us physical line numbers (its
  ``invalid_row_handler`` gets none when parsing in parallel, and it silently skips blank lines), so we keep
  the line bookkeeping ourselves and let Arrow do the heavy parsing of each chunk (multi-threaded).
- Happy path: Arrow parses the chunk, nothing is skipped, the row count equals the newline count, so row
  ``i`` is line ``first_line + i``. Otherwise (rare: a blank line, a wrong field count, a line longer than
  Arrow's block, whatever bytes it holds) the chunk takes the slow path: numpy finds every line's field
  count, bad lines become rejects, and only the good lines are handed to Arrow again. No line can abort
  the file; one longer than 64 MiB is dropped as it is read and rejected too.
- A UTF-8 byte order mark at the start of a file (Excel writes one) is skipped.
- Values: Arrow parses a chunk typed where that is safe (I* as int32, C* as 8-byte fixed-size binary that a
  numpy lookup table decodes from hex; see :class:`_ArrowParser`). A chunk Arrow cannot type (a malformed
  value somewhere) is parsed as strings and validated column by column with vectorised kernels
  (``pyarrow.compute`` / numpy). Only rejected rows are looked at in Python, to say why.

Quoting is switched off: Criteo fields never contain quotes, delimiters or newlines, and with quoting off
a physical line is always exactly one row, which keeps the line numbers exact.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from data_pipeline.schema import DENSE_COLUMNS, LABEL_COLUMN, MAX_HEX_DIGITS, RAW_COLUMNS, SPARSE_COLUMNS

# ~4 MiB of text per chunk (~16k Criteo rows): big enough to amortise per-call overhead, small enough to keep
# memory bounded and to give Arrow a few 1 MiB blocks to parse in parallel.
DEFAULT_CHUNK_BYTES = 4 << 20
_ARROW_BLOCK_BYTES = 1 << 20
# detect_format() decides labelled vs unlabelled by majority over this many non-blank lines (at most
# _DETECT_BYTES of decompressed text, read in blocks; lines over _SAMPLE_LINE_BYTES are not sampled: a
# Criteo line is at most ~450 bytes).
_DETECT_LINES = 1000
_DETECT_BYTES = 16 << 20
_DETECT_BLOCK_BYTES = 256 << 10
_SAMPLE_LINE_BYTES = 64 << 10
_UTF8_BOM = b"\xef\xbb\xbf"
# A single line longer than this is not Criteo data: it is dropped as it is read (a reject, "line_length")
# instead of being buffered without bound.
_MAX_LINE_BYTES = 64 << 20
# Reject records keep at most this much of the offending line.
MAX_RAW_CHARS = 500

_GZIP_MAGIC = b"\x1f\x8b"
# Other containers we recognise only to refuse them with a clear message (instead of parsing binary noise).
_OTHER_MAGIC = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
    b"PAR1": "parquet",
}

_LABELLED_FIELDS = len(RAW_COLUMNS)  # 40
_UNLABELLED_FIELDS = _LABELLED_FIELDS - 1  # 39
_CSV_HEADER_LABELLED = ("Id", "Label", *DENSE_COLUMNS, *SPARSE_COLUMNS)
_CSV_HEADER_UNLABELLED = ("Id", *DENSE_COLUMNS, *SPARSE_COLUMNS)

# Stricter than Arrow's integer parser, which also takes "0x1f" and " 5": optional minus, digits only; at most 10
# significant digits so that the int64 cast below cannot overflow before the int32 range check.
_DENSE_RE = r"^-?0*[0-9]{1,10}$"
_DENSE_RE_LOOSE = r"^-?[0-9]+$"
_HEX_RE = rf"^[0-9a-fA-F]{{1,{MAX_HEX_DIGITS}}}$"
_HEX_RE_LOOSE = r"^[0-9a-fA-F]+$"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _hex_pair_table() -> np.ndarray:
    """uint16[65536]: two ASCII chars read as a little-endian uint16 (first char in the low byte) -> the
    byte they spell in hex, or 0xFFFF if either is not a hex digit. Decoding 8 hex digits is then 4 table
    lookups, which is several times faster than Arrow's ``cast("0x" + s)``."""
    nibble = np.full(256, 0xFF, dtype=np.uint16)
    for i, ch in enumerate(b"0123456789abcdef"):
        nibble[ch] = i
    for i, ch in enumerate(b"ABCDEF"):
        nibble[ch] = 10 + i
    codes = np.arange(1 << 16)
    first, second = nibble[codes & 0xFF], nibble[codes >> 8]
    ok = (first < 16) & (second < 16)
    return np.where(ok, first * 16 + second, 0xFFFF).astype(np.uint16)


_HEX_PAIR = _hex_pair_table()
# For fixed-width ids from the typed parse, where a null id's slot holds zero bytes: decode "\0\0" to 0
# so nulls need no masking (chunks with a NUL byte anywhere never take the typed parse).
_HEX_PAIR_NUL0 = _HEX_PAIR.copy()
_HEX_PAIR_NUL0[0] = 0


REJECT_KINDS = ("blank_line", "field_count", "stray_cr", "line_length", "label", "dense", "categorical")


class IngestError(Exception):
    """Bad or unreadable input, or an output that cannot or must not be written. The message names the file
    (and line, where there is one) and what was expected.

    ``cli_message`` is the same message for the command line, where options are spelled as flags
    (``--overwrite``) rather than as Python keywords (``overwrite=True``); it defaults to the message.
    """

    def __init__(self, message: str, *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


@dataclass(frozen=True)
class SourceFormat:
    """What :func:`detect_format` found out about one input file."""

    path: Path
    name: str  # the path as the caller gave it; used in manifests and rejects
    size: int  # bytes on disk
    compression: Literal["gzip"] | None
    kind: Literal["tsv", "csv"]
    labelled: bool
    bom: bool = False  # the text starts with a UTF-8 byte order mark (skipped when reading)

    @property
    def delimiter(self) -> str:
        return "," if self.kind == "csv" else "\t"

    @property
    def file_columns(self) -> tuple[str, ...]:
        """A name for every field of a line, in file order (the CSV ``Id`` included)."""
        value = self.value_columns
        return ("Id", *value) if self.kind == "csv" else value

    @property
    def value_columns(self) -> tuple[str, ...]:
        """The fields we keep, named as in the Parquet schema."""
        return RAW_COLUMNS if self.labelled else (*DENSE_COLUMNS, *SPARSE_COLUMNS)

    @property
    def header_lines(self) -> int:
        return 1 if self.kind == "csv" else 0

    def describe(self) -> dict[str, object]:
        """JSON-able description for the manifest."""
        return {
            "kind": self.kind,
            "compression": self.compression,
            "labelled": self.labelled,
            "fields": len(self.file_columns),
            "header_lines": self.header_lines,
            # Only when there is one, so manifests of ordinary inputs stay as they were.
            **({"bom": True} if self.bom else {}),
        }


@dataclass(frozen=True)
class Reject:
    """One input line that did not make it into the output."""

    source: str
    line: int  # 1-based physical line number in the (decompressed) source, header included
    kind: str  # one of REJECT_KINDS, for counting
    reason: str  # human-readable, names the column and the value
    raw: str  # the line, CR/LF stripped, truncated to MAX_RAW_CHARS

    def to_json(self) -> str:
        record = {
            "source": self.source,
            "line": self.line,
            "reason": self.reason,
            "kind": self.kind,
            "raw": self.raw,
        }
        return json.dumps(record, ensure_ascii=False)


def _raw_text(line: bytes) -> str:
    return line[: MAX_RAW_CHARS * 4].decode("utf-8", errors="replace")[:MAX_RAW_CHARS]


# --------------------------------------------------------------------------------------------------------
# Opening files and detecting their format
# --------------------------------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Wraps the raw file: hashes every byte (sha256 for the manifest, in the same pass as the parse) and
    counts bytes for the progress bar (compressed bytes for .gz, so the total is known up front)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        super().__init__()
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            # hashlib releases the GIL for large updates, so this overlaps with the other pipeline stages.
            self.sha256.update(memoryview(buffer)[:n])
            self.bytes_read += n
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def _check_path(path: Path, name: str) -> int:
    """Size of a readable regular file, else IngestError naming it."""
    if not path.exists():
        raise IngestError(f"{name}: no such file")
    if path.is_dir():
        raise IngestError(f"{name}: is a directory, expected a Criteo TSV/CSV file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise IngestError(f"{name}: cannot read: {e.strerror or e}") from e
    return path.stat().st_size


def _sniff_compression(path: Path, name: str) -> Literal["gzip"] | None:
    """By magic bytes, not by extension: a mislabelled ``.gz`` that is plain text is read as text."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    for magic, what in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise IngestError(f"{name}: looks like a {what} file; expected Criteo TSV/CSV, plain or gzip")
    return None


def _open_text(path: Path, compression: Literal["gzip"] | None) -> tuple[_HashingReader, io.RawIOBase]:
    """(hashing raw reader, decompressed byte stream)."""
    hashing = _HashingReader(open(path, "rb"))  # noqa: SIM115 - closed by the caller
    if compression == "gzip":
        return hashing, gzip.GzipFile(fileobj=hashing, mode="rb")  # type: ignore[return-value]
    return hashing, hashing


def _decompression_error(name: str, err: Exception) -> IngestError:
    if isinstance(err, EOFError):
        return IngestError(f"{name}: truncated gzip file (compressed stream ended early): {err}")
    return IngestError(f"{name}: corrupt gzip data: {err}")


_DECOMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _sample_lines(stream: io.RawIOBase, max_lines: int) -> tuple[list[bytes], bool, bool]:
    """(up to max_lines complete lines from the start of the stream (LF and CR stripped), whether the stream
    ended within them, whether any line was skipped as too long to be Criteo). Reads at most _DETECT_BYTES
    of text: lines longer than _SAMPLE_LINE_BYTES are skipped without being kept, so one huge line cannot
    hide the rest of the file from the detection, nor make it buffer without bound."""
    lines: list[bytes] = []
    carry = b""
    skipping = False  # inside a line too long to sample: drop bytes up to its newline
    skipped = False
    read = 0
    while len(lines) < max_lines and read < _DETECT_BYTES:
        block = stream.read(_DETECT_BLOCK_BYTES)
        if not block:
            if carry and not skipping:
                lines.append(carry.rstrip(b"\r"))
            return lines[:max_lines], True, skipped
        read += len(block)
        pieces = (carry + block).split(b"\n")
        carry = pieces.pop()
        for piece in pieces:
            if skipping:  # the tail of the long line
                skipping = False
                continue
            lines.append(piece.rstrip(b"\r"))
        if len(carry) > _SAMPLE_LINE_BYTES:
            carry, skipping, skipped = b"", True, True
    return lines[:max_lines], False, skipped


def detect_format(path: str | Path) -> SourceFormat:
    """Detect compression (magic bytes), TSV vs Kaggle CSV (a header line starting ``Id,``, after an
    optional UTF-8 byte order mark) and, for TSV, labelled (40 fields) vs unlabelled (39 fields) by majority
    over the first _DETECT_LINES non-blank lines: one odd first line (a 39-field line in a labelled file)
    must not decide the format of the whole file, which would then reject every good row.

    On a tie (tiny files) the first 39- or 40-field line decides. Raises IngestError for a missing,
    unreadable or empty file, or one with no 39- or 40-field line among those sampled. Empty inputs are
    errors rather than empty datasets: in a data pipeline an empty file is almost always a failed download
    or a wrong path.
    """
    name = str(path)
    p = Path(path)
    size = _check_path(p, name)
    if size == 0:
        raise IngestError(f"{name}: empty file (0 bytes, no rows)")
    compression = _sniff_compression(p, name)
    hashing, stream = _open_text(p, compression)
    try:
        lines, at_end, skipped_long = _sample_lines(stream, _DETECT_LINES + 1)  # + 1: a CSV header
    except _DECOMPRESSION_ERRORS as e:
        raise _decompression_error(name, e) from e
    except OSError as e:
        raise IngestError(f"{name}: read error: {e.strerror or e}") from e
    finally:
        stream.close()
        hashing.close()
    bom = bool(lines) and lines[0].startswith(_UTF8_BOM)
    if bom:  # a BOM is an encoding mark some tools write (Excel's "CSV UTF-8"), not data
        lines[0] = lines[0][len(_UTF8_BOM) :]
    if not any(line.strip() for line in lines) and at_end and not skipped_long:
        raise IngestError(f"{name}: no rows (the file holds only blank lines or nothing after decompression)")

    first = lines[0] if lines else b""
    if first.startswith(b"Id,"):
        header = tuple(first.decode("ascii", errors="replace").split(","))
        if header == _CSV_HEADER_LABELLED:
            labelled = True
        elif header == _CSV_HEADER_UNLABELLED:
            labelled = False
        else:
            raise IngestError(
                f"{name}: line 1: CSV header {first[:200]!r} is not 'Id,Label,I1..I13,C1..C26' "
                "(or 'Id,I1..I13,C1..C26' for unlabelled data)"
            )
        if not any(line.strip() for line in lines[1:]) and at_end and not skipped_long:
            raise IngestError(f"{name}: CSV header but no rows")
        return SourceFormat(p, name, size, compression, "csv", labelled, bom)

    sample = [line for line in lines[:_DETECT_LINES] if line.strip()]
    n_fields = Counter(line.count(b"\t") + 1 for line in sample)
    n_labelled, n_unlabelled = n_fields[_LABELLED_FIELDS], n_fields[_UNLABELLED_FIELDS]
    if n_labelled == n_unlabelled == 0:
        raise IngestError(
            f"{name}: no line with {_LABELLED_FIELDS} (labelled) or {_UNLABELLED_FIELDS} (unlabelled) "
            f"tab-separated fields in the first {len(sample)} lines"
            + (f" (lines over {_SAMPLE_LINE_BYTES} bytes not counted)" if skipped_long else "")
            + "; not Criteo TSV (and no 'Id,Label,...' CSV header)"
        )
    if n_labelled != n_unlabelled:
        labelled = n_labelled > n_unlabelled
    else:  # a tie (tiny files): the first well-formed line decides, as it always did
        first_fields = next(
            n
            for n in (line.count(b"\t") + 1 for line in sample)
            if n in (_LABELLED_FIELDS, _UNLABELLED_FIELDS)
        )
        labelled = first_fields == _LABELLED_FIELDS
    return SourceFormat(p, name, size, compression, "tsv", labelled, bom)


# --------------------------------------------------------------------------------------------------------
# Chunked parsing with exact line numbers
# --------------------------------------------------------------------------------------------------------


@dataclass
class ParsedChunk:
    """The well-formed lines of one chunk, parsed by Arrow (empty field -> null)."""

    source: str
    data: bytes  # the chunk's raw bytes (kept to quote rejected lines)
    first_line: int  # physical line number of the chunk's first line
    lines_in: int  # physical lines in the chunk
    table: pa.Table  # columns named as in value_columns (typed or strings, see _ArrowParser); one row per
    # well-formed line
    row_lines: np.ndarray | None  # line index (0-based within the chunk) of each row; None = identity
    rejects: list[Reject]  # lines rejected for their shape (blank, field count, stray CR)

    def line_number(self, row: int) -> int:
        idx = row if self.row_lines is None else int(self.row_lines[row])
        return self.first_line + idx

    def raw_line(self, row: int) -> str:
        """The source line of a parsed row (line offsets are found with numpy, once, only when a row of
        this chunk is rejected)."""
        idx = row if self.row_lines is None else int(self.row_lines[row])
        starts, ends = self._bounds
        return _raw_text(self.data[starts[idx] : ends[idx]])

    @functools.cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _line_bounds(self.data)


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of every line (ends exclude the LF and the CR of a CRLF)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 0x0A)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    if data.endswith(b"\n"):  # no line after the final newline
        starts, ends = starts[:-1], ends[:-1]
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 0x0D)
    return starts, ends - has_cr


class _ArrowParser:
    """Arrow CSV options for one source format; parses a buffer of whole lines.

    Two ways to type the columns:

    - typed (tried first): I* as int32 and C* as fixed_size_binary(8), so Arrow's parser does the integer
      conversion and lays the hex digits out contiguously for the numpy decoder; label stays a string (Arrow
      would read "01" as 1). Any value Arrow cannot convert (a 7-digit id, "1.5", an int32 overflow) fails
      the whole call, and the chunk is parsed again as strings.
    - strings: every column a string; used for such chunks and validated column by column.

    Arrow raises ArrowInvalid for a line with the wrong field count and for a line longer than its block
    size; the caller then classifies the lines itself (see _parse_chunk). There is deliberately no
    ``invalid_row_handler``: pyarrow decodes the row's text as UTF-8 to call it, so a malformed line with
    a non-UTF-8 byte made the handler fail and aborted the whole file.
    """

    def __init__(self, fmt: SourceFormat) -> None:
        self.fmt = fmt
        self._read_options = self._options_for_block(_ARROW_BLOCK_BYTES)
        self._parse_options = pv.ParseOptions(
            delimiter=fmt.delimiter,
            quote_char=False,
            escape_char=False,
            newlines_in_values=False,
            ignore_empty_lines=True,
        )
        common = {
            "include_columns": list(fmt.value_columns),
            "strings_can_be_null": True,
            # Only the empty field is missing; Arrow's default list would also turn "NA", "NULL", ... into nulls.
            "null_values": [""],
            # Validity is checked by our own (ASCII-only) rules; skipping UTF-8 validation is faster and keeps a
            # stray non-UTF-8 byte a per-row reject instead of a chunk-level failure.
            "check_utf8": False,
        }
        typed = {c: pa.string() for c in fmt.value_columns}
        typed.update({c: pa.int32() for c in DENSE_COLUMNS})
        typed.update({c: pa.binary(MAX_HEX_DIGITS) for c in SPARSE_COLUMNS})
        self._typed = pv.ConvertOptions(column_types=typed, **common)
        self._strings = pv.ConvertOptions(column_types={c: pa.string() for c in fmt.value_columns}, **common)

    def _options_for_block(self, block_size: int) -> pv.ReadOptions:
        return pv.ReadOptions(
            column_names=list(self.fmt.file_columns), block_size=block_size, use_threads=True
        )

    def parse(self, data: bytes, longest_line: int = 0) -> pa.Table:
        """One row per non-blank line of data; raises pa.ArrowInvalid for a line with the wrong field count
        or one longer than the block size. Give ``longest_line`` (bytes) when it may exceed the default
        block: Arrow cannot parse a row that straddles two blocks, so the block is made to fit it."""
        if not data:
            return _empty_string_table(self.fmt.value_columns)
        read_options = self._read_options
        if longest_line + 2 > _ARROW_BLOCK_BYTES:  # + 2: the line's CRLF
            read_options = self._options_for_block(2 * (longest_line + 2))
        # Arrow's integer parser is laxer than our rule: it takes "0x1f" and trims spaces; and the hex
        # decoder reads a null id's zero bytes as 0, so a real NUL must not reach it. Real Criteo data has
        # no 'x', space or NUL anywhere, so a chunk that does goes the string way.
        if not any(ch in data for ch in (b"x", b"X", b" ", b"\0")):
            try:
                return self._read(data, read_options, self._typed)
            except pa.ArrowInvalid:
                pass  # some value did not convert (or a line is malformed); try as strings to find out
        return self._read(data, read_options, self._strings)

    def _read(self, data: bytes, read_options: pv.ReadOptions, convert: pv.ConvertOptions) -> pa.Table:
        # Columns come in one chunk per parsed block; they stay chunked (concatenating would copy the whole
        # chunk once more) and are converted chunk by chunk.
        return pv.read_csv(
            pa.py_buffer(data),
            read_options=read_options,
            parse_options=self._parse_options,
            convert_options=convert,
        )


def _empty_string_table(columns: tuple[str, ...]) -> pa.Table:
    return pa.table({c: pa.array([], type=pa.string()) for c in columns})


def _parse_chunk(parser: _ArrowParser, data: bytes, first_line: int) -> ParsedChunk:
    fmt = parser.fmt
    # numpy counts bytes about twice as fast as bytes.count.
    lines_in = int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A))
    lines_in += 0 if data.endswith(b"\n") else 1
    # Fast path. Arrow treats a lone CR as a line break, so a chunk whose CRs are not all part of CRLFs
    # takes the slow path too (where such lines are rejected), keeping Arrow's rows and our lines aligned.
    # Arrow skips blank lines (fewer rows than lines) and raises for a wrong field count or a line longer
    # than its block: all of those take the slow path as well, so no line can abort the file.
    crs_ok = b"\r" not in data or data.count(b"\r") == data.count(b"\r\n")
    try:
        table = parser.parse(data)
    except pa.ArrowInvalid:
        table = None
    if table is not None and table.num_rows == lines_in and crs_ok:
        return ParsedChunk(fmt.name, data, first_line, lines_in, table, None, [])

    # Slow path: classify every line with numpy, reject the malformed ones, re-parse the rest.
    buf = np.frombuffer(data, dtype=np.uint8)
    starts, ends = _line_bounds(data)
    delim_cum = np.concatenate(([0], np.cumsum(buf == ord(fmt.delimiter), dtype=np.int64)))
    cr_cum = np.concatenate(([0], np.cumsum(buf == 0x0D, dtype=np.int64)))
    n_fields = delim_cum[ends] - delim_cum[starts] + 1
    stray_cr = cr_cum[ends] - cr_cum[starts] > 0
    blank = ends == starts
    expected = len(fmt.file_columns)
    good = ~blank & ~stray_cr & (n_fields == expected)

    rejects = []
    for i in np.flatnonzero(~good):
        line = data[starts[i] : ends[i]]
        if blank[i]:
            kind, reason = "blank_line", "blank line"
        elif stray_cr[i]:
            kind, reason = "stray_cr", "carriage return inside the line (only CRLF line endings are accepted)"
        elif n_fields[i] == expected + 1 and line.endswith(fmt.delimiter.encode()):
            what = "tab" if fmt.kind == "tsv" else "comma"
            kind, reason = "field_count", f"{n_fields[i]} fields, expected {expected}: trailing {what}"
        else:
            kind, reason = "field_count", f"{n_fields[i]} fields, expected {expected}"
        rejects.append(Reject(fmt.name, first_line + int(i), kind, reason, _raw_text(line)))

    good_idx = np.flatnonzero(good)
    clean = b"\n".join(data[starts[i] : ends[i]] for i in good_idx)
    # A well-shaped line may still be long (a huge value, rejected later with its line number): size
    # Arrow's block to the longest good line so that it parses.
    longest = int((ends - starts)[good_idx].max()) if len(good_idx) else 0
    try:
        table = parser.parse(clean, longest_line=longest)
    except pa.ArrowInvalid as e:  # our line classification and Arrow's must agree
        raise RuntimeError(
            f"{fmt.name}: internal error re-parsing lines {first_line}..{first_line + lines_in - 1}: {e}"
        ) from e
    if table.num_rows != len(good_idx):
        raise RuntimeError(
            f"{fmt.name}: internal error re-parsing lines {first_line}..{first_line + lines_in - 1}: "
            f"{table.num_rows} rows for {len(good_idx)} good lines"
        )
    return ParsedChunk(fmt.name, data, first_line, lines_in, table, good_idx, rejects)


class SourceReader:
    """Streams one input file as :class:`ParsedChunk` s. After a full iteration, ``sha256`` holds the digest
    of the file's bytes on disk (computed in the same pass)."""

    def __init__(self, fmt: SourceFormat, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.fmt = fmt
        self.chunk_bytes = chunk_bytes
        self.sha256: str | None = None
        self._hashing: _HashingReader | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of the file on disk read so far (for the progress bar)."""
        return self._hashing.bytes_read if self._hashing is not None else 0

    def chunks(self) -> Iterator[ParsedChunk]:
        fmt = self.fmt
        parser = _ArrowParser(fmt)
        hashing, stream = _open_text(fmt.path, fmt.compression)
        self._hashing = hashing
        try:
            line = 1
            if fmt.bom and not fmt.header_lines:  # a CSV's BOM goes with the header line, which is skipped
                _skip_exactly(stream, len(_UTF8_BOM))
            if fmt.header_lines:
                stream_buf = io.BufferedReader(stream) if stream is hashing else stream
                header = stream_buf.readline()  # type: ignore[union-attr]
                if not header.endswith(b"\n"):
                    raise IngestError(f"{fmt.name}: CSV header but no rows")
                stream = stream_buf  # type: ignore[assignment]
                line += fmt.header_lines
            for data in _line_chunks(stream, self.chunk_bytes):
                if isinstance(data, _OverlongLine):
                    parsed = _overlong_chunk(fmt, data, line)
                else:
                    parsed = _parse_chunk(parser, data, line)
                line += parsed.lines_in
                yield parsed
            # Hash the whole file even if the gzip stream ended before the file did (e.g. zero padding).
            while hashing.read(1 << 20):
                pass
            self.sha256 = hashing.sha256.hexdigest()
        except _DECOMPRESSION_ERRORS as e:
            raise _decompression_error(fmt.name, e) from e
        except OSError as e:
            raise IngestError(f"{fmt.name}: read error: {e}") from e
        finally:
            stream.close()
            hashing.close()


def _skip_exactly(stream: io.RawIOBase | io.BufferedIOBase, n: int) -> None:
    while n > 0:
        got = stream.read(n)
        if not got:
            return
        n -= len(got)


@dataclass(frozen=True)
class _OverlongLine:
    """Stands in the stream for a line longer than _MAX_LINE_BYTES (dropped while it was read)."""

    head: bytes  # its first bytes, for the reject record
    length: int  # its length in bytes, without the LF


def _line_chunks(
    stream: io.RawIOBase | io.BufferedIOBase, chunk_bytes: int
) -> Iterator[bytes | _OverlongLine]:
    """Byte chunks of about chunk_bytes that end just after a newline (the last one may not). A line that
    grows past _MAX_LINE_BYTES before its newline is dropped as it is read (memory stays bounded) and an
    _OverlongLine takes its place, so it becomes a reject with its line number like any other bad line."""
    pending: list[bytes] = []  # the start of a line no newline has ended yet
    pending_bytes = 0
    overlong: _OverlongLine | None = None  # inside a dropped line: its head and length so far
    while True:
        data = stream.read(chunk_bytes)
        if not data:
            if overlong is not None:
                yield overlong
            elif pending:
                yield b"".join(pending)
            return
        if overlong is not None:
            cut = data.find(b"\n")
            if cut < 0:
                overlong = _OverlongLine(overlong.head, overlong.length + len(data))
                continue
            yield _OverlongLine(overlong.head, overlong.length + cut)
            overlong = None
            data = data[cut + 1 :]
            if not data:
                continue
        cut = data.rfind(b"\n")
        if cut < 0:
            pending.append(data)
            pending_bytes += len(data)
            if pending_bytes > _MAX_LINE_BYTES:
                head = b"".join(pending)[: MAX_RAW_CHARS * 4]
                overlong = _OverlongLine(head, pending_bytes)
                pending, pending_bytes = [], 0
            continue
        if pending:
            yield b"".join([*pending, data[: cut + 1]])
            pending, pending_bytes = [], 0
        else:
            yield data[: cut + 1]
        rest = data[cut + 1 :]
        if rest:
            pending, pending_bytes = [rest], len(rest)


def _overlong_chunk(fmt: SourceFormat, line: _OverlongLine, line_number: int) -> ParsedChunk:
    reason = f"line of {line.length} bytes, longer than the limit of {_MAX_LINE_BYTES} bytes: not Criteo data"
    reject = Reject(fmt.name, line_number, "line_length", reason, _raw_text(line.head))
    table = _empty_string_table(fmt.value_columns)
    return ParsedChunk(fmt.name, b"", line_number, 1, table, np.zeros(0, dtype=np.int64), [reject])


# --------------------------------------------------------------------------------------------------------
# Validation and conversion of the string columns (vectorised)
# --------------------------------------------------------------------------------------------------------


@dataclass
class TypedChunk:
    """Accepted rows of a chunk in schema types (without row_id), plus everything rejected in it."""

    table: pa.Table  # label int8, I* int32, C* uint32 (chunked as parsed)
    lines_in: int
    rejects: list[Reject]


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data bytes) of a string array as numpy views (no copy)."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets, data[offsets[0] : offsets[-1]]


def _hex8_fast(arr: pa.Array) -> pa.Array | None:
    """uint32 from a string array whose non-null values are all exactly 8 hex digits (the Criteo norm);
    None if any value is not, so the caller takes the validating path."""
    n = len(arr)
    offsets, data = _string_parts(arr)
    lengths = np.diff(offsets)
    is8 = lengths == 8
    n_valid = n - arr.null_count
    # All values are 8 chars and all nulls are empty (true for Arrow's CSV output).
    if np.count_nonzero(is8) != n_valid or len(data) != 8 * n_valid:
        return None
    # np.take is about twice as fast as fancy indexing here.
    decoded = np.take(_HEX_PAIR, data.view(np.uint16))
    if decoded.size and decoded.max() > 0xFF:
        return None
    # Four bytes per value, most significant first -> read them as big-endian uint32.
    values = decoded.astype(np.uint8).view(">u4").astype(np.uint32)
    if arr.null_count == 0:
        return pa.array(values, type=pa.uint32())
    out = np.zeros(n, dtype=np.uint32)
    out[is8] = values
    return pa.array(out, type=pa.uint32(), mask=~is8)


def _hex_fixed(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """uint32 from a fixed_size_binary(8) array (the typed parse): (values, bad-cell mask or None).
    Arrow already checked the width; here every byte must be a hex digit."""
    n = len(arr)
    pairs = np.frombuffer(arr.buffers()[1], dtype=np.uint16, count=4 * n, offset=arr.offset * 8)
    decoded = np.take(_HEX_PAIR_NUL0, pairs)
    # Four bytes per value, most significant first -> read them as big-endian uint32.
    values = decoded.astype(np.uint8).view(">u4").astype(np.uint32)
    bad = None
    if decoded.size and decoded.max() > 0xFF:
        bad = (decoded.reshape(n, 4) > 0xFF).any(axis=1)
    if arr.offset == 0:
        out = pa.Array.from_buffers(pa.uint32(), n, [arr.buffers()[0], pa.py_buffer(values)], arr.null_count)
    else:
        out = pa.array(values, type=pa.uint32(), mask=pc.is_null(arr).to_numpy(zero_copy_only=False))
    return out, bad


def _hex_checked(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Validating path: (uint32 with nulls where invalid, bad-cell mask). 1..8 hex digits, either case."""
    ok = pc.match_substring_regex(arr, _HEX_RE)
    bad = _bad_mask(ok)
    kept = pc.if_else(ok, arr, pa.scalar(None, pa.string()))
    values = pc.cast(pc.binary_join_element_wise("0x", kept, ""), pa.uint32())
    return values, bad


def _dense_fast(arr: pa.Array) -> pa.Array | None:
    """int32 via Arrow's parser, or None if any value fails (or might be hex, which Arrow would accept)."""
    _, data = _string_parts(arr)
    if np.count_nonzero((data | 0x20) == ord("x")):
        return None
    try:
        return pc.cast(arr, pa.int32())
    except pa.ArrowInvalid:
        return None


def _dense_checked(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Validating path: (int32 with nulls where invalid, bad-cell mask). ``-?[0-9]+`` within int32."""
    ok = pc.match_substring_regex(arr, _DENSE_RE)
    wide = pc.cast(pc.if_else(ok, arr, pa.scalar(None, pa.string())), pa.int64())
    in_range = pc.and_(pc.greater_equal(wide, _INT32_MIN), pc.less_equal(wide, _INT32_MAX))
    ok = pc.and_kleene(ok, in_range)
    values = pc.cast(pc.if_else(ok, wide, pa.scalar(None, pa.int64())), pa.int32())
    return values, _bad_mask(ok)


def _bad_mask(ok: pa.Array) -> np.ndarray:
    """True where a non-null cell failed its check (null cells are missing values, which are fine)."""
    return ~np.asarray(pc.fill_null(ok, True).to_numpy(zero_copy_only=False), dtype=bool)


_LABEL_VALUES = pa.array(["0", "1"])


def _label_column(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    ok = pc.is_in(col, value_set=_LABEL_VALUES)  # null -> False: a labelled row needs its label
    if pc.all(ok).as_py() is not False:  # None for an empty chunk
        return pc.cast(col, pa.int8()), None
    bad = ~np.asarray(ok.to_numpy(), dtype=bool)
    return pc.cast(pc.if_else(ok, col, pa.scalar(None, pa.string())), pa.int8()), bad


def _cell_text(column: pa.ChunkedArray, row: int) -> str | None:
    # Via binary: the cell may not be valid UTF-8 (we parse with check_utf8=False).
    value = column.cast(pa.binary())[row].as_py()
    return None if value is None else value.decode("utf-8", errors="replace")


def _reason(column: str, value: str | None) -> str:
    """Why one cell was rejected (called only for rejected rows)."""
    shown = repr(value[:40] + "..." if value is not None and len(value) > 40 else value)
    if column == LABEL_COLUMN:
        return "label is empty, expected 0 or 1" if value is None else f"label must be 0 or 1, got {shown}"
    if column in DENSE_COLUMNS:
        if value is not None and pc.match_substring_regex(pa.array([value]), _DENSE_RE_LOOSE)[0].as_py():
            return f"{column}: integer {shown} outside the int32 range"
        return f"{column}: not an integer: {shown}"
    if value is not None and pc.match_substring_regex(pa.array([value]), _HEX_RE_LOOSE)[0].as_py():
        return f"{column}: {len(value)} hex digits, at most {MAX_HEX_DIGITS} allowed: {shown}"
    return f"{column}: not a hex string of 1-{MAX_HEX_DIGITS} digits: {shown}"


def convert_chunk(parsed: ParsedChunk, labelled: bool) -> TypedChunk:
    """Validate and convert one parsed chunk to schema types; invalid rows become rejects."""
    table = parsed.table
    n = table.num_rows
    columns: dict[str, pa.ChunkedArray] = {}
    bad_cells: dict[str, np.ndarray] = {}

    if labelled:
        label, bad = _label_column(table.column(LABEL_COLUMN))
        columns[LABEL_COLUMN] = label
        if bad is not None:
            bad_cells[LABEL_COLUMN] = bad
    else:
        columns[LABEL_COLUMN] = pa.chunked_array([pa.nulls(n, type=pa.int8())])

    for name in (*DENSE_COLUMNS, *SPARSE_COLUMNS):
        col = table.column(name)
        if col.type == pa.int32():  # typed parse: Arrow converted and range-checked it
            columns[name] = col
            continue
        if pa.types.is_fixed_size_binary(col.type):  # typed parse: 8 bytes each, decode + check digits
            parts = [_hex_fixed(chunk) for chunk in col.chunks]
            columns[name] = pa.chunked_array([values for values, _ in parts], type=pa.uint32())
            if any(bad is not None for _, bad in parts):
                bad_cells[name] = np.concatenate(
                    [np.zeros(len(v), dtype=bool) if bad is None else bad for v, bad in parts]
                )
            continue
        # String path (chunks with unusual content): rare, so one combined array keeps it simple.
        arr = col.combine_chunks() if n else pa.array([], pa.string())
        is_dense = name in DENSE_COLUMNS
        fast = _dense_fast(arr) if is_dense else _hex8_fast(arr)
        if fast is not None:
            columns[name] = pa.chunked_array([fast])
            continue
        values, bad = _dense_checked(arr) if is_dense else _hex_checked(arr)
        columns[name] = pa.chunked_array([values])
        if bad.any():
            bad_cells[name] = bad

    typed = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    rejects = list(parsed.rejects)
    if bad_cells:
        bad_rows = np.zeros(n, dtype=bool)
        for mask in bad_cells.values():
            bad_rows |= mask
        for row in np.flatnonzero(bad_rows):
            column = next(c for c, mask in bad_cells.items() if mask[row])
            kind = (
                "label" if column == LABEL_COLUMN else "dense" if column in DENSE_COLUMNS else "categorical"
            )
            reason = _reason(column, _cell_text(table.column(column), int(row)))
            line = parsed.line_number(int(row))
            rejects.append(Reject(parsed.source, line, kind, reason, parsed.raw_line(int(row))))
        typed = typed.filter(pa.array(~bad_rows))
        # Shape rejects and value rejects interleave by line in rejects.jsonl.
        rejects.sort(key=lambda r: r.line)
    return TypedChunk(typed, parsed.lines_in, rejects)
