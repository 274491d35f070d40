"""Post-hoc calibrators of one model: a logit offset, Platt scaling and isotonic regression.

Each is fitted on a *calibration split* (one model's logits and the 0/1 labels of the same rows) and then
applied to other rows. The study uses them to take churn apart (:mod:`recsys_codistill.eval.retrains`):
two retrains whose predictions differ only by a global shift agree after an offset, those that differ by
any increasing distortion agree after isotonic recalibration, and what is left after that is
disagreement in how the models *order* the rows, which no per-model recalibration can remove.

Calibrators
    - :class:`OffsetCalibrator`  σ(z + b): the intercept of a logistic regression whose slope is fixed
      at 1, i.e. the b with mean σ(z + b) = base rate (a global shift of the log-odds).
    - :class:`PlattCalibrator`   σ(a z + b): unpenalised one-feature logistic regression of y on z
      (Platt 1999), the best affine map of the logit.
    - :class:`IsotonicCalibrator` the best non-decreasing step function of z (pool-adjacent-violators,
      Zadrozny & Elkan 2002), interpolated linearly between thresholds as scikit-learn does.

Each is a small frozen dataclass with ``kind``, ``transform(logits) -> probabilities`` (float64) and
``to_dict()`` (JSON-able parameters; :func:`calibrator_from_dict` reads them back). Fitting is
deterministic and needs both classes in the labels: a calibrator fitted to one class would map every row
to a constant 0 or 1, which says nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from scipy.optimize import isotonic_regression

from recsys_codistill.eval.metrics import as_numpy, logit, sigmoid

__all__ = [
    "CALIBRATORS",
    "ISOTONIC_CLIP",
    "Calibrator",
    "IsotonicCalibrator",
    "OffsetCalibrator",
    "PlattCalibrator",
    "calibrator_from_dict",
    "fit_calibrator",
    "fit_isotonic",
    "fit_offset",
    "fit_platt",
]

#: Names accepted by :func:`fit_calibrator`.
CALIBRATORS: tuple[str, ...] = ("offset", "platt", "isotonic")
#: Isotonic outputs are clipped to [ISOTONIC_CLIP, 1 - ISOTONIC_CLIP]: a step fitted to a run of one
#: class is exactly 0 or 1, and one such row would make the log loss infinite.
ISOTONIC_CLIP = 1e-7

# Newton iterations stop when a step moves the parameters by less than this (relative to 1 + |param|).
_TOL = 1e-12
_MAX_ITER = 200


def _check_fit_inputs(logits: Any, labels: Any, calibrator: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 logits, bool labels) of a calibration split, or a ValueError naming what is wrong."""
    z = as_numpy(logits, name="logits")
    y = as_numpy(labels, name="labels")
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"{calibrator}: logits have {z.shape[0]} rows but labels have {y.shape[0]}")
    if z.size == 0:
        raise ValueError(f"{calibrator}: the calibration split is empty (0 rows)")
    if not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
        raise ValueError(f"{calibrator}: logits must be numeric, got dtype {z.dtype}")
    z = z.astype(np.float64, copy=False)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{calibrator}: logits must be finite; got {int(np.sum(~np.isfinite(z)))} NaN/inf")
    if y.dtype != np.bool_:
        if y.dtype.kind not in "iuf":
            raise ValueError(f"{calibrator}: labels must be 0/1, got dtype {y.dtype}")
        ok = (y == 0) | (y == 1)  # NaN and 0.5 fail both
        if not ok.all():
            raise ValueError(f"{calibrator}: labels must be 0/1; got e.g. {y[~ok][:3].tolist()}")
        y = y == 1
    pos = int(np.count_nonzero(y))
    if pos == 0 or pos == y.size:
        only = "positive" if pos else "negative"
        raise ValueError(
            f"{calibrator}: needs both classes in the calibration labels; all {y.size} are {only}"
        )
    return z, y


