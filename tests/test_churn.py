"""recsys_codistill.eval.churn: point metrics by hand, alignment errors, and the Poisson bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from recsys_codistill.eval import churn
from recsys_codistill.eval.churn import (
    align,
    churn_by_feature_frequency,
    churn_by_probability_bucket,
    churn_report,
    flip_rate,
    frequency_buckets,
    mean_abs_diff,
    poisson_weights_u8,
    symmetric_pd,
    topk_overlap,
)
from recsys_codistill.eval.metrics import log_loss

PA = np.array([0.1, 0.5, 0.9, 0.3])
PB = np.array([0.2, 0.5, 0.6, 0.4])


def _pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pa = rng.beta(2, 6, n)
    pb = np.clip(pa + rng.normal(0, 0.03, n), 0, 1)
    return pa, pb


def test_identical_vectors_have_zero_churn() -> None:
    pa, _ = _pairs(2_000, 0)
    assert mean_abs_diff(pa, pa) == 0.0
    assert symmetric_pd(pa, pa) == 0.0
    assert flip_rate(pa, pa, 0.25) == {"flip_rate": 0.0, "flip_0_to_1": 0.0, "flip_1_to_0": 0.0}
    assert topk_overlap(pa, pa, 50) == {"k": 50, "shared_fraction": 1.0, "jaccard": 1.0}
    rep = churn_report(pa, pa, threshold=0.25, bootstrap=50, feature_values=np.arange(pa.size) % 7)
    for key in ("mean_abs_diff", "symmetric_pd", "flip_rate"):
        assert rep[key] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "se": 0.0}
    for b in rep["by_probability"] + rep["by_feature_frequency"]:
        assert b["mean_abs_diff"]["value"] in (0.0, None)
        assert b["mean_abs_diff"]["ci_high"] in (0.0, None)


def test_point_metrics_hand_values() -> None:
    assert mean_abs_diff(PA, PB) == pytest.approx((0.1 + 0 + 0.3 + 0.1) / 4)
    e = 1e-7
    spd = (2 * 0.1 / (0.3 + e) + 0 + 2 * 0.3 / (1.5 + e) + 2 * 0.1 / (0.7 + e)) / 4
    assert symmetric_pd(PA, PB) == pytest.approx(spd, rel=1e-12)
    # threshold 0.35: A = [0,1,1,0], B = [0,1,1,1] -> one 0->1 flip.
    assert flip_rate(PA, PB, 0.35) == {"flip_rate": 0.25, "flip_0_to_1": 0.25, "flip_1_to_0": 0.0}
    # threshold 0.7: A = [0,0,1,0], B = [0,0,0,0] -> one 1->0 flip; p == threshold counts as positive.
    assert flip_rate(PA, PB, 0.7) == {"flip_rate": 0.25, "flip_0_to_1": 0.0, "flip_1_to_0": 0.25}
    assert flip_rate([0.5], [0.49], 0.5)["flip_1_to_0"] == 1.0
    # top-2: A -> rows {2, 1}, B -> rows {2, 1} (0.6, 0.5).
    assert topk_overlap(PA, PB, 2) == {"k": 2, "shared_fraction": 1.0, "jaccard": 1.0}
    # top-1: A -> row 2, B -> row 2; top-3: A {2,1,3}, B {2,1,3}.
    r = topk_overlap([0.9, 0.8, 0.1, 0.2], [0.1, 0.8, 0.9, 0.2], 2)
    assert r == {"k": 2, "shared_fraction": 0.5, "jaccard": pytest.approx(1 / 3)}


def test_topk_ties_are_deterministic() -> None:
    p = np.array([0.5, 0.5, 0.5, 0.9, 0.1])
    # k = 2: 0.9 plus the first 0.5 (row 0).
    assert churn._topk_indices(p, 2).tolist() == [3, 0]
    assert topk_overlap(p, [0.5, 0.5, 0.5, 0.1, 0.9], 2)["shared_fraction"] == 0.5  # row 0 shared


def test_probability_buckets_hand_values() -> None:
    edges = (0.0, 0.25, 0.5, 1.0)
    # means: 0.15, 0.5, 0.75, 0.35
    out = churn_by_probability_bucket(PA, PB, edges)
    assert [b["rows"] for b in out] == [1, 1, 2]
    assert out[0]["mean_abs_diff"] == pytest.approx(0.1)
    assert out[1]["mean_abs_diff"] == pytest.approx(0.1)  # 0.35 -> [0.25, 0.5)
    assert out[2]["mean_abs_diff"] == pytest.approx(0.15)  # 0.5 and 0.75
    assert churn_by_probability_bucket([1.0], [1.0], edges)[2]["rows"] == 1  # last bucket is closed
    empty = churn_by_probability_bucket([0.1], [0.1], edges)
    assert empty[1] == {"lo": 0.25, "hi": 0.5, "rows": 0, "mean_abs_diff": None}
    with pytest.raises(ValueError, match="strictly increasing"):
        churn_by_probability_bucket(PA, PB, (0.0, 0.5, 0.5, 1.0))


def test_frequency_buckets_hand_values() -> None:
    values = np.array([7, 7, 7, 8, 8, 9, 10, 7])
    bucket, count = frequency_buckets(values)
    assert count.tolist() == [4, 4, 4, 2, 2, 1, 1, 4]
    assert bucket.tolist() == [2, 2, 2, 1, 1, 0, 0, 2]
    bucket, count = frequency_buckets(values, reference_values=np.array([7, 8, 8, 8, 11]))
    assert count.tolist() == [1, 1, 1, 3, 3, 0, 0, 1]
    assert bucket.tolist() == [0, 0, 0, 1, 1, -1, -1, 0]
    # Exact powers of two land in their own bucket (no log rounding).
    big = np.repeat(np.arange(3), [1023, 1024, 2047])
    assert np.unique(frequency_buckets(big)[0]).tolist() == [9, 10]

    pa = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    pb = pa + np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.0, 0.4, 0.1])
    out = churn_by_feature_frequency(pa, pb, values, reference_values=np.array([7, 8, 8, 8, 11]))
    assert [b["bucket"] for b in out] == ["unseen", "1", "2-3"]
    assert [b["rows"] for b in out] == [2, 4, 2]
    assert [b["distinct_values"] for b in out] == [2, 1, 1]
    assert [b["min_count"] for b in out] == [0, 1, 2]
    assert out[0]["mean_abs_diff"] == pytest.approx(0.2)
    assert out[1]["mean_abs_diff"] == pytest.approx(0.1)
    assert out[2]["mean_abs_diff"] == pytest.approx(0.2)


def test_align_joins_by_row_id() -> None:
    rng = np.random.default_rng(1)
    ids = rng.permutation(1000) * 3 + 5
    pa = rng.random(1000)
    perm = rng.permutation(1000)
    al = align(ids, pa, ids[perm], pa[perm] * 0.5)
    assert np.all(np.diff(al.row_id) > 0)
    np.testing.assert_array_equal(al.p_b, al.p_a * 0.5)
    lookup = dict(zip(ids.tolist(), pa.tolist(), strict=True))
    assert all(lookup[i] == p for i, p in zip(al.row_id.tolist(), al.p_a.tolist(), strict=True))
    # Already-sorted input comes back unchanged.
    s = np.arange(10)
    al = align(s, np.linspace(0, 1, 10), s, np.linspace(0, 1, 10))
    assert al.row_id is s


def test_align_refuses_mismatched_or_duplicate_ids() -> None:
    p3 = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"1 only in A \(e.g. row_id 3\).*1 only in B \(e.g. row_id 4\)"):
        align([1, 2, 3], p3, [1, 2, 4], p3)
    with pytest.raises(ValueError, match=r"A has 3 rows, B has 2.*1 only in A"):
        align([1, 2, 3], p3, [1, 2], p3[:2])
    with pytest.raises(
        ValueError, match=r"predictions B have 1 duplicated row ids \(1 extra rows of 3\); e.g. row_id 2"
    ):
        align([1, 2, 3], p3, [2, 1, 2], p3)
    with pytest.raises(ValueError, match="3 row ids but 2 probabilities"):
        align([1, 2, 3], p3[:2], [1, 2, 3], p3)


def test_poisson_weights_are_discretised_poisson1() -> None:
    w = poisson_weights_u8(np.arange(256, dtype=np.uint8))
    assert np.bincount(w).tolist() == [94, 95, 46, 16, 4, 1]
    assert w.mean() == 1.0 and w.var() == 1.0
    pois = [math.exp(-1) / math.factorial(k) * 256 for k in range(6)]
    assert np.allclose(np.bincount(w), pois, atol=1.1)  # 1/256 granularity


def test_bootstrap_sums_do_not_depend_on_chunking() -> None:
    rng = np.random.default_rng(2)
    x = rng.random((3000, 3)).astype(np.float32)
    bounds = [0, 700, 700, 2999, 3000]
    res = [
        churn._bootstrap_cell_sums(lambda s, e: x[s:e], 3000, 3, bounds, 37, seed=5, chunk_rows=c)
        for c in (8, 64, 512)
    ]
    for r in res[1:]:
        np.testing.assert_allclose(r, res[0], rtol=1e-5, atol=1e-3)
    # Direct check on one cell against explicit weights from the same byte stream.
    u = np.random.default_rng(5).bit_generator.random_raw(-(-3000 * 37 // 8)).view(np.uint8)[: 3000 * 37]
    w = poisson_weights_u8(u).reshape(3000, 37).astype(np.float64)
    np.testing.assert_allclose(res[0][2], x[700:2999].T.astype(np.float64) @ w[700:2999], rtol=1e-5)
    assert np.all(res[0][1] == 0)  # empty cell


def test_report_point_estimates_match_standalone_functions() -> None:
    pa, pb = _pairs(5_000, 3)
    rng = np.random.default_rng(3)
    labels = (rng.random(pa.size) < pa).astype(np.float64)
    labels[::10] = np.nan
    feat = rng.zipf(1.6, pa.size)
    rep = churn_report(pa, pb, threshold=0.2, bootstrap=40, labels=labels, feature_values=feat)
    json.dumps(rep, allow_nan=False)
    assert rep["rows"] == pa.size
    assert rep["mean_abs_diff"]["value"] == pytest.approx(mean_abs_diff(pa, pb), rel=1e-12)
    assert rep["symmetric_pd"]["value"] == pytest.approx(symmetric_pd(pa, pb), rel=1e-12)
    fr = flip_rate(pa, pb, 0.2)
    for key in ("flip_rate", "flip_0_to_1", "flip_1_to_0"):
        assert rep[key]["value"] == pytest.approx(fr[key], abs=1e-15)
    ref_b = churn_by_probability_bucket(pa, pb)
    assert [b["rows"] for b in rep["by_probability"]] == [b["rows"] for b in ref_b]
    for got, ref in zip(rep["by_probability"], ref_b, strict=True):
        if ref["rows"]:
            assert got["mean_abs_diff"]["value"] == pytest.approx(ref["mean_abs_diff"], rel=1e-12)
        else:
            assert got["mean_abs_diff"]["value"] is None
    ref_f = churn_by_feature_frequency(pa, pb, feat)
    assert [b["bucket"] for b in rep["by_feature_frequency"]] == [b["bucket"] for b in ref_f]
    for got, ref in zip(rep["by_feature_frequency"], ref_f, strict=True):
        assert got["rows"] == ref["rows"] and got["distinct_values"] == ref["distinct_values"]
        assert got["mean_abs_diff"]["value"] == pytest.approx(ref["mean_abs_diff"], rel=1e-12)
    m = np.isfinite(labels)
    lab = rep["labelled"]
    assert lab["rows"] == int(m.sum())
    assert lab["log_loss_a"]["value"] == pytest.approx(log_loss(labels[m], pa[m]), rel=1e-12)
    assert lab["log_loss_b"]["value"] == pytest.approx(log_loss(labels[m], pb[m]), rel=1e-12)
    d = lab["log_loss_diff"]
    assert d["value"] == pytest.approx(lab["log_loss_a"]["value"] - lab["log_loss_b"]["value"])
    for est in (rep["mean_abs_diff"], rep["flip_rate"], d):
        assert est["ci_low"] <= est["value"] <= est["ci_high"]
    assert rep["topk_overlap"]["k"] == 50
    assert rep["bootstrap"]["replicates"] == 40


def test_report_is_seeded() -> None:
    pa, pb = _pairs(3_000, 4)
    r1 = churn_report(pa, pb, threshold=0.2, bootstrap=30, seed=7)
    r2 = churn_report(pa, pb, threshold=0.2, bootstrap=30, seed=7)
    r3 = churn_report(pa, pb, threshold=0.2, bootstrap=30, seed=8)
    assert r1 == r2
    assert r1["mean_abs_diff"]["ci_low"] != r3["mean_abs_diff"]["ci_low"]
    r0 = churn_report(pa, pb, threshold=0.2, bootstrap=0)
    assert r0["mean_abs_diff"]["value"] == r1["mean_abs_diff"]["value"]
    assert r0["mean_abs_diff"]["ci_low"] is None


def test_bootstrap_se_matches_analytic_se() -> None:
    pa, pb = _pairs(20_000, 5)
    d = np.abs(pa - pb)
    rep = churn_report(pa, pb, threshold=0.2, bootstrap=400, seed=1)
    assert rep["mean_abs_diff"]["se"] == pytest.approx(d.std() / math.sqrt(d.size), rel=0.15)
    f = ((pa >= 0.2) != (pb >= 0.2)).astype(float)
    assert rep["flip_rate"]["se"] == pytest.approx(f.std() / math.sqrt(f.size), rel=0.15)


def test_ci_coverage_is_near_nominal() -> None:
    # pA ~ U(0.2, 0.6), pB = pA + U(-a, a): E|pA - pB| = a/2, and at threshold 0.4 (inside the support)
    # P(flip) = density(pA) * 2 * integral_0^a P(e > d) dd = 2.5 * a / 2. 200 independent samples.
    a, n, sims = 0.1, 1000, 200
    truth = {"mean_abs_diff": a / 2, "flip_rate": 2.5 * a / 2}
    rng = np.random.default_rng(11)
    covered = dict.fromkeys(truth, 0)
    for s in range(sims):
        pa = rng.uniform(0.2, 0.6, n)
        pb = pa + rng.uniform(-a, a, n)
        rep = churn_report(pa, pb, threshold=0.4, bootstrap=300, seed=s)
        for key, value in truth.items():
            covered[key] += rep[key]["ci_low"] <= value <= rep[key]["ci_high"]
    for key in truth:
        assert 0.90 <= covered[key] / sims <= 0.99, (key, covered[key] / sims)


def test_report_input_errors() -> None:
    with pytest.raises(ValueError, match="rows"):
        churn_report(PA, PB[:3], threshold=0.5)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        churn_report(PA, PB, threshold=0.5, labels=[0, 1, 2, np.nan])
    with pytest.raises(ValueError, match="feature_values has 3 rows"):
        churn_report(PA, PB, threshold=0.5, feature_values=[1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        mean_abs_diff([0.1, np.nan], [0.1, 0.2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, 1.0, -0.1, 2.0])
def test_flip_threshold_must_be_finite_and_inside_0_1(bad: float) -> None:
    # A NaN threshold used to compare false everywhere and report a flip rate of 0.
    with pytest.raises(ValueError, match=r"threshold = .*finite number in \(0, 1\)"):
        flip_rate(PA, PB, bad)
    with pytest.raises(ValueError, match=r"threshold = .*finite number in \(0, 1\)"):
        churn_report(PA, PB, threshold=bad, bootstrap=0)
