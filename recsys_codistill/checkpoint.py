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

KIND = "checkpoint"
_STEP_RE = re.compile(r"^step_(\d{8})$")


class NonFiniteError(FloatingPointError):
    """Training produced NaN or infinite values; nothing non-finite is ever saved or served."""


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Checkpoint directories by name, oldest first (temp dirs and anything else are ignored); not
    verified: see :func:`latest_checkpoint`."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / atomic.MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def verify_checkpoint(path: Path, step: int | None = None, checksums: bool = True) -> dict[str, Any]:
    """The manifest of an intact checkpoint; raises atomic.DamagedDirectory otherwise."""
    if step is None:
        m = _STEP_RE.match(path.name)
        step = int(m.group(1)) if m else -1
    return atomic.verify(path, KIND, {"step": step}, checksums=checksums)


def latest_checkpoint(ckpt_dir: str | Path, *, checksums: bool = True, warn: bool = True) -> Path | None:
    """The newest intact checkpoint. Damaged newer ones are skipped, each with a warning naming what is
    wrong, so a torn or corrupted save falls back to the previous intact checkpoint."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
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
    from recsys_codistill.codistill import CodistillTrain

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


def check_inputs(path: str | Path, inputs: dict[str, Any]) -> None:
    """Raise if checkpoint ``path`` recorded other model inputs than ``inputs`` (older checkpoints, which
    have no record, pass)."""
    from recsys_codistill.features import check_fingerprint

    f = Path(path) / INPUTS_FILE
    if f.is_file():
        check_fingerprint(json.loads(f.read_text()), inputs, path)


class Checkpointer:
    """Saves and restores (model, optimizer, loader cursor, step, RNG) for one group."""

    def __init__(
        self, ckpt_dir: str | Path, cfg: CheckpointConfig, inputs: dict[str, Any] | None = None
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.cfg = cfg
        # How inputs map to table rows (recsys_codistill.features.input_fingerprint): saved as inputs.json
        # with every checkpoint and compared on load.
        self.inputs = inputs

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: Any,
        loader_state: dict[str, Any],
    ) -> Path:
        """Collective: write checkpoint ``step`` atomically, then prune to ``keep_last``. Refuses (on every
        rank) a model with non-finite weights: a NaN checkpoint would be resumed and served."""
        state = {"model": model_state_dict(model), "step": torch.tensor(step)}
        if not dist.all_true(state_is_finite(state["model"])):
            raise NonFiniteError(
                f"step {step}: the model has NaN or infinite weights; not saving a checkpoint under {self.dir} "
                "(lower optim.dense_lr / optim.sparse_lr, or check the data)"
            )
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        rank = dist.rank()

        def write(tmp: Path) -> None:
            dcp_io.save(state, tmp)
            torch.save(
                {
                    "loader": json.dumps(loader_state, sort_keys=True),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
                    "step": torch.tensor(step),
                },
                tmp / f"rank{rank:05d}.pt",
            )
            if rank == 0 and self.inputs is not None:
                (tmp / INPUTS_FILE).write_text(json.dumps(self.inputs, sort_keys=True))

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

    def load(self, path: str | Path, model: nn.Module, optimizer: Any) -> tuple[int, dict[str, Any]]:
        """Restore in place; returns (step, this rank's loader state). ``path`` must have been verified
        (``latest_checkpoint`` does it)."""
        path = Path(path)
        if self.inputs is not None:
            check_inputs(path, self.inputs)
        if optimizer is not None:
            # Lazily created state (Adam's moments) does not exist before the first step, and an empty
            # state loads as "nothing to restore" without a word: create it first (TorchRec's pattern).
            # The dummy step may move weights (weight decay); the model weights are loaded after it.
            for _, sub in getattr(optimizer, "optimizers", []):
                if isinstance(sub, KeyedOptimizerWrapper):
                    sub.init_state()
        state: dict[str, Any] = {"model": model_state_dict(model), "step": torch.tensor(0)}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp_io.load(state, path)
        load_model_state_dict(model, state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
        extra = torch.load(path / f"rank{dist.rank():05d}.pt", weights_only=True)
        torch.set_rng_state(extra["torch_rng"])
        if torch.cuda.is_available() and extra["cuda_rng"].numel():
            torch.cuda.set_rng_state(extra["cuda_rng"])
        return int(state["step"]), json.loads(extra["loader"])

    def _choose(self) -> Path | str | None:
        """Rank 0: the checkpoint to resume from, or an error message every rank raises."""
        path = latest_checkpoint(self.dir)
        if path is None:
            damaged = list_checkpoints(self.dir)
            if damaged:
                return (
                    f"every checkpoint under {self.dir} is damaged ({', '.join(p.name for _, p in damaged)}; see "
                    "the warnings above): refusing to start over silently; move them away or set "
                    "checkpoint.resume = false"
                )
            return None
        saved_world = atomic.read_manifest(path).get("world_size")  # type: ignore[union-attr]
        if saved_world is not None and saved_world != dist.world_size():
            return (
                f"checkpoint {path} was written by {saved_world} ranks, this run has {dist.world_size()}; "
                f"resume with sharding.nproc x sharding.nnodes = {saved_world} (predict reshards any count)"
            )
        return path

    def maybe_resume(
        self, model: nn.Module, optimizer: Any
    ) -> tuple[int, dict[str, Any] | None, Path | None]:
        if not self.cfg.resume:
            return 0, None, None
        # rank 0 decides: every rank must load the same checkpoint
        choice = dist.broadcast_from_rank0(self._choose() if dist.rank() == 0 else None)
        if isinstance(choice, str):
            raise RuntimeError(choice)
        if choice is None:
            return 0, None, None
        step, loader_state = self.load(choice, model, optimizer)
        return step, loader_state, choice


def load_model_weights(path: str | Path, model: nn.Module) -> int:
    """Load only the model weights of a checkpoint (sharded or not) into ``model``; returns its step.

    Works without a process group: DCP reshards the saved shards into plain tensors, so a model trained on
    R ranks predicts in one process. The checkpoint is verified against its manifest first.
    """
    path = Path(path)
    verify_checkpoint(path)
    state: dict[str, Any] = {"model": model.state_dict(), "step": torch.tensor(0)}
    dcp_io.load(state, path, single_process=True)
    model.load_state_dict(state["model"])
    return int(state["step"])
