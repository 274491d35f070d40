"""recsys_codistill.eval.metrics against scikit-learn, torchrec and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recsys_codistill.eval import metrics
from recsys_codistill.eval.metrics import base_rate, calibration, log_loss, normalized_entropy, roc_auc


def _data(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    s = 1 / (1 + np.exp(-(rng.normal(-1, 1, n) + 1.2 * y)))
    if decimals is not None:
        s = np.round(s, decimals)
    w = rng.gamma(2.0, 1.0, n)
    return y, s, w


@pytest.mark.parametrize("decimals", [None, 3, 2, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn(decimals: int | None, seed: int) -> None:
    y, s, w = _data(20_000, seed, decimals)
    assert abs(roc_auc(y, s) - roc_auc_score(y, s)) <= 1e-9
    assert abs(roc_auc(y, s, w) - roc_auc_score(y, s, sample_weight=w)) <= 1e-9


def test_auc_chunked_paths_match_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several chunks of positives for the searchsorted loop and of rows for the losses.
    monkeypatch.setattr(metrics, "_CHUNK", 1000)
    y, s, w = _data(7_777, 3, 2)
    assert abs(roc_auc(y, s) - roc_auc_score(y, s)) <= 1e-9
    assert abs(log_loss(y, s, w) - sk_log_loss(y, s, sample_weight=w)) <= 1e-9
    assert abs(calibration(y, s) - s.sum() / y.sum()) <= 1e-12


def test_auc_hand_values_and_ties() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert roc_auc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert roc_auc([1, 0], [0.9, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    # Weights act like repeated rows.
    assert roc_auc([0, 1, 1], [0.3, 0.2, 0.4], [2.0, 1.0, 3.0]) == pytest.approx(
        roc_auc([0, 0, 1, 1, 1, 1], [0.3, 0.3, 0.2, 0.4, 0.4, 0.4])
    )


def test_auc_input_types() -> None:
    torch = pytest.importorskip("torch")
    y, s, _ = _data(5_000, 4, 2)
    ref = roc_auc_score(y, s)
    assert abs(roc_auc(y.astype(bool), s) - ref) <= 1e-9
    assert abs(roc_auc(y.astype(np.float32), s) - ref) <= 1e-9
    s32 = s.astype(np.float32)
    assert abs(roc_auc(y, s32) - roc_auc_score(y, s32)) <= 1e-9
    assert abs(roc_auc(torch.from_numpy(y), torch.from_numpy(s)) - ref) <= 1e-9
    assert abs(roc_auc(y.reshape(-1, 1), s.reshape(-1, 1)) - ref) <= 1e-9
    assert abs(roc_auc(list(y), list(s)) - ref) <= 1e-9


def test_one_class_labels_raise() -> None:
    with pytest.raises(ValueError, match="all .*labels are positive"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all .*labels are negative"):
        roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="normalized entropy is undefined"):
        normalized_entropy([0, 0, 0], [0.1, 0.2, 0.3])
    # All the positive weight is zero: one class in the weighted sense.
    with pytest.raises(ValueError, match="ROC AUC is undefined"):
        roc_auc([0, 1, 0], [0.1, 0.2, 0.3], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="no positive labels"):
        calibration([0, 0], [0.1, 0.2])


@pytest.mark.parametrize(
    "bad", [[0, 2, 1], [0, -1, 1], [0.0, 0.5, 1.0], [0.0, math.nan, 1.0], ["a", "b", "a"]]
)
def test_non_binary_labels_raise(bad: list) -> None:
    with pytest.raises(ValueError, match="labels must be 0/1"):
        roc_auc(bad, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        log_loss(bad, [0.1, 0.2, 0.3])


def test_bad_scores_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="rows"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="non-negative"):
        roc_auc([0, 1], [0.1, 0.2], [1.0, -1.0])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])


@pytest.mark.parametrize("decimals", [None, 2])
def test_log_loss_matches_sklearn(decimals: int | None) -> None:
    y, p, w = _data(20_000, 5, decimals)
    p = np.clip(p, 0.001, 0.999)
    assert abs(log_loss(y, p) - sk_log_loss(y, p)) <= 1e-9
    assert abs(log_loss(y, p, w) - sk_log_loss(y, p, sample_weight=w)) <= 1e-9
    assert (
        abs(log_loss(y, p.astype(np.float32)) - sk_log_loss(y, p.astype(np.float32).astype(np.float64)))
        <= 1e-9
    )


def test_log_loss_clipping() -> None:
    y = np.array([1, 0, 1, 0, 1])
    p = np.array([0.0, 1.0, 1.0, 0.0, 0.7])
    eps64 = float(np.finfo(np.float64).eps)
    # scikit-learn >= 1.5 clips at the dtype's machine epsilon; with that eps we match it exactly.
    assert abs(log_loss(y, p, eps=eps64) - sk_log_loss(y, p)) <= 1e-9
    # Default eps = 1e-15 (the classic sklearn default): p is clipped to [1e-15, 1 - 1e-15] in float64.
    hi = 1.0 - 1e-15
    terms = [-math.log(1e-15), -math.log(1.0 - hi), -math.log(hi), -math.log(1.0 - 1e-15), -math.log(0.7)]
    expected = sum(terms) / 5
    assert log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_normalized_entropy_matches_torchrec() -> None:
    torch = pytest.importorskip("torch")
    ne_mod = pytest.importorskip("torchrec.metrics.ne")
    y, p, w = _data(10_000, 6)
    p[:3] = [0.0, 1.0, 1e-14]  # exercise the eta clamp
    for weights in (None, w):
        tw = torch.ones(y.size, dtype=torch.float64) if weights is None else torch.from_numpy(weights)
        states = ne_mod.get_ne_states(torch.from_numpy(y).double(), torch.from_numpy(p), tw, 1e-12)
        ref = ne_mod.compute_ne(
            states["cross_entropy_sum"],
            states["weighted_num_samples"],
            states["pos_labels"],
            states["neg_labels"],
            1e-12,
        ).item()
        assert abs(normalized_entropy(y, p, weights) - ref) <= 1e-9 * abs(ref)


def test_normalized_entropy_definition() -> None:
    y, p, w = _data(10_000, 7)
    for weights in (None, w):
        br = base_rate(y, weights)
        h = -(br * math.log(br) + (1 - br) * math.log(1 - br))
        assert normalized_entropy(y, p, weights) == pytest.approx(log_loss(y, p, weights) / h, rel=1e-12)
    # Predicting the base rate everywhere gives NE = 1.
    br = base_rate(y)
    assert normalized_entropy(y, np.full(y.size, br)) == pytest.approx(1.0, rel=1e-12)


def test_calibration_and_base_rate_hand_values() -> None:
    y = [1, 0, 0, 1]
    p = [0.5, 0.25, 0.25, 0.5]
    assert calibration(y, p) == 0.75
    assert base_rate(y) == 0.5
    assert base_rate(y, [3.0, 1.0, 0.0, 0.0]) == 0.75
    assert calibration(y, p, [2.0, 1.0, 1.0, 0.0]) == pytest.approx((1.0 + 0.25 + 0.25) / 2.0)