def _check_logits(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError("logits to transform must be finite")
    return z


class Calibrator:
    """Common interface: ``kind``, ``transform(logits)`` and ``to_dict()``."""

    kind: ClassVar[str]

    def transform(self, logits: Any) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class OffsetCalibrator(Calibrator):
    """σ(z + b): shifts every logit by the same ``b``."""

    b: float
    kind: ClassVar[str] = "offset"

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (float64, the shape of ``logits``)."""
        return sigmoid(_check_logits(logits) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "b": float(self.b)}


@dataclass(frozen=True)
class PlattCalibrator(Calibrator):
    """σ(a z + b). ``a < 0`` (a model anti-correlated with the labels) reverses the order of the rows."""

    a: float
    b: float
    kind: ClassVar[str] = "platt"

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (float64, the shape of ``logits``)."""
        return sigmoid(self.a * _check_logits(logits) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": float(self.a), "b": float(self.b)}


@dataclass(frozen=True, eq=False)
class IsotonicCalibrator(Calibrator):
    """Piecewise-linear interpolation of (``x_thresholds``, ``y_thresholds``), constant outside them.

    Outputs are clipped to ``[ISOTONIC_CLIP, 1 - ISOTONIC_CLIP]`` so that log loss stays finite: the
    fitted step is exactly 0 (or 1) below (above) the first positive (last negative) calibration row.
    Arrays are stored read-only (the dataclass is frozen; ``eq=False`` because arrays have no scalar ==).
    """

    x_thresholds: np.ndarray
    y_thresholds: np.ndarray
    kind: ClassVar[str] = "isotonic"

    def __post_init__(self) -> None:
        x = np.array(self.x_thresholds, dtype=np.float64)
        y = np.array(self.y_thresholds, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError(
                f"isotonic: x_thresholds and y_thresholds must be equal-length non-empty 1-D arrays; "
                f"got shapes {x.shape} and {y.shape}"
            )
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
            raise ValueError(
                "isotonic: x_thresholds must increase strictly and y_thresholds must not decrease"
            )
        x.flags.writeable = False
        y.flags.writeable = False
        object.__setattr__(self, "x_thresholds", x)
        object.__setattr__(self, "y_thresholds", y)

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (float64, the shape of ``logits``), clipped to [1e-7, 1 - 1e-7]."""
        p = np.interp(_check_logits(logits), self.x_thresholds, self.y_thresholds)
        return np.clip(p, ISOTONIC_CLIP, 1.0 - ISOTONIC_CLIP)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "x_thresholds": self.x_thresholds.tolist(),
            "y_thresholds": self.y_thresholds.tolist(),
        }


def fit_offset(logits: Any, labels: Any) -> OffsetCalibrator:
    """Fit σ(z + b) by solving mean σ(z + b) = mean(y) for b.

    This is the maximum-likelihood intercept of a logistic regression of y with the logit as a fixed
    offset (slope 1): its score equation is Σ (y − σ(z + b)) = 0, so the fitted model predicts the
    calibration base rate on average. f(b) = mean σ(z + b) − ȳ increases strictly, and is ≤ 0 at
    b = logit(ȳ) − max z and ≥ 0 at b = logit(ȳ) − min z, so Newton steps kept inside that shrinking
    bracket (bisecting whenever a step leaves it) converge from any start; stops at |Δb| ≤ 1e-12 (1 + |b|).

    Raises ValueError on mismatched lengths, an empty split, non-finite logits, non-0/1 labels, or labels
    of one class only.
    """
    z, y = _check_fit_inputs(logits, labels, "offset")
    ybar = float(np.count_nonzero(y)) / y.size
    target = float(logit(ybar))
    lo, hi = target - float(z.max()), target - float(z.min())
    b = min(max(0.0, lo), hi)
    for _ in range(_MAX_ITER):
        if hi - lo <= _TOL * (1.0 + abs(b)):
            break
        p = sigmoid(z + b)
        f = float(p.mean()) - ybar
        if f == 0.0:
            break
        if f > 0:
            hi = b
        else:
            lo = b
        slope = float(np.mean(p * (1.0 - p)))
        new = b - f / slope if slope > 0 else np.nan
        if not lo < new < hi:  # also catches NaN
            new = 0.5 * (lo + hi)
        step, b = new - b, new
        if abs(step) <= _TOL * (1.0 + abs(b)):
            break
    else:  # pragma: no cover - the bracket halves at worst, so 200 iterations always suffice
        raise ValueError("offset: Newton iterations did not converge")
    return OffsetCalibrator(b=float(b))


def _log_likelihood(eta: np.ndarray, y: np.ndarray) -> float:
    """Σ y η − log(1 + e^η): the Bernoulli log-likelihood in a form that never takes log(0)."""
    return float(np.sum(np.where(y, eta, 0.0) - np.logaddexp(0.0, eta)))


def fit_platt(logits: Any, labels: Any) -> PlattCalibrator:
    """Fit σ(a z + b) by unpenalised maximum likelihood (Newton / IRLS with step halving).

    The likelihood is concave, so Newton's method with step halving (halve until the log-likelihood
    does not drop) converges from any start; it starts from the identity map a = 1, b = 0, or from the
    intercept-only model (a = 0, b = logit of the base rate) when that fits better — for logits so badly
    scaled that σ saturates, where the Hessian at the identity is numerically singular. The iteration runs on the
    standardised logit (z − mean) / sd and maps back — the same iterates in exact arithmetic (Newton is
    affine invariant) but a well-conditioned 2×2 system whatever the logits' scale. Stops when a step
    moves (a, b) by less than 1e-12 relative; the result then equals scikit-learn's
    ``LogisticRegression(C=np.inf)`` to the solvers' tolerance.

    No probability targets are smoothed (Platt's original (N+ + 1)/(N+ + 2) targets): with the
    calibration splits used here (thousands of rows) the smoothing is negligible, and plain maximum
    likelihood is what scikit-learn and the offset calibrator fit.

    Raises ValueError as :func:`fit_offset`, and when the maximum-likelihood estimate does not exist:
    constant logits (a is not identified) or labels separated by a threshold on the logit (a → ±∞).
    """
    z, y = _check_fit_inputs(logits, labels, "platt")
    mean, sd = float(z.mean()), float(z.std())
    if not sd > 0:
        raise ValueError("platt: the logits are constant, so the slope a is not identified")
    z_neg_max, z_neg_min = float(z[~y].max()), float(z[~y].min())
    z_pos_max, z_pos_min = float(z[y].max()), float(z[y].min())
    if z_neg_max <= z_pos_min or z_pos_max <= z_neg_min:
        raise ValueError(
            "platt: a threshold on the logit separates the two classes, so the maximum-likelihood "
            "slope is infinite; use isotonic calibration instead"
        )
    x = (z - mean) / sd
    yf = y.astype(np.float64)
    # Start from the identity map (a = 1, b = 0 on z) unless the intercept-only model (a = 0) fits
    # better: logits of a badly scaled model saturate σ, and Newton's Hessian is then numerically 0.
    theta = np.array([sd, mean])  # (slope, intercept) on x
    ll = _log_likelihood(theta[0] * x + theta[1], y)
    flat = np.array([0.0, float(logit(float(np.count_nonzero(y)) / y.size))])
    ll_flat = _log_likelihood(np.full(x.shape, flat[1]), y)
    if not ll >= ll_flat:
        theta, ll = flat, ll_flat
    for _ in range(_MAX_ITER):
        p = sigmoid(theta[0] * x + theta[1])
        w = p * (1.0 - p)
        r = yf - p
        grad = np.array([np.dot(r, x), r.sum()])
        hess = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]])
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # pragma: no cover - needs w == 0 on all but one logit value
            raise ValueError("platt: singular Hessian (predictions saturated at 0/1)") from None
        t = 1.0
        while True:
            cand = theta + t * step
            ll_new = _log_likelihood(cand[0] * x + cand[1], y)
            # Accept a drop at rounding level: at the optimum the log-likelihood is flat to ~1e-16.
            if ll_new >= ll - 1e-13 * (1.0 + abs(ll)) or t < 2.0**-40:
                break
            t *= 0.5
        moved = t * step
        theta, ll = cand, ll_new
        if np.all(np.abs(moved) <= _TOL * (1.0 + np.abs(theta))):
            break
    else:
        raise ValueError(f"platt: Newton iterations did not converge in {_MAX_ITER} steps")
    a = theta[0] / sd
    return PlattCalibrator(a=float(a), b=float(theta[1] - a * mean))


def fit_isotonic(logits: Any, labels: Any) -> IsotonicCalibrator:
    """Fit the non-decreasing step function of the logit that is closest to the labels (least squares).

    As scikit-learn's ``IsotonicRegression(increasing=True, out_of_bounds="clip")``: rows with equal
    logits are pooled first into their label mean (weighted by their count), pool-adjacent-violators
    (``scipy.optimize.isotonic_regression``, O(n)) runs on the pooled means, and thresholds inside flat
    runs are dropped because they do not change the interpolation. Ties are exact float equality
    (scikit-learn also merges logits closer than 1e-15, which only matters for values within rounding).

    Least squares on 0/1 labels is also the maximum-likelihood monotone fit, so the step values are
    empirical click rates of contiguous logit ranges. :meth:`IsotonicCalibrator.transform` clips them to
    [1e-7, 1 - 1e-7] so that log loss stays finite.

    Raises ValueError as :func:`fit_offset`.
    """
    z, y = _check_fit_inputs(logits, labels, "isotonic")
    order = np.argsort(z, kind="stable")
    zs = z[order]
    ys = y[order].astype(np.float64)
    starts = np.flatnonzero(np.concatenate(([True], zs[1:] != zs[:-1])))
    counts = np.diff(np.append(starts, zs.size)).astype(np.float64)
    means = np.add.reduceat(ys, starts) / counts
    fitted = np.asarray(isotonic_regression(means, weights=counts, increasing=True).x, dtype=np.float64)
    x_thr = zs[starts]
    keep = np.ones(fitted.size, dtype=np.bool_)
    keep[1:-1] = (fitted[1:-1] != fitted[:-2]) | (fitted[1:-1] != fitted[2:])
    # PAVA's block means can differ by an ulp inside a block; force monotone for the constructor's check.
    y_thr = np.maximum.accumulate(fitted[keep])
    return IsotonicCalibrator(x_thresholds=x_thr[keep], y_thresholds=y_thr)


def fit_calibrator(kind: Literal["offset", "platt", "isotonic"], logits: Any, labels: Any) -> Calibrator:
    """Fit the calibrator named ``kind`` (one of :data:`CALIBRATORS`) on a calibration split."""
    if kind == "offset":
        return fit_offset(logits, labels)
    if kind == "platt":
        return fit_platt(logits, labels)
    if kind == "isotonic":
        return fit_isotonic(logits, labels)
    raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATORS}")


def calibrator_from_dict(params: dict[str, Any]) -> Calibrator:
    """Rebuild a calibrator from its :meth:`to_dict` output (e.g. read back from a JSON report)."""
    kind = params.get("kind")
    if kind == "offset":
        return OffsetCalibrator(b=float(params["b"]))
    if kind == "platt":
        return PlattCalibrator(a=float(params["a"]), b=float(params["b"]))
    if kind == "isotonic":
        return IsotonicCalibrator(
            x_thresholds=np.asarray(params["x_thresholds"]), y_thresholds=np.asarray(params["y_thresholds"])
        )
    raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATORS}")
