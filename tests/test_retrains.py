"""recsys_codistill.eval.retrains: all-pairs churn, jackknife over runs, ensembles, outliers, decomposition."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from recsys_codistill.eval.metrics import sigmoid
from recsys_codistill.eval.retrains import (
    Estimate,
    all_pairs_churn,
    calibrated,
    consensus_distance,
    decompose,
    ensemble_churn,
    ensemble_churn_matrix,
    ensemble_mean_over_runs,
    ensemble_members,
    flag_outliers,
    jackknife,
    mean_over_disjoint_ensembles,
    mean_over_pairs,
    paired_difference,
    pairwise_churn,
    robust_z,
    within_run_churn,
)

ROOT = Path(__file__).resolve().parents[1]


def _runs(n_runs: int, n_rows: int, seed: int, tau: float = 0.3, noise: float = 0.3) -> np.ndarray:
    """Retrains σ(z + δ_i + noise ε_i): a run-level offset δ_i ~ N(0, τ²) plus per-row noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.0, n_rows)
    delta = rng.normal(0.0, tau, (n_runs, 1))
    return sigmoid(z + delta + noise * rng.normal(size=(n_runs, n_rows)))


def _brute_pairwise(P: np.ndarray) -> np.ndarray:
    n = P.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = np.mean(np.abs(P[i] - P[j]))
    return out


def _brute_all_pairs(P: np.ndarray, runs: list[int]) -> float:
    vals = [np.mean(np.abs(P[i] - P[j])) for i, j in itertools.combinations(runs, 2)]
    return float(np.mean(vals))


def _brute_ensemble(P: np.ndarray, runs: list[int]) -> float:
    vals = []
    ens = list(itertools.combinations(runs, 2))
    for a, b in itertools.combinations(ens, 2):
        if set(a) & set(b):
            continue
        ea = (P[a[0]] + P[a[1]]) / 2
        eb = (P[b[0]] + P[b[1]]) / 2
        vals.append(np.mean(np.abs(ea - eb)))
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------------
# All-pairs churn and the jackknife
# ----------------------------------------------------------------------------------------------------


def test_pairwise_churn_matches_brute_force() -> None:
    P = np.random.default_rng(0).random((5, 301))
    M = pairwise_churn(P)
    np.testing.assert_allclose(M, _brute_pairwise(P), rtol=1e-13, atol=0)
    np.testing.assert_array_equal(M, M.T)
    np.testing.assert_array_equal(np.diag(M), 0.0)
    # float32 input accumulates in float64 like the float64 input of the same values
    np.testing.assert_allclose(pairwise_churn(P.astype(np.float32)), _brute_pairwise(P.astype(np.float32)))


def test_pairwise_churn_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_codistill.eval import retrains

    P = np.random.default_rng(1).random((4, 1000))
    whole = pairwise_churn(P)
    monkeypatch.setattr(retrains, "_CHUNK_ELEMS", 4 * 37)  # 37 rows per chunk, a ragged last one
    np.testing.assert_allclose(pairwise_churn(P), whole, rtol=1e-13)
    np.testing.assert_allclose(consensus_distance(P), _brute_consensus(P), rtol=1e-12)


def test_all_pairs_churn_value_and_replicates_match_brute_force() -> None:
    P = np.random.default_rng(2).random((5, 200))
    est = all_pairs_churn(P)
    assert est.value == pytest.approx(_brute_all_pairs(P, list(range(5))), rel=1e-13)
    for i, rep in enumerate(est.replicates):
        assert rep == pytest.approx(_brute_all_pairs(P, [j for j in range(5) if j != i]), rel=1e-13)
    assert mean_over_pairs(pairwise_churn(P), [4, 1, 3]) == pytest.approx(_brute_all_pairs(P, [1, 3, 4]))
    assert est.n_runs == 5 and not est.few_runs and est.method == "jackknife over runs, t(4)"
    assert est.ci_low < est.value < est.ci_high
    json.dumps(est.to_dict())


