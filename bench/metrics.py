"""Benchmark of the evaluation metrics; prints one JSON line.

1. Exact ROC AUC on 10M predictions with heavy ties (scores rounded to 3 decimals) against
   ``sklearn.metrics.roc_auc_score``: max |difference| (goal <= 1e-9) and speed ratio (goal >= 3x).
2. ``churn_report`` on 10M prediction pairs with 1,000 paired bootstrap replicates, one thread
   (goal <= 30 s); also timed with labels and a categorical feature (frequency buckets) for reference.

Usage: ``python bench/metrics.py [--rows N] [--replicates R]``. Everything is pinned to one thread so the
numbers do not depend on how busy the machine's other cores are.
"""

from __future__ import annotations

import os

# Must be set before numpy/BLAS are imported: the goals are stated for one thread.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_codistill.eval.churn import churn_report  # noqa: E402
from recsys_codistill.eval.metrics import roc_auc  # noqa: E402


def _best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_auc(n: int, repeats: int) -> tuple[dict[str, object], np.ndarray, np.ndarray]:
    """Our AUC vs scikit-learn's on tied and on continuous scores; returns (fields, labels, logits)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    # CTR-like: 25% positives, scores informative but overlapping; 3 decimals -> ~1000 tie groups.
    y = rng.random(n) < 0.25
    logit = rng.normal(-1.2, 1.0, n) + 1.0 * y
    score_cont = 1.0 / (1.0 + np.exp(-logit))
    score_tied = np.round(score_cont, 3)
    t_ours, auc_ours = _best_of(lambda: roc_auc(y, score_tied), repeats)
    t_skl, auc_skl = _best_of(lambda: roc_auc_score(y, score_tied), repeats)
    t_ours_c, auc_ours_c = _best_of(lambda: roc_auc(y, score_cont), 1)
    t_skl_c, auc_skl_c = _best_of(lambda: roc_auc_score(y, score_cont), 1)
    diff = max(abs(auc_ours - auc_skl), abs(auc_ours_c - auc_skl_c))
    fields: dict[str, object] = {
        "auc_rows": n,
        "auc_tied_unique_scores": int(np.unique(score_tied).size),
        "auc_max_abs_diff_vs_sklearn": diff,
        "auc_ours_s": round(t_ours, 3),
        "auc_sklearn_s": round(t_skl, 3),
        "auc_speedup": round(t_skl / t_ours, 2),
        "auc_continuous_ours_s": round(t_ours_c, 3),
        "auc_continuous_sklearn_s": round(t_skl_c, 3),
        "auc_continuous_speedup": round(t_skl_c / t_ours_c, 2),
        "goal_auc_diff_le_1e-9": diff <= 1e-9,
        "goal_auc_speedup_ge_3": t_skl / t_ours >= 3.0,
    }
    return fields, y, logit


def bench_churn(y: np.ndarray, logit: np.ndarray, replicates: int) -> dict[str, object]:
    """churn_report on two 'retrains' (B = A perturbed in logit space), plain and with labels+feature."""
    n = y.size
    rng = np.random.default_rng(1)
    p_a = 1.0 / (1.0 + np.exp(-logit))
    p_b = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.15, n))))
    t0 = time.perf_counter()
    rep = churn_report(p_a, p_b, threshold=0.25, bootstrap=replicates, seed=0)
    t_churn = time.perf_counter() - t0
    feature = rng.zipf(1.3, n) % 1_000_003
    t0 = time.perf_counter()
    rep_full = churn_report(
        p_a,
        p_b,
        threshold=0.25,
        bootstrap=replicates,
        seed=0,
        labels=y.astype(np.float64),
        feature_values=feature,
    )
    t_full = time.perf_counter() - t0
    mad = rep["mean_abs_diff"]
    return {
        "churn_rows": n,
        "churn_replicates": replicates,
        "churn_report_s": round(t_churn, 2),
        "churn_report_labels_feature_s": round(t_full, 2),
        "churn_mean_abs_diff_ci": [mad["value"], mad["ci_low"], mad["ci_high"]],
        "churn_freq_buckets": len(rep_full.get("by_feature_frequency", [])),
        "goal_churn_le_30s": t_churn <= 30.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="tied-AUC timings: best of this many runs each")
    args = ap.parse_args()
    auc_fields, y, logit = bench_auc(args.rows, args.repeats)
    churn_fields = bench_churn(y, logit, args.replicates)
    out = {
        "bench": "metrics",
        "numpy": np.__version__,
        "threads": 1,
        **auc_fields,
        **churn_fields,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
