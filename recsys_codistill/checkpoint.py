"""Atomic, resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<group dir>/checkpoints/``::

    step_00000200/            complete checkpoint (renamed into place only after every rank finished)
        .metadata, __0_0.distcp, ...   DCP: model + optimizer (incl. fused sparse state) + step
        rank00000.pt          per-rank train state: loader cursor (JSON text) and RNG states (tensors)
    .tmp-step_00000400/       being written; never read, removed on the next save

A checkpoint is written to a temp dir by all ranks, then rank 0 renames it, so a job killed mid-save
leaves the previous checkpoint as the latest. Everything is loaded with ``weights_only`` semantics:
DCP's reader and ``torch.load(weights_only=True)`` for the per-rank file (tensors and plain strings only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from recsys_codistill.config import CheckpointConfig

_STEP_RE = re.compile(r"^step_(\d{8})$")


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp dirs and anything else are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


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


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity outside a multi-rank world): decisions taken from the
    filesystem must be taken once, or ranks may disagree and split collectives."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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

    def __init__(self, ckpt_dir: str | Path, cfg: CheckpointConfig, inputs: dict[str, Any] | None = None) -> None:
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
        rank = _rank()
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".tmp-step_{step:08d}"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        state = {"model": model_state_dict(model), "step": torch.tensor(step)}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        dcp.save(state, checkpoint_id=str(tmp))
        rank_file = tmp / f"rank{rank:05d}.pt"
        torch.save(
            {
                "loader": json.dumps(loader_state, sort_keys=True),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
                "step": torch.tensor(step),
            },
            rank_file,
        )
        with rank_file.open("rb") as f:
            os.fsync(f.fileno())
        if rank == 0 and self.inputs is not None:
            (tmp / INPUTS_FILE).write_text(json.dumps(self.inputs, sort_keys=True))
        _barrier()
        if rank == 0:
            if final.exists():
                # A re-save of the same step (a resumed run ending where it resumed): swap, never leaving
                # a moment without a complete checkpoint of this step.
                old = final.with_name(f".old-{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            for _, old in list_checkpoints(self.dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer: Any) -> tuple[int, dict[str, Any]]:
        """Restore in place; returns (step, this rank's loader state)."""
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
        dcp.load(state, checkpoint_id=str(path))
        load_model_state_dict(model, state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
        rank_file = path / f"rank{_rank():05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{rank_file} is missing: checkpoint {path} was written by a different number of ranks; "
                "resume with the same sharding.nproc"
            )
        extra = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(extra["torch_rng"])
        if torch.cuda.is_available() and extra["cuda_rng"].numel():
            torch.cuda.set_rng_state(extra["cuda_rng"])
        return int(state["step"]), json.loads(extra["loader"])

    def maybe_resume(self, model: nn.Module, optimizer: Any) -> tuple[int, dict[str, Any] | None, Path | None]:
        if not self.cfg.resume:
            return 0, None, None
        # rank 0 decides: every rank must load the same checkpoint
        path = broadcast_from_rank0(latest_checkpoint(self.dir) if _rank() == 0 else None)
        if path is None:
            return 0, None, None
        step, loader_state = self.load(path, model, optimizer)
        return step, loader_state, path


def load_model_weights(path: str | Path, model: nn.Module) -> int:
    """Load only the model weights of a checkpoint (sharded or not) into ``model``; returns its step.

    Works without a process group: DCP reshards the saved shards into plain tensors, so a model trained on
    R ranks predicts in one process.
    """
    state: dict[str, Any] = {"model": model.state_dict(), "step": torch.tensor(0)}
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... load in a single process": exactly what we want here.
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    return int(state["step"])
