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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from recsys_codistill.metrics import as_numpy

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
#: Log-loss clipping, as in :func:`recsys_codistill.metrics.log_loss`.
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
    e = _check_edges(edges)
    idx = probability_bucket_index(a, b, e)
    nb = e.size - 1
    rows = np.bincount(idx, minlength=nb)
    sums = np.bincount(idx, weights=np.abs(a - b), minlength=nb)
    return [
        {
            "lo": float(e[i]),
            "hi": float(e[i + 1]),
            "rows": int(rows[i]),
            "mean_abs_diff": float(sums[i] / rows[i]) if rows[i] else None,
        }
        for i in range(nb)
    ]


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
    fv = as_numpy(feature_values, name="feature_values")
    if fv.size != a.size:
        raise ValueError(f"feature_values has {fv.size} rows but predictions have {a.size}")
    bucket, _ = frequency_buckets(fv, reference_values)
    out = []
    shifted = bucket + 1  # bincount needs non-negative bins; 0 = unseen
    rows = np.bincount(shifted)
    sums = np.bincount(shifted, weights=np.abs(a - b), minlength=rows.size)
    distinct = _distinct_per_bucket(fv, shifted, rows.size)
    for j in np.flatnonzero(rows):
        k = int(j) - 1
        out.append(
            {
                "bucket": _frequency_bucket_label(k),
                "min_count": 0 if k < 0 else 1 << k,
                "max_count": 0 if k < 0 else (1 << (k + 1)) - 1,
                "rows": int(rows[j]),
                "distinct_values": int(distinct[j]),
                "mean_abs_diff": float(sums[j] / rows[j]),
            }
        )
    return out


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


