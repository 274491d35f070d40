"""Atomic, verified directories: the one protocol behind checkpoints and exchanged teacher versions.

Writing ``final`` (collective within a process group; rank 0 does the filesystem work)::

    final.parent/.tmp-<final.name>/     created by rank 0 with a partial marker (proof that we made it)
        ... every rank writes its files (DCP shards, per-rank state) ...
        manifest.json                   written last by rank 0: created_by, kind, the caller's fields
                                        (step, group, ...) and every other file's size and sha256
    rename .tmp-<name> -> <name>        so a reader sees either nothing or a complete directory

Reading: :func:`verify` trusts a directory only if its manifest parses, was written by this project for
this ``kind`` and these fields (a version of group 1 at step 50 cannot pose as another), lists plain file
names (no path separators, no ``..``), lists exactly the files the directory holds, and every size and
checksum matches. Anything else is :class:`DamagedDirectory`, with the reason.

Deleting: :func:`remove_owned` removes a directory only when it proves the project made it (a manifest or
a partial marker of the expected kind); nothing else is ever deleted by the project.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recsys_codistill import dist

MANIFEST = "manifest.json"
PARTIAL = ".recsys-codistill-partial"
CREATED_BY = "recsys-codistill"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


class DamagedDirectory(ValueError):
    """A directory that must not be loaded: torn, tampered with, or not what it claims to be."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_durably(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest, or None when there is none or it is not JSON."""
    try:
        meta = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def owned(directory: Path, kind: str) -> bool:
    """Whether ``directory`` proves the project made it as a ``kind`` (a manifest or a partial marker)."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    meta = read_manifest(directory)
    if meta is not None and meta.get("created_by") == CREATED_BY and meta.get("kind") == kind:
        return True
    try:
        marker = json.loads((directory / PARTIAL).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("created_by") == CREATED_BY and marker.get("kind") == kind


def remove_owned(directory: Path, kind: str) -> bool:
    """Delete ``directory`` if (and only if) the project provably created it as a ``kind``."""
    if not owned(directory, kind):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def verify(
    directory: Path, kind: str, expect: Mapping[str, Any] | None = None, checksums: bool = True
) -> dict:
    """The manifest of a complete, intact ``kind`` directory; raises DamagedDirectory otherwise."""
    if directory.is_symlink() or not directory.is_dir():
        raise DamagedDirectory(f"{directory}: not a directory")
    meta = read_manifest(directory)
    if meta is None:
        raise DamagedDirectory(
            f"{directory}: no readable {MANIFEST} (torn write or not written by this tool)"
        )
    if meta.get("created_by") != CREATED_BY or meta.get("kind") != kind:
        raise DamagedDirectory(
            f"{directory}: {MANIFEST} is not a {CREATED_BY} {kind} manifest "
            f"(created_by={meta.get('created_by')!r}, kind={meta.get('kind')!r})"
        )
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise DamagedDirectory(
                f"{directory}: {MANIFEST} says {key}={meta.get(key)!r}, expected {value!r}"
            )
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise DamagedDirectory(f"{directory}: {MANIFEST} lists no files")
    for name in files:
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise DamagedDirectory(f"{directory}: {MANIFEST} lists {name!r}, which is not a plain file name")
    try:
        present = {p.name for p in directory.iterdir()} - {MANIFEST}
    except OSError as e:  # removed while we looked (a peer's GC, pruning): not loadable, not a crash
        raise DamagedDirectory(f"{directory}: cannot be listed ({e})") from e
    if present != set(files):
        missing, extra = sorted(set(files) - present), sorted(present - set(files))
        raise DamagedDirectory(
            f"{directory}: files differ from {MANIFEST} (missing {missing}, unlisted {extra})"
        )
    for name, info in files.items():
        path = directory / name
        try:
            if path.is_symlink() or not path.is_file():
                raise DamagedDirectory(f"{path}: not a regular file")
            if path.stat().st_size != info["bytes"]:
                raise DamagedDirectory(
                    f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {info['bytes']}"
                )
            if checksums and sha256_file(path) != info["sha256"]:
                raise DamagedDirectory(f"{path}: sha256 differs from {MANIFEST} (damaged or changed)")
        except (OSError, KeyError, TypeError) as e:
            raise DamagedDirectory(f"{path}: cannot be checked against {MANIFEST} ({e})") from e
    return meta


def is_complete(
    directory: Path, kind: str, expect: Mapping[str, Any] | None = None, checksums: bool = True
) -> bool:
    try:
        verify(directory, kind, expect, checksums)
    except DamagedDirectory:
        return False
    return True


def write_manifest(directory: Path, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """fsync every file of ``directory`` and write its manifest (sizes, sha256) durably, last."""
    files = {}
    for f in sorted(directory.iterdir()):
        if f.name in (PARTIAL, MANIFEST):
            continue
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"created_by": CREATED_BY, "kind": kind, **fields, "files": files}
    _write_json_durably(directory / MANIFEST, manifest)
    return manifest


def tmp_dir(final: Path) -> Path:
    return final.with_name(TMP_PREFIX + final.name)


def begin(final: Path, kind: str) -> Path:
    """Rank 0: a fresh, marked temp dir for ``final`` (a stale one of ours, from a killed write, goes)."""
    tmp = tmp_dir(final)
    if tmp.exists() or tmp.is_symlink():
        if not remove_owned(tmp, kind) and (tmp.is_symlink() or not tmp.is_dir() or any(tmp.iterdir())):
            raise FileExistsError(f"{tmp} exists and was not made by {CREATED_BY}; refusing to overwrite it")
        if tmp.is_dir():
            tmp.rmdir()
    tmp.mkdir(parents=True)
    (tmp / PARTIAL).write_text(json.dumps({"created_by": CREATED_BY, "kind": kind}))
    return tmp


def commit(tmp: Path, final: Path, kind: str, fields: Mapping[str, Any], *, replace: bool) -> Path:
    """Rank 0: fsync the files, write the manifest last, rename into place.

    An existing ``final`` is kept when ``replace`` is false and it verifies (a restarted writer
    re-publishing what it already wrote); otherwise it is swapped out, never leaving a moment without a
    complete directory of this name, and removed.
    """
    write_manifest(tmp, kind, fields)
    (tmp / PARTIAL).unlink(missing_ok=True)  # the manifest now proves ownership
    fsync_dir(tmp)
    if final.exists() or final.is_symlink():
        if not replace and is_complete(final, kind, fields):
            remove_owned(tmp, kind)
            return final
        if not owned(final, kind) and not (final.is_dir() and not any(final.iterdir())):
            # Not provably ours (say, its manifest was lost): never deleted, only moved out of the way.
            aside = final.with_name(f".damaged-{final.name}-{secrets.token_hex(4)}")
            final.rename(aside)
            print(
                f"recsys-codistill: warning: moved {final} aside to {aside} (no valid manifest)",
                file=sys.stderr,
            )
        if final.exists() and owned(final, kind) and _swap(tmp, final):
            remove_owned(tmp, kind)  # one atomic step: `final` is the new directory, `tmp` holds the old
        else:
            # Two renames where an atomic swap is not available. A crash between them leaves only
            # `.old-<name>`, which restore_interrupted() (run by every listing) moves back.
            old = final.with_name(OLD_PREFIX + final.name)
            if old.exists():
                remove_owned(old, kind)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            if old.exists() and not remove_owned(old, kind):
                old.rmdir()  # the empty directory that stood in the way
    else:
        tmp.rename(final)
    fsync_dir(final.parent)
    return final


def _swap(a: Path, b: Path) -> bool:
    """Exchange two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the kernel, libc or filesystem does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def restore_interrupted(parent: Path, kind: str) -> list[Path]:
    """Move back every ``.old-<name>`` of ours whose ``<name>`` is missing: a replacement interrupted
    between its two renames (see :func:`commit`). Returns the restored directories."""
    restored = []
    if not parent.is_dir():
        return restored
    for old in parent.glob(OLD_PREFIX + "*"):
        final = old.with_name(old.name[len(OLD_PREFIX) :])
        if not final.exists() and not final.is_symlink() and owned(old, kind):
            old.rename(final)
            restored.append(final)
    return restored


