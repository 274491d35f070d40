"""Exchange of models between co-distilling groups through versioned DCP directories.

Layout (``codistill.exchange_dir``, default ``<run_dir>/exchange``; any path DCP's filesystem writer
takes)::

    .recsys-codistill-exchange      marker: this directory was made by this project for a run
    group0/step_00000050/           complete version: DCP files + manifest.json (written last)
    group0/.tmp-step_00000100/      being written: never read
    group0/checkpoint.json          this group's latest training checkpoint step (keeps GC from deleting
                                    versions a restarted group will need again)

Publishing follows :mod:`recsys_codistill.atomic`: every rank writes its shards into the temp dir
(``dcp.save`` is collective within the group's world), rank 0 then writes ``manifest.json`` (group, step,
sha256 per file, plan), fsyncs and renames. A reader trusts a version only if its manifest names this group
and step and lists exactly the directory's files, intact; it is loaded through :mod:`recsys_codistill.dcp_io`
(no code in it can run). A torn version is never listed; a damaged one is skipped (async: the previous
intact version serves; lockstep: a clear error, since exactly that version is needed). A restarted group
re-publishes any version that is missing or damaged.

Which version a group uses at step ``s`` (after burn-in):
- ``lockstep``: the peer's version ``s - s % K``, waiting for it: runs are exactly reproducible.
- ``async``: the freshest complete version, waiting only when it is older than ``max_staleness_steps``.
Rank 0 decides and broadcasts, so all ranks of a group load the same version.

Cleaning removes only versions whose manifest (or partial marker) proves this project wrote them, under a
root that carries the marker; the root itself is never removed while anything else is in it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from recsys_codistill import atomic, dcp_io, dist
from recsys_codistill.config import CodistillConfig
from recsys_codistill.train.checkpoint import model_state_dict

KIND = "teacher_version"
ROOT_MARKER = ".recsys-codistill-exchange"
_GROUP_PREFIX = "group"
_PREFIX = "step_"
_POLL_S = 0.05
_CHECKPOINT_NOTE = "checkpoint.json"


class TeacherSource(Protocol):
    """What the Trainer asks of a teacher (peers of a codistillation run, a fixed checkpoint, ...).

    Every hook is called on every rank of the group, in this order: ``start`` once before the loop, then per
    step ``logits`` (inside the step), ``after_step``, ``metrics`` (at log lines) and ``on_checkpoint``
    (after each periodic checkpoint). Teacher logits carry no gradient.
    """

    #: the loss term's log name, weight and ψ (``ce`` / ``kl`` / ``mse_logits``)
    name: str
    weight: float
    loss: str

    def start(self, model: nn.Module, step: int) -> None: ...

    def wants(self, step: int) -> bool:
        """Whether ``logits`` will run a teacher at ``step`` (so the trainer draws teacher rows only then)."""
        ...

    def logits(self, batch: Any, step: int) -> list[torch.Tensor]:
        """Teacher logits on this batch (one per teacher); empty when none applies at ``step``."""
        ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def on_checkpoint(self, step: int) -> None: ...

    def metrics(self, step: int) -> dict[str, Any]: ...


def group_dir(root: Path, group: int) -> Path:
    """One group's versions under an exchange root (this module owns the exchange layout)."""
    return root / f"{_GROUP_PREFIX}{group}"


def version_dir(root: Path, group: int, step: int) -> Path:
    return group_dir(root, group) / f"{_PREFIX}{step:08d}"


def verify_version(path: Path, group: int, step: int, verify_checksums: bool = True) -> dict[str, Any]:
    """The manifest of an intact version ``step`` of ``group``; raises atomic.DamagedDirectory otherwise
    (the manifest must list exactly the directory's files, by plain name, and name this group and step)."""
    return atomic.verify(path, KIND, {"step": step, "group": group}, checksums=verify_checksums)


def is_complete(path: Path, verify_checksums: bool = True) -> bool:
    """A version is complete iff its manifest verifies for the group and step its path names."""
    try:
        group = int(path.parent.name.removeprefix(_GROUP_PREFIX))
        step = int(path.name.removeprefix(_PREFIX))
        verify_version(path, group, step, verify_checksums)
    except (ValueError, atomic.DamagedDirectory):
        return False
    return True


def complete_versions(root: Path, group: int, verify_checksums: bool = False) -> list[int]:
    d = group_dir(root, group)
    if not d.is_dir():
        return []
    steps = []
    for p in d.iterdir():
        if (
            p.name.startswith(_PREFIX)
            and p.name[len(_PREFIX) :].isdigit()
            and is_complete(p, verify_checksums)
        ):
            steps.append(int(p.name[len(_PREFIX) :]))
    return sorted(steps)


