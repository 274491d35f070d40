"""Importance-sampled teacher forwards (after Li et al. 2018, "Dynamic importance sampling for knowledge
distillation", moved from softmax classes to the rows of a batch).

A teacher's forward is a large part of a codistillation step (~31% of it on CPU). With
``teacher.fraction = q < 1`` the teachers run on m = ⌈q·n⌉ rows of each n-row batch, drawn with replacement
with probabilities π_i, and the distillation term becomes

    (1/m) Σ_j ψ_{i_j} / (n·π_{i_j})  =  Σ_j ψ_{i_j} / (n·q_{i_j}),   q_i = m·π_i (the expected draws of row i)

whose expectation over draws is exactly the full term (1/n) Σ_i ψ_i, and so is its gradient's. Scores:

- ``uniform``: π_i = 1/n (the control: every weight is 1/m);
- ``uncertainty``: π_i ∝ p_i(1 − p_i) of the student's own prediction on this batch (the rows where its
  probability can still move most), mixed with uniform (weight ``UNIFORM_MIX``) so that no row's weight
  exceeds 1/(UNIFORM_MIX·m): the defensive mixture of Hesterberg (1995), which bounds the variance an
  importance sampler can add.

The draw depends only on (seed, group, rank, step) and the student's logits, so a resumed run draws the
same rows. A fixed number of rows per rank keeps a sharded teacher's collectives the same shape everywhere.
q = 1 is the full term itself (no draw, no reweighting).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Share of the uniform distribution in the ``uncertainty`` score's mixture.
UNIFORM_MIX = 0.2


@dataclass(frozen=True)
class TeacherRows:
    """The rows the teachers run on and each draw's weight: Σ_j weight_j · ψ_j is unbiased for mean ψ."""

    index: torch.Tensor  # int64 [m], rows of the batch (with replacement)
    weight: torch.Tensor  # float32 [m], 1 / (n · m · π_index)


def row_probabilities(student_logits: torch.Tensor, score: str) -> torch.Tensor:
    """π over the batch's rows (sums to 1)."""
    n = student_logits.numel()
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64, device=student_logits.device)
    if score == "uniform":
        return uniform
    if score == "uncertainty":
        p = torch.sigmoid(student_logits.detach().double().reshape(-1))
        s = p * (1.0 - p)
        total = s.sum()
        if not total > 0:  # every prediction saturated: nothing to prefer
            return uniform
        return (1.0 - UNIFORM_MIX) * s / total + UNIFORM_MIX * uniform
    raise ValueError(f"unknown teacher sampling score {score!r}; expected uniform or uncertainty")


def draw_rows(
    student_logits: torch.Tensor, fraction: float, score: str, generator: torch.Generator
) -> TeacherRows | None:
    """m = ⌈fraction·n⌉ rows drawn with replacement by π; None for fraction ≥ 1 (the full term)."""
    if fraction >= 1.0:
        return None
    n = student_logits.numel()
    m = max(1, math.ceil(fraction * n))
    pi = row_probabilities(student_logits, score)
    index = torch.multinomial(pi.cpu(), m, replacement=True, generator=generator).to(pi.device)
    weight = (1.0 / (n * m * pi[index])).float()
    return TeacherRows(index=index, weight=weight)


def step_generator(seed: int, group: int, rank: int, step: int) -> torch.Generator:
    """The draw's generator: a function of (seed, group, rank, step) only, so a resumed run redraws alike
    (hashed to 63 bits: any seed and step fit ``manual_seed``)."""
    digest = hashlib.blake2b(f"teacher-rows/{seed}/{group}/{rank}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def teacher_batch(
    batch: Any, student_logits: torch.Tensor, fraction: float, score: str, generator_args: tuple[int, ...]
) -> tuple[Any, TeacherRows | None]:
    """The batch the teachers run on and its rows: ``batch`` itself for fraction ≥ 1, else the rows drawn
    from the student's logits with ``step_generator(*generator_args)`` (seed, group, rank, step)."""
    if fraction >= 1.0:
        return batch, None
    rows = draw_rows(student_logits, fraction, score, step_generator(*generator_args))
    return take_rows(batch, rows.index), rows


def take_kjt_rows(kjt: KeyedJaggedTensor, index: torch.Tensor) -> KeyedJaggedTensor:
    """The rows ``index`` (any order, repeats allowed) of every key of a KJT, as a new KJT of stride m."""
    keys = kjt.keys()
    n, k, m = kjt.stride(), len(keys), index.numel()
    lengths = kjt.lengths().reshape(k, n)
    offsets = kjt.offsets()[:-1].reshape(k, n)
    new_lengths = lengths[:, index].reshape(-1)
    starts = offsets[:, index].reshape(-1)
    # every output value: its segment (key, row) and its place in it, then its source position
    segment = torch.repeat_interleave(torch.arange(k * m, device=index.device), new_lengths)
    new_offsets = torch.cumsum(new_lengths, 0) - new_lengths
    source = starts[segment] + (torch.arange(segment.numel(), device=index.device) - new_offsets[segment])
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=kjt.values()[source],
        weights=None if weights is None else weights[source],
        lengths=new_lengths,
    )


def take_rows(batch: Any, index: torch.Tensor) -> Batch:
    """A torchrec ``Batch`` of the rows ``index`` of ``batch``."""
    return Batch(
        dense_features=batch.dense_features[index],
        sparse_features=take_kjt_rows(batch.sparse_features, index),
        labels=batch.labels[index],
    )
