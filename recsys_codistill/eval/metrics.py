"""Quality metrics for binary CTR predictions: exact ROC AUC, log loss, normalized entropy, calibration.

Every function takes numpy arrays, torch tensors (moved to CPU, never imported here) or sequences, and
does its arithmetic in float64. They are written for very large evaluation sets (100M predictions):

- no O(n^2) work and no per-example Python;
- few full-size temporaries: the AUC sorts the two classes' scores separately (two copies, no int64
  permutation), and the losses are summed over fixed-size chunks so that their float64 temporaries stay
  a few MB whatever n is;
- float32 inputs are accepted as they are (sorting float32 scores keeps their ties exactly as given).

Labels must be 0/1 (bool, integer or float); anything else is a ValueError, so a label column with
``-1`` for "missing" or a probability passed as a label fails loudly instead of skewing a metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_numpy",
    "base_rate",
    "calibration",
    "log_loss",
    "logit",
    "normalized_entropy",
    "roc_auc",
    "sigmoid",
]

# Rows per chunk for the chunked reductions: 2^20 float64 values = 8 MB per temporary.
_CHUNK = 1 << 20
#: Probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before :func:`logit`, so it stays finite.
LOGIT_EPS = 1e-12


def as_numpy(x: Any, *, name: str = "array") -> np.ndarray:
    """Return a 1-D numpy view/copy of ``x`` (numpy array, torch tensor, or sequence).

    Torch tensors are detected by duck typing so that this module never imports torch. Half-precision
    tensors (which numpy cannot hold) are widened to float32 first.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        x = t.numpy()
    arr = np.asarray(x)
    if arr.ndim > 1 and sum(d != 1 for d in arr.shape) <= 1:
        arr = arr.reshape(-1)  # (n, 1) column vectors, as models often output
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _as_labels(labels: Any) -> np.ndarray:
    """Validate 0/1 labels and return them as a bool array (1 byte per row: the cheapest mask)."""
    y = as_numpy(labels, name="labels")
    if y.size == 0:
        raise ValueError("labels are empty")
    if y.dtype == np.bool_:
        return y
    if np.issubdtype(y.dtype, np.integer):
        ok = int(y.min()) >= 0 and int(y.max()) <= 1
    elif np.issubdtype(y.dtype, np.floating):
        # min/max alone would let 0.5 through; NaN fails both equalities.
        ok = int(np.count_nonzero(y == 0)) + int(np.count_nonzero(y == 1)) == y.size
    else:
        ok = False
    if not ok:
        bad = y[~((y == 0) | (y == 1))] if y.dtype.kind in "iufb" else y[:1]
        raise ValueError(
            f"labels must be 0/1; got dtype {y.dtype} with e.g. {bad[:3].tolist()} "
            "(drop unlabelled rows before computing metrics)"
        )
    return y.astype(np.bool_, copy=False)


def _as_scores(scores: Any, n: int, name: str) -> np.ndarray:
    s = as_numpy(scores, name=name)
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} rows but labels have {n}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN")
    return s


def _as_probs(probs: Any, n: int) -> np.ndarray:
    p = _as_scores(probs, n, "probs")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must lie in [0, 1]; got range [{p.min()}, {p.max()}]")
    return p


