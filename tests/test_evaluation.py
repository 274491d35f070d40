"""recsys_codistill.eval.evaluation on small prediction files written with pyarrow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_codistill.eval import metrics
from recsys_codistill.eval.churn import churn_by_feature_frequency, flip_rate, mean_abs_diff
from recsys_codistill.eval.evaluation import evaluate, format_table, load_predictions, write_json

N = 3000


def _write_preds(path: Path, row_id: np.ndarray, label: np.ndarray | None, prob: np.ndarray) -> Path:
    label_arr = (
        pa.array([None] * row_id.size, type=pa.int8())
        if label is None
        else pa.array(np.nan_to_num(label, nan=0).astype(np.int8), mask=np.isnan(label))
    )
    logit = np.log(prob / (1 - prob)).astype(np.float32)
    table = pa.table(
        {"row_id": pa.array(row_id, pa.int64()), "label": label_arr, "logit": logit, "probability": prob}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture()
def setup(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    ids = np.arange(N, dtype=np.int64) * 2 + 100
    p1 = rng.beta(2, 6, N)
    p2 = np.clip(p1 + rng.normal(0, 0.03, N), 1e-4, 1 - 1e-4)
    y = (rng.random(N) < p1).astype(np.float64)
    y[:50] = np.nan  # some unlabelled rows
    perm = rng.permutation(N)
    a = _write_preds(tmp_path / "runA" / "predictions.parquet", ids, y, p1)
    b = _write_preds(tmp_path / "runB" / "predictions.parquet", ids[perm], y[perm], p2[perm])
    # Ingested data dir: two shards, C1 with nulls, covering more rows than the predictions.
    data = tmp_path / "data"
    data.mkdir()
    all_ids = np.arange(0, 2 * N + 200, dtype=np.int64)
    c1 = rng.zipf(1.5, all_ids.size).astype(np.uint32)
    c1_null = rng.random(all_ids.size) < 0.05
    files = []
    for k, sl in enumerate((slice(0, 2000), slice(2000, None))):
        t = pa.table(
            {
                "row_id": all_ids[sl],
                "label": pa.array(np.zeros(all_ids[sl].size, np.int8)),
                "C1": pa.array(c1[sl], type=pa.uint32(), mask=c1_null[sl]),
                "C2": pa.array(c1[sl], type=pa.uint32()),
            }
        )
        pq.write_table(t, data / f"part-{k}.parquet")
        files.append({"path": f"part-{k}.parquet", "rows": t.num_rows})
    (data / "manifest.json").write_text(json.dumps({"files": files}))
    c1_filled = np.where(c1_null, -1, c1.astype(np.int64))
    return {
        "a": a,
        "b": b,
        "ids": ids,
        "p1": p1,
        "p2": p2,
        "y": y,
        "data": data,
        "c1": c1_filled,
        "all_ids": all_ids,
    }


def test_evaluate_two_files(setup: dict) -> None:
    res = evaluate([setup["a"], setup["b"]], bootstrap=60, seed=1)
    json.dumps(res, allow_nan=False)
    y, p1, p2 = setup["y"], setup["p1"], setup["p2"]
    m = np.isfinite(y)
    names = [mo["name"] for mo in res["models"]]
    assert names == ["runA/predictions", "runB/predictions"]
    ma = res["models"][0]
    assert ma["rows"] == N and ma["labelled_rows"] == int(m.sum())
    assert ma["auc"] == pytest.approx(metrics.roc_auc(y[m], p1[m]), abs=1e-12)
    assert ma["log_loss"] == pytest.approx(metrics.log_loss(y[m], p1[m]), rel=1e-12)
    assert ma["normalized_entropy"] == pytest.approx(metrics.normalized_entropy(y[m], p1[m]), rel=1e-12)
    assert ma["calibration"] == pytest.approx(metrics.calibration(y[m], p1[m]), rel=1e-12)
    assert res["models"][1]["auc"] == pytest.approx(metrics.roc_auc(y[m], p2[m]), abs=1e-12)
    # Default threshold: base rate of the first file's labels.
    assert res["threshold"] == pytest.approx(metrics.base_rate(y[m]))
    (pair,) = res["pairs"]
    assert (pair["a"], pair["b"]) == ("runA/predictions", "runB/predictions")
    assert pair["rows"] == N
    assert pair["mean_abs_diff"]["value"] == pytest.approx(mean_abs_diff(p1, p2), rel=1e-12)
    assert pair["flip_rate"]["value"] == pytest.approx(flip_rate(p1, p2, res["threshold"])["flip_rate"])
    assert pair["labelled"]["rows"] == int(m.sum())
    assert "by_feature_frequency" not in pair
    assert res["feature"] is None

    text = format_table(res)
    assert "runA/predictions vs runB/predictions" in text
    assert "AUC" in text and "mean |dp|" in text and "[" in text

    out = write_json(res, setup["a"].parent.parent / "out" / "eval.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))


def test_evaluate_with_data_dir_feature_buckets(setup: dict) -> None:
    res = evaluate(
        [setup["a"], setup["b"]], names=["A", "B"], threshold=0.3, bootstrap=20, data_dir=setup["data"]
    )
    assert res["threshold"] == 0.3 and res["threshold_source"] == "given"
    assert res["feature"] == "C1"
    (pair,) = res["pairs"]
    ids = setup["ids"]
    feat = setup["c1"][ids]  # all_ids == arange, so row_id indexes the data
    ref = churn_by_feature_frequency(setup["p1"], setup["p2"], feat, reference_values=setup["c1"])
    got = pair["by_feature_frequency"]
    assert [b["bucket"] for b in got] == [b["bucket"] for b in ref]
    assert [b["rows"] for b in got] == [b["rows"] for b in ref]
    for g, r in zip(got, ref, strict=True):
        assert g["mean_abs_diff"]["value"] == pytest.approx(r["mean_abs_diff"], rel=1e-12)
    assert "churn by frequency of C1" in format_table(res)


def test_three_files_give_three_pairs(setup: dict, tmp_path: Path) -> None:
    c = _write_preds(tmp_path / "c.parquet", setup["ids"], None, np.full(N, 0.2))
    res = evaluate([setup["a"], setup["b"], c], names=["a", "b", "c"], bootstrap=0)
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    mc = res["models"][2]
    assert mc["labelled_rows"] == 0 and mc["auc"] is None
    assert any("c: no labelled rows" in w for w in res["warnings"])
    assert res["pairs"][0]["mean_abs_diff"]["ci_low"] is None
    format_table(res)


def test_unlabelled_first_file_defaults_threshold(setup: dict, tmp_path: Path) -> None:
    c = _write_preds(tmp_path / "c.parquet", setup["ids"], None, setup["p1"])
    res = evaluate([c, setup["a"]], bootstrap=0)
    assert res["threshold"] == 0.5
    assert "labelled" not in res["pairs"][0]


def test_missing_file_and_columns(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        evaluate([setup["a"], tmp_path / "nope.parquet"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"row_id": pa.array([1, 2], pa.int64()), "label": pa.array([0, 1], pa.int8())}), bad
    )
    with pytest.raises(ValueError, match=r"bad.parquet lacks column\(s\) 'probability'"):
        load_predictions(bad)
    with pytest.raises(ValueError, match=r"lacks column\(s\) 'C9'"):
        evaluate([setup["a"], setup["b"]], bootstrap=0, data_dir=setup["data"], feature="C9")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        evaluate([setup["a"], setup["b"]], bootstrap=0, data_dir=tmp_path)
    notpq = tmp_path / "x.parquet"
    notpq.write_text("hello")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_predictions(notpq)


def test_mismatched_row_ids_name_both_files(setup: dict, tmp_path: Path) -> None:
    ids = setup["ids"].copy()
    ids[7] = 10**9
    c = _write_preds(tmp_path / "c.parquet", ids, setup["y"], setup["p2"])
    with pytest.raises(
        ValueError,
        match=r"cannot compare .*predictions.parquet \(A\) with .*c.parquet \(B\).*row_id 1000000000",
    ):
        evaluate([setup["a"], c], bootstrap=0)


def test_invalid_values_are_rejected(tmp_path: Path) -> None:
    p = _write_preds(
        tmp_path / "p.parquet", np.arange(3), np.array([0.0, 1.0, 0.0]), np.array([0.1, 0.2, 0.3])
    )
    t = pq.read_table(p)
    t = t.set_column(3, "probability", pa.array([0.1, 1.5, 0.3]))
    pq.write_table(t, p)
    with pytest.raises(ValueError, match="outside"):
        load_predictions(p)
    t = t.set_column(3, "probability", pa.array([0.1, 0.5, 0.3])).set_column(
        1, "label", pa.array([0, 2, 1], pa.int8())
    )
    pq.write_table(t, p)
    with pytest.raises(ValueError, match="'label' must be 0/1"):
        load_predictions(p)


# ---------------------------------------------------------------------------------------------------
# Unlabelled predictions and the flip threshold


def test_unlabelled_files_get_no_label_metrics_but_still_churn(setup: dict, tmp_path: Path) -> None:
    # What predict writes for an unlabelled data set: label null on every row.
    a = _write_preds(tmp_path / "ua.parquet", setup["ids"], None, setup["p1"])
    b = _write_preds(tmp_path / "ub.parquet", setup["ids"], None, setup["p2"])
    assert np.isnan(load_predictions(a).label).all()
    res = evaluate([a, b], names=["A", "B"], bootstrap=30)
    for m in res["models"]:
        assert m["labelled_rows"] == 0
        assert all(
            m[k] is None for k in ("base_rate", "auc", "log_loss", "normalized_entropy", "calibration")
        )
        assert m["label_metrics"].startswith("skipped: no labelled rows")
    (pair,) = res["pairs"]
    assert "labelled" not in pair  # no log-loss difference on made-up labels
    assert pair["mean_abs_diff"]["value"] == pytest.approx(mean_abs_diff(setup["p1"], setup["p2"]))
    assert pair["flip_rate"]["value"] == pytest.approx(flip_rate(setup["p1"], setup["p2"], 0.5)["flip_rate"])
    assert pair["flip_rate"]["ci_low"] is not None
    text = format_table(res)
    assert "A: label metrics skipped" in text and "B: label metrics skipped" in text
    out = write_json(res, tmp_path / "r.json")
    assert json.loads(out.read_text())["models"][0]["label_metrics"].startswith("skipped")


def test_label_metrics_note_says_which_rows_were_scored(setup: dict) -> None:
    res = evaluate([setup["a"], setup["b"]], bootstrap=0)
    assert res["models"][0]["label_metrics"] == f"on the {N - 50} labelled of {N} rows"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -0.2, 1.5])
def test_threshold_must_be_finite_and_inside_0_1(setup: dict, bad: float) -> None:
    with pytest.raises(ValueError, match=r"threshold = .*expected a finite number in \(0, 1\)"):
        evaluate([setup["a"], setup["b"]], threshold=bad, bootstrap=0)


def test_one_class_labels_do_not_give_a_degenerate_default_threshold(setup: dict, tmp_path: Path) -> None:
    a = _write_preds(tmp_path / "a.parquet", setup["ids"], np.zeros(N), setup["p1"])
    res = evaluate([a, setup["b"]], bootstrap=0)
    assert res["threshold"] == 0.5 and "all 0" in res["threshold_source"]
    assert any("all 0: flip threshold defaults to 0.5" in w for w in res["warnings"])


@pytest.mark.parametrize(
    "kwargs, match", [({"bootstrap": -1}, "bootstrap = -1"), ({"seed": -3}, "seed = -3")]
)
def test_bootstrap_and_seed_ranges(setup: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate([setup["a"], setup["b"]], **kwargs)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--threshold", "nan"], "--threshold"),
        (["--threshold", "inf"], "--threshold"),
        (["--threshold", "1"], "--threshold"),
        (["--threshold", "0"], "--threshold"),
        (["--bootstrap", "-1"], "--bootstrap"),
        (["--seed", "-1"], "--seed"),
        (["--name", "only-one"], "--name"),
    ],
)
def test_cli_eval_names_the_bad_flag(
    setup: dict, capsys: pytest.CaptureFixture, args: list, flag: str
) -> None:
    from recsys_codistill.cli import main as cli_main

    code = cli_main(["eval", "--pred", str(setup["a"]), "--pred", str(setup["b"]), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert f"eval: error: {flag}" in err, err
