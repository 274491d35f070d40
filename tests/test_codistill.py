import torch
import torch.nn.functional as F

from recsys_codistill.codistill.losses import codistill_loss, distill_term
from recsys_codistill.config import CodistillConfig


def test_burn_in_and_zero_weight_are_plain_bce():
    z, y = torch.randn(8), torch.randint(0, 2, (8,)).float()
    bce = F.binary_cross_entropy_with_logits(z, y)
    assert torch.equal(codistill_loss(z, None, y, CodistillConfig()).total, bce)
    w0 = codistill_loss(z, [torch.randn(8)], y, CodistillConfig(distill_weight=0.0))
    assert torch.equal(w0.total, bce)


def test_ce_gradient_matches_hand_computation():
    # d/dz CE(p_t, sigmoid(z)) = (sigmoid(z) - p_t) / B ; total adds w times that to the BCE gradient.
    z = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    t = torch.tensor([1.0, 0.5, -0.7])
    y = torch.tensor([1.0, 0.0, 1.0])
    w = 2.0
    parts = codistill_loss(z, [t], y, CodistillConfig(distill_weight=w, loss="ce"))
    parts.total.backward()
    s = torch.sigmoid(z.detach())
    expected = (s - y) / 3 + w * (s - torch.sigmoid(t)) / 3
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-7)


def test_no_gradient_reaches_the_teacher():
    z = torch.randn(5, requires_grad=True)
    t = torch.randn(5, requires_grad=True)
    codistill_loss(z, [t], torch.ones(5), CodistillConfig()).total.backward()
    assert t.grad is None and z.grad is not None


def test_three_groups_average_two_teachers():
    z = torch.randn(6)
    t1, t2 = torch.randn(6), torch.randn(6)
    p_bar = (torch.sigmoid(t1) + torch.sigmoid(t2)) / 2
    got = distill_term(z, [t1, t2], "ce")
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(z, p_bar))


def test_kl_is_zero_at_match_and_mse_on_logits():
    t = torch.randn(7)
    assert abs(distill_term(t.clone(), [t], "kl").item()) < 1e-6
    z = t + 1.0
    torch.testing.assert_close(distill_term(z, [t], "mse_logits"), torch.tensor(1.0))


def test_logged_gap_is_the_kl_whatever_the_loss():
    # The logged gap is KL(p̄ ‖ σ(z)) = Σ p log(p/q) + (1 − p) log((1 − p)/(1 − q)), hand-computed; the CE
    # loss term exceeds it by the teacher's entropy, so it never reaches 0 when the student matches.
    gen = torch.Generator().manual_seed(0)
    z, t = (torch.randn(9, dtype=torch.float64, generator=gen) for _ in range(2))
    p, q = torch.sigmoid(t), torch.sigmoid(z)
    kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()
    y = torch.ones(9, dtype=torch.float64)
    for loss in ("ce", "kl", "mse_logits"):
        parts = codistill_loss(z, [t], y, CodistillConfig(loss=loss))
        torch.testing.assert_close(parts.kl, kl.float() if parts.kl.dtype == torch.float32 else kl)
    match = codistill_loss(t.clone(), [t], y, CodistillConfig(loss="ce"))
    # the gap is computed in float32 (teachers' logits are): 0 up to its rounding
    assert abs(match.kl.item()) < 1e-6 and match.distill.item() > 0.1
    assert codistill_loss(z, None, y, CodistillConfig()).kl.item() == 0.0
