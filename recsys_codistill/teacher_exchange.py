"""Exchange of models between co-distilling groups through versioned DCP directories.

Layout (``codistill.exchange_dir``, default ``<run_dir>/exchange``; any path DCP's filesystem writer
takes)::

    group0/step_00000050/           complete version: DCP files + manifest.json (written last)
    group0/.tmp-step_00000100/      being written: never read
    group0/checkpoint.json          this group's latest training checkpoint step (keeps GC from deleting
                                    versions a restarted group will need again)

Publishing: every rank writes its shards into the temp dir (``dcp.save`` is collective within the group's
world), rank 0 then hashes the files into ``manifest.json`` (step, sha256 per file, plan), fsyncs and
renames. A reader only trusts directories whose manifest is present and whose files match it, so a torn or
partial version is never loaded; it falls back to the previous complete one.

Which version a group uses at step ``s`` (after burn-in):
- ``lockstep``: the peer's version ``s - s % K``, waiting for it: runs are exactly reproducible.
- ``async``: the freshest complete version, waiting only when it is older than ``max_staleness_steps``.
Rank 0 decides and broadcasts, so all ranks of a group load the same version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recsys_codistill.checkpoint import broadcast_from_rank0, model_state_dict
from recsys_codistill.config import RunConfig

_PREFIX = "step_"
_POLL_S = 0.05


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def version_dir(root: Path, group: int, step: int) -> Path:
    return root / f"group{group}" / f"{_PREFIX}{step:08d}"


def is_complete(path: Path, verify_checksums: bool = True) -> bool:
    """A version is complete iff its manifest exists and every file it lists is there, intact."""
    manifest = path / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        for name, info in meta["files"].items():
            f = path / name
            if f.stat().st_size != info["bytes"]:
                return False
            if verify_checksums and _sha256(f) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def complete_versions(root: Path, group: int, verify_checksums: bool = False) -> list[int]:
    d = root / f"group{group}"
    if not d.is_dir():
        return []
    steps = []
    for p in d.iterdir():
        if p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit() and is_complete(p, verify_checksums):
            steps.append(int(p.name[len(_PREFIX) :]))
    return sorted(steps)


def publish(root: Path, group: int, step: int, model: nn.Module, plan_text: str = "") -> Path:
    """Collective within the group: write ``model`` as version ``step`` atomically."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = version_dir(root, group, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model_state_dict(model)}, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        files = {}
        for f in sorted(tmp.iterdir()):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        manifest = {"step": step, "group": group, "files": files, "plan": plan_text}
        with (tmp / "manifest.json").open("w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a restarted group re-publishing a version it already wrote
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    if dist.is_initialized():
        dist.barrier()
    return final


class TeacherExchange:
    """Publishes this group's model and serves the peers' stale copies as frozen teachers."""

    def __init__(self, cfg: RunConfig, group: int, ctx: Any, make_teacher: Callable[[], nn.Module]) -> None:
        self.cfg = cfg.codistill
        self.group = group
        self.ctx = ctx
        self.root = Path(self.cfg.exchange_dir or Path(cfg.run_dir) / "exchange")
        self.peers = [g for g in range(self.cfg.num_groups) if g != group]
        self.teachers: dict[int, nn.Module] = {}
        self.loaded: dict[int, int] = {}
        self.load_seconds = 0.0
        self.publish_seconds = 0.0
        self.bytes_published = 0
        self.wait_seconds = 0.0
        (self.root / f"group{group}").mkdir(parents=True, exist_ok=True)
        # Frozen copies with the student's plan, built up front (outside no_grad: DMP's fused kernels
        # are set up through autograd hooks). Their weights come from the first loaded version.
        for peer in self.peers:
            teacher = make_teacher()
            teacher.eval()
            for p in teacher.parameters():
                if p.is_leaf:  # fused tables expose non-leaf views; they only run under no_grad anyway
                    p.requires_grad_(False)
            self.teachers[peer] = teacher

    # -- choosing and loading teachers -------------------------------------------------------------------
    def _find(self, peer: int, step: int) -> int | None:
        """Rank 0: the peer version to use at ``step`` if it is there now, else None."""
        versions = complete_versions(self.root, peer)
        if self.cfg.exchange_mode == "lockstep":
            target = step - step % self.cfg.exchange_every
            return target if target in versions else None
        # async: the freshest complete version, whoever is ahead; wait only when it is too stale.
        if versions and step - versions[-1] <= self.cfg.max_staleness_steps:
            return versions[-1]
        return None

    def _wanted(self, peer: int, step: int) -> int:
        """Collective: poll until the wanted version exists. Every poll is one short broadcast from rank 0,
        so no rank sits in a long collective (which would hit the process group's timeout), and a peer
        that never delivers ends in a clear error instead of a silent hang."""
        t0 = time.perf_counter()
        while True:
            target = broadcast_from_rank0(self._find(peer, step) if self.ctx.rank == 0 else None)
            if target is not None:
                break
            waited = time.perf_counter() - t0
            if waited > self.cfg.wait_timeout_s:
                raise RuntimeError(
                    f"group {self.group} waited {waited:.0f}s at step {step} for a teacher version of group {peer} "
                    f"under {self.root / f'group{peer}'} ({self.cfg.exchange_mode}); is group {peer} running? "
                    "(codistill.wait_timeout_s)"
                )
            time.sleep(_POLL_S)
        self.wait_seconds += time.perf_counter() - t0
        return target

    def _refresh(self, step: int) -> None:
        for peer in self.peers:
            if self.cfg.exchange_mode == "lockstep" and self.loaded.get(peer) == step - step % self.cfg.exchange_every:
                continue  # lockstep: nothing new can be wanted before the next multiple of K
            target = self._wanted(peer, step)
            if self.loaded.get(peer) == target:
                continue
            path = version_dir(self.root, peer, target)
            if self.ctx.rank == 0 and not is_complete(path, verify_checksums=True):
                raise RuntimeError(f"teacher version {path} failed its checksum after being listed complete")
            t0 = time.perf_counter()
            teacher = self.teachers[peer]
            state = {"model": teacher.state_dict()}
            dcp.load(state, checkpoint_id=str(path))
            teacher.load_state_dict(state["model"])
            self.load_seconds += time.perf_counter() - t0
            self.loaded[peer] = target

    @torch.no_grad()
    def teacher_logits(self, batch: Any, step: int) -> list[torch.Tensor] | None:
        """The peers' logits on this batch, or None during burn-in / with w = 0."""
        if step < self.cfg.burn_in_steps or self.cfg.distill_weight == 0.0:
            return None
        self._refresh(step)
        return [self.teachers[p](batch.dense_features, batch.sparse_features).float() for p in self.peers]

    # -- publishing --------------------------------------------------------------------------------------
    def _useful(self, version: int) -> bool:
        # A version v serves steps [v, v + K); none of them needs a teacher if all are still burn-in.
        return self.cfg.distill_weight > 0 and version + self.cfg.exchange_every > self.cfg.burn_in_steps

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.cfg.exchange_every == 0 and self._useful(step):
            self.publish(model, step)

    def publish(self, model: nn.Module, step: int) -> None:
        t0 = time.perf_counter()
        path = publish(self.root, self.group, step, model)
        self.publish_seconds += time.perf_counter() - t0
        if self.ctx.rank == 0:
            self.bytes_published += sum(f.stat().st_size for f in path.iterdir())
            self._gc()

    def start(self, model: nn.Module, step: int) -> None:
        """Publish the version peers need right at ``step`` (0 at a fresh start; after a resume, the
        version of the resumed step if it is a multiple of K)."""
        version = step - step % self.cfg.exchange_every
        exists = broadcast_from_rank0(version_dir(self.root, self.group, step).exists() if self.ctx.rank == 0 else None)
        if self._useful(version) and version == step and not exists:
            self.publish(model, step)

    def note_checkpoint(self, step: int) -> None:
        if self.ctx.rank == 0:
            (self.root / f"group{self.group}" / "checkpoint.json").write_text(json.dumps({"step": step}))

    def _gc(self) -> None:
        versions = complete_versions(self.root, self.group)
        keep = set(versions[-self.cfg.keep_versions :])
        # A peer that resumes from its last checkpoint replays from there and needs our versions again.
        floors = [self._peer_checkpoint(p) for p in self.peers]
        if floors and None not in floors:
            floor = min(f for f in floors if f is not None)
            keep |= {v for v in versions if v >= floor - self.cfg.exchange_every}
        for v in versions:
            if v not in keep:
                shutil.rmtree(version_dir(self.root, self.group, v), ignore_errors=True)

    def _peer_checkpoint(self, peer: int) -> int | None:
        """The peer's latest checkpoint step, or None if it keeps none (then it cannot replay anyway)."""
        try:
            return int(json.loads((self.root / f"group{peer}" / "checkpoint.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return None

    def status(self, step: int) -> dict[str, Any]:
        if not self.loaded:
            return {"teacher_step": None, "staleness": None}
        oldest = min(self.loaded.values())
        return {
            "teacher_step": oldest,
            "staleness": step - oldest,
            "exchange_wait_s": round(self.wait_seconds, 3),
            "exchange_load_s": round(self.load_seconds, 3),
            "exchange_publish_s": round(self.publish_seconds, 3),
            "exchange_bytes": self.bytes_published,
        }
