"""Atomic, verified, resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<group dir>/checkpoints/``::

    step_00000200/            complete checkpoint (renamed into place only after every rank finished)
        .metadata, __0_0.distcp, ...   DCP: model + optimizer (incl. fused sparse state) + step
        rank00000.pt          per-rank train state: loader cursor (JSON text) and RNG states (tensors)
        inputs.json           how inputs map to table rows (compared on load)
        manifest.json         written last: step, world size, size and sha256 of every other file
    .tmp-step_00000400/       being written; never read, removed on the next save

Writing follows :mod:`recsys_codistill.atomic` (temp dir, manifest last, fsync, rename), so a job killed
mid-save leaves the previous checkpoint as the latest. Reading verifies the manifest first (file set,
sizes, checksums, step); a damaged latest checkpoint is skipped with a warning for the previous intact
one. Nothing loaded can execute code: DCP through :mod:`recsys_codistill.dcp_io` (restricted metadata
unpickler, ``weights_only`` byte items) and ``torch.load(weights_only=True)`` for the per-rank file. A model
with non-finite weights is never saved.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from recsys_codistill import atomic, dcp_io, dist
from recsys_codistill.config import CheckpointConfig
from recsys_codistill.train.inputs import InputMapping

KIND = "checkpoint"
_STEP_RE = re.compile(r"^step_(\d{8})$")


class NonFiniteError(dist.FatalError, FloatingPointError):
    """Training produced NaN or infinite values; nothing non-finite is ever saved or served."""


def list_checkpoints(ckpt_dir: str | Path, *, restore: bool = True) -> list[tuple[int, Path]]:
    """Checkpoint directories by name, oldest first (temp dirs and anything else are ignored); not
    verified: see :func:`latest_checkpoint`. ``restore`` first completes an interrupted replacement (the
    run's own directory); a reader of another run's checkpoints (a teacher, a warm start) passes False and
    changes nothing there."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    if restore:
        atomic.restore_interrupted(d, KIND)
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / atomic.MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def unverifiable_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``step_*`` directories with DCP files but no manifest: written by an older version, or a manifest
    lost since. Never loaded (nothing vouches for them), but never silently treated as "no checkpoint"."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(
        p
        for p in d.iterdir()
        if _STEP_RE.match(p.name)
        and p.is_dir()
        and not (p / atomic.MANIFEST).is_file()
        and (p / ".metadata").exists()
    )


def verify_checkpoint(path: Path, step: int | None = None, checksums: bool = True) -> dict[str, Any]:
    """The manifest of an intact checkpoint; raises atomic.DamagedDirectory otherwise."""
    if step is None:
        m = _STEP_RE.match(path.name)
        step = int(m.group(1)) if m else -1
    return atomic.verify(path, KIND, {"step": step}, checksums=checksums)