def write_collectively(
    final: Path, kind: str, fields: Mapping[str, Any], write: Callable[[Path], None], *, replace: bool
) -> Path:
    """Collective: every rank calls ``write(tmp)`` into one temp dir; rank 0 commits it as ``final``."""
    is_main = dist.rank() == 0
    tmp = tmp_dir(final)
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        begin(final, kind)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if is_main:
        commit(tmp, final, kind, fields, replace=replace)
    dist.barrier()
    return final


def _resolved(path: str | Path) -> Path:
    # realpath resolves symlinks component by component, as the kernel does; abspath first would apply
    # ``..`` textually (``link/../x`` is not ``./x`` when ``link`` points elsewhere).
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_not_protected(path: str | Path, what: str, protected: Mapping[str, str | Path]) -> Path:
    """Raise ValueError if ``path`` is a filesystem root, the home or working directory, or equals or
    contains any of ``protected`` (name -> path: inputs, the run directory, data directories). Applied to
    every directory the project may delete entries of, before anything is deleted."""
    p = _resolved(path)
    guards = {"the filesystem root": Path(p.anchor or "/"), "the working directory": Path.cwd().resolve()}
    home = os.path.expanduser("~")
    if home != "~":
        guards["the home directory"] = Path(home).resolve()
    guards.update({name: _resolved(q) for name, q in protected.items() if q})
    for name, q in guards.items():
        if p == q or p in q.parents:
            relation = "is" if p == q else "contains"
            raise ValueError(
                f"{what} = {path} {relation} {name} ({q}); refusing to use it (it may be cleaned)"
            )
    return p
