"""recsys_codistill.eval.calibration: offset, Platt and isotonic calibrators against scikit-learn."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from recsys_codistill.eval.calibration import (
    CALIBRATORS,
    ISOTONIC_CLIP,
    IsotonicCalibrator,
    OffsetCalibrator,
    PlattCalibrator,
    calibrator_from_dict,
    fit_calibrator,
    fit_isotonic,
    fit_offset,
    fit_platt,
)
from recsys_codistill.eval.metrics import log_loss, sigmoid


def _split(n: int, seed: int, slope: float = 0.7, shift: float = -1.2) -> tuple[np.ndarray, np.ndarray]:
    """Miscalibrated logits z with labels drawn from σ(slope z + shift)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < sigmoid(slope * z + shift)).astype(np.int64)
    return z, y


def test_offset_matches_base_rate() -> None:
    z, y = _split(5_000, 0)
    cal = fit_offset(z, y)
    assert isinstance(cal, OffsetCalibrator)
    assert cal.transform(z).mean() == pytest.approx(y.mean(), abs=1e-12)
    # It is the maximum-likelihood intercept: moving b either way lowers the likelihood.
    ll = log_loss(y, cal.transform(z))
    assert ll < log_loss(y, sigmoid(z + cal.b + 1e-3)) and ll < log_loss(y, sigmoid(z + cal.b - 1e-3))


def test_offset_converges_from_far_away() -> None:
    # Saturated logits and a rare class: plain Newton from b = 0 overshoots; the bracket keeps it safe.
    rng = np.random.default_rng(1)
    z = rng.normal(12.0, 4.0, 3_000)
    y = (rng.random(3_000) < 0.01).astype(int)
    y[0] = 1
    cal = fit_offset(z, y)
    assert cal.transform(z).mean() == pytest.approx(y.mean(), abs=1e-12)


def test_offset_constant_logits_is_exact() -> None:
    cal = fit_offset(np.full(10, 2.0), [0, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    assert cal.transform([2.0])[0] == pytest.approx(0.2, abs=1e-14)


def test_platt_matches_sklearn() -> None:
    z, y = _split(4_000, 2)
    cal = fit_platt(z, y)
    assert isinstance(cal, PlattCalibrator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation / convergence warning hidden in the reference
        ref = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-14, max_iter=1_000)
        ref.fit(z[:, None], y)
    assert cal.a == pytest.approx(float(ref.coef_[0, 0]), abs=1e-6)
    assert cal.b == pytest.approx(float(ref.intercept_[0]), abs=1e-6)
    # The truth was a = 0.7, b = -1.2: the fit should be near it too.
    assert abs(cal.a - 0.7) < 0.1 and abs(cal.b + 1.2) < 0.1
    np.testing.assert_allclose(cal.transform(z), ref.predict_proba(z[:, None])[:, 1], atol=1e-7)


def test_platt_is_scale_free() -> None:
    # Logits in the thousands (a badly scaled model) fit as well as logits of order 1.
    z, y = _split(3_000, 3)
    small = fit_platt(z, y)
    big = fit_platt(1_000.0 * z + 5_000.0, y)
    assert big.a * 1_000.0 == pytest.approx(small.a, rel=1e-8)
    assert big.b + 5_000.0 * big.a == pytest.approx(small.b, abs=1e-8)


def test_isotonic_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(4)
    z = np.round(rng.normal(0.0, 1.0, 3_000), 1)  # ~60 distinct values: many ties
    y = (rng.random(z.size) < sigmoid(1.5 * z - 1.0)).astype(int)
    z_new = np.concatenate((rng.normal(0.0, 1.5, 2_000), [-10.0, 10.0, z.min(), z.max()]))
    cal = fit_isotonic(z, y)
    assert isinstance(cal, IsotonicCalibrator)
    ref = IsotonicRegression(out_of_bounds="clip", increasing=True).fit(z, y)
    expected = np.clip(ref.predict(z_new), ISOTONIC_CLIP, 1 - ISOTONIC_CLIP)
    np.testing.assert_allclose(cal.transform(z_new), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cal.x_thresholds, ref.X_thresholds_, rtol=0, atol=0)
    np.testing.assert_allclose(cal.y_thresholds, ref.y_thresholds_, rtol=0, atol=1e-12)


def test_isotonic_matches_sklearn_without_ties_and_pools_ties_first() -> None:
    z, y = _split(2_000, 5)
    ref = IsotonicRegression(out_of_bounds="clip").fit(z, y)
    z_new = np.linspace(-6, 6, 501)
    expected = np.clip(ref.predict(z_new), ISOTONIC_CLIP, 1 - ISOTONIC_CLIP)
    np.testing.assert_allclose(fit_isotonic(z, y).transform(z_new), expected, rtol=0, atol=1e-12)
    # Tied logits are one point with their mean label, whatever the order of their rows.
    cal = fit_isotonic([0.0, 1.0, 1.0, 1.0, 2.0], [0, 1, 0, 1, 1])
    np.testing.assert_allclose(cal.transform([0.0, 1.0, 2.0]), [ISOTONIC_CLIP, 2 / 3, 1 - ISOTONIC_CLIP])


def test_isotonic_clip_keeps_log_loss_finite() -> None:
    cal = fit_isotonic([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    p = cal.transform([-5.0, 0.0, 3.0, 5.0])
    assert p.min() == ISOTONIC_CLIP and p.max() == 1 - ISOTONIC_CLIP
    assert np.isfinite(log_loss([1, 1, 0, 0], p))


@pytest.mark.parametrize("kind", CALIBRATORS)
def test_dispatcher_dict_round_trip_and_frozen(kind: str) -> None:
    z, y = _split(1_000, 6)
    cal = fit_calibrator(kind, z, y)
    assert cal.kind == kind
    params = json.loads(json.dumps(cal.to_dict()))
    assert params["kind"] == kind
    back = calibrator_from_dict(params)
    np.testing.assert_array_equal(back.transform(z), cal.transform(z))
    assert cal.transform(z).dtype == np.float64
    with pytest.raises(AttributeError):
        cal.b = 0.0  # type: ignore[misc]  # frozen dataclass (isotonic has no b; still frozen)


def test_dispatcher_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        fit_calibrator("beta", [0.0, 1.0], [0, 1])  # type: ignore[arg-type]


@pytest.mark.parametrize("fit", [fit_offset, fit_platt, fit_isotonic])
def test_input_errors(fit) -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="both classes"):
        fit([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        fit([0.1, np.nan, 0.3], [0, 1, 0])
    with pytest.raises(ValueError, match="finite"):
        fit([0.1, np.inf, 0.3], [0, 1, 0])
    with pytest.raises(ValueError, match="3 rows but labels have 2"):
        fit([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        fit([], [])
    with pytest.raises(ValueError, match="0/1"):
        fit([0.1, 0.2, 0.3], [0, 0.5, 1])
    with pytest.raises(ValueError, match="0/1"):
        fit([0.1, 0.2, 0.3], [0, 2, 1])


def test_platt_refuses_when_the_mle_does_not_exist() -> None:
    with pytest.raises(ValueError, match="separates"):
        fit_platt([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="separates"):
        fit_platt([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0])
    with pytest.raises(ValueError, match="constant"):
        fit_platt([1.0, 1.0, 1.0], [0, 1, 0])
    # Overlapping classes are fine, even with a negative slope.
    cal = fit_platt([0.0, 1.0, 2.0, 3.0, 0.5], [1, 1, 0, 0, 0])
    assert cal.a < 0


def test_transform_rejects_nan() -> None:
    cal = fit_offset([0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        cal.transform([0.0, np.nan])