def test_jackknife_of_a_mean_is_the_classical_t_interval() -> None:
    x = np.random.default_rng(3).normal(2.0, 0.5, 7)
    est = jackknife(lambda idx: float(x[idx].mean()), 7, confidence=0.9)
    se = x.std(ddof=1) / math.sqrt(7)
    assert est.value == pytest.approx(x.mean(), rel=1e-14)
    assert est.se == pytest.approx(se, rel=1e-12)
    half = student_t.ppf(0.95, 6) * se
    assert est.ci_low == pytest.approx(x.mean() - half, rel=1e-12)
    assert est.ci_high == pytest.approx(x.mean() + half, rel=1e-12)
    assert est.confidence == 0.9


def test_jackknife_log_scale_interval() -> None:
    x = np.random.default_rng(4).gamma(2.0, 1.0, 6)
    est = jackknife(lambda idx: float(x[idx].mean()), 6, scale="log")
    logs = np.log([x[np.delete(np.arange(6), i)].mean() for i in range(6)])
    se_log = math.sqrt(5 / 6 * np.sum((logs - logs.mean()) ** 2))
    spread = math.exp(student_t.ppf(0.975, 5) * se_log)
    assert (est.ci_low, est.ci_high) == pytest.approx((x.mean() / spread, x.mean() * spread), rel=1e-12)
    assert est.se == pytest.approx(x.std(ddof=1) / math.sqrt(6), rel=1e-12)  # se stays on the linear scale
    assert est.method == "jackknife over runs, log scale, t(5)" and est.ci_low > 0
    with pytest.raises(ValueError, match="positive"):
        jackknife(lambda idx: float(idx.size - 5), 6, scale="log")
    with pytest.raises(ValueError, match="scale"):
        jackknife(lambda idx: 1.0, 6, scale="sqrt")  # type: ignore[arg-type]


