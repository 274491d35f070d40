"""A trained run's checkpoint as a frozen teacher: anchor distillation and offline distillation.

Anchor distillation (Jiang et al., ICLR 2022, "Churn reduction via distillation") trains today's model
with an extra term pulling it toward yesterday's model, ``λ · ψ(p_anchor, z)``: the distillation form of an
explicit constraint on churn against the version it replaces. The same mechanism with any trained run is
offline (two-phase) distillation, which Anil et al. compare codistillation against.

The teacher is read, never written: its latest intact checkpoint is verified (manifest, sizes, sha256),
loaded through :mod:`recsys_codistill.dcp_io` (nothing that can run code), into a frozen copy built from the
teacher run's own config (it may be another architecture). Its input mapping (vocabulary, table sizes,
dense buckets) must equal the student's, since both read the same batches: otherwise it is refused with the
differing keys named.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys_codistill import atomic, dist
from recsys_codistill.config import RunConfig, load_config
from recsys_codistill.run_dir import RunDir


def teacher_checkpoint(run_dir: str | Path, group: int, what: str) -> Path:
    """The latest intact checkpoint of ``group`` of a trained run; a clear error when there is none."""
    from recsys_codistill.train.checkpoint import latest_checkpoint

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise dist.FatalError(f"{what} = {run_dir}: not a run directory (no {run.config.name})")
    path = latest_checkpoint(run.checkpoints(group), restore=False)  # read-only: another run's directory
    if path is None:
        raise dist.FatalError(
            f"{what} = {run_dir}: group {group} has no intact checkpoint under {run.checkpoints(group)}"
        )
    return path


class FixedTeacher:
    """A :class:`~recsys_codistill.codistill.exchange.TeacherSource` serving one trained run's logits.

    ``stateful``: the trainer saves its identity (checkpoint path, manifest sha256) with the student's
    checkpoints and a resume refuses another teacher."""

    stateful = True

    def __init__(
        self,
        name: str,
        run_dir: str | Path,
        group: int,
        weight: float,
        loss: str,
        inputs: Any,
        build: Callable[[RunConfig], Any],
    ) -> None:
        from recsys_codistill.train.checkpoint import check_inputs

        self.name, self.weight, self.loss = name, weight, loss
        self.path = teacher_checkpoint(run_dir, group, f"{name}.run")
        try:
            check_inputs(self.path, inputs)
        except ValueError as e:
            raise dist.FatalError(f"{name}.run: {e}") from e
        # a frozen copy (codistill/copies.py) of the teacher run's own model, loaded from its checkpoint
        self.model = build(load_config(RunDir(run_dir).config))
        self.model.load(self.path)
        self.forwards = 0
        self.rows = 0  # rows the teacher ran on (teacher.fraction < 1: a sample of each batch's)
        # what this teacher is, for the student's checkpoints: a resumed run must distil from the same one
        self.identity = {
            "checkpoint": str(self.path),
            "manifest_sha256": atomic.sha256_file(self.path / atomic.MANIFEST),
        }

    # -- per-rank checkpoint state: the teacher a run was distilling from ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(self.identity)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd != self.identity:
            raise dist.FatalError(
                f"{self.name}.run: this run was distilling from {sd.get('checkpoint')} (manifest sha256 "
                f"{str(sd.get('manifest_sha256'))[:12]}…), now the latest checkpoint is {self.identity['checkpoint']} "
                f"({self.identity['manifest_sha256'][:12]}…): the teacher changed under a resumed run; restore it, "
                "or start a new run directory"
            )

    def start(self, model: nn.Module, step: int) -> None:
        pass

    def wants(self, step: int) -> bool:
        return self.weight > 0.0

    @torch.no_grad()
    def logits(self, batch: Any, step: int) -> list[torch.Tensor]:
        if not self.wants(step):
            return []  # λ = 0: no forward, the run is the plain baseline
        self.forwards += 1
        self.rows += batch.dense_features.shape[0]
        return [self.model(batch.dense_features, batch.sparse_features).float()]

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def on_checkpoint(self, step: int) -> None:
        pass

    def metrics(self, step: int) -> dict[str, Any]:
        return {
            f"{self.name}_checkpoint": str(self.path),
            f"{self.name}_forwards": self.forwards,
            f"{self.name}_rows": self.rows,
            f"{self.name}_precision": self.model.precision,
        }
