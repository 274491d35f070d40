"""Prediction churn between two prediction vectors on the same rows, with paired bootstrap CIs.

Churn is what this project sells: how much a model's predictions move when it is retrained with a
different seed / data order (Anil et al. 2018, "prediction difference"). Everything here compares
``p_a[i]`` with ``p_b[i]`` for the same held-out row ``i``; :func:`align` produces such pairs from two
prediction files joined by row id.

Point metrics
    - :func:`mean_abs_diff`  mean |pA − pB| — the paper's prediction difference.
    - :func:`symmetric_pd`   mean 2|pA − pB| / (pA + pB + 1e-7) — TFMA's symmetric prediction difference.
    - :func:`flip_rate`      fraction of rows whose thresholded class differs, split by direction.
    - :func:`churn_by_probability_bucket`  per bucket of (pA + pB)/2 (fixed edges).
    - :func:`churn_by_feature_frequency`   per log2 bucket of how often a row's categorical value occurs
      in a reference array (rare ids are where embeddings are least trained and churn most).
    - :func:`topk_overlap`   overlap of the two top-k rankings.

Bootstrap (:func:`churn_report`)
    Paired: one resampling weight per *row* (a row carries both predictions), shared by every statistic
    of a replicate. We use the Poisson bootstrap — each row gets an independent weight w ~ Poisson(1) per
    replicate and a replicate statistic is the weighted mean Σ w x / Σ w — because it needs no index
    resampling and streams: rows are processed in chunks of a few hundred, so a 10M × 1000 weight matrix
    never exists. Weights are a *discretised* Poisson(1) drawn from one random byte u (uniform on
    0..255): w = #{k : u < T_k} with T = (162, 67, 21, 5, 1), i.e. P(w = 0..5) = (94, 95, 46, 16, 4, 1)/256
    against Poisson(1)'s (94.2, 94.2, 47.1, 15.7, 3.9, 0.8, ...)/256. Mean and variance are exactly 1
    like Poisson(1) (the third moment is 4.98 vs 5), which is what the bootstrap's variance estimate
    depends on; it lets one random byte and five SIMD compares replace a Poisson draw (the per-element
    cost dominates at 10^10 weights). The bytes come from the seeded ``numpy.random.Generator``'s
    bit generator (``random_raw``), in row-major (row, replicate) order, so results depend only on the
    seed, the inputs and the number of replicates, not on chunk sizes. Per chunk the replicate sums are
    one float32 matrix product ``X_chunkᵀ @ W_chunk``; X holds per-row statistics *centred* on their cell's
    point estimate so float32 partial sums lose nothing that matters, and sums accumulate in float64.
    Buckets cost no extra matrix columns: rows are ordered by (probability bucket, frequency bucket) so
    every cell is a contiguous run and cell sums are added up per bucket afterwards.
    Intervals are bootstrap percentile intervals (default 95%).

Statistics are named, not numbered: each is a ratio Σ x / Σ d of a per-row value x (``_RATIO_STATISTICS``:
``mean_abs_diff``, ``symmetric_pd``, ``flip_0_to_1``, ``flip_1_to_0`` over all rows; ``log_loss_a``,
``log_loss_b`` over the labelled rows) or a sum/difference of two of them (``flip_rate``,
``log_loss_diff``), and one bucket-row builder serves the report and both bucket functions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from recsys_codistill.eval.metrics import as_numpy

__all__ = [
    "PROB_BUCKET_EDGES",
    "AlignedPredictions",
    "align",
    "check_threshold",
    "churn_by_feature_frequency",
    "churn_by_probability_bucket",
    "churn_report",
    "flip_rate",
    "frequency_buckets",
    "mean_abs_diff",
    "poisson_weights_u8",
    "symmetric_pd",
    "topk_overlap",
]

#: Default bucket edges of the mean prediction (pA + pB) / 2; buckets are [lo, hi), the last one closed.
PROB_BUCKET_EDGES: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
#: TFMA's epsilon in the symmetric prediction difference.
SPD_EPS = 1e-7
#: Log-loss clipping, as in :func:`recsys_codistill.eval.metrics.log_loss`.
LOGLOSS_EPS = 1e-15
#: P(w >= k) * 256 for k = 1..5 of the discretised Poisson(1) bootstrap weight (mean 1, variance 1).
POISSON_TAIL_256: tuple[int, ...] = (162, 67, 21, 5, 1)
BOOTSTRAP_WEIGHTS = "poisson(1) discretised to 1/256: P(w=0..5)=(94,95,46,16,4,1)/256, mean 1, var 1"

# Rows per bootstrap chunk: a multiple of 8 (whole random words) small enough that the (rows × R) byte
# and float32 weight blocks stay in L2 cache for R = 1000 (0.5 MB + 2 MB).
_BOOT_CHUNK_ROWS = 512
# Rows per block of per-row statistics built (permuted, centred, float32) for the bootstrap loop.
_STAT_BLOCK_ROWS = 1 << 16


class AlignedPredictions(NamedTuple):
    """Two prediction vectors on the same rows, ordered by ascending row id."""

    row_id: np.ndarray
    p_a: np.ndarray
    p_b: np.ndarray


# ----------------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------------


def _sorted_by_id(ids: np.ndarray, probs: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    if ids.shape[0] != probs.shape[0]:
        raise ValueError(f"predictions {side}: {ids.shape[0]} row ids but {probs.shape[0]} probabilities")
    if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids, probs  # already strictly increasing: sorted and unique, no copy needed
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    dup = s[1:] == s[:-1]
    if dup.any():
        dup_ids = np.unique(s[1:][dup])
        raise ValueError(
            f"predictions {side} have {dup_ids.size} duplicated row ids ({int(dup.sum())} extra rows "
            f"of {ids.size}); e.g. row_id {dup_ids[0].item()!r}"
        )
    return s, probs[order]


def align(a_ids: Any, a_probs: Any, b_ids: Any, b_probs: Any) -> AlignedPredictions:
    """Join two prediction vectors by row id (sort-based) and return them on a common ascending order.

    Churn is only meaningful on identical row sets, so instead of an inner join this refuses duplicate
    ids within a side and any difference between the two id sets, with a ValueError that names the
    counts and an example id.
    """
    ai, bi = as_numpy(a_ids, name="a_ids"), as_numpy(b_ids, name="b_ids")
    ap = as_numpy(a_probs, name="a_probs").astype(np.float64, copy=False)
    bp = as_numpy(b_probs, name="b_probs").astype(np.float64, copy=False)
    sa, pa = _sorted_by_id(ai, ap, "A")
    sb, pb = _sorted_by_id(bi, bp, "B")
    if sa.size == sb.size and np.array_equal(sa, sb):
        return AlignedPredictions(sa, pa, pb)
    only_a = np.setdiff1d(sa, sb, assume_unique=True)
    only_b = np.setdiff1d(sb, sa, assume_unique=True)
    parts = [f"row ids differ: A has {sa.size} rows, B has {sb.size}"]
    if only_a.size:
        parts.append(f"{only_a.size} only in A (e.g. row_id {only_a[0].item()!r})")
    if only_b.size:
        parts.append(f"{only_b.size} only in B (e.g. row_id {only_b[0].item()!r})")
    raise ValueError("; ".join(parts))


# ----------------------------------------------------------------------------------------------------
# Point metrics
# ----------------------------------------------------------------------------------------------------


def _pair(p_a: Any, p_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = as_numpy(p_a, name="p_a").astype(np.float64, copy=False)
    b = as_numpy(p_b, name="p_b").astype(np.float64, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"p_a has {a.shape[0]} rows but p_b has {b.shape[0]}")
    if a.size == 0:
        raise ValueError("no rows to compare")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("predictions contain NaN")
    return a, b


def mean_abs_diff(p_a: Any, p_b: Any) -> float:
    """Mean |pA − pB| over rows (Anil et al. 2018's prediction difference)."""
    a, b = _pair(p_a, p_b)
    return float(np.mean(np.abs(a - b)))


def _spd_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 2.0 * np.abs(a - b) / (a + b + SPD_EPS)


def symmetric_pd(p_a: Any, p_b: Any) -> float:
    """Mean 2|pA − pB| / (pA + pB + 1e-7) (TFMA's symmetric prediction difference)."""
    a, b = _pair(p_a, p_b)
    return float(np.mean(_spd_rows(a, b)))


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """``threshold`` as a float if it is a finite number in (0, 1), else a ValueError naming ``name``.

    NaN compares false with every probability, so every row would be "negative" in both models and the
    flip rate a silent 0; 0 or 1 (or beyond) puts every row in one class with the same effect.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} = {threshold!r}: expected a finite number in (0, 1)")
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 < t < 1.0):
        raise ValueError(f"{name} = {threshold!r}: expected a finite number in (0, 1)")
    return t


def flip_rate(p_a: Any, p_b: Any, threshold: float) -> dict[str, float]:
    """Fraction of rows whose class (p >= threshold is positive) differs between A and B.

    Returns ``{"flip_rate", "flip_0_to_1", "flip_1_to_0"}``, all fractions of *all* rows, where 0→1
    means negative under A and positive under B (so the two directions add up to ``flip_rate``).
    ``threshold`` must be a finite number in (0, 1).
    """
    threshold = check_threshold(threshold)
    a, b = _pair(p_a, p_b)
    a1, b1 = a >= threshold, b >= threshold
    up = int(np.count_nonzero(b1 & ~a1))
    down = int(np.count_nonzero(a1 & ~b1))
    n = a.size
    return {"flip_rate": (up + down) / n, "flip_0_to_1": up / n, "flip_1_to_0": down / n}


def _check_edges(edges: Sequence[float]) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise ValueError(f"bucket edges must be a strictly increasing sequence of >= 2 values, got {edges!r}")
    return e


def probability_bucket_index(p_a: np.ndarray, p_b: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bucket of each row's mean prediction (pA + pB)/2: i for edges[i] <= m < edges[i+1].

    Values below the first edge or at/above the last go to the first/last bucket (so p = 1.0 is in the
    last bucket).
    """
    e = _check_edges(edges)
    m = 0.5 * (p_a + p_b)
    idx = np.searchsorted(e, m, side="right") - 1
    return np.clip(idx, 0, e.size - 2).astype(np.int64)


def churn_by_probability_bucket(
    p_a: Any, p_b: Any, edges: Sequence[float] = PROB_BUCKET_EDGES
) -> list[dict[str, Any]]:
    """Rows and mean |pA − pB| per bucket of (pA + pB)/2 with fixed ``edges`` (empty buckets → None)."""
    a, b = _pair(p_a, p_b)
    axis = _probability_axis(a, b, _check_edges(edges))
    return _mean_abs_diff_rows(a, b, _CellGrid(a.size, prob=axis), axis)


def frequency_buckets(feature_values: Any, reference_values: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the count of its feature value in ``reference_values`` and its log2 bucket.

    Bucket k >= 0 holds counts in [2^k, 2^(k+1)); bucket -1 holds values absent from the reference.
    ``reference_values`` defaults to ``feature_values`` itself (frequency among the evaluated rows); pass
    the training rows' values to measure churn against how often the model saw a value. Values must be
    sortable (integers or strings); map missing values to a sentinel first.

    Returns ``(bucket, count)``, both int64 arrays of one entry per row.
    """
    fv = as_numpy(feature_values, name="feature_values")
    ref = fv if reference_values is None else as_numpy(reference_values, name="reference_values")
    uniq, counts = np.unique(ref, return_counts=True)
    if uniq.size == 0:
        count = np.zeros(fv.size, dtype=np.int64)
    else:
        pos = np.minimum(np.searchsorted(uniq, fv), uniq.size - 1)
        count = np.where(uniq[pos] == fv, counts[pos], 0).astype(np.int64)
    # frexp(c) = (m, e) with c = m * 2^e, 0.5 <= m < 1, so floor(log2 c) = e - 1 exactly (no log rounding).
    bucket = np.where(count > 0, np.frexp(count.astype(np.float64))[1].astype(np.int64) - 1, -1)
    return bucket, count


def _frequency_bucket_label(k: int) -> str:
    if k < 0:
        return "unseen"
    lo, hi = 1 << k, (1 << (k + 1)) - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


def churn_by_feature_frequency(
    p_a: Any, p_b: Any, feature_values: Any, reference_values: Any = None
) -> list[dict[str, Any]]:
    """Rows, distinct values and mean |pA − pB| per log2 frequency bucket (see :func:`frequency_buckets`).

    Only non-empty buckets are listed, in increasing frequency ("unseen" first).
    """
    a, b = _pair(p_a, p_b)
    axis = _frequency_axis(feature_values, reference_values, a.size)
    return _mean_abs_diff_rows(a, b, _CellGrid(a.size, freq=axis), axis)


def _distinct_per_bucket(fv: np.ndarray, shifted_bucket: np.ndarray, nbins: int) -> np.ndarray:
    # A value's bucket is a function of the value, so one representative row per value suffices.
    _, first = np.unique(fv, return_index=True)
    return np.bincount(shifted_bucket[first], minlength=nbins)


def _topk_indices(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values in O(n); ties at the k-th value go to the lowest indices."""
    n = p.size
    if k >= n:
        return np.arange(n)
    kth = np.partition(p, n - k)[n - k]
    above = np.flatnonzero(p > kth)
    at = np.flatnonzero(p == kth)[: k - above.size]
    return np.concatenate((above, at))


def topk_overlap(p_a: Any, p_b: Any, k: int) -> dict[str, float | int]:
    """Overlap of the top-k rows by pA and by pB.

    Returns ``{"k", "shared_fraction": |A∩B| / k, "jaccard": |A∩B| / |A∪B|}``. Ties at the k-th value are
    broken by row position, deterministically.
    """
    a, b = _pair(p_a, p_b)
    k = min(int(k), a.size)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    in_a = np.zeros(a.size, dtype=np.bool_)
    in_a[_topk_indices(a, k)] = True
    shared = int(np.count_nonzero(in_a[_topk_indices(b, k)]))
    return {"k": k, "shared_fraction": shared / k, "jaccard": shared / (2 * k - shared)}


# ----------------------------------------------------------------------------------------------------
# Named statistics
# ----------------------------------------------------------------------------------------------------


class _PairRows(NamedTuple):
    """What a per-row statistic reads: both predictions, the flip threshold, labels (0 where unlabelled)."""

    a: np.ndarray
    b: np.ndarray
    threshold: float | None = None  # needed by the flips only
    y: np.ndarray | None = None  # needed by the log losses only


class _RatioStatistic(NamedTuple):
    """A per-row value x whose estimate over a set of rows is Σ x / Σ d.

    d = 1 (a mean over all rows), or, with ``labelled_only``, d = "row is labelled" (a mean over the
    labelled rows; x is zeroed on the others).
    """

    name: str
    per_row: Callable[[_PairRows], np.ndarray]
    labelled_only: bool = False


class _CombinedStatistic(NamedTuple):
    """``op(left, right)`` of two ratio statistics, applied to point estimates and replicates alike."""

    name: str
    left: str
    right: str
    op: Callable[[Any, Any], Any]


def _row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    pc = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return -np.where(y >= 0.5, np.log(pc), np.log(1.0 - pc))


# The ratio statistics, in bootstrap-column order. Flips are bool (1 byte per row); bincount and the float32
# bootstrap blocks cast them as they read.
_RATIO_STATISTICS: dict[str, _RatioStatistic] = {
    s.name: s
    for s in (
        _RatioStatistic("mean_abs_diff", lambda r: np.abs(r.a - r.b)),
        _RatioStatistic("symmetric_pd", lambda r: _spd_rows(r.a, r.b)),
        _RatioStatistic("flip_0_to_1", lambda r: (r.b >= r.threshold) & (r.a < r.threshold)),
        _RatioStatistic("flip_1_to_0", lambda r: (r.a >= r.threshold) & (r.b < r.threshold)),
        _RatioStatistic("log_loss_a", lambda r: _row_logloss(r.y, r.a), labelled_only=True),
        _RatioStatistic("log_loss_b", lambda r: _row_logloss(r.y, r.b), labelled_only=True),
    )
}
_COMBINED_STATISTICS: dict[str, _CombinedStatistic] = {
    s.name: s
    for s in (
        _CombinedStatistic("flip_rate", "flip_0_to_1", "flip_1_to_0", operator.add),
        _CombinedStatistic("log_loss_diff", "log_loss_a", "log_loss_b", operator.sub),
    )
}
# What churn_report estimates over all rows, per bucket, and over the labelled rows (in output order).
_OVERALL = ("mean_abs_diff", "symmetric_pd", "flip_rate", "flip_0_to_1", "flip_1_to_0")
_PER_BUCKET = ("mean_abs_diff", "symmetric_pd", "flip_rate")
_LABELLED = ("log_loss_a", "log_loss_b", "log_loss_diff")


class _Column(NamedTuple):
    """One ratio statistic's per-row values."""

    name: str
    values: np.ndarray
    labelled_only: bool


def _columns(names: Sequence[str], rows: _PairRows, labelled: np.ndarray | None = None) -> list[_Column]:
    """Per-row values of the named ratio statistics; labelled-only ones are zeroed on unlabelled rows."""
    out = []
    for name in names:
        stat = _RATIO_STATISTICS[name]
        values = stat.per_row(rows)
        if stat.labelled_only:
            if labelled is None:
                raise ValueError(f"{name} needs labels")
            values = values * labelled
        out.append(_Column(name, values, stat.labelled_only))
    return out


# ----------------------------------------------------------------------------------------------------
# Buckets and cells
# ----------------------------------------------------------------------------------------------------


class _Axis(NamedTuple):
    """One bucketing of the rows: each row's bucket (0..size-1) and each bucket's leading output columns."""

    index: np.ndarray
    size: int
    header: Callable[[int, int], dict[str, Any]]  # (bucket, rows) -> its columns up to and with "rows"
    keep_empty: bool  # list empty buckets too (fixed probability edges) or leave them out (frequency)


def _probability_axis(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> _Axis:
    """Buckets of (pA + pB)/2 between ``edges`` (checked), every bucket listed."""

    def header(i: int, rows: int) -> dict[str, Any]:
        return {"lo": float(edges[i]), "hi": float(edges[i + 1]), "rows": rows}

    return _Axis(probability_bucket_index(a, b, edges), edges.size - 1, header, keep_empty=True)


def _frequency_axis(feature_values: Any, reference_values: Any, n: int) -> _Axis:
    """Log2 frequency buckets of ``feature_values`` (see :func:`frequency_buckets`), non-empty ones listed."""
    fv = as_numpy(feature_values, name="feature_values")
    if fv.size != n:
        raise ValueError(f"feature_values has {fv.size} rows but predictions have {n}")
    shifted = frequency_buckets(fv, reference_values)[0] + 1  # bincount needs non-negative bins; 0 = unseen
    size = int(shifted.max()) + 1
    distinct = _distinct_per_bucket(fv, shifted, size)

    def header(j: int, rows: int) -> dict[str, Any]:
        k = j - 1
        return {
            "bucket": _frequency_bucket_label(k),
            "min_count": 0 if k < 0 else 1 << k,
            "max_count": 0 if k < 0 else (1 << (k + 1)) - 1,
            "rows": rows,
            "distinct_values": int(distinct[j]),
        }

    return _Axis(shifted, size, header, keep_empty=False)


class _CellGrid:
    """Rows grouped into cells (probability bucket, frequency bucket); an absent axis is one bucket.

    Cell ``i * n_fb + j`` holds probability bucket i and frequency bucket j, so a probability bucket is a
    contiguous run of cells and a frequency bucket a strided one.
    """

    def __init__(self, n: int, prob: _Axis | None = None, freq: _Axis | None = None) -> None:
        self.prob, self.freq = prob, freq
        self.n_fb = freq.size if freq is not None else 1
        self.n_cells = (prob.size if prob is not None else 1) * self.n_fb
        if prob is not None:
            self.cell = prob.index * self.n_fb + (freq.index if freq is not None else 0)
        else:
            self.cell = freq.index if freq is not None else np.zeros(n, dtype=np.int64)
        self.rows = np.bincount(self.cell, minlength=self.n_cells)

    def cells(self, axis: _Axis, bucket: int) -> np.ndarray:
        """The cells of bucket ``bucket`` of ``axis`` (this grid's ``prob`` or ``freq``)."""
        if axis is self.prob:
            return np.arange(bucket * self.n_fb, (bucket + 1) * self.n_fb)
        return np.arange(bucket, self.n_cells, self.n_fb)


def _bucket_rows(
    grid: _CellGrid, axis: _Axis, values: Callable[[np.ndarray], dict[str, Any]]
) -> list[dict[str, Any]]:
    """One output row per bucket of ``axis``: the bucket's columns, then ``values(cells of the bucket)``."""
    out = []
    for i in range(axis.size):
        cells = grid.cells(axis, i)
        rows = int(grid.rows[cells].sum())
        if rows or axis.keep_empty:
            out.append({**axis.header(i, rows), **values(cells)})
    return out


def _mean_abs_diff_rows(a: np.ndarray, b: np.ndarray, grid: _CellGrid, axis: _Axis) -> list[dict[str, Any]]:
    """Bucket rows of the standalone bucket functions: mean |pA − pB| as a float (None if empty)."""
    stats = _CellStatistics(grid, _columns(("mean_abs_diff",), _PairRows(a, b)))
    return _bucket_rows(grid, axis, lambda cells: {"mean_abs_diff": stats.ratio("mean_abs_diff", cells)[0]})


# ----------------------------------------------------------------------------------------------------
# Poisson bootstrap engine
# ----------------------------------------------------------------------------------------------------


def poisson_weights_u8(
    u: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
    """Map uniform random bytes to discretised Poisson(1) weights (uint8, values 0..5).

    w = #{k : u < T_k} for T = :data:`POISSON_TAIL_256`. Written as compares into a reusable bool buffer
    viewed as uint8 and added in place, because these byte-wide SIMD passes are the cheapest way numpy has
    to apply a 256-entry lookup table (``np.take`` on uint8 indices is several times slower).
    """
    if out is None:
        out = np.empty(u.shape, dtype=np.uint8)
    if scratch is None:
        scratch = np.empty(u.shape, dtype=np.bool_)
    np.less(u, POISSON_TAIL_256[0], out=out.view(np.bool_))
    for t in POISSON_TAIL_256[1:]:
        np.less(u, t, out=scratch)
        out += scratch.view(np.uint8)
    return out


def _bootstrap_cell_sums(
    stat_block: Callable[[int, int], np.ndarray],
    n_rows: int,
    n_cols: int,
    cell_bounds: Sequence[int],
    replicates: int,
    seed: int,
    chunk_rows: int = _BOOT_CHUNK_ROWS,
) -> np.ndarray:
    """Σ_i w_ir X_ic per cell for every replicate r, as a float64 array (cells, n_cols, replicates).

    ``stat_block(start, stop)`` returns the float32 per-row statistics X for rows [start, stop) of the
    (cell-ordered) row sequence; ``cell_bounds`` are the cells' start offsets plus ``n_rows``.
    Weights for row i, replicate r are byte i*R + r of the generator's raw stream, whatever the chunking.
    """
    if chunk_rows % 8:
        raise ValueError("chunk_rows must be a multiple of 8 (whole 64-bit random words)")
    bits = np.random.default_rng(seed).bit_generator
    bounds = [int(x) for x in cell_bounds]
    n_cells = len(bounds) - 1
    out = np.zeros((n_cells, n_cols, replicates), dtype=np.float64)
    w8 = np.empty(chunk_rows * replicates, dtype=np.uint8)
    scratch = np.empty(chunk_rows * replicates, dtype=np.bool_)
    wf = np.empty((chunk_rows, replicates), dtype=np.float32)
    carry = np.empty(0, dtype=np.uint8)  # unused tail of the last random word (only when R*rows % 8)
    cell = 0
    for block_start in range(0, n_rows, _STAT_BLOCK_ROWS):
        block_stop = min(block_start + _STAT_BLOCK_ROWS, n_rows)
        xb = stat_block(block_start, block_stop)
        for start in range(block_start, block_stop, chunk_rows):
            stop = min(start + chunk_rows, block_stop)
            rows = stop - start
            need = rows * replicates
            fresh = need - carry.size
            raw = bits.random_raw(-(-fresh // 8)).view(np.uint8) if fresh > 0 else np.empty(0, np.uint8)
            u = np.concatenate((carry, raw)) if carry.size else raw
            carry = u[need:].copy()
            u = u[:need]
            w = poisson_weights_u8(u, out=w8[:need], scratch=scratch[:need])
            wfc = wf[:rows]
            wfc[...] = w.reshape(rows, replicates)  # uint8 -> float32 for the BLAS product
            xc = xb[start - block_start : stop - block_start]
            # Cells overlapping this chunk are consecutive; each gets one small GEMM on its row run.
            while bounds[cell + 1] <= start:
                cell += 1
            c = cell
            while c < n_cells and bounds[c] < stop:
                lo, hi = max(bounds[c], start) - start, min(bounds[c + 1], stop) - start
                if hi > lo:
                    out[c] += xc[lo:hi].T @ wfc[lo:hi]
                c += 1
    return out


class _CellStatistics:
    """Named ratio statistics summed per cell of a :class:`_CellGrid`, exactly and per bootstrap replicate.

    A statistic's estimate over a group of cells (a bucket, or every cell) adds up the cells' sums of x and
    of d. Exact float64 sums give the point estimates. With ``bootstrap > 0`` one streaming pass
    (:func:`_bootstrap_cell_sums`, rows in cell order) gives every cell's replicate sums; its columns are
    the ``columns`` in order, then the weighted row count, then the weighted labelled-row count.
    """

    def __init__(
        self,
        grid: _CellGrid,
        columns: Sequence[_Column],
        labelled: np.ndarray | None = None,
        bootstrap: int = 0,
        seed: int = 0,
    ) -> None:
        cell, n_cells = grid.cell, grid.n_cells
        self._col = {c.name: j for j, c in enumerate(columns)}
        self._labelled_only = np.array([c.labelled_only for c in columns], dtype=np.bool_)
        self.cell_rows = grid.rows.astype(np.float64)
        self.cell_lab = (
            np.bincount(cell, weights=labelled, minlength=n_cells)
            if labelled is not None
            else np.zeros(n_cells)
        )
        self._num = np.stack([np.bincount(cell, weights=c.values, minlength=n_cells) for c in columns])
        self._den = np.where(self._labelled_only[:, None], self.cell_lab[None, :], self.cell_rows[None, :])
        # Per-cell means: the bootstrap columns carry x - theta_cell * d, so float32 partial sums hold
        # only deviations (a constant cell gives exactly 0, not rounding noise).
        self._theta = np.divide(self._num, self._den, out=np.zeros_like(self._num), where=self._den > 0)
        self._col_rows, self._col_lab = len(columns), len(columns) + 1
        self._reps: np.ndarray | None = None  # (cells, bootstrap columns, R)
        if bootstrap > 0:
            self._reps = self._bootstrap(grid, columns, labelled, bootstrap, seed)

    def _bootstrap(
        self,
        grid: _CellGrid,
        columns: Sequence[_Column],
        labelled: np.ndarray | None,
        bootstrap: int,
        seed: int,
    ) -> np.ndarray:
        cell, theta, labelled_only = grid.cell, self._theta, self._labelled_only
        order = np.argsort(cell, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(grid.rows)))

        def stat_block(start: int, stop: int) -> np.ndarray:
            idx = order[start:stop]
            c = cell[idx]
            d_lab = labelled[idx] if labelled is not None else None
            cols = []
            for j, column in enumerate(columns):
                d = d_lab if labelled_only[j] else 1.0
                cols.append(column.values[idx] - theta[j, c] * d)
            cols.append(np.ones(idx.size))
            if d_lab is not None:
                cols.append(d_lab)
            return np.stack(cols, axis=1).astype(np.float32)

        n_cols = len(columns) + 1 + (1 if labelled is not None else 0)
        return _bootstrap_cell_sums(stat_block, cell.size, n_cols, bounds, bootstrap, seed)

    def ratio(self, name: str, cells: np.ndarray) -> tuple[float | None, np.ndarray | None]:
        """Point estimate and replicates (None without bootstrap) of statistic ``name`` over ``cells``."""
        combined = _COMBINED_STATISTICS.get(name)
        if combined is not None:
            (left_p, left_r), (right_p, right_r) = (
                self.ratio(combined.left, cells),
                self.ratio(combined.right, cells),
            )
            point = None if left_p is None or right_p is None else combined.op(left_p, right_p)
            reps = None if left_r is None or right_r is None else combined.op(left_r, right_r)
            return point, reps
        j = self._col[name]
        den = float(self._den[j, cells].sum())
        if den <= 0:
            return None, None
        point = float(self._num[j, cells].sum()) / den
        if self._reps is None:
            return point, None
        d_col = self._col_lab if self._labelled_only[j] else self._col_rows
        rep_den = self._reps[cells, d_col].sum(axis=0)
        rep_num = (self._theta[j, cells, None] * self._reps[cells, d_col] + self._reps[cells, j]).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rep = rep_num / rep_den
        # Every per-row statistic is >= 0; float32 rounding of the centred sums can leave -1e-10 where
        # a replicate resampled only zeros, which would print as a "-0.0000" interval end.
        return point, np.maximum(rep, 0.0)

    def estimates(
        self, names: Sequence[str], cells: np.ndarray, confidence: float
    ) -> dict[str, dict[str, float | None]]:
        """``{name: estimate}`` (see :func:`_estimate`) of each statistic in ``names`` over ``cells``."""
        return {name: _estimate(*self.ratio(name, cells), confidence) for name in names}


def _estimate(value: float | None, reps: np.ndarray | None, confidence: float) -> dict[str, float | None]:
    """Point estimate with a percentile interval and the bootstrap standard error."""
    res: dict[str, float | None] = {"value": _finite(value), "ci_low": None, "ci_high": None, "se": None}
    if value is None or reps is None:
        return res
    good = reps[np.isfinite(reps)]
    if good.size >= 2:
        alpha = 100.0 * (1.0 - confidence) / 2.0
        lo, hi = np.percentile(good, [alpha, 100.0 - alpha])
        res.update(ci_low=float(lo), ci_high=float(hi), se=float(np.std(good, ddof=1)))
    return res


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _check_labels(labels: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels with 0 on unlabelled rows, float64 "row is labelled" mask) of 0/1/NaN ``labels``."""
    y = as_numpy(labels, name="labels").astype(np.float64, copy=False)
    if y.size != n:
        raise ValueError(f"labels has {y.size} rows but predictions have {n}")
    lab_mask = np.isfinite(y)
    if np.any((y[lab_mask] != 0) & (y[lab_mask] != 1)):
        raise ValueError("labels must be 0/1 (NaN for unlabelled rows)")
    return np.where(lab_mask, y, 0.0), lab_mask.astype(np.float64)


def churn_report(
    p_a: Any,
    p_b: Any,
    *,
    threshold: float,
    bootstrap: int = 1000,
    seed: int = 0,
    labels: Any = None,
    feature_values: Any = None,
    feature_reference: Any = None,
    prob_edges: Sequence[float] = PROB_BUCKET_EDGES,
    topk_fraction: float = 0.01,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """All churn metrics between aligned ``p_a`` and ``p_b`` with paired Poisson-bootstrap CIs.

    Parameters
    ----------
    p_a, p_b : array-like of shape (n_rows,)
        Predicted probabilities for the same rows in the same order (see :func:`align`).
    threshold : float
        Class threshold for flips (p >= threshold is positive), a finite number in (0, 1).
    bootstrap : int, default 1000
        Number of replicates R (0 disables intervals).
    seed : int, default 0
        Seed of the ``numpy.random.Generator`` that draws the bootstrap weights.
    labels : array-like of shape (n_rows,), optional
        0/1 labels, NaN for unlabelled rows; adds log loss of A, of B and of A − B on the labelled rows,
        with intervals from the same replicates.
    feature_values : array-like of shape (n_rows,), optional
        Per-row categorical values; adds churn per log2 frequency bucket (frequency counted in
        ``feature_reference``, default ``feature_values``).
    feature_reference : array-like, optional
        Values whose counts define a row's frequency bucket.
    prob_edges : sequence of float, default PROB_BUCKET_EDGES
        Bucket edges of (pA + pB)/2.
    topk_fraction : float, default 0.01
        k = max(1, round(fraction * rows)) for the top-k overlap (no interval).
    confidence : float, default 0.95
        Interval coverage (percentile bootstrap).

    Returns
    -------
    dict
        JSON-serialisable; every estimate is ``{"value", "ci_low", "ci_high", "se"}`` (None where
        undefined, e.g. an empty bucket or ``bootstrap=0``).
    """
    threshold = check_threshold(threshold)
    a, b = _pair(p_a, p_b)
    n = a.size
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    edges = _check_edges(prob_edges)
    y = lab = None
    if labels is not None:
        y, lab = _check_labels(labels, n)
    prob = _probability_axis(a, b, edges)
    freq = _frequency_axis(feature_values, feature_reference, n) if feature_values is not None else None

    # Per-row statistics, summed per cell (probability bucket x frequency bucket) and per replicate.
    names = [s.name for s in _RATIO_STATISTICS.values() if lab is not None or not s.labelled_only]
    grid = _CellGrid(n, prob=prob, freq=freq)
    stats = _CellStatistics(grid, _columns(names, _PairRows(a, b, threshold, y), lab), lab, bootstrap, seed)
    all_cells = np.arange(grid.n_cells)

    report: dict[str, Any] = {"rows": int(n), "threshold": float(threshold)}
    report.update(stats.estimates(_OVERALL, all_cells, confidence))
    k = max(1, int(round(topk_fraction * n)))
    report["topk_overlap"] = {"fraction": float(topk_fraction), **topk_overlap(a, b, k)}

    def per_bucket(cells: np.ndarray) -> dict[str, dict[str, float | None]]:
        return stats.estimates(_PER_BUCKET, cells, confidence)

    report["by_probability"] = _bucket_rows(grid, prob, per_bucket)
    if freq is not None:
        report["by_feature_frequency"] = _bucket_rows(grid, freq, per_bucket)
    if lab is not None:
        report["labelled"] = {
            "rows": int(stats.cell_lab.sum()),
            **stats.estimates(_LABELLED, all_cells, confidence),
        }
    report["bootstrap"] = {
        "replicates": int(bootstrap),
        "seed": int(seed),
        "confidence": float(confidence),
        "interval": "percentile",
        "weights": BOOTSTRAP_WEIGHTS,
        "paired": "one weight per row, shared by both models and all statistics",
    }
    return report
