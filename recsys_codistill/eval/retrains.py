"""Statistics over N independent retrains of a method: all-pairs churn with jackknife-over-runs intervals.

Design
    A method (single model, codistillation, ...) is trained N times with different seeds; run i of
    every method uses seed index i, so methods are *paired by run index*. Every run predicts the same n
    evaluation rows; ``P`` is the (N, n) array of their probabilities, rows aligned. Churn between two
    runs is mean |p_a − p_b| over rows, and a method's churn is the mean over all N(N−1)/2 pairs of its
    runs (a U-statistic of degree 2 in the runs).

Uncertainty comes from the runs, not the rows
    The N(N−1)/2 pair values are not independent — pairs that share a run share its seed effect — so
    treating them as a sample (or bootstrapping rows, as :mod:`recsys_codistill.eval.churn` does for
    one fixed pair) understates the uncertainty about a *new* retrain. Everything here resamples runs:
    :func:`jackknife` recomputes a statistic with each run deleted and turns the spread of those
    delete-one values into a standard error and a t(N−1) interval. Paired comparisons between methods
    (:func:`paired_difference`) delete run i from both methods at once, which is what makes them paired.

Functions
    - :func:`pairwise_churn`, :func:`mean_over_pairs`, :func:`all_pairs_churn`: the all-pairs design.
    - :func:`jackknife`, :func:`paired_difference`: intervals for any statistic of a run subset.
    - :func:`ensemble_members`, :func:`ensemble_churn_matrix`, :func:`mean_over_disjoint_ensembles`,
      :func:`ensemble_churn`, :func:`ensemble_mean_over_runs`: ensembles of two runs, compared only
      with ensembles that share no run (a shared member would make churn look smaller than a retrain's).
    - :func:`within_run_churn`: disagreement between the two copies of one codistillation run.
    - :func:`consensus_distance`, :func:`robust_z`, :func:`flag_outliers`: runs far from the others.
    - :func:`calibrated`, :func:`decompose`: churn left after per-run recalibration, and its shares.

Everything is numpy (plus ``scipy.stats.t`` for quantiles); arithmetic is float64, row-chunked so that
(30, 10^6) float32 predictions need only a few tens of MB of temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import t as student_t

from recsys_codistill.eval.calibration import fit_calibrator

__all__ = [
    "FEW_RUNS",
    "Estimate",
    "all_pairs_churn",
    "calibrated",
    "consensus_distance",
    "decompose",
    "ensemble_churn",
    "ensemble_churn_matrix",
    "ensemble_mean_over_runs",
    "ensemble_members",
    "flag_outliers",
    "jackknife",
    "mean_over_disjoint_ensembles",
    "mean_over_pairs",
    "paired_difference",
    "pairwise_churn",
    "robust_z",
    "within_run_churn",
]

#: Below this many runs an :class:`Estimate` is marked ``few_runs``: its t interval has few degrees of
#: freedom (t(3) quantile 3.18 vs 1.96) and is wide, and the report should say so.
FEW_RUNS = 5
#: Iglewicz & Hoaglin's constant Φ⁻¹(0.75): MAD / 0.6745 estimates the standard deviation of normal data.
MAD_TO_Z = 0.6745

# float64 elements per row-chunk temporary (16 MB).
_CHUNK_ELEMS = 1 << 21


@dataclass(frozen=True)
class Estimate:
    """A statistic over runs with its standard error and a t interval.

    ``replicates`` are the values the uncertainty was computed from: the N leave-one-run-out values for
    the jackknife, the N per-run values for a t interval over independent runs. ``few_runs`` is
    N < :data:`FEW_RUNS` (the interval is a small-sample t interval and wide).
    """

    value: float
    se: float
    ci_low: float
    ci_high: float
    n_runs: int
    method: str
    few_runs: bool
    replicates: tuple[float, ...]
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (replicates as a list)."""
        d = asdict(self)
        d["replicates"] = list(self.replicates)
        return d


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _as_array(x: Any) -> np.ndarray:
    """numpy view of an array or torch tensor (duck-typed, so that this module never imports torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.float()
        x = t.numpy()
    return np.asarray(x)


def _check_runs(P: Any, name: str = "P", *, min_runs: int = 2, probabilities: bool = True) -> np.ndarray:
    """A finite floating (runs, rows) array with at least ``min_runs`` runs and one row."""
    arr = _as_array(P)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (runs, rows) array, got shape {arr.shape}")
    n_runs, n_rows = arr.shape
    if n_runs < min_runs:
        raise ValueError(f"{name} needs at least {min_runs} runs (rows of the array), got {n_runs}")
    if n_rows == 0:
        raise ValueError(f"{name} has no evaluation rows (shape {arr.shape})")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if probabilities and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1]; got range [{arr.min()}, {arr.max()}]")
    return arr


def _check_runs_subset(runs: Iterable[int] | np.ndarray | None, n_runs: int, min_size: int) -> np.ndarray:
    """Sorted int array of distinct run indices in [0, n_runs) with at least ``min_size`` of them."""
    if runs is None:
        idx = np.arange(n_runs)
    else:
        idx = np.asarray(list(runs) if not isinstance(runs, np.ndarray) else runs)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"runs must be a 1-D sequence of integer run indices, got {idx!r}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_runs):
            raise ValueError(f"runs must lie in [0, {n_runs}), got {idx.tolist()}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"runs contain duplicates: {idx.tolist()}")
        idx = np.sort(idx)
    if idx.size < min_size:
        raise ValueError(f"this statistic needs at least {min_size} runs, got {idx.size}")
    return idx


def _check_square(M: Any, name: str = "M") -> np.ndarray:
    m = np.asarray(M, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square (runs, runs) matrix, got shape {m.shape}")
    return m


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


def _t_quantile(confidence: float, df: int) -> float:
    return float(student_t.ppf(0.5 * (1.0 + confidence), df))


def _chunk_rows(width: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, width))


# ----------------------------------------------------------------------------------------------------
# All-pairs churn
# ----------------------------------------------------------------------------------------------------


def pairwise_churn(P: Any) -> np.ndarray:
    """(N, N) matrix of mean |P[i] − P[j]| over rows: symmetric, zero diagonal.

    One pass over row chunks; each chunk is widened to float64 once and every pair's absolute
    differences are summed in float64, so float32 predictions lose nothing to float32 accumulation.
    Cost N(N−1)/2 · n, fine for N up to ~30 and n = 10^6.
    """
    p = _check_runs(P)
    n_runs, n_rows = p.shape
    acc = np.zeros((n_runs, n_runs))
    step = _chunk_rows(n_runs)
    for start in range(0, n_rows, step):
        blk = p[:, start : start + step].astype(np.float64)
        for i in range(n_runs - 1):
            acc[i, i + 1 :] += np.abs(blk[i + 1 :] - blk[i]).sum(axis=1)
    acc /= n_rows
    return acc + acc.T


def mean_over_pairs(M: Any, runs: Iterable[int] | np.ndarray | None = None) -> float:
    """Mean of ``M[i, j]`` over the pairs i < j of ``runs`` (default all runs); needs 2 runs or more."""
    m = _check_square(M)
    idx = _check_runs_subset(runs, m.shape[0], min_size=2)
    sub = m[np.ix_(idx, idx)]
    return float(sub[np.triu_indices(idx.size, k=1)].mean())


def jackknife(
    stat: Callable[[np.ndarray], float],
    n_runs: int,
    confidence: float = 0.95,
    min_runs: int = 2,
    scale: Literal["linear", "log"] = "linear",
) -> Estimate:
    """Delete-one-run jackknife of ``stat`` with a t(N−1) interval.

    ``stat(indices)`` gets a sorted int array of the kept run indices and returns a float. The estimate
    is ``stat(all runs)``; θ_(i) = stat(all but run i) are the replicates and
    se = sqrt((N−1)/N · Σ (θ_(i) − θ̄)²); the interval is value ± t_{N−1, (1+confidence)/2} · se.

    For a mean of per-run values this is exactly sd/√N and the interval is the classical t interval.
    For the all-pairs mean (a U-statistic) the jackknife *variance* is known to be biased upwards
    (Efron & Stein 1981), which is the safe side. That does not make the interval conservative at small
    N, though: a run's contribution to churn grows like its squared distance from the other runs, so the
    estimate's distribution is right-skewed, its se is small exactly when it comes out low, and the
    symmetric interval misses on the low side. In simulations with N = 6 (tests/test_retrains.py) the
    95% interval covers 84–92% depending on how much of the churn is run-level; at N = 20, 91–94%.
    ``scale="log"`` — the interval value · exp(±t · se of log θ), for statistics that are positive —
    never has a negative lower end and covers as well or better (≈ 94% when run-level offsets dominate).
    ``se`` is always the jackknife se of θ itself. The estimate is not bias-corrected: the all-pairs
    mean is unbiased, and its jackknife bias estimate is 0.

    Parameters
    ----------
    stat : callable
        Statistic of a run subset, e.g. ``lambda idx: mean_over_pairs(M, idx)``.
    n_runs : int
        N, the number of runs.
    confidence : float, default 0.95
        Two-sided coverage of the interval.
    min_runs : int, default 2
        Fewest runs ``stat`` is defined on; every delete-one subset keeps N − 1, so N must be at least
        ``min_runs + 1``.
    scale : {"linear", "log"}, default "linear"
        Scale of the interval (see above); "log" needs a positive statistic on every subset.

    Raises
    ------
    ValueError
        If N − 1 < ``min_runs`` (saying how many runs are needed), ``stat`` returns a non-finite value,
        or (``scale="log"``) a value that is not positive.
    """
    confidence = _check_confidence(confidence)
    if scale not in ("linear", "log"):
        raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")
    if int(min_runs) != min_runs or min_runs < 1:
        raise ValueError(f"min_runs must be a positive integer, got {min_runs}")
    if int(n_runs) != n_runs or n_runs < 1:
        raise ValueError(f"n_runs must be a positive integer, got {n_runs}")
    n = int(n_runs)
    if n - 1 < min_runs:
        raise ValueError(
            f"the jackknife over runs needs at least {min_runs + 1} runs (each delete-one replicate keeps "
            f"N - 1 runs and this statistic needs {min_runs}); got N = {n}"
        )
    everything = np.arange(n)
    value = float(stat(everything))
    reps = np.array([float(stat(np.delete(everything, i))) for i in range(n)])
    if not math.isfinite(value) or not np.all(np.isfinite(reps)):
        bad = (
            "all runs"
            if not math.isfinite(value)
            else f"run {int(np.flatnonzero(~np.isfinite(reps))[0])} deleted"
        )
        raise ValueError(f"the statistic is not finite ({bad})")
    se = _jackknife_se(reps)
    tq = _t_quantile(confidence, n - 1)
    if scale == "log":
        if not (value > 0 and np.all(reps > 0)):
            raise ValueError("scale='log' needs a positive statistic on every run subset")
        spread = math.exp(tq * _jackknife_se(np.log(reps)))
        low, high, label = value / spread, value * spread, "jackknife over runs, log scale"
    else:
        low, high, label = value - tq * se, value + tq * se, "jackknife over runs"
    return Estimate(
        value=value,
        se=se,
        ci_low=low,
        ci_high=high,
        n_runs=n,
        method=f"{label}, t({n - 1})",
        few_runs=n < FEW_RUNS,
        replicates=tuple(float(r) for r in reps),
        confidence=confidence,
    )


def _jackknife_se(reps: np.ndarray) -> float:
    n = reps.size
    return math.sqrt((n - 1) / n * float(np.sum((reps - reps.mean()) ** 2)))


def all_pairs_churn(P: Any, confidence: float = 0.95, scale: Literal["linear", "log"] = "linear") -> Estimate:
    """Mean churn over all pairs of runs, jackknifed over runs (needs N ≥ 3).

    The pairwise matrix is computed once; each delete-one replicate is the mean over the pairs of the
    remaining N − 1 runs. ``scale`` as in :func:`jackknife` ("log" needs churn > 0, i.e. no two runs
    with identical predictions on every row).
    """
    m = pairwise_churn(P)
    return jackknife(
        lambda idx: mean_over_pairs(m, idx), m.shape[0], confidence=confidence, min_runs=2, scale=scale
    )


def paired_difference(
    stat_method: Callable[[np.ndarray], float],
    stat_base: Callable[[np.ndarray], float],
    n_runs: int,
    relative: bool = False,
    confidence: float = 0.95,
    min_runs: int = 2,
) -> Estimate:
    """Jackknife of ``stat_method(idx) − stat_base(idx)`` (or ``stat_method / stat_base − 1``).

    Both statistics get the same run subset, so deleting run i removes seed i from both methods at once:
    the seed-to-seed variation they share cancels in the difference, which is why the comparison is
    paired (and its interval narrower than the two intervals combined). ``min_runs`` as in
    :func:`jackknife` (4 for ensemble churn).

    Raises ValueError (via :func:`jackknife`) when ``relative`` and the base statistic is 0 on a subset.
    """

    def diff(idx: np.ndarray) -> float:
        a, b = float(stat_method(idx)), float(stat_base(idx))
        if not relative:
            return a - b
        return a / b - 1.0 if b != 0 else math.nan

    est = jackknife(diff, n_runs, confidence=confidence, min_runs=min_runs)
    kind = "relative difference (method / base - 1)" if relative else "difference (method - base)"
    return Estimate(**{**asdict(est), "method": f"paired {kind}, {est.method}"})


# ----------------------------------------------------------------------------------------------------
# Ensembles of two runs
# ----------------------------------------------------------------------------------------------------


def ensemble_members(runs: Iterable[int] | int) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, of ``runs`` (or of ``range(runs)`` for an int): the 2-run ensembles."""
    r = sorted(int(i) for i in (range(runs) if isinstance(runs, int) else runs))
    return [(r[a], r[b]) for a in range(len(r)) for b in range(a + 1, len(r))]