def latest_checkpoint(
    ckpt_dir: str | Path, *, checksums: bool = True, warn: bool = True, restore: bool = True
) -> Path | None:
    """The newest intact checkpoint. Damaged newer ones are skipped, each with a warning naming what is
    wrong, so a torn or corrupted save falls back to the previous intact checkpoint."""
    if warn:
        for path in unverifiable_checkpoints(ckpt_dir):
            print(
                f"recsys-codistill: warning: ignoring {path}: it has no {atomic.MANIFEST} (written by an older "
                "version, or its manifest was lost), so nothing vouches for its files",
                file=sys.stderr,
                flush=True,
            )
    for step, path in reversed(list_checkpoints(ckpt_dir, restore=restore)):
        try:
            verify_checkpoint(path, step, checksums)
        except atomic.DamagedDirectory as e:
            if warn:
                print(
                    f"recsys-codistill: warning: skipping damaged checkpoint: {e}",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        return path
    return None


def _local_tensors(value: Any) -> list[torch.Tensor]:
    """This rank's data of a state-dict value (plain tensor, ShardedTensor or DTensor)."""
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    if hasattr(value, "to_local"):
        return [value.to_local()]
    return [value] if isinstance(value, torch.Tensor) else []


def state_is_finite(state: dict[str, Any]) -> bool:
    """Whether every floating-point tensor of this rank's part of ``state`` is finite."""
    for value in state.values():
        for t in _local_tensors(value):
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                return False
    return True


_WRAPPER_PREFIX = "model."


def is_wrapped(model: nn.Module) -> bool:
    """True for DMP(CodistillTrain(model)), the layout TrainPipelineSparseDist needs."""
    from recsys_codistill.codistill.losses import CodistillTrain

    return isinstance(getattr(model, "module", None), CodistillTrain)


def model_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's state dict under the bare model's keys, whether or not it is wrapped for the pipeline,
    so checkpoints and exchanged teachers are interchangeable between the two training loops."""
    sd = model.state_dict()
    if is_wrapped(model):
        sd = {k[len(_WRAPPER_PREFIX) :]: v for k, v in sd.items()}
    return sd


def load_model_state_dict(model: nn.Module, sd: dict[str, Any]) -> None:
    if is_wrapped(model):
        sd = {_WRAPPER_PREFIX + k: v for k, v in sd.items()}
    model.load_state_dict(sd)


INPUTS_FILE = "inputs.json"


def check_inputs(path: str | Path, inputs: InputMapping) -> None:
    """Raise if checkpoint ``path`` recorded other model inputs than ``inputs`` (older checkpoints, which
    have no record, pass)."""
    f = Path(path) / INPUTS_FILE
    if f.is_file():
        inputs.check(json.loads(f.read_text()), path)


class ModelState:
    """The model as a DCP ``Stateful``, under the bare model's keys (wrapped for the pipeline or not)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        load_model_state_dict(self.model, sd)

    def is_finite(self) -> bool:
        return state_is_finite(self.state_dict())


class OptimizerState:
    """A TorchRec ``CombinedOptimizer`` (fused sparse state included) as a DCP ``Stateful``."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def prepare_load(self) -> None:
        # Lazily created state (Adam's moments) does not exist before the first step, and an empty state
        # loads as "nothing to restore" without a word: create it first (TorchRec's pattern). The dummy
        # step may move weights (weight decay): DCP copies the saved weights in after every state_dict().
        for _, sub in getattr(self.optimizer, "optimizers", []):
            if isinstance(sub, KeyedOptimizerWrapper):
                sub.init_state()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)


class TrainState:
    """The step counter (saved in DCP: the same on every rank)."""

    def __init__(self, step: int = 0) -> None:
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])


class RNGState:
    """This rank's torch (and CUDA) RNG: a per-rank state, in the rank's own file."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0)
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        torch.set_rng_state(sd["torch_rng"])
        if torch.cuda.is_available() and sd["cuda_rng"].numel():
            torch.cuda.set_rng_state(sd["cuda_rng"])


class Checkpointer:
    """Saves and restores one group's registered state (torchtitan's CheckpointManager pattern).

    ``register(name, obj)`` adds a ``Stateful`` (``state_dict()`` / ``load_state_dict()``) saved through
    DCP, resharded on load (model, optimizer, train step); ``register(name, obj, per_rank=True)`` one saved
    in the rank's own file (loader cursor, RNG), loaded with ``torch.load(weights_only=True)``: tensors and
    plain values only. New state (an EMA copy, a sampler) registers itself; the loop does not change.
    """

    def __init__(
        self, ckpt_dir: str | Path, cfg: CheckpointConfig, inputs: InputMapping | None = None
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.cfg = cfg
        # Saved as inputs.json with every checkpoint and compared on load.
        self.inputs = inputs
        self.states: dict[str, Any] = {}
        self.rank_states: dict[str, Any] = {}

    def register(self, name: str, obj: Any, *, per_rank: bool = False) -> None:
        target = self.rank_states if per_rank else self.states
        if name in self.states or name in self.rank_states:
            raise ValueError(f"checkpoint state {name!r} registered twice")
        target[name] = obj

    def should_save(self, step: int, total: int) -> bool:
        """Periodic checkpoints (``checkpoint.every_steps``); the final one is the caller's."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0 and step < total

    def save(self, step: int) -> Path:
        """Collective: write checkpoint ``step`` atomically, then prune to ``keep_last``. Refuses (on every
        rank) a model with non-finite weights: a NaN checkpoint would be resumed and served."""
        finite = all(s.is_finite() for s in self.states.values() if hasattr(s, "is_finite"))
        if not dist.all_true(finite):
            raise NonFiniteError(
                f"step {step}: the model has NaN or infinite weights; not saving a checkpoint under {self.dir} "
                "(lower optim.dense_lr / optim.sparse_lr, or check the data)"
            )
        rank = dist.rank()
        per_rank = {name: s.state_dict() for name, s in self.rank_states.items()}

        def write(tmp: Path) -> None:
            dcp_io.save(dict(self.states), tmp)  # DCP calls each Stateful's state_dict()
            torch.save(per_rank, tmp / f"rank{rank:05d}.pt")
            if rank == 0 and self.inputs is not None:
                (tmp / INPUTS_FILE).write_text(json.dumps(self.inputs.fingerprint(), sort_keys=True))

        # A re-save of an existing step (a resumed run ending where it resumed) replaces it.
        final = atomic.write_collectively(
            self.dir / f"step_{step:08d}",
            KIND,
            {"step": step, "world_size": dist.world_size()},
            write,
            replace=True,
        )
        if rank == 0:
            for _, old in list_checkpoints(self.dir)[: -self.cfg.keep_last]:
                atomic.remove_owned(old, KIND)
        dist.barrier()
        return final

    def load(self, path: str | Path) -> None:
        """Restore every registered state in place from ``path`` (verified: ``latest_checkpoint`` does it)."""
        path = Path(path)
        if self.inputs is not None:
            try:
                check_inputs(path, self.inputs)
            except ValueError as e:
                raise dist.FatalError(str(e)) from e
        for s in self.states.values():
            if hasattr(s, "prepare_load"):
                s.prepare_load()
        dcp_io.load(dict(self.states), path)  # DCP calls state_dict(), fills it, then load_state_dict()
        saved = torch.load(path / f"rank{dist.rank():05d}.pt", weights_only=True)
        for name, s in self.rank_states.items():
            if name not in saved:
                raise ValueError(f"{path}: rank file has no {name!r} state (saved: {sorted(saved)})")
            s.load_state_dict(saved[name])

    def _choose(self) -> Path | str | None:
        """Rank 0: the checkpoint to resume from, or an error message every rank raises."""
        path = latest_checkpoint(self.dir)
        if path is None:
            damaged = list_checkpoints(self.dir) + [(0, p) for p in unverifiable_checkpoints(self.dir)]
            if damaged:
                return (
                    f"every checkpoint under {self.dir} is damaged ({', '.join(p.name for _, p in damaged)}; see "
                    "the warnings above): refusing to start over silently; move them away or set "
                    "checkpoint.resume = false"
                )
            return None
        saved_world = (atomic.read_manifest(path) or {}).get("world_size")
        if saved_world is not None and saved_world != dist.world_size():
            return (
                f"checkpoint {path} was written by {saved_world} ranks, this run has {dist.world_size()}; "
                f"resume with sharding.nproc x sharding.nnodes = {saved_world} (predict reshards any count)"
            )
        return path

    def maybe_resume(self) -> Path | None:
        """Restore the latest intact checkpoint if ``checkpoint.resume`` and there is one; its path."""
        if not self.cfg.resume:
            return None
        # rank 0 decides: every rank must load the same checkpoint
        choice = dist.broadcast_from_rank0(self._choose() if dist.rank() == 0 else None)
        if isinstance(choice, str):
            raise dist.FatalError(choice)
        if choice is not None:
            self.load(choice)
        return choice


def load_model_weights(path: str | Path, model: nn.Module, *, verified: bool = False) -> int:
    """Load only the model weights of a checkpoint (sharded or not) into ``model``; returns its step.

    Works without a process group: DCP reshards the saved shards into plain tensors, so a model trained on
    R ranks predicts in one process. The checkpoint is verified against its manifest first, unless the
    caller just did (``verified``: ``latest_checkpoint`` hashes what it returns).
    """
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    train = TrainState()
    dcp_io.load({"model": ModelState(model), "train": train}, path, single_process=True)
    return train.step