def test_jackknife_passes_sorted_subsets_and_needs_enough_runs() -> None:
    seen: list[list[int]] = []
    jackknife(lambda idx: seen.append(idx.tolist()) or 0.0, 4)
    assert seen == [[0, 1, 2, 3], [1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    with pytest.raises(ValueError, match="at least 3 runs"):
        all_pairs_churn(np.random.default_rng(0).random((2, 10)))
    with pytest.raises(ValueError, match="at least 5 runs"):
        jackknife(lambda idx: 0.0, 4, min_runs=4)
    with pytest.raises(ValueError, match="not finite"):
        jackknife(lambda idx: math.nan if idx.size == 3 else 1.0, 4)
    assert all_pairs_churn(np.random.default_rng(0).random((3, 10))).few_runs


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pairwise_churn(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        pairwise_churn(np.array([[0.1, np.nan], [0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pairwise_churn(np.array([[0.1, 1.5], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="at least 2 runs"):
        pairwise_churn(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="duplicates"):
        mean_over_pairs(np.zeros((3, 3)), [0, 0, 1])
    with pytest.raises(ValueError, match="lie in"):
        mean_over_pairs(np.zeros((3, 3)), [0, 3])


def _expected_churn(P: np.ndarray) -> float:
    """All-pairs mean churn of many runs in O(N log N) per row: sum_{i<j} |x_i - x_j| = sum_k (2k-N+1) x_(k)."""
    srt = np.sort(P, axis=0)
    k = np.arange(srt.shape[0])[:, None]
    return float(((2 * k - srt.shape[0] + 1) * srt).sum(axis=0).mean() / math.comb(srt.shape[0], 2))


def test_expected_churn_helper_is_the_all_pairs_mean() -> None:
    P = np.random.default_rng(6).random((9, 100))
    assert _expected_churn(P) == pytest.approx(_brute_all_pairs(P, list(range(9))), rel=1e-12)


# (run-level offset sd, per-row noise sd, interval scale, accepted coverage band). Measured coverage of
# the nominal 95% interval over 1500 studies: 0.92 (linear, row noise dominates), 0.90 linear / 0.94 log
# (run offsets dominate), 0.84 linear / 0.86 log (both: the per-run contribution to churn is then like a
# squared offset, chi-square-skewed, and the symmetric small-sample interval misses on the low side).
COVERAGE_CASES = {
    "row-noise-dominated": (0.3, 1.0, "linear", (0.88, 0.995)),
    "offset-dominated-log": (0.3, 0.0, "log", (0.90, 0.99)),
    "skewed-linear": (0.3, 0.3, "linear", (0.78, 0.93)),
    # what the study uses for churn (log scale): measured 0.86 (1500 studies) and 0.89 (300, another seed)
    "skewed-log": (0.3, 0.3, "log", (0.80, 0.95)),
}


@pytest.mark.parametrize("case", COVERAGE_CASES)
def test_jackknife_interval_covers_the_expected_churn(case: str) -> None:
    # 300 studies of N = 6 retrains sigma(z + delta_i + noise * eps_i), delta_i ~ N(0, tau^2) a run-level
    # offset, so pairs sharing a run are dependent. The estimand is the expected churn between two fresh
    # retrains on these rows, estimated from all pairs of 4000 independent retrains.
    tau, noise, scale, (low, high) = COVERAGE_CASES[case]
    rng = np.random.default_rng(7)
    n_rows = 2_000
    z = rng.normal(-1.5, 1.0, n_rows)

    def retrains(n: int) -> np.ndarray:
        return sigmoid(z + rng.normal(0.0, tau, (n, 1)) + noise * rng.normal(size=(n, n_rows)))

    truth = _expected_churn(retrains(4_000))
    hits = misses_low = 0
    studies = 300
    for _ in range(studies):
        est = all_pairs_churn(retrains(6), scale=scale)
        hits += est.ci_low <= truth <= est.ci_high
        misses_low += est.ci_high < truth
    coverage = hits / studies
    assert low <= coverage <= high, coverage
    if case == "skewed-linear":
        # The known failure mode: nearly every miss is an interval below the truth.
        assert misses_low >= 0.9 * (studies - hits)


def test_pairwise_churn_ignoring_run_dependence_would_under_cover() -> None:
    # The reason for resampling runs: a naive t interval over the 15 pair values of each study (treating
    # pairs as independent) covers much less often than the jackknife in the same simulation.
    rng = np.random.default_rng(8)
    n_rows, tau, noise = 1_000, 0.4, 0.2
    z = rng.normal(-1.5, 1.0, n_rows)
    truth = _expected_churn(
        sigmoid(z + rng.normal(0.0, tau, (3_000, 1)) + noise * rng.normal(size=(3_000, n_rows)))
    )
    jack = naive = 0
    for _ in range(200):
        P = sigmoid(z + rng.normal(0.0, tau, (6, 1)) + noise * rng.normal(size=(6, n_rows)))
        est = all_pairs_churn(P)
        jack += est.ci_low <= truth <= est.ci_high
        vals = pairwise_churn(P)[np.triu_indices(6, 1)]
        half = student_t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / math.sqrt(vals.size)
        naive += abs(vals.mean() - truth) <= half
    assert naive < jack - 20, (naive, jack)


# ----------------------------------------------------------------------------------------------------
# Paired differences
# ----------------------------------------------------------------------------------------------------


def test_paired_difference_deletes_the_same_run_from_both_methods() -> None:
    calls: list[tuple[str, list[int]]] = []

    def stat(name: str, vals: np.ndarray):
        def f(idx: np.ndarray) -> float:
            calls.append((name, idx.tolist()))
            return float(vals[idx].mean())

        return f

    a = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    b = np.array([0.5, 1.0, 2.5, 2.0, 4.0])
    est = paired_difference(stat("a", a), stat("b", b), 5)
    subsets_a = [s for n, s in calls if n == "a"]
    subsets_b = [s for n, s in calls if n == "b"]
    assert subsets_a == subsets_b and len(subsets_a) == 6
    assert [set(range(5)) - set(s) for s in subsets_a[1:]] == [{i} for i in range(5)]
    # Linear statistics: the paired jackknife is the t interval of the per-run differences.
    d = a - b
    assert est.value == pytest.approx(d.mean())
    assert est.se == pytest.approx(d.std(ddof=1) / math.sqrt(5), rel=1e-12)
    assert est.method.startswith("paired difference")
    rel = paired_difference(stat("a", a), stat("b", b), 5, relative=True)
    assert rel.value == pytest.approx(a.mean() / b.mean() - 1)
    assert rel.replicates[0] == pytest.approx(a[1:].mean() / b[1:].mean() - 1)


def test_pairing_cancels_shared_seed_effects() -> None:
    # Seed i moves both methods' churn the same way; the paired interval sees only the difference.
    rng = np.random.default_rng(9)
    n_rows = 500
    z = rng.normal(-1.0, 1.0, n_rows)
    delta = rng.normal(0.0, 0.5, (8, 1))  # shared by run i of both methods
    base = sigmoid(z + delta + 0.3 * rng.normal(size=(8, n_rows)))
    method = sigmoid(z + 0.8 * delta + 0.3 * rng.normal(size=(8, n_rows)))
    mb, mm = pairwise_churn(base), pairwise_churn(method)
    est = paired_difference(lambda i: mean_over_pairs(mm, i), lambda i: mean_over_pairs(mb, i), 8)
    se_b, se_m = all_pairs_churn(base).se, all_pairs_churn(method).se
    assert est.value == pytest.approx(mean_over_pairs(mm) - mean_over_pairs(mb))
    assert est.se < 0.5 * math.hypot(se_b, se_m)


# ----------------------------------------------------------------------------------------------------
# Ensembles
# ----------------------------------------------------------------------------------------------------


def test_ensemble_churn_matches_brute_force_over_disjoint_quadruples() -> None:
    P = np.random.default_rng(10).random((6, 150))
    pairs, M = ensemble_churn_matrix(P)
    assert pairs == ensemble_members(range(6)) == list(itertools.combinations(range(6), 2))
    for a, (i, j) in enumerate(pairs):
        for b, (k, m) in enumerate(pairs):
            if {i, j} & {k, m}:
                assert np.isnan(M[a, b])
            else:
                expected = np.mean(np.abs((P[i] + P[j]) / 2 - (P[k] + P[m]) / 2))
                assert M[a, b] == pytest.approx(expected, rel=1e-13)
    est = ensemble_churn(P)
    assert est.value == pytest.approx(_brute_ensemble(P, list(range(6))), rel=1e-13)
    for i, rep in enumerate(est.replicates):
        assert rep == pytest.approx(_brute_ensemble(P, [j for j in range(6) if j != i]), rel=1e-13)
    assert mean_over_disjoint_ensembles(M, pairs, [0, 2, 3, 5]) == pytest.approx(
        _brute_ensemble(P, [0, 2, 3, 5])
    )
    assert est.method == "jackknife over runs, t(5)"


def test_ensemble_churn_needs_five_runs() -> None:
    with pytest.raises(ValueError, match="at least 5 runs"):
        ensemble_churn(np.random.default_rng(0).random((4, 20)))
    with pytest.raises(ValueError, match="at least 4 runs"):
        ensemble_churn_matrix(np.random.default_rng(0).random((3, 20)))


def test_ensemble_mean_over_runs() -> None:
    pairs = ensemble_members([0, 1, 2, 3])
    values = np.arange(len(pairs), dtype=float)  # (0,1)->0 (0,2)->1 (0,3)->2 (1,2)->3 (1,3)->4 (2,3)->5
    assert ensemble_mean_over_runs(values, pairs) == pytest.approx(2.5)
    assert ensemble_mean_over_runs(values, pairs, [1, 2, 3]) == pytest.approx((3 + 4 + 5) / 3)
    est = jackknife(lambda idx: ensemble_mean_over_runs(values, pairs, idx), 4)
    assert est.replicates[0] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="one value per pair"):
        ensemble_mean_over_runs(values[:-1], pairs)


# ----------------------------------------------------------------------------------------------------
# Within-run churn, consensus and outliers
# ----------------------------------------------------------------------------------------------------


def test_within_run_churn_is_a_t_interval_over_runs() -> None:
    rng = np.random.default_rng(11)
    P0 = rng.random((4, 300))
    P1 = np.clip(P0 + rng.normal(0, 0.05, P0.shape), 0, 1)
    est = within_run_churn(P0, P1, confidence=0.95)
    c = np.array([np.mean(np.abs(P0[i] - P1[i])) for i in range(4)])
    se = c.std(ddof=1) / 2.0
    half = student_t.ppf(0.975, 3) * se
    assert est.value == pytest.approx(c.mean(), rel=1e-13)
    assert est.se == pytest.approx(se, rel=1e-12)
    assert (est.ci_low, est.ci_high) == pytest.approx((c.mean() - half, c.mean() + half), rel=1e-12)
    np.testing.assert_allclose(est.replicates, c, rtol=1e-13)
    assert est.method == "t over runs, t(3)" and est.few_runs
    with pytest.raises(ValueError, match="same"):
        within_run_churn(P0, P1[:3])


def _brute_consensus(P: np.ndarray) -> np.ndarray:
    out = []
    for i in range(P.shape[0]):
        med = np.median(np.delete(P, i, axis=0), axis=0)
        out.append(np.mean(np.abs(P[i] - med)))
    return np.array(out)


@pytest.mark.parametrize("n_runs", [2, 3, 6, 7])
def test_consensus_distance_matches_brute_force(n_runs: int) -> None:
    rng = np.random.default_rng(12)
    P = rng.random((n_runs, 400))
    P[:, :50] = np.round(P[:, :50], 1)  # ties across runs
    np.testing.assert_allclose(consensus_distance(P), _brute_consensus(P), rtol=1e-12, atol=1e-15)


def test_flag_outliers_finds_a_planted_run_and_nothing_in_clean_data() -> None:
    plain_rule_flags = 0
    for seed in range(10):
        clean = _runs(7, 2_000, seed, tau=0.05, noise=0.2)
        d = consensus_distance(clean)
        assert not flag_outliers(d).any(), seed
        plain_rule_flags += bool(flag_outliers(d, min_ratio=1.0).any())
        rng = np.random.default_rng(100 + seed)
        broken = clean.copy()
        bad = int(rng.integers(7))
        broken[bad] = sigmoid(np.log(clean[bad] / (1 - clean[bad])) + 1.0)  # one run shifted by +1 logit
        flags = flag_outliers(consensus_distance(broken))
        assert flags.tolist() == [i == bad for i in range(7)], seed
    # Why min_ratio exists: the plain modified z-score flags some of these healthy studies.
    assert plain_rule_flags >= 1


def test_robust_z() -> None:
    d = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(robust_z(d), 0.6745 * (d - 3.0) / 1.0)
    assert flag_outliers(d).tolist() == [False, False, False, False, True]
    assert flag_outliers(d, min_ratio=1.0).tolist() == [False, False, False, False, True]
    # 4.5 is 1.5 times the median 3 (z = 1.01): only a lower threshold flags it, and only with min_ratio.
    assert flag_outliers(np.array([1.0, 2.0, 3.0, 4.0, 4.5]), threshold=1.0).tolist() == [False] * 4 + [True]
    assert not flag_outliers(np.array([1.0, 2.0, 3.0, 4.0, 4.4]), threshold=1.0).any()
    # Closer than usual is not an outlier: one-sided.
    assert not flag_outliers(np.array([-100.0, 2.0, 3.0, 4.0, 5.0])).any()
    # MAD = 0: only values off the median count, and they count as infinitely far.
    z = robust_z(np.array([1.0, 1.0, 1.0, 1.0, 1.5]))
    assert z.tolist() == [0.0, 0.0, 0.0, 0.0, math.inf]
    assert not flag_outliers(np.full(5, 0.02)).any()
    with pytest.raises(ValueError, match="at least 3"):
        robust_z([1.0, 2.0])


# ----------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------


def _labelled_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.2, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return z, y


def test_constant_offset_churn_vanishes_after_every_recalibration() -> None:
    z_cal, y_cal = _labelled_logits(5_000, 13)
    z_eval, _ = _labelled_logits(3_000, 14)
    Z_cal = np.stack([z_cal, z_cal + 1.0])
    Z_eval = np.stack([z_eval, z_eval + 1.0])
    raw = float(pairwise_churn(sigmoid(Z_eval))[0, 1])
    assert raw > 0.05
    after = {}
    for kind in ("offset", "platt", "isotonic"):
        P, params = calibrated(Z_eval, Z_cal, y_cal, kind)
        after[kind] = float(pairwise_churn(P)[0, 1])
        assert after[kind] < 1e-6, (kind, after[kind])
        assert [p["run"] for p in params] == [0, 1] and all(p["kind"] == kind for p in params)
        json.dumps(params)
    shares = decompose(raw, after["offset"], after["isotonic"])
    assert shares["global_shift"] == pytest.approx(1.0, abs=1e-4)
    assert shares["reordering"] == pytest.approx(0.0, abs=1e-4)


def test_reordered_scores_keep_their_churn_after_recalibration() -> None:
    rng = np.random.default_rng(15)
    z_cal, y_cal = _labelled_logits(5_000, 16)
    z_eval, _ = _labelled_logits(3_000, 17)
    # B has A's scores in a random order: same distribution, a different ranking of the rows.
    Z_cal = np.stack([z_cal, rng.permutation(z_cal)])
    Z_eval = np.stack([z_eval, rng.permutation(z_eval)])
    raw = float(pairwise_churn(sigmoid(Z_eval))[0, 1])
    for kind in ("offset", "platt", "isotonic"):
        P, _ = calibrated(Z_eval, Z_cal, y_cal, kind)
        assert pairwise_churn(P)[0, 1] > 0.5 * raw, kind
    after_offset = float(pairwise_churn(calibrated(Z_eval, Z_cal, y_cal, "offset")[0])[0, 1])
    after_iso = float(pairwise_churn(calibrated(Z_eval, Z_cal, y_cal, "isotonic")[0])[0, 1])
    shares = decompose(raw, after_offset, after_iso)
    assert shares["reordering"] > 0.5
    assert shares["monotone_recalibration"] + shares["reordering"] == pytest.approx(1.0)


def test_decompose_values_and_errors() -> None:
    d = decompose(0.04, 0.03, 0.01)
    assert d == pytest.approx(
        {
            "raw": 0.04,
            "after_offset": 0.03,
            "after_monotone": 0.01,
            "global_shift": 0.25,
            "monotone_recalibration": 0.75,
            "reordering": 0.25,
        }
    )
    with pytest.raises(ValueError, match="positive"):
        decompose(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="after_offset"):
        decompose(0.1, math.nan, 0.0)


def test_estimate_round_trips_through_json() -> None:
    est = Estimate(0.1, 0.01, 0.08, 0.12, 6, "jackknife over runs, t(5)", False, (0.1, 0.11), 0.95)
    d = json.loads(json.dumps(est.to_dict()))
    assert Estimate(**{**d, "replicates": tuple(d["replicates"])}) == est


def test_rank_matching_removes_every_monotone_difference_and_keeps_reordering() -> None:
    from recsys_codistill.eval.retrains import rank_matched

    rng = np.random.default_rng(11)
    z = rng.normal(-1.5, 1.0, 3_000)
    # the same ranking under different monotone maps: offset, slope, a cubic
    P = np.stack([sigmoid(z), sigmoid(z + 0.7), sigmoid(2.0 * z - 0.3), sigmoid(z + 0.1 * z**3)])
    assert all_pairs_churn(P).value > 0.02
    assert pairwise_churn(rank_matched(P)).max() < 1e-12
    # a permuted run keeps most of its churn
    Q = np.stack([sigmoid(z), sigmoid(rng.permutation(z))])
    assert pairwise_churn(rank_matched(Q))[0, 1] > 0.5 * pairwise_churn(Q)[0, 1]