def _pairs_array(pairs: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    arr = np.asarray(pairs, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"pairs must be a non-empty list of (i, j) run pairs, got shape {arr.shape}")
    if np.any(arr[:, 0] == arr[:, 1]) or arr.min() < 0:
        raise ValueError("pairs must hold two distinct non-negative run indices each")
    return arr


def _disjoint(pairs: np.ndarray) -> np.ndarray:
    """(K, K) bool: ensembles a and b share no member."""
    i, j = pairs[:, 0], pairs[:, 1]
    share = (i[:, None] == i[None, :]) | (i[:, None] == j[None, :])
    share |= (j[:, None] == i[None, :]) | (j[:, None] == j[None, :])
    return ~share


def ensemble_churn_matrix(P: Any) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Churn between every two disjoint 2-run ensembles.

    The ensemble of runs (i, j) predicts (P[i] + P[j]) / 2. Returns ``(pairs, M)`` with ``pairs`` from
    :func:`ensemble_members` and M[a, b] = mean |e_a − e_b| over rows for ensembles a, b with no shared
    member, NaN where they share one (comparing (0, 1) with (0, 2) would count half of the same run twice
    and understate a retrain's churn), NaN on the diagonal. Needs N ≥ 4. Cost is about K²/2 · n for K =
    N(N−1)/2 ensembles, so keep N ≤ ~12 at n = 10^6.
    """
    p = _check_runs(P, min_runs=4)
    n_runs, n_rows = p.shape
    pairs = ensemble_members(n_runs)
    pa = np.asarray(pairs)
    k = len(pairs)
    disjoint = _disjoint(pa)
    later = [np.flatnonzero(disjoint[a, a + 1 :]) + a + 1 for a in range(k)]
    acc = np.zeros((k, k))
    step = _chunk_rows(k)
    for start in range(0, n_rows, step):
        blk = p[:, start : start + step].astype(np.float64)
        ens = 0.5 * (blk[pa[:, 0]] + blk[pa[:, 1]])
        for a in range(k):
            if later[a].size:
                acc[a, later[a]] += np.abs(ens[later[a]] - ens[a]).sum(axis=1)
    acc /= n_rows
    m = acc + acc.T
    m[~disjoint] = np.nan
    return pairs, m


def _quadruples(m: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members (Q, 4), values (Q,)) of every unordered pair of disjoint ensembles."""
    k = pairs.shape[0]
    if m.shape != (k, k):
        raise ValueError(f"M must be ({k}, {k}) for {k} ensembles, got shape {m.shape}")
    a, b = np.nonzero(np.triu(_disjoint(pairs), k=1))
    return np.concatenate((pairs[a], pairs[b]), axis=1), m[a, b]


def _mean_over_kept(members: np.ndarray, values: np.ndarray, idx: np.ndarray, n_total: int) -> float:
    keep = np.zeros(n_total, dtype=np.bool_)
    keep[idx] = True
    sel = keep[members].all(axis=1)
    if not sel.any():
        raise ValueError(f"no ensemble pair has all its members in runs {idx.tolist()}")
    return float(values[sel].mean())


def mean_over_disjoint_ensembles(
    M: Any, pairs: Sequence[tuple[int, int]] | np.ndarray, runs: Iterable[int] | np.ndarray | None = None
) -> float:
    """Mean of M[a, b] over pairs of disjoint ensembles whose four members all lie in ``runs``.

    The ensemble analogue of :func:`mean_over_pairs`, for :func:`jackknife` / :func:`paired_difference`
    statistics; ``runs`` defaults to every run named in ``pairs`` and needs at least 4 runs.
    """
    pa = _pairs_array(pairs)
    m = _check_square(M)
    n_total = int(pa.max()) + 1
    idx = _check_runs_subset(runs, n_total, min_size=4)
    members, values = _quadruples(m, pa)
    return _mean_over_kept(members, values, idx, n_total)


def ensemble_churn(P: Any, confidence: float = 0.95, scale: Literal["linear", "log"] = "linear") -> Estimate:
    """Mean churn between disjoint 2-run ensembles, jackknifed over runs (needs N ≥ 5).

    A replicate without run i averages over the disjoint ensemble pairs whose 4 members are all kept, so
    every delete-one subset needs 4 runs (``min_runs=4``). ``scale`` as in :func:`jackknife`.
    """
    pairs, m = ensemble_churn_matrix(P)
    n_runs = _as_array(P).shape[0]
    members, values = _quadruples(m, np.asarray(pairs))
    return jackknife(
        lambda idx: _mean_over_kept(members, values, idx, n_runs),
        n_runs,
        confidence=confidence,
        min_runs=4,
        scale=scale,
    )


def ensemble_mean_over_runs(
    values_by_pair: Any,
    pairs: Sequence[tuple[int, int]] | np.ndarray,
    runs: Iterable[int] | np.ndarray | None = None,
) -> float:
    """Mean of a per-ensemble quantity (e.g. its log loss) over the ensembles with both members in ``runs``.

    ``values_by_pair[k]`` belongs to ensemble ``pairs[k]``; ``runs`` defaults to every run in ``pairs``.
    Use it as the statistic of :func:`jackknife` (``min_runs=2``) to put an interval on ensemble quality.
    """
    pa = _pairs_array(pairs)
    v = np.asarray(values_by_pair, dtype=np.float64)
    if v.shape != (pa.shape[0],):
        raise ValueError(f"values_by_pair must have one value per pair ({pa.shape[0]}), got shape {v.shape}")
    n_total = int(pa.max()) + 1
    idx = _check_runs_subset(runs, n_total, min_size=2)
    return _mean_over_kept(pa, v, idx, n_total)


# ----------------------------------------------------------------------------------------------------
# Within-run churn, consensus and outliers
# ----------------------------------------------------------------------------------------------------


def within_run_churn(P0: Any, P1: Any, confidence: float = 0.95) -> Estimate:
    """Churn between the two copies of each codistillation run, with a t interval over runs.

    c_i = mean |P0[i] − P1[i]| over rows. Different runs are independent (different seeds), so the
    c_i are an i.i.d. sample: value = mean c_i, se = sd(c)/√N and the interval is the classical
    t(N−1) interval (``method`` "t over runs"); ``replicates`` are the c_i.
    """
    confidence = _check_confidence(confidence)
    a = _check_runs(P0, "P0")
    b = _check_runs(P1, "P1")
    if a.shape != b.shape:
        raise ValueError(f"P0 and P1 must have the same (runs, rows) shape, got {a.shape} and {b.shape}")
    n_runs, n_rows = a.shape
    c = np.zeros(n_runs)
    step = _chunk_rows(1)
    for i in range(n_runs):
        for start in range(0, n_rows, step):
            stop = start + step
            c[i] += np.abs(a[i, start:stop].astype(np.float64) - b[i, start:stop]).sum()
    c /= n_rows
    value = float(c.mean())
    se = float(c.std(ddof=1)) / math.sqrt(n_runs)
    half = _t_quantile(confidence, n_runs - 1) * se
    return Estimate(
        value=value,
        se=se,
        ci_low=value - half,
        ci_high=value + half,
        n_runs=n_runs,
        method=f"t over runs, t({n_runs - 1})",
        few_runs=n_runs < FEW_RUNS,
        replicates=tuple(float(x) for x in c),
        confidence=confidence,
    )


def consensus_distance(P: Any) -> np.ndarray:
    """d_i = mean over rows of |P[i] − median over j ≠ i of P[j]|: how far run i is from the others.

    The median of the *other* runs is the consensus, so one broken run cannot drag it towards itself.
    Computed from one sort per row chunk: with the runs of a row sorted, the k-th smallest of the others
    is sorted[k] if run i ranks above k and sorted[k + 1] otherwise — no N separate medians.
    """
    p = _check_runs(P)
    n_runs, n_rows = p.shape
    m = n_runs - 1  # runs in each consensus
    ks = [(m - 1) // 2] if m % 2 else [m // 2 - 1, m // 2]
    d = np.zeros(n_runs)
    step = _chunk_rows(3 * n_runs)
    ranks_of = np.arange(n_runs)[:, None]
    for start in range(0, n_rows, step):
        blk = p[:, start : start + step].astype(np.float64)
        order = np.argsort(blk, axis=0, kind="stable")
        srt = np.take_along_axis(blk, order, axis=0)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(ranks_of, order.shape), axis=0)
        med = np.zeros_like(blk)
        for k in ks:
            med += np.take_along_axis(srt, k + (rank <= k), axis=0)
        med /= len(ks)
        d += np.abs(blk - med).sum(axis=1)
    return d / n_rows


def robust_z(d: Any) -> np.ndarray:
    """Iglewicz–Hoaglin modified z-scores 0.6745 (d − median d) / MAD, MAD = median |d − median d|.

    Median and MAD are not moved by a few outliers, unlike mean and sd (with 7 runs, one huge value
    inflates the sd so much that its own ordinary z-score cannot exceed (N−1)/√N ≈ 2.3). If MAD = 0
    (more than half the values equal the median) a value is ±inf when it differs from the median by
    more than 1e-12 relative to it and 0 otherwise. Needs 3 values or more.
    """
    x = np.asarray(d, dtype=np.float64)
    if x.ndim != 1 or x.size < 3:
        raise ValueError(f"robust z-scores need a 1-D array of at least 3 values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("robust z-scores need finite values")
    med = float(np.median(x))
    dev = x - med
    mad = float(np.median(np.abs(dev)))
    if mad > 0:
        return MAD_TO_Z * dev / mad
    tol = 1e-12 * max(abs(med), np.finfo(np.float64).tiny)
    return np.where(dev > tol, np.inf, np.where(dev < -tol, -np.inf, 0.0))


def flag_outliers(d: Any, threshold: float = 3.5, min_ratio: float = 1.5) -> np.ndarray:
    """Bool mask of runs with :func:`robust_z` above ``threshold`` *and* d ≥ ``min_ratio`` · median(d).

    3.5 is Iglewicz & Hoaglin's recommended cut-off; the test is one-sided because a run *closer* to the
    consensus than the others is not a problem. The ratio condition is there because the z-score alone
    flags healthy runs far too often at the run counts of a study: consensus distances of healthy runs
    cluster tightly (each averages over many rows) and are right-skewed (a run's distance grows with its
    seed effect), and the MAD of 7 such values is often tiny. In simulations with 7 healthy runs the
    z-score alone flagged a run in 11% of studies without run-level effects and 30–40% with them;
    requiring the run to be 50% farther from the consensus than the median run brought that to 0% when
    seed effects are small (logit offsets of sd ≤ 0.05) while still catching a run shifted by +0.5 logit.
    Large seed effects (sd 0.3) leave ~40% either way: a healthy run far out in that spread is then not
    distinguishable from a broken one by distance alone. ``min_ratio=1`` gives the plain modified z rule.

    Flags are for the report to show and a person to look at, not for dropping runs automatically:
    removing the runs that disagree most biases churn downwards.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if not min_ratio >= 1:
        raise ValueError(f"min_ratio must be >= 1, got {min_ratio}")
    x = np.asarray(d, dtype=np.float64)
    z = robust_z(x)
    return (z > threshold) & (x >= min_ratio * float(np.median(x)))


# ----------------------------------------------------------------------------------------------------
# Churn decomposition
# ----------------------------------------------------------------------------------------------------


def calibrated(
    Z_eval: Any, Z_cal: Any, y_cal: Any, kind: Literal["offset", "platt", "isotonic"]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Recalibrate every run on its own calibration-split logits and apply it to its evaluation logits.

    ``Z_cal`` (N, n_cal) are the runs' logits on the calibration rows, whose labels ``y_cal`` (n_cal,)
    are shared; ``Z_eval`` (N, n_eval) their logits on the evaluation rows. Returns the (N, n_eval)
    float64 calibrated probabilities and each run's calibrator parameters (``to_dict()``, with ``run``).
    Calibrating on rows other than the evaluated ones keeps isotonic regression from fitting the
    evaluation labels' noise.
    """
    ze = _check_runs(Z_eval, "Z_eval", min_runs=1, probabilities=False)
    zc = _check_runs(Z_cal, "Z_cal", min_runs=1, probabilities=False)
    if ze.shape[0] != zc.shape[0]:
        raise ValueError(f"Z_eval has {ze.shape[0]} runs but Z_cal has {zc.shape[0]}")
    out = np.empty(ze.shape, dtype=np.float64)
    params = []
    for i in range(ze.shape[0]):
        cal = fit_calibrator(kind, zc[i], y_cal)
        out[i] = cal.transform(ze[i])
        params.append({"run": i, **cal.to_dict()})
    return out, params


def decompose(raw: float, after_offset: float, after_monotone: float) -> dict[str, float]:
    """Shares of raw churn removed by a per-run offset and by per-run monotone recalibration.

    Arguments are all-pairs churn of the raw predictions, after each run is recalibrated by an offset
    (:func:`calibrated` with ``"offset"``) and after a monotone recalibration (``"isotonic"``, the most
    general increasing map; ``"platt"`` is a restricted one). Returns the inputs and

    - ``global_shift`` = (raw − after_offset) / raw: churn that is only a different overall level;
    - ``monotone_recalibration`` = (raw − after_monotone) / raw: churn that any increasing per-run map
      removes (it includes the global shift, an increasing map itself);
    - ``reordering`` = after_monotone / raw = 1 − monotone_recalibration: churn left after each model is
      monotonically recalibrated is disagreement in the *ranking* of rows, which no recalibration can
      remove.

    Shares are not clipped: recalibration fitted on a finite split can add a little churn (a share
    slightly below 0 or a reordering share above 1), and hiding that would hide noise.
    """
    vals = {"raw": raw, "after_offset": after_offset, "after_monotone": after_monotone}
    for name, v in vals.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} churn must be finite and non-negative, got {v}")
    if raw <= 0:
        raise ValueError(f"raw churn must be positive to take shares of it, got {raw}")
    return {
        **{k: float(v) for k, v in vals.items()},
        "global_shift": (raw - after_offset) / raw,
        "monotone_recalibration": (raw - after_monotone) / raw,
        "reordering": after_monotone / raw,
    }


def rank_matched(P: Any) -> np.ndarray:
    """Every run's predictions replaced by a common set of values, assigned by its own ranking of the rows.

    The reference is the mean over runs of the sorted prediction vectors; run i's k-th smallest prediction
    becomes the reference's k-th value. That is a monotone map per run onto one shared distribution, so
    churn left after it is purely rows the runs *rank* differently: any global shift, and any difference a
    monotone recalibration of each run could remove, is gone. Unlike a fitted calibrator it uses no labels
    and adds no fitting noise (a model and any strictly increasing transform of it give 0).
    Ties keep their row order (a stable sort), so tied rows map alike in runs that tie them alike.
    """
    X = _check_runs(P)
    order = np.argsort(X, axis=1, kind="stable")
    reference = np.take_along_axis(X, order, axis=1).mean(axis=0)
    out = np.empty_like(X)
    np.put_along_axis(out, order, np.broadcast_to(reference, X.shape), axis=1)
    return out