def _tables_in(sd: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The state dict with its sharded (embedding table) tensors in ``dtype``, local shards converted in
    place of their fp32 originals; replicated (dense) tensors stay fp32. Collective within the group."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    out: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, ShardedTensor) and v.dtype != dtype:
            shards = [Shard(s.tensor.detach().to(dtype), s.metadata) for s in v.local_shards()]
            v = ShardedTensor._init_from_local_shards(shards, v.size())
        out[k] = v
    return out


def publish(
    root: Path, group: int, step: int, model: nn.Module, plan_text: str = "", tables: str = "fp32"
) -> Path:
    """Collective within the group: write ``model`` as version ``step`` atomically, its embedding tables in
    ``tables`` precision (``fp16`` halves the bytes; readers load it into fp32 or quantized copies, DCP
    casting). An intact version of this step already there (a restarted group re-publishing) is kept; a
    damaged one is replaced."""
    sd = model_state_dict(model)
    if tables == "fp16":
        sd = _tables_in(sd, torch.float16)
    elif tables != "fp32":
        raise ValueError(f"exchange table precision {tables!r}: expected fp32 or fp16")
    state = {"model": sd}
    return atomic.write_collectively(
        version_dir(root, group, step),
        KIND,
        {"step": step, "group": group, "plan": plan_text, "tables": tables},
        lambda tmp: dcp_io.save(state, tmp),
        replace=False,
    )


def _owner_record(run_dir: str | Path) -> dict[str, str]:
    return {"created_by": atomic.CREATED_BY, "run_dir": str(Path(run_dir).resolve())}


def _inside(root: Path, run_dir: str | Path) -> bool:
    """An exchange root inside its run directory belongs to it wherever the directory was moved (the run
    lock already keeps a second launch out)."""
    return Path(run_dir).resolve() in Path(root).resolve().parents


def root_owner(root: Path) -> str | None:
    """The run directory recorded in an exchange root's marker (None without a readable marker)."""
    try:
        return str(json.loads((root / ROOT_MARKER).read_text())["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim_root(root: Path, run_dir: str | Path) -> None:
    """Launcher: make ``root`` an exchange directory of this run, or refuse. An existing directory is taken
    only if it is empty or carries this project's exchange marker; anything else may hold a user's files."""
    marker = root / ROOT_MARKER
    if root.exists() and not marker.is_file():
        if not root.is_dir() or any(root.iterdir()):
            raise ValueError(
                f"codistill.exchange_dir = {root} exists and is not an exchange directory made by "
                f"{atomic.CREATED_BY} (no {ROOT_MARKER}); choose a new or empty directory"
            )
    owner = root_owner(root)
    if owner is not None and owner != _owner_record(run_dir)["run_dir"] and not _inside(root, run_dir):
        # Two runs in one exchange root would clear and serve each other's versions.
        raise ValueError(
            f"codistill.exchange_dir = {root} belongs to the run {owner}; every run needs its own "
            "exchange directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    if owner != _owner_record(run_dir)["run_dir"]:  # new, or inside a run directory that was moved
        marker.write_text(json.dumps(_owner_record(run_dir)))


def clear_versions(root: Path, num_groups: int) -> list[Path]:
    """Remove the versions (and temp dirs, and checkpoint notes) this project wrote under an exchange
    root it marked; nothing else. Returns what was removed. Empty group dirs and the root go too."""
    removed: list[Path] = []
    if not (root / ROOT_MARKER).is_file():
        return removed
    for g in range(num_groups):
        d = group_dir(root, g)
        if not d.is_dir() or d.is_symlink():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith((_PREFIX, atomic.TMP_PREFIX + _PREFIX, atomic.OLD_PREFIX + _PREFIX)):
                if atomic.remove_owned(p, KIND):
                    removed.append(p)
        for note in (d / _CHECKPOINT_NOTE, d / (_CHECKPOINT_NOTE + ".tmp")):
            if note.is_file() and not note.is_symlink():
                note.unlink()
        _rmdir_if_empty(d)
    if {p.name for p in root.iterdir()} == {ROOT_MARKER}:
        (root / ROOT_MARKER).unlink()
        _rmdir_if_empty(root)
    return removed


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass  # not empty: something we did not make stays


class PeerExchange:
    """The peers of a codistillation run as a :class:`TeacherSource`: publishes this group's model every K
    steps and serves the peers' stale copies as frozen teachers."""

    def __init__(
        self,
        cfg: CodistillConfig,
        root: Path,
        group: int,
        ctx: Any,
        make_teacher: Callable[[], Any],
        tables: str = "fp32",
    ) -> None:
        self.cfg = cfg
        # precision of the tables this group publishes (fp16 when the peers' copies are fp16 / int8 anyway)
        self.tables = tables
        # as a TeacherSource term: w · ψ(p̄ of the peers, z), logged as "distill"
        self.name, self.weight, self.loss = "distill", cfg.distill_weight, cfg.loss
        self.group = group
        self.ctx = ctx
        self.root = Path(root)
        self.peers = [g for g in range(self.cfg.num_groups) if g != group]
        # frozen copies (codistill/copies.py: the student's plan in fp32, or local fp16 / int8 tables)
        self.teachers: dict[int, Any] = {}
        self.loaded: dict[int, int] = {}
        self.load_seconds = 0.0
        self.publish_seconds = 0.0
        self.bytes_published = 0
        self.wait_seconds = 0.0
        # what the distillation term actually saw (this process): versions loaded, and the staleness of
        # the oldest teacher summed over the steps that used one
        self.versions_loaded = 0
        self.distilled_steps = 0
        self.rows = 0  # rows the teachers ran on (teacher.fraction < 1: a sample of each batch's)
        self.staleness_sum = 0
        self.good: dict[int, set[int]] = {p: set() for p in self.peers}
        self.bad: dict[int, set[int]] = {p: set() for p in self.peers}
        group_dir(self.root, group).mkdir(parents=True, exist_ok=True)
        # Frozen copies built up front (outside no_grad: DMP's fused kernels are set up through autograd
        # hooks). Their weights come from the first loaded version.
        for peer in self.peers:
            self.teachers[peer] = make_teacher()

    # -- choosing and loading teachers -------------------------------------------------------------------
    def _verified(self, peer: int, version: int) -> bool:
        """Rank 0: whether ``version`` of ``peer`` passes its checksums (once per version); a damaged one
        is remembered and skipped from then on."""
        if version in self.good[peer]:
            return True
        if version in self.bad[peer]:
            return False
        path = version_dir(self.root, peer, version)
        try:
            verify_version(path, peer, version)
        except atomic.DamagedDirectory as e:
            self.bad[peer].add(version)
            print(f"[group {self.group}] warning: teacher version unusable: {e}", file=sys.stderr, flush=True)
            return False
        self.good[peer].add(version)
        return True

    def _find(self, peer: int, step: int) -> int | str | None:
        """Rank 0: the verified peer version to use at ``step`` if it is there now, None to keep waiting,
        or an error message when waiting cannot help."""
        versions = [v for v in complete_versions(self.root, peer) if v not in self.bad[peer]]
        if self.cfg.exchange_mode == "lockstep":
            target = step - step % self.cfg.exchange_every
            if target not in versions:
                return None
            if self._verified(peer, target):
                return target
            # Lockstep needs exactly this version; the peer re-publishes it only if it replays that step.
            return (
                f"group {self.group}: teacher version {version_dir(self.root, peer, target)} of group {peer} is "
                "damaged (see the warning above) and lockstep needs exactly it; resume group "
                f"{peer} from an earlier checkpoint to re-publish it, or use codistill.exchange_mode = 'async'"
            )
        # async: the freshest intact version, whoever is ahead (an older intact one if the freshest is
        # damaged); wait only when it is too stale.
        for v in reversed(versions):
            if step - v > self.cfg.max_staleness_steps:
                break
            if self._verified(peer, v):
                return v
        return None

    def _why_waiting(self, peer: int, step: int) -> str:
        """What is under the peer's directory and why none of it serves (for the timeout message)."""
        d = group_dir(self.root, peer)
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        notes = [f"found {found[-5:] or 'nothing'}"]
        for v in sorted(self.bad[peer])[-3:]:
            notes.append(f"{version_dir(self.root, peer, v).name} damaged")
        for p in sorted(d.glob(f"{_PREFIX}*"))[-3:] if d.is_dir() else []:
            if p.name[len(_PREFIX) :].isdigit() and not is_complete(p, verify_checksums=False):
                notes.append(f"{p.name} incomplete (no valid manifest)")
        return "; ".join(notes)

    def _poll(self, peer: int, step: int, t0: float) -> int | str | None:
        """Rank 0, once per poll: the version, None to keep waiting, or the error every rank raises (the
        timeout is decided here too, on one clock, so every rank stops at the same poll)."""
        found = self._find(peer, step)
        waited = time.perf_counter() - t0
        if found is None and waited > self.cfg.wait_timeout_s:
            return (
                f"group {self.group} waited {waited:.0f}s at step {step} for a teacher version of group {peer} "
                f"under {group_dir(self.root, peer)} ({self.cfg.exchange_mode}): {self._why_waiting(peer, step)}; "
                f"is group {peer} running? (codistill.wait_timeout_s)"
            )
        return found

    def _wanted(self, peer: int, step: int) -> int:
        """Collective: poll until the wanted version exists. Every poll is one short broadcast from rank 0,
        so no rank sits in a long collective (which would hit the process group's timeout), and a peer
        that never delivers ends in a clear error instead of a silent hang."""
        t0 = time.perf_counter()
        while True:
            target = dist.broadcast_from_rank0(self._poll(peer, step, t0) if self.ctx.rank == 0 else None)
            if isinstance(target, str):
                raise dist.FatalError(target)
            if target is not None:
                break
            time.sleep(_POLL_S)
        self.wait_seconds += time.perf_counter() - t0
        return target

    def _refresh(self, step: int) -> None:
        for peer in self.peers:
            if (
                self.cfg.exchange_mode == "lockstep"
                and self.loaded.get(peer) == step - step % self.cfg.exchange_every
            ):
                continue  # lockstep: nothing new can be wanted before the next multiple of K
            target = self._wanted(peer, step)
            if self.loaded.get(peer) == target:
                continue
            t0 = time.perf_counter()
            self.teachers[peer].load(version_dir(self.root, peer, target))
            self.load_seconds += time.perf_counter() - t0
            self.loaded[peer] = target
            self.versions_loaded += 1

    def wants(self, step: int) -> bool:
        return step >= self.cfg.burn_in_steps and self.cfg.distill_weight > 0.0

    @torch.no_grad()
    def logits(self, batch: Any, step: int) -> list[torch.Tensor]:
        """The peers' logits on this batch; none during burn-in / with w = 0."""
        if not self.wants(step):
            return []
        self._refresh(step)
        self.distilled_steps += 1
        self.rows += batch.dense_features.shape[0]
        self.staleness_sum += step - min(self.loaded.values())
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
        path = publish(self.root, self.group, step, model, tables=self.tables)
        self.publish_seconds += time.perf_counter() - t0
        if self.ctx.rank == 0:
            self.bytes_published += sum(f.stat().st_size for f in path.iterdir())
            self._gc()

    def start(self, model: nn.Module, step: int) -> None:
        """Publish the version peers need right at ``step`` (0 at a fresh start; after a resume, the
        version of the resumed step if it is a multiple of K)."""
        version = step - step % self.cfg.exchange_every
        # An intact version of this step is kept; a missing or damaged one is (re-)published, so a peer
        # waiting for it is served.
        intact = dist.broadcast_from_rank0(
            is_complete(version_dir(self.root, self.group, step)) if self.ctx.rank == 0 else None
        )
        if self._useful(version) and version == step and not intact:
            self.publish(model, step)

    def on_checkpoint(self, step: int) -> None:
        if self.ctx.rank == 0:
            # written whole, then renamed: a peer's GC must never read a torn note (it would drop the floor)
            note = group_dir(self.root, self.group) / _CHECKPOINT_NOTE
            tmp = note.with_name(note.name + ".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.replace(note)

    def _gc(self) -> None:
        if self.cfg.keep_exchange:
            return  # the user asked to keep every version
        versions = complete_versions(self.root, self.group)
        keep = set(versions[-self.cfg.keep_versions :])
        # A peer that resumes from its last checkpoint replays from there and needs our versions again.
        floors = [self._peer_checkpoint(p) for p in self.peers]
        if floors and None not in floors:
            floor = min(f for f in floors if f is not None)
            keep |= {v for v in versions if v >= floor - self.cfg.exchange_every}
        for v in versions:
            if v not in keep:
                atomic.remove_owned(version_dir(self.root, self.group, v), KIND)

    def _peer_checkpoint(self, peer: int) -> int | None:
        """The peer's latest checkpoint step, or None if it keeps none (then it cannot replay anyway)."""
        try:
            return int(json.loads((group_dir(self.root, peer) / _CHECKPOINT_NOTE).read_text())["step"])
        except (OSError, ValueError, KeyError):
            return None

    def metrics(self, step: int) -> dict[str, Any]:
        if not self.loaded:
            return {"teacher_step": None, "staleness": None, "teacher_versions_loaded": 0}
        oldest = min(self.loaded.values())
        return {
            "teacher_step": oldest,
            "staleness": step - oldest,
            "mean_staleness": round(self.staleness_sum / max(1, self.distilled_steps), 2),
            "teacher_versions_loaded": self.versions_loaded,
            "distilled_steps": self.distilled_steps,
            "teacher_rows": self.rows,
            "teacher_precision": next(iter(self.teachers.values())).precision,
            "exchange_wait_s": round(self.wait_seconds, 3),
            "exchange_load_s": round(self.load_seconds, 3),
            "exchange_publish_s": round(self.publish_seconds, 3),
            "exchange_bytes": self.bytes_published,
        }
