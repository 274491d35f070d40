"""Importance-sampled teacher forwards: row gathers, the exact q = 1 term, unbiasedness over draws."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_codistill.codistill.losses import TeacherTerm, distill_term, distillation_loss
from recsys_codistill.codistill.sampling import (
    UNIFORM_MIX,
    TeacherRows,
    draw_rows,
    row_probabilities,
    step_generator,
    take_kjt_rows,
    take_rows,
)


def _kjt(n: int, weighted: bool, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * n,), generator=g)
    values = torch.randint(0, 1000, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths, weights=weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_taking_rows_of_a_kjt_keeps_every_key_s_ids_of_those_rows_in_order(weighted):
    kjt = _kjt(7, weighted)
    index = torch.tensor([5, 0, 5, 3, 6])  # any order, repeats
    out = take_kjt_rows(kjt, index)
    assert out.keys() == kjt.keys() and out.stride() == 5
    src, got = kjt.to_dict(), out.to_dict()
    for key in kjt.keys():
        want = [src[key].to_dense()[i] for i in index.tolist()]
        have = got[key].to_dense()
        assert len(have) == len(want) and all(torch.equal(a, b) for a, b in zip(have, want, strict=True))
        if weighted:
            ww = [src[key].to_dense_weights()[i] for i in index.tolist()]
            assert all(torch.equal(a, b) for a, b in zip(got[key].to_dense_weights(), ww, strict=True))


def test_taking_rows_of_a_batch():
    kjt = _kjt(6, False)
    batch = Batch(
        dense_features=torch.arange(12.0).reshape(6, 2), sparse_features=kjt, labels=torch.arange(6.0)
    )
    sub = take_rows(batch, torch.tensor([4, 1]))
    assert torch.equal(sub.dense_features, torch.tensor([[8.0, 9.0], [2.0, 3.0]]))
    assert torch.equal(sub.labels, torch.tensor([4.0, 1.0]))
    assert torch.equal(sub.sparse_features.lengths(), kjt.lengths().reshape(3, 6)[:, [4, 1]].reshape(-1))


def _problem(n: int = 64, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, generator=g)
    teachers = [z + torch.randn(n, generator=g), z + 0.5 * torch.randn(n, generator=g)]
    return z, teachers


@pytest.mark.parametrize("kind", ["ce", "kl", "mse_logits"])
def test_q_one_is_the_full_term_and_every_row_once_weighted_one_over_n_agrees(kind):
    z, teachers = _problem()
    assert draw_rows(z, 1.0, "uncertainty", step_generator(0, 0, 0, 5)) is None  # no draw: the exact term
    full = distill_term(z, teachers, kind)
    n = z.numel()
    every = TeacherRows(index=torch.arange(n), weight=torch.full((n,), 1.0 / n))
    # the same sum in another order, in float32: 64 terms of size <= ~1 round to ~1e-6 (KL is a difference)
    assert float(distill_term(z, teachers, kind, every)) == pytest.approx(float(full), abs=2e-6)


def test_probabilities_and_the_weight_bound():
    z, _ = _problem()
    for score in ("uniform", "uncertainty"):
        pi = row_probabilities(z, score)
        assert float(pi.sum()) == pytest.approx(1.0) and bool((pi > 0).all())
    rows = draw_rows(z, 0.25, "uncertainty", step_generator(1, 0, 0, 0))
    m = math.ceil(0.25 * z.numel())
    assert rows.index.numel() == m and float(rows.weight.max()) <= 1.0 / (UNIFORM_MIX * m) * (1 + 1e-6)
    uni = draw_rows(z, 0.25, "uniform", step_generator(1, 0, 0, 0))
    assert torch.allclose(uni.weight, torch.full((m,), 1.0 / m))
    # uncertain rows (p near 1/2) are drawn more often than saturated ones
    p = torch.sigmoid(z)
    pi = row_probabilities(z, "uncertainty")
    assert float(pi[(p - 0.5).abs().argmin()]) > float(pi[(p - 0.5).abs().argmax()])


def test_the_draw_is_a_function_of_seed_group_rank_step():
    z, _ = _problem()
    a = draw_rows(z, 0.5, "uncertainty", step_generator(3, 1, 0, 40))
    b = draw_rows(z, 0.5, "uncertainty", step_generator(3, 1, 0, 40))
    c = draw_rows(z, 0.5, "uncertainty", step_generator(3, 1, 0, 41))
    d = draw_rows(z, 0.5, "uncertainty", step_generator(3, 0, 0, 40))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert not torch.equal(a.index, d.index)  # another group draws other rows
    # any seed the config allows and any step (a retrain chain's seeds are ~1e5 and up)
    big = draw_rows(z, 0.5, "uniform", step_generator(2**32 - 1, 7, 3, 10**9))
    assert big.index.numel() == 32


@pytest.mark.parametrize("score", ["uniform", "uncertainty"])
@pytest.mark.parametrize("kind", ["ce", "mse_logits"])
def test_sampled_term_and_its_gradient_are_unbiased(score, kind):
    """Over R independent draws the mean of the sampled term (and of its gradient along a fixed direction)
    is the full term: a z-test at 4.5 standard errors (a 1-in-150000 false alarm per check), seeded."""
    z, teachers = _problem()
    full = z.clone().requires_grad_(True)
    f = distill_term(full, teachers, kind)
    (gf,) = torch.autograd.grad(f, full)
    direction = torch.randn(z.numel(), generator=torch.Generator().manual_seed(9))
    values, grads = [], []
    for r in range(2000):
        x = z.clone().requires_grad_(True)
        rows = draw_rows(x, 0.25, score, step_generator(11, 0, 0, r))
        v = distill_term(x, [t[rows.index] for t in teachers], kind, rows)  # teachers on the drawn rows
        (g,) = torch.autograd.grad(v, x)
        values.append(float(v.detach()))
        grads.append(float(g @ direction))
    for sample, target in (
        (torch.tensor(values), float(f.detach())),
        (torch.tensor(grads), float(gf @ direction)),
    ):
        se = float(sample.std()) / math.sqrt(sample.numel())
        assert se > 0  # a sample, not the full term again
        assert abs(float(sample.mean()) - target) < 4.5 * se, (float(sample.mean()), target, se)


def test_the_loss_uses_the_rows_and_logs_an_estimated_kl():
    z, teachers = _problem()
    rows = draw_rows(z, 0.5, "uniform", step_generator(0, 0, 0, 0))
    sub = [t[rows.index] for t in teachers]  # what a teacher returns on the sub-batch
    labels = (torch.sigmoid(z) > 0.5).float()
    parts = distillation_loss(z, labels, [TeacherTerm("distill", 2.0, "ce", sub, rows)])
    assert float(parts.distill) == pytest.approx(float(distill_term(z, sub, "ce", rows)))
    assert float(parts.total) == pytest.approx(float(parts.bce + 2.0 * parts.distill))
    assert float(parts.kl) == pytest.approx(float(distill_term(z, sub, "kl", rows)))
