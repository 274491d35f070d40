"""The synthetic Criteo-format generator: format, statistics, truth alignment, determinism."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline import synthetic
from data_pipeline.schema import DENSE_COLUMNS, SPARSE_COLUMNS, parquet_schema

ROWS = 20_000
HEX8 = re.compile(r"^[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn")
    summary = synthetic.generate(out, ROWS, seed=7, num_files=3)
    return out, summary


def _lines(out: Path) -> list[list[str]]:
    rows: list[list[str]] = []
    for p in sorted(out.glob("synthetic-*.tsv.gz")):
        with gzip.open(p, "rt") as f:
            rows += [line.rstrip("\n").split("\t") for line in f]
    return rows


def test_files_and_row_counts(gen: tuple[Path, dict]) -> None:
    out, summary = gen
    names = sorted(p.name for p in out.glob("synthetic-*.tsv.gz"))
    assert names == ["synthetic-00000.tsv.gz", "synthetic-00001.tsv.gz", "synthetic-00002.tsv.gz"]
    counts = []
    for n in names:
        with gzip.open(out / n, "rt") as f:
            counts.append(sum(1 for _ in f))
    assert sum(counts) == ROWS and max(counts) - min(counts) <= 1
    assert [f["rows"] for f in summary["files"]] == counts
    on_disk = json.loads((out / "synthetic.json").read_text())
    assert on_disk["rows"] == ROWS and on_disk["seed"] == 7
    for key in ("params", "base_rate", "bayes_log_loss", "bayes_auc", "intercept"):
        assert key in on_disk


def test_field_format_and_null_rates(gen: tuple[Path, dict]) -> None:
    out, _ = gen
    rows = _lines(out)
    assert all(len(r) == 40 for r in rows)
    labels = np.array([int(r[0]) for r in rows])
    assert set(np.unique(labels)) <= {0, 1}
    assert 0.20 <= labels.mean() <= 0.30
    dense_null = np.array([[r[1 + j] == "" for j in range(13)] for r in rows])
    cat_null = np.array([[r[14 + f] == "" for f in range(26)] for r in rows])
    # Criteo-like missingness: ~21% of dense and ~10.5% of categorical values overall, per column close to
    # the configured rates.
    assert abs(dense_null.mean() - 0.208) < 0.02
    assert abs(cat_null.mean() - 0.105) < 0.015
    p = synthetic.SyntheticParams()
    np.testing.assert_allclose(dense_null.mean(axis=0), p.dense_null_rate, atol=0.02)
    np.testing.assert_allclose(cat_null.mean(axis=0), p.cat_null_rate, atol=0.02)
    # Columns of one null group go missing together.
    c = {name: i for i, name in enumerate(SPARSE_COLUMNS)}
    assert (cat_null[:, c["C19"]] == cat_null[:, c["C26"]]).all()
    for r in rows[:2000]:
        for v in r[1:14]:
            if v:
                int(v)  # integers
        for v in r[14:]:
            assert v == "" or HEX8.match(v), v
    dense = np.array([[int(v) if v else 0 for v in r[1:14]] for r in rows])
    assert dense[:, 1].min() == -1  # I2 has Criteo's -1s ...
    assert (np.delete(dense, 1, axis=1) >= 0).all()  # ... the other counts are non-negative
    # Heavy-tailed ids: the most frequent C3 value is common, yet many values are seen only once or twice.
    vals, counts = np.unique([r[16] for r in rows if r[16]], return_counts=True)
    assert counts.max() > 50 and len(vals) > 1000


def test_truth_alignment_and_bayes_metrics(gen: tuple[Path, dict]) -> None:
    out, summary = gen
    truth = pq.read_table(out / "truth.parquet")
    assert truth.column_names == ["row_id", "probability", "logit"]
    rid = truth["row_id"].to_numpy()
    np.testing.assert_array_equal(rid, np.arange(ROWS))
    prob = truth["probability"].to_numpy()
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-truth["logit"].to_numpy())), rtol=1e-12)
    labels = np.array([int(r[0]) for r in _lines(out)])
    m = synthetic.bayes_metrics(prob, labels)
    assert m["log_loss"] == pytest.approx(summary["bayes_log_loss"])
    assert m["auc"] == pytest.approx(summary["bayes_auc"])
    base = labels.mean()
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert summary["base_rate_log_loss"] == pytest.approx(entropy)
    assert m["log_loss"] < entropy - 0.05
    assert 0.7 < m["auc"] < 0.95
    # Labels really are drawn from the truth: calibration of the true probabilities.
    assert prob.mean() == pytest.approx(base, abs=0.01)


def test_bayes_metrics_match_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    p = np.round(rng.random(5000), 2)  # many ties
    y = (rng.random(5000) < p).astype(np.int8)
    m = synthetic.bayes_metrics(p, y)
    assert m["auc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    pc = np.clip(p, 1e-15, 1 - 1e-15)
    assert m["log_loss"] == pytest.approx(sk.log_loss(y, pc), abs=1e-12)


def test_deterministic_and_prefix(gen: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = gen
    again = synthetic.generate(tmp_path / "a", ROWS, seed=7, num_files=3)
    for name in (
        "synthetic-00000.tsv.gz",
        "synthetic-00001.tsv.gz",
        "synthetic-00002.tsv.gz",
        "synthetic.json",
    ):
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
    assert again["bayes_auc"] == json.loads((out / "synthetic.json").read_text())["bayes_auc"]
    # A shorter run is an exact prefix (rows come from fixed per-chunk RNGs) ...
    synthetic.generate(tmp_path / "b", 1234, seed=7)
    short = _lines(tmp_path / "b")
    assert short == _lines(out)[:1234]
    # ... and another seed gives other rows from the same kind of world.
    synthetic.generate(tmp_path / "c", 1234, seed=8)
    assert _lines(tmp_path / "c") != short


def test_world_seed_separates_world_from_sample(tmp_path: Path) -> None:
    p = synthetic.SyntheticParams(world_seed=3)
    a = synthetic.generate(tmp_path / "a", 500, seed=1, params=p)
    b = synthetic.generate(tmp_path / "b", 500, seed=2, params=p)
    assert a["intercept"] == b["intercept"]  # same world ...
    assert _lines(tmp_path / "a") != _lines(tmp_path / "b")  # ... different samples
    # The same Zipf rank maps to the same id in both: the most frequent C2 value agrees.
    top = [np.unique([r[15] for r in _lines(tmp_path / d)], return_counts=True) for d in ("a", "b")]
    assert top[0][0][np.argmax(top[0][1])] == top[1][0][np.argmax(top[1][1])]


def test_parquet_writer_matches_tsv(gen: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = gen
    summary = synthetic.generate_parquet(tmp_path, 5000, seed=7, rows_per_file=3000, row_group_size=1000)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rows"] == 5000 and [f["rows"] for f in manifest["files"]] == [3000, 2000]
    assert summary["rows"] == 5000
    tables = [pq.read_table(tmp_path / f["path"]) for f in manifest["files"]]
    assert all(t.schema.equals(parquet_schema(), check_metadata=False) for t in tables)
    meta = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, 1000, 1000]
    lines = _lines(out)[:5000]
    import pyarrow as pa

    t = pa.concat_tables(tables)
    np.testing.assert_array_equal(t["row_id"].to_numpy(), np.arange(5000))
    assert t["label"].to_pylist() == [int(r[0]) for r in lines]
    for j, name in enumerate(DENSE_COLUMNS):
        assert t[name].to_pylist() == [int(r[1 + j]) if r[1 + j] else None for r in lines]
    for f, name in enumerate(SPARSE_COLUMNS):
        assert t[name].to_pylist() == [int(r[14 + f], 16) if r[14 + f] else None for r in lines]


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="cardinalities"):
        synthetic.SyntheticParams(cardinalities=(10,) * 3)
    with pytest.raises(ValueError, match="interactions"):
        synthetic.SyntheticParams(interactions=(("C1", "C99"),))
    with pytest.raises(ValueError, match="null_groups"):
        synthetic.SyntheticParams(null_groups=(("I1", "I1"),))


def test_daily_drift_is_deterministic_and_moves_effects_and_ids_between_days(tmp_path):
    from data_pipeline.synthetic import SyntheticParams, day_of_rows, generate_parquet

    rows, days = 7_000, 7
    drifting = SyntheticParams(days=days, drift=0.5, id_turnover=0.05)
    a = generate_parquet(tmp_path / "a", rows, seed=3, params=drifting, row_group_size=1000)
    b = generate_parquet(tmp_path / "b", rows, seed=3, params=drifting, row_group_size=1000)
    generate_parquet(tmp_path / "c", rows, seed=3, row_group_size=1000)
    ta, tb, tc = (pq.read_table(tmp_path / x / "truth.parquet") for x in "abc")
    assert ta.equals(tb) and a["bayes_log_loss"] == b["bayes_log_loss"]  # deterministic for a seed
    assert ta.num_rows == rows and ta["row_id"].to_pylist() == list(range(rows))  # truth covers every row
    # the day cut is ingest --days's
    from data_pipeline.preprocess import day_cuts

    day = day_of_rows(0, rows, rows, days)
    assert [int(np.argmax(day == d)) for d in range(1, days)] == day_cuts(rows, days)
    # day 0 is the stationary world row for row; later days differ, more so the later the day
    pa_, pc = ta["logit"].to_numpy(), tc["logit"].to_numpy()
    assert np.array_equal(pa_[day == 0], pc[day == 0])
    gap = [np.abs(pa_ - pc)[day == d].mean() for d in range(days)]
    assert gap[0] == 0 and all(x < y for x, y in zip(gap[1:], gap[2:], strict=False)) and gap[1] > 0.05
    # new ids: the C14 ids seen of day 0 and of day 6 differ when ids turn over
    ids = pq.read_table(tmp_path / "a" / "part-00000.parquet", columns=["C14"])["C14"].to_numpy()
    first, last = set(ids[day == 0].tolist()), set(ids[day == days - 1].tolist())
    flat_ids = pq.read_table(tmp_path / "c" / "part-00000.parquet", columns=["C14"])["C14"].to_numpy()
    flat_first, flat_last = set(flat_ids[day == 0].tolist()), set(flat_ids[day == days - 1].tolist())
    assert len(first & last) / len(first) < 0.8 * len(flat_first & flat_last) / len(flat_first)
    with pytest.raises(ValueError, match="days"):
        SyntheticParams(days=0)
