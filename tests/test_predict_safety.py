"""predict: labels stay null on unlabelled data end to end, and non-finite outputs are never written.

The model comes from a tiny in-process DLRM (``load_run`` is replaced), so no training run is needed; the
data sets are real ingests of a few hundred synthetic rows, labelled and with the label column removed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from data_pipeline.preprocess import ingest
from data_pipeline.synthetic import generate
from models import build_model
from recsys_codistill.cli import main as cli_main
from recsys_codistill.config import RunConfig, load_config
from recsys_codistill.eval.evaluation import evaluate, format_table
from recsys_codistill.train import predict as predict_mod
from recsys_codistill.train.predict import dataset_is_labelled, predict, write_predictions

ROWS = 300


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"labelled", "unlabelled"}: the same rows ingested with and without their label field."""
    root = tmp_path_factory.mktemp("predict_data")
    generate(root / "raw", ROWS, seed=3)
    (src,) = sorted((root / "raw").glob("synthetic-*.tsv.gz"))
    with gzip.open(src, "rt") as f:
        lines = f.read().splitlines()
    # Criteo's test.txt layout: the same 39 feature fields without the leading label.
    (root / "test.tsv").write_text("".join(line.split("\t", 1)[1] + "\n" for line in lines))
    ingest([src], root / "labelled", progress=False)
    ingest([root / "test.tsv"], root / "unlabelled", progress=False)
    return {"labelled": root / "labelled", "unlabelled": root / "unlabelled"}


def _cfg(run_dir: Path) -> RunConfig:
    return load_config(
        None,
        [
            "model.table_sizes=[50]",
            "model.embedding_dim=4",
            "model.dense_arch=[8, 4]",
            "model.over_arch=[8, 1]",
            f"run_dir={json.dumps(str(run_dir))}",
        ],
    )


def _fake_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, poisoned: set[str] = frozenset()) -> None:
    """``load_run(run)`` builds a tiny CPU model seeded by the run's name; runs in ``poisoned`` get one
    NaN weight in the over-arch (what a diverged checkpoint looks like)."""

    def load_run(run: str | Path, group: int = 0, device: str = "cpu") -> tuple[RunConfig, nn.Module, int]:
        cfg = _cfg(tmp_path / Path(run).name)
        torch.manual_seed(sum(map(ord, Path(run).name)))
        model = build_model(**cfg.model.build_kwargs(), device="cpu")
        if Path(run).name in poisoned:
            with torch.no_grad():
                last = [p for n, p in model.named_parameters() if n.startswith("over_arch")][-1]
                last.view(-1)[0] = float("nan")
        return cfg, model.eval(), 7

    monkeypatch.setattr(predict_mod, "load_run", load_run)


# ---------------------------------------------------------------------------------------------------
# Labels: null end to end for unlabelled data


