"""Codistillation losses (Anil et al. 2018, Algorithm 1) and the torchrec-style train wrapper.

    loss_i = BCE(y, σ(z_i)) + w · ψ(p̄_others, z_i)

with p̄ the average of the other groups' (stale, frozen) teacher predictions on the same batch. During
burn-in, and with no teacher yet, the loss is plain BCE. No gradient ever flows into a teacher: teacher
logits are detached here even if a caller forgot ``no_grad``. With sampled teacher rows
(:mod:`recsys_codistill.codistill.sampling`) ψ is the importance-weighted sum over the drawn rows, an
unbiased estimate of the batch mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from recsys_codistill.codistill.sampling import TeacherRows
from recsys_codistill.config import CodistillConfig


@dataclass
class LossParts:
    bce: torch.Tensor
    distill: torch.Tensor
    total: torch.Tensor
    # KL(p̄ ‖ σ(z)): the real gap between student and teachers, whatever ψ is (a cross entropy against
    # soft targets includes the teachers' own entropy, so it never reaches 0); 0 without teachers.
    kl: torch.Tensor
    # Other teachers' terms by name (e.g. "anchor"): (ψ, KL), both unweighted.
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherTerm:
    """One teacher source's contribution: ``weight · ψ_loss(p̄ of its logits, z)`` logged under ``name``
    (``distill`` is codistillation's peers)."""

    name: str
    weight: float
    loss: str
    logits: Sequence[torch.Tensor]
    # the rows the teacher ran on (None: every row of the batch)
    rows: TeacherRows | None = None


def soft_targets(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """p̄: the mean of the teachers' probabilities (N > 2 groups average all other groups)."""
    return torch.stack([torch.sigmoid(t.detach().float()) for t in teacher_logits]).mean(0)


def distill_term(
    logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    kind: str,
    rows: TeacherRows | None = None,
) -> torch.Tensor:
    """ψ(teacher, student), averaged over the batch (with ``rows``: the teachers ran on those rows only, and
    ψ is Σ_j weight_j · ψ_j over them, unbiased for the batch mean).

    - ``ce``: cross entropy of the student against the soft target p̄ (the paper's choice).
    - ``kl``: KL(p̄ ‖ σ(z)) = ce − H(p̄); same gradient as ``ce``, but 0 when the student matches.
    - ``mse_logits``: mean squared error between the student's and the mean teacher logit.
    """
    if rows is not None:
        return (rows.weight * _per_row(logits[rows.index], teacher_logits, kind)).sum()
    if kind == "mse_logits":
        target = torch.stack([t.detach().float() for t in teacher_logits]).mean(0)
        return F.mse_loss(logits, target)
    p = soft_targets(teacher_logits)
    ce = F.binary_cross_entropy_with_logits(logits, p)
    if kind == "ce":
        return ce
    if kind == "kl":
        return ce - F.binary_cross_entropy(p, p)
    raise ValueError(f"unknown distillation loss {kind!r}; expected ce, kl or mse_logits")


def _per_row(logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """ψ per row (``distill_term``'s terms before the mean)."""
    if kind == "mse_logits":
        target = torch.stack([t.detach().float() for t in teacher_logits]).mean(0)
        return (logits - target) ** 2
    p = soft_targets(teacher_logits)
    ce = F.binary_cross_entropy_with_logits(logits, p, reduction="none")
    if kind == "ce":
        return ce
    if kind == "kl":
        return ce - F.binary_cross_entropy(p, p, reduction="none")
    raise ValueError(f"unknown distillation loss {kind!r}; expected ce, kl or mse_logits")


@torch.no_grad()
def distill_gap(
    logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], rows: TeacherRows | None = None
) -> torch.Tensor:
    """KL(p̄ ‖ σ(z)) averaged over the batch (estimated from ``rows`` when sampled), for logging."""
    return distill_term(logits.detach().float(), teacher_logits, "kl", rows)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, terms: Sequence[TeacherTerm]) -> LossParts:
    """BCE plus every teacher's weighted term; a term without logits (burn-in) or with weight 0 adds
    nothing, not even a zero, so the graph is exactly the baseline's and such a run reproduces the baseline
    bit for bit."""
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    zero = torch.zeros((), device=logits.device)
    total, parts = bce, {}
    for t in terms:
        if not t.logits or t.weight == 0.0:
            continue
        psi = distill_term(logits, t.logits, t.loss, t.rows)
        if t.loss == "kl":
            kl = psi.detach()
        elif t.loss == "ce" and t.rows is None:  # KL = CE − H(p̄): no second cross entropy on the step
            with torch.no_grad():
                p = soft_targets(t.logits)
                kl = psi.detach() - F.binary_cross_entropy(p, p)
        else:
            kl = distill_gap(logits, t.logits, t.rows)
        total = total + t.weight * psi
        parts[t.name] = (psi, kl)
    distill, kl = parts.pop("distill", (zero, zero))
    return LossParts(bce=bce, distill=distill, total=total, kl=kl, terms=parts)


def codistill_loss(
    logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor] | None,
    labels: torch.Tensor,
    cfg: CodistillConfig,
) -> LossParts:
    """BCE plus the weighted distillation term; pure BCE when there is no teacher (burn-in) or w = 0."""
    return distillation_loss(
        logits, labels, [TeacherTerm("distill", cfg.distill_weight, cfg.loss, teacher_logits or [])]
    )


class CodistillTrain(nn.Module):
    """torchrec ``DLRMTrain``-style wrapper, ``forward(batch) -> (loss, (parts, logits, labels))``: the
    contract of TorchRec's train pipelines. The batch is its only input (the pipeline FX-traces this
    forward), so it computes the burn-in / baseline loss; past burn-in the trainer adds the teachers'
    term with :func:`codistill_loss` itself."""

    def __init__(self, model: nn.Module, cfg: CodistillConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, batch):  # noqa: ANN001, ANN201
        logits = self.model(batch.dense_features, batch.sparse_features)
        parts = codistill_loss(logits, None, batch.labels.float(), self.cfg)
        return parts.total, (parts, logits.detach(), batch.labels.detach())