def _as_weights(sample_weight: Any, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = as_numpy(sample_weight, name="sample_weight").astype(np.float64, copy=False)
    if w.shape[0] != n:
        raise ValueError(f"sample_weight has {w.shape[0]} rows but labels have {n}")
    if not np.all(np.isfinite(w)) or w.min() < 0:
        raise ValueError("sample_weight must be finite and non-negative")
    return w


def _class_totals(y: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    """(positive weight, negative weight); counts when unweighted."""
    if w is None:
        pos = int(np.count_nonzero(y))
        return float(pos), float(y.size - pos)
    pos_w = float(w[y].sum())
    return pos_w, float(w.sum()) - pos_w


def _require_both_classes(pos: float, neg: float, metric: str) -> None:
    if pos <= 0 or neg <= 0:
        only = "positive" if neg <= 0 else "negative"
        raise ValueError(
            f"{metric} is undefined when all (weighted) labels are {only}: "
            f"positive weight {pos:g}, negative weight {neg:g}"
        )


def roc_auc(labels: Any, scores: Any, sample_weight: Any = None) -> float:
    """Exact area under the ROC curve, ties counted as one half (Mann-Whitney U / (P * N)).

    Equal to ``sklearn.metrics.roc_auc_score`` (which integrates the tie-aware ROC curve with the
    trapezoid rule — the same quantity) to float64 rounding.

    Unweighted path: sort the positive and the negative scores separately (``np.sort``, which uses the
    SIMD sorts of recent numpy and needs no int64 permutation) and, for chunks of sorted positives,
    count the negatives strictly below and tied with each positive with two ``searchsorted`` calls. The
    pair counts are summed as int64, so the statistic is exact until the single final division
    (2U < 2^53 holds up to ~1.3e8 rows with balanced classes).

    Weighted path: one ``argsort`` of the scores, tied scores grouped by where the sorted value changes,
    per-group positive/negative weight with ``np.add.reduceat``, then
    ``sum_g Wpos_g * (Wneg_below_g + Wneg_g / 2) / (Wpos * Wneg)``.

    Raises ValueError if labels are not 0/1, if all (weighted) labels are of one class, or on NaN scores.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size, "scores")
    w = _as_weights(sample_weight, y.size)
    pos_total, neg_total = _class_totals(y, w)
    _require_both_classes(pos_total, neg_total, "ROC AUC")
    if w is None:
        return _auc_unweighted(y, s)
    return _auc_weighted(y, s, w, pos_total, neg_total)


def _auc_unweighted(y: np.ndarray, s: np.ndarray) -> float:
    pos = s[y]
    pos.sort()
    neg = s[~y]
    neg.sort()
    below = 0  # pairs (pos, neg) with neg < pos
    ties = 0  # pairs with neg == pos
    # Chunked so the two int64 index arrays stay small; sorted keys make searchsorted cache-friendly.
    for start in range(0, pos.size, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        lo = np.searchsorted(neg, chunk, side="left")
        hi = np.searchsorted(neg, chunk, side="right")
        below += int(lo.sum())
        ties += int(hi.sum()) - int(lo.sum())
    twice_u = 2 * below + ties  # exact integer
    return float(twice_u) / (2.0 * float(pos.size) * float(neg.size))


def _auc_weighted(y: np.ndarray, s: np.ndarray, w: np.ndarray, pos_total: float, neg_total: float) -> float:
    order = np.argsort(s)
    s_sorted = s[order]
    w_sorted = w[order]
    y_sorted = y[order]
    del order
    # Start index of each run of equal scores.
    starts = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))
    del s_sorted
    w_all = np.add.reduceat(w_sorted, starts)
    w_pos = np.add.reduceat(np.where(y_sorted, w_sorted, 0.0), starts)
    w_neg = w_all - w_pos
    neg_below = np.cumsum(w_neg) - w_neg  # negative weight strictly below each group
    u = float(np.dot(w_pos, neg_below + 0.5 * w_neg))
    return u / (pos_total * neg_total)


def _xent_sums(y: np.ndarray, p: np.ndarray, w: np.ndarray | None, eps: float) -> float:
    """Sum over rows of w * -(y log p + (1-y) log(1-p)) with p clipped to [eps, 1-eps], chunked."""
    total = 0.0
    for start in range(0, y.size, _CHUNK):
        stop = start + _CHUNK
        pc = np.clip(p[start:stop].astype(np.float64), eps, 1.0 - eps)
        yc = y[start:stop]
        # log(1 - p) rather than log1p(-p) to follow scikit-learn's formula bit for bit.
        ll = np.where(yc, np.log(pc), np.log(1.0 - pc))
        total -= float(ll.sum() if w is None else np.dot(ll, w[start:stop]))
    return total


def log_loss(labels: Any, probs: Any, sample_weight: Any = None, eps: float = 1e-15) -> float:
    """Mean binary cross entropy in nats, probabilities clipped to ``[eps, 1 - eps]``.

    Clipping follows scikit-learn; note that scikit-learn >= 1.5 clips at the machine epsilon of the
    input's dtype (2.2e-16 for float64) instead of its former default 1e-15 kept here, so the two differ
    only for probabilities within 1e-15 of 0 or 1 (pass ``eps=np.finfo(np.float64).eps`` to match).
    """
    y = _as_labels(labels)
    p = _as_probs(probs, y.size)
    w = _as_weights(sample_weight, y.size)
    total_w = float(y.size) if w is None else float(w.sum())
    if total_w <= 0:
        raise ValueError("log loss is undefined: total sample weight is 0")
    return _xent_sums(y, p, w, eps) / total_w


def normalized_entropy(labels: Any, probs: Any, sample_weight: Any = None, eps: float = 1e-12) -> float:
    """Normalized entropy: cross entropy divided by the entropy of the (weighted) base rate.

    Follows torchrec's ``torchrec.metrics.ne`` exactly: predictions and the base rate are clamped to
    ``[eta, 1 - eta]`` with ``eta = 1e-12`` and ``NE = ce_sum / (-(P log p̄ + N log(1 - p̄)))`` with
    P, N the positive/negative weights and p̄ = P / (P + N). torchrec uses log2; the ratio does not depend
    on the base, so this equals the base-2 NE. 1.0 means no better than predicting the base rate.

    Raises ValueError when all (weighted) labels are of one class (the normalizer is 0).
    """
    y = _as_labels(labels)
    p = _as_probs(probs, y.size)
    w = _as_weights(sample_weight, y.size)
    pos, neg = _class_totals(y, w)
    _require_both_classes(pos, neg, "normalized entropy")
    ce_sum = _xent_sums(y, p, w, eps)
    mean_label = min(max(pos / max(pos + neg, eps), eps), 1.0 - eps)
    norm = -(pos * np.log(mean_label) + neg * np.log(1.0 - mean_label))
    return float(ce_sum / norm)


def base_rate(labels: Any, sample_weight: Any = None) -> float:
    """Fraction of (weighted) positive labels."""
    y = _as_labels(labels)
    w = _as_weights(sample_weight, y.size)
    pos, neg = _class_totals(y, w)
    if pos + neg <= 0:
        raise ValueError("base rate is undefined: total sample weight is 0")
    return pos / (pos + neg)


def calibration(labels: Any, probs: Any, sample_weight: Any = None) -> float:
    """Sum of predicted probabilities over sum of labels (1.0 = calibrated on average; > 1 over-predicts).

    Raises ValueError when there are no (weighted) positives.
    """
    y = _as_labels(labels)
    p = _as_probs(probs, y.size)
    w = _as_weights(sample_weight, y.size)
    pos, _ = _class_totals(y, w)
    if pos <= 0:
        raise ValueError("calibration (sum p / sum y) is undefined: there are no positive labels")
    sum_p = 0.0
    for start in range(0, y.size, _CHUNK):
        pc = p[start : start + _CHUNK].astype(np.float64)
        sum_p += float(pc.sum() if w is None else np.dot(pc, w[start : start + _CHUNK]))
    return sum_p / pos


def summary(labels: Any, probs: Any) -> dict[str, float]:
    """The per-model quality block used by training logs and the study: AUC, log loss, NE, calibration."""
    return {
        "auc": roc_auc(labels, probs),
        "log_loss": log_loss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration": calibration(labels, probs),
    }


def sigmoid(z: Any) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-z))``, elementwise, in ``z``'s floating dtype.

    The one sigmoid of the project (prediction files, ensembles). It needs no branch to be stable:
    ``exp(-z)`` overflows to inf for z < -709 (float64), which still gives the exact limit 0, so only that
    overflow warning is silenced; ±inf map to 0 and 1, and the result is within a few ulps of the true
    value everywhere (no ``1 - small`` cancellation).

    Parameters
    ----------
    z : array-like
        Logits.

    Returns
    -------
    numpy.ndarray
        Probabilities in [0, 1], the shape of ``z``.
    """
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(z)))


def logit(p: Any, eps: float = LOGIT_EPS) -> np.ndarray:
    """Log-odds ``log(p) - log(1 - p)`` of probabilities clipped to ``[eps, 1 - eps]`` (finite for 0 and 1).

    Parameters
    ----------
    p : array-like
        Probabilities.
    eps : float, default LOGIT_EPS
        Clipping, so that 0 and 1 give about ∓27.6 rather than ∓inf.

    Returns
    -------
    numpy.ndarray
        Logits, the shape of ``p``.
    """
    pc = np.clip(p, eps, 1 - eps)
    return np.log(pc) - np.log1p(-pc)