def _row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    pc = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return -np.where(y >= 0.5, np.log(pc), np.log(1.0 - pc))


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

    Args:
        p_a, p_b: predicted probabilities for the same rows in the same order (see :func:`align`).
        threshold: class threshold for flips (p >= threshold is positive), a finite number in (0, 1).
        bootstrap: number of replicates R (0 disables intervals).
        seed: seed of the ``numpy.random.Generator`` that draws the bootstrap weights.
        labels: optional 0/1 labels, NaN for unlabelled rows; adds log loss of A, of B and of A − B on the
            labelled rows, with intervals from the same replicates.
        feature_values: optional per-row categorical values; adds churn per log2 frequency bucket
            (frequency counted in ``feature_reference``, default ``feature_values``).
        prob_edges: bucket edges of (pA + pB)/2.
        topk_fraction: k = max(1, round(fraction * rows)) for the top-k overlap (no interval).
        confidence: interval coverage (percentile bootstrap).

    Returns a JSON-serialisable dict; every estimate is ``{"value", "ci_low", "ci_high", "se"}`` (None
    where undefined, e.g. an empty bucket or ``bootstrap=0``).
    """
    threshold = check_threshold(threshold)
    a, b = _pair(p_a, p_b)
    n = a.size
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    edges = _check_edges(prob_edges)

    # --- per-row statistics ---------------------------------------------------------------------------
    # Each statistic is a ratio Σ x / Σ d over a set of rows, d = 1 (all rows) or d = "row is labelled".
    absd = np.abs(a - b)
    spd = _spd_rows(a, b)
    a1, b1 = a >= threshold, b >= threshold
    up = b1 & ~a1  # bool: 1 byte per row; bincount and the float32 blocks cast as they read
    down = a1 & ~b1
    del a1, b1
    numerators: list[np.ndarray] = [absd, spd, up, down]
    lab: np.ndarray | None = None
    if labels is not None:
        y = as_numpy(labels, name="labels").astype(np.float64, copy=False)
        if y.size != n:
            raise ValueError(f"labels has {y.size} rows but predictions have {n}")
        lab_mask = np.isfinite(y)
        if np.any((y[lab_mask] != 0) & (y[lab_mask] != 1)):
            raise ValueError("labels must be 0/1 (NaN for unlabelled rows)")
        lab = lab_mask.astype(np.float64)
        yz = np.where(lab_mask, y, 0.0)
        numerators += [_row_logloss(yz, a) * lab, _row_logloss(yz, b) * lab]
    n_num = len(numerators)
    uses_lab = np.arange(n_num) >= 4  # log-loss columns are means over labelled rows only

    # --- cells: probability bucket x frequency bucket ---------------------------------------------------
    pbucket = probability_bucket_index(a, b, edges)
    n_pb = edges.size - 1
    fshift: np.ndarray | None = None
    n_fb = 1
    if feature_values is not None:
        fv = as_numpy(feature_values, name="feature_values")
        if fv.size != n:
            raise ValueError(f"feature_values has {fv.size} rows but predictions have {n}")
        fshift = frequency_buckets(fv, feature_reference)[0] + 1  # 0 = unseen
        n_fb = int(fshift.max()) + 1
    cell = pbucket * n_fb + (fshift if fshift is not None else 0)
    del pbucket
    n_cells = n_pb * n_fb

    # Exact float64 sums per cell give the point estimates of every group of cells.
    cell_rows = np.bincount(cell, minlength=n_cells).astype(np.float64)
    cell_lab = np.bincount(cell, weights=lab, minlength=n_cells) if lab is not None else np.zeros(n_cells)
    cell_num = np.stack([np.bincount(cell, weights=x, minlength=n_cells) for x in numerators])
    cell_den = np.where(uses_lab[:, None], cell_lab[None, :], cell_rows[None, :])
    # Per-cell means: the bootstrap columns carry x - theta_cell * d, so float32 partial sums hold
    # only deviations (a constant cell gives exactly 0, not rounding noise).
    theta = np.divide(cell_num, cell_den, out=np.zeros_like(cell_num), where=cell_den > 0)

    reps: np.ndarray | None = None  # (cells, columns, R)
    # Column layout of reps: numerators 0..n_num-1, then the weighted row count, then labelled count.
    col_rows, col_lab = n_num, n_num + 1
    if bootstrap > 0:
        order = np.argsort(cell, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(cell, minlength=n_cells))))

        def stat_block(start: int, stop: int) -> np.ndarray:
            idx = order[start:stop]
            c = cell[idx]
            d_lab = lab[idx] if lab is not None else None
            cols = []
            for j, x in enumerate(numerators):
                d = d_lab if uses_lab[j] else 1.0
                cols.append(x[idx] - theta[j, c] * d)
            cols.append(np.ones(idx.size))
            if d_lab is not None:
                cols.append(d_lab)
            return np.stack(cols, axis=1).astype(np.float32)

        n_cols = n_num + 1 + (1 if lab is not None else 0)
        reps = _bootstrap_cell_sums(stat_block, n, n_cols, bounds, bootstrap, seed)

    def ratio(j: int, cells: np.ndarray) -> tuple[float | None, np.ndarray | None]:
        """Point estimate and replicates of statistic j over the union of ``cells``."""
        den = float(cell_den[j, cells].sum())
        if den <= 0:
            return None, None
        point = float(cell_num[j, cells].sum()) / den
        if reps is None:
            return point, None
        d_col = col_lab if uses_lab[j] else col_rows
        rep_den = reps[cells, d_col].sum(axis=0)
        rep_num = (theta[j, cells, None] * reps[cells, d_col] + reps[cells, j]).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rep = rep_num / rep_den
        # Every per-row statistic is >= 0; float32 rounding of the centred sums can leave -1e-10 where
        # a replicate resampled only zeros, which would print as a "-0.0000" interval end.
        return point, np.maximum(rep, 0.0)

    def group(cells: np.ndarray) -> dict[str, dict[str, float | None]]:
        est = {}
        for j, name in enumerate(("mean_abs_diff", "symmetric_pd", "flip_0_to_1", "flip_1_to_0")):
            est[name] = _estimate(*ratio(j, cells), confidence)
        (up_p, up_r), (down_p, down_r) = ratio(2, cells), ratio(3, cells)
        flip_p = None if up_p is None or down_p is None else up_p + down_p
        flip_r = None if up_r is None or down_r is None else up_r + down_r
        est["flip_rate"] = _estimate(flip_p, flip_r, confidence)
        return est

    all_cells = np.arange(n_cells)
    report: dict[str, Any] = {"rows": int(n), "threshold": float(threshold)}
    overall = group(all_cells)
    for name in ("mean_abs_diff", "symmetric_pd", "flip_rate", "flip_0_to_1", "flip_1_to_0"):
        report[name] = overall[name]

    k = max(1, int(round(topk_fraction * n)))
    report["topk_overlap"] = {"fraction": float(topk_fraction), **topk_overlap(a, b, k)}

    by_prob = []
    for i in range(n_pb):
        cells = np.arange(i * n_fb, (i + 1) * n_fb)
        est = group(cells)
        by_prob.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "rows": int(cell_rows[cells].sum()),
                "mean_abs_diff": est["mean_abs_diff"],
                "symmetric_pd": est["symmetric_pd"],
                "flip_rate": est["flip_rate"],
            }
        )
    report["by_probability"] = by_prob

    if fshift is not None:
        distinct = _distinct_per_bucket(as_numpy(feature_values), fshift, n_fb)
        by_freq = []
        for jb in range(n_fb):
            cells = np.arange(jb, n_cells, n_fb)
            rows = int(cell_rows[cells].sum())
            if rows == 0:
                continue
            est = group(cells)
            kb = jb - 1
            by_freq.append(
                {
                    "bucket": _frequency_bucket_label(kb),
                    "min_count": 0 if kb < 0 else 1 << kb,
                    "max_count": 0 if kb < 0 else (1 << (kb + 1)) - 1,
                    "rows": rows,
                    "distinct_values": int(distinct[jb]),
                    "mean_abs_diff": est["mean_abs_diff"],
                    "symmetric_pd": est["symmetric_pd"],
                    "flip_rate": est["flip_rate"],
                }
            )
        report["by_feature_frequency"] = by_freq

    if lab is not None:
        (lla_p, lla_r), (llb_p, llb_r) = ratio(4, all_cells), ratio(5, all_cells)
        report["labelled"] = {
            "rows": int(cell_lab.sum()),
            "log_loss_a": _estimate(lla_p, lla_r, confidence),
            "log_loss_b": _estimate(llb_p, llb_r, confidence),
            "log_loss_diff": _estimate(
                None if lla_p is None or llb_p is None else lla_p - llb_p,
                None if lla_r is None or llb_r is None else lla_r - llb_r,
                confidence,
            ),
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
