"""The one way the project reads and writes ``torch.distributed.checkpoint`` (DCP) directories.

Why not plain ``dcp.load``: torch's ``FileSystemReader.read_metadata`` decodes ``.metadata`` with a plain
``pickle.load`` (upstream issue pytorch/pytorch#189308), and ``DefaultLoadPlanner.load_bytes`` decodes
every non-tensor item with ``torch.load(weights_only=False)``; either runs arbitrary code planted in a
checkpoint or a teacher version. Here:

- ``.metadata`` goes through :class:`MetadataUnpickler`, which resolves only DCP's own metadata classes,
  ``torch.Size``, dtypes and layouts, and ``pathlib`` paths; any other global is refused with
  :class:`UnsafeCheckpointError` before anything is called.
- byte items go through ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts).
- tensor items were already read with ``weights_only=True`` by torch.

Writing stays DCP's own ``dcp.save`` (what it writes is read back through the checks above).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem


class UnsafeCheckpointError(RuntimeError):
    """A DCP directory holds something that would execute code (or is not DCP metadata at all)."""


_METADATA_CLASSES = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "StorageMeta",
    "MetadataIndex",
    "_MEM_FORMAT_ENCODING",
}
_ALLOWED: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n) for n in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a lookup of torch.layout
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"): PurePosixPath,
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global outside an allow-list (nothing else is ever called)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: the DCP metadata references {module}.{name}, which is not a "
            "DCP metadata class (a checkpoint written by torch.distributed.checkpoint never does; the file "
            "may have been crafted to run code)"
        )


def read_metadata_file(path: Path) -> Metadata:
    """Decode one ``.metadata`` file with the restricted unpickler."""
    try:
        with path.open("rb") as f:
            meta = MetadataUnpickler(f, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbage bytes: a damaged checkpoint, not a crash
        raise UnsafeCheckpointError(f"{path}: not readable as DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(meta).__name__}, not DCP Metadata")
    return meta


def check_storage_paths(meta: Metadata, directory: Path) -> None:
    """Every file the metadata points the reader at must be a plain name inside ``directory`` (DCP joins
    ``relative_path`` to the checkpoint path: ``../x`` would read outside it)."""
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel in ("", ".", "..") or "/" in rel or "\\" in rel:
            raise UnsafeCheckpointError(
                f"{directory}/.metadata: refused to load: a storage item points at {rel!r}, not a file of "
                "the checkpoint directory"
            )
        if not (directory / rel).is_file():
            raise UnsafeCheckpointError(
                f"{directory}/.metadata: refused to load: {rel!r} is not in {directory}"
            )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is decoded by :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(Path(self._get_metadata_path(rank)))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that decodes byte items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refused to load item {read_item.dest_index.fqn!r}: not plain weights ({e})"
            ) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict[str, Any], path: str | Path, *, single_process: bool = False) -> None:
    """``dcp.load(state, path)`` in place, with the restricted decoders above. ``single_process`` silences
    DCP's "no process group: loading in one process" warning where that is the intent (predict)."""
    # Checked here first so that a refusal is one clear error, not DCP's per-rank fallback noise; the
    # reader checks again (it is what DCP actually calls).
    check_storage_paths(read_metadata_file(Path(path) / ".metadata"), Path(path))
    reader = SafeFileSystemReader(str(path))
    try:
        with warnings.catch_warnings():
            if single_process:
                warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        # DCP wraps every rank's error; a refusal must surface as itself.
        for failure in getattr(e, "failures", {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, UnsafeCheckpointError):
                raise inner from e
        raise


def save(state: dict[str, Any], path: str | Path) -> None:
    """``dcp.save`` (collective within the current process group)."""
    dcp.save(state, checkpoint_id=str(path))