def test_manifest_says_whether_a_data_set_is_labelled(datasets: dict[str, Path], tmp_path: Path) -> None:
    assert dataset_is_labelled(datasets["labelled"])
    assert not dataset_is_labelled(datasets["unlabelled"])
    manifest = json.loads((datasets["unlabelled"] / "manifest.json").read_text())
    assert manifest["positives"] is None  # what ingest writes for unlabelled data
    # A manifest without the "labelled"/"positives" keys is decided from the Parquet footers.
    for name in ("labelled", "unlabelled"):
        d = tmp_path / name
        d.mkdir()
        m = json.loads((datasets[name] / "manifest.json").read_text())
        for f in m["files"]:
            (d / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            (d / f["path"]).write_bytes((datasets[name] / f["path"]).read_bytes())
        (d / "manifest.json").write_text(json.dumps({"files": m["files"]}))
        assert dataset_is_labelled(d) == (name == "labelled")


def test_unlabelled_data_gives_null_labels_and_eval_skips_label_metrics_but_computes_churn(
    datasets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_runs(monkeypatch, tmp_path)
    out = tmp_path / "preds" / "ens.parquet"
    written = predict(["runA", "runB"], datasets["unlabelled"], out)
    assert written == [out, out.with_name("ens.member0.parquet"), out.with_name("ens.member1.parquet")]
    for path in written:
        label = pq.read_table(path).column("label")
        assert label.null_count == ROWS, f"{path}: labels of unlabelled data must be null, not 0"

    res = evaluate(written[1:], names=["A", "B"], bootstrap=20)
    for m in res["models"]:
        assert m["labelled_rows"] == 0
        assert all(
            m[k] is None for k in ("base_rate", "auc", "log_loss", "normalized_entropy", "calibration")
        )
        assert m["label_metrics"].startswith("skipped: no labelled rows")
    (pair,) = res["pairs"]
    assert pair["rows"] == ROWS and pair["mean_abs_diff"]["value"] > 0  # churn needs no labels
    assert pair["flip_rate"]["value"] is not None
    assert "labelled" not in pair
    assert "label metrics skipped" in format_table(res)


def test_labelled_data_keeps_its_labels(
    datasets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_runs(monkeypatch, tmp_path)
    (path,) = predict(["runA"], datasets["labelled"], tmp_path / "p.parquet")
    got = pq.read_table(path)
    data = pq.read_table(datasets["labelled"] / "part-00000.parquet", columns=["row_id", "label"])
    assert got.column("label").null_count == 0
    np.testing.assert_array_equal(got.column("row_id").to_numpy(), data.column("row_id").to_numpy())
    np.testing.assert_array_equal(got.column("label").to_numpy(), data.column("label").to_numpy())
    res = evaluate([path], bootstrap=0)
    assert res["models"][0]["log_loss"] is not None
    assert res["models"][0]["label_metrics"] == f"on all {ROWS} rows"


# ---------------------------------------------------------------------------------------------------
# Non-finite outputs are refused before anything is written


def test_predict_refuses_non_finite_logits_naming_the_run_and_count(
    datasets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_runs(monkeypatch, tmp_path, poisoned={"runBad"})
    out = tmp_path / "preds" / "p.parquet"
    with pytest.raises(
        ValueError, match=rf"run runBad \(group 0, checkpoint step 7\): {ROWS} of {ROWS} rows"
    ):
        predict(["runBad"], datasets["labelled"], out)
    # In an ensemble the healthy member is not written either: nothing half-done is left behind.
    with pytest.raises(ValueError, match=r"run runBad .*non-finite logit"):
        predict(["runA", "runBad"], datasets["labelled"], out)
    assert not (tmp_path / "preds").exists() or not any((tmp_path / "preds").iterdir())


def test_cli_predict_reports_non_finite_predictions(
    datasets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _fake_runs(monkeypatch, tmp_path, poisoned={"runBad"})
    out = tmp_path / "p.parquet"
    code = cli_main(["predict", "--run", "runBad", "--data", str(datasets["labelled"]), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "runBad" in err and f"{ROWS} of {ROWS} rows have a non-finite logit" in err
    assert not out.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_write_predictions_refuses_non_finite_logits(tmp_path: Path, bad: float) -> None:
    out = tmp_path / "p.parquet"
    logit = np.array([0.1, bad, -2.0, bad])
    with pytest.raises(ValueError, match=r"p.parquet: 2 of 4 rows have a non-finite logit"):
        write_predictions(out, np.arange(4), np.zeros(4), logit)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_write_predictions_extreme_finite_logits_give_valid_probabilities(tmp_path: Path) -> None:
    out = write_predictions(
        tmp_path / "p.parquet", np.arange(3), np.array([0.0, np.nan, 1.0]), np.array([-800.0, 0.0, 800.0])
    )
    t = pq.read_table(out)
    np.testing.assert_array_equal(t.column("probability").to_numpy(), [0.0, 0.5, 1.0])
    assert t.column("label").to_pylist() == [0, None, 1]


@pytest.mark.parametrize(
    "args, flag",
    [(["--batch-size", "0"], "--batch-size"), (["--group", "-1"], "--group")],
)
def test_cli_predict_flags_are_checked_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], flag: str
) -> None:
    code = cli_main(["predict", "--run", str(tmp_path), "--data", str(tmp_path), "--out", "x.parquet", *args])
    assert code == 2
    assert flag in capsys.readouterr().err


def test_load_run_names_a_group_the_run_does_not_have(tmp_path: Path) -> None:
    from recsys_codistill.config import save_resolved
    from recsys_codistill.train.predict import load_run

    save_resolved(_cfg(tmp_path / "run"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"trained 1 group\(s\), numbered 0..0; it has no group 3"):
        load_run(tmp_path / "run", group=3)
