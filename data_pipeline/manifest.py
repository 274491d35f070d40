"""The one reader of a data set's ``manifest.json`` (torch-free: evaluation and the study use it too).

``{"files": [{"path", "rows"}, ...], ...}`` with paths relative to the data directory; a manifest is data,
so an entry that could name a file outside its directory is refused.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Any

MANIFEST = "manifest.json"


class DatasetError(ValueError):
    """The data directory, its manifest or one of its Parquet files is missing or malformed."""


class MissingDataset(DatasetError, FileNotFoundError):
    """No data set there at all (no manifest.json)."""


def load_manifest(data_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(manifest path, the whole manifest) of an ingested data directory, its ``files`` entries checked to
    have ``path`` and ``rows`` and to name a file inside ``data_dir`` (see :func:`check_manifest_entry`)."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise MissingDataset(
            f"{path}: no manifest.json in data directory {data_dir} (run the ingester first)"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, list):
            raise TypeError(f"'files' is a {type(files).__name__}, not a list")
        for f in files:
            if not isinstance(f["path"], str) or not isinstance(f["rows"], int):
                raise TypeError(f"bad entry {f!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{path}: malformed manifest ({e}); expected {{'files': [{{'path', 'rows'}}]}}"
        ) from e
    for f in files:
        check_manifest_entry(path, f["path"])
    return path, manifest


def read_manifest(data_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """(manifest path, its checked ``files`` entries): :func:`load_manifest` for readers of the files."""
    path, manifest = load_manifest(data_dir)
    return path, manifest["files"]


def data_files(data_dir: str | Path) -> list[Path]:
    """The Parquet files of a data set, in manifest order (time order for Criteo)."""
    return [Path(data_dir) / f["path"] for f in read_manifest(data_dir)[1]]


def check_manifest_entry(manifest_path: Path, entry: str) -> None:
    """Refuse a manifest ``path`` that could name a file outside the manifest's directory: absolute (also
    Windows-style), with a ``..``, empty or ``.`` component, or a backslash. A data directory is trusted
    only for what is inside it; a manifest is data, and must not make the loader read ``/etc/passwd`` or
    a sibling's files. Relative paths with ``/`` inside the directory (``train/part-00000.parquet``, as a
    split data set's top manifest lists them) are fine."""
    why = None
    if not entry:
        why = "is empty"
    elif entry.startswith("/") or PureWindowsPath(entry).anchor:
        why = "is an absolute path"
    elif "\\" in entry:
        why = "contains a backslash"
    elif any(part in ("", ".", "..") for part in entry.split("/")):
        why = "has an empty, '.' or '..' component"
    if why:
        raise DatasetError(
            f"{manifest_path}: files entry {entry!r} {why}; expected a relative path inside "
            f"{manifest_path.parent} such as 'part-00000.parquet'"
        )
