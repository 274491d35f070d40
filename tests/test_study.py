"""The study end to end on a tiny config: every artefact, resumability, and the hold-out check."""

from __future__ import annotations

import json

import pytest

from recsys_codistill.config import ConfigError
from recsys_codistill.study.study import check_holdout, load_study, run_study

TINY = """
[study]
out_dir = "{out}"
repeats = 1
synthetic_rows = 6000
valid_fraction = 0.25
bootstrap = 50

[study.variants]
"K=8" = ["codistill.exchange_every=8"]

[data]
batch_size = 256

[model]
table_sizes = [1000]
embedding_dim = 8
dense_arch = [16, 8]
over_arch = [16, 1]

[train]
log_every = 4
eval_every = 8

[codistill]
burn_in_steps = 4
exchange_every = 4
data = "shared"
"""


@pytest.mark.dist
def test_tiny_study_writes_every_artefact_and_resumes(tmp_path):
    cfg = tmp_path / "study.toml"
    cfg.write_text(TINY.format(out=tmp_path / "out"))
    report = run_study(cfg)
    out = tmp_path / "out"
    assert report == out / "report.md"
    text = report.read_text()
    for needle in (
        "single model",
        "ensemble of two",
        "two-way codistillation",
        "Bayes-optimal",
        "95%",
        "torchrec",
    ):
        assert needle in text
    for png in ("churn.png", "learning_curves.png", "churn_vs_staleness.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "codistillation (K=8)" in text
    result = json.loads((out / "study.json").read_text())
    assert result["holdout"]["overlap"] == 0 and result["holdout"]["valid_rows"] == 1500
    assert result["codistill_settings"]["codistill[K=8]"]["exchange_every"] == 8
    for m in ("baseline", "ensemble", "codistill", "codistill[K=8]"):
        churn = result["per_repeat"][m][0]["churn"]["mean_abs_diff"]
        assert 0 < churn["value"] < 0.5 and churn["ci_low"] <= churn["value"] <= churn["ci_high"]
    # the ensemble row really averages two models: its churn differs from the single model's
    assert result["table"]["ensemble"]["churn"]["mean"] != result["table"]["baseline"]["churn"]["mean"]
    # resumable: a second run reuses every finished run (no training timings recorded)
    run_study(cfg)
    again = json.loads((out / "study.json").read_text())
    assert set(again["timings_s"]) == {"total"}
    assert again["table"] == result["table"]


def test_overlapping_holdout_is_refused(tmp_path):
    from tests.conftest import write_tiny_parquet

    write_tiny_parquet(tmp_path / "train", rows_per_file=(20,))
    write_tiny_parquet(tmp_path / "valid", rows_per_file=(10,))  # row ids 0..9 again
    with pytest.raises(RuntimeError, match="shares 10 row ids"):
        check_holdout(tmp_path)


def test_study_config_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[study]\nmethods = ["baseline", "bagging"]\n')
    with pytest.raises(ConfigError, match="bagging"):
        load_study(p)
    p.write_text('[study.variants]\nbad = ["codistill.exchange_every=0"]\n')
    with pytest.raises(ConfigError, match="variant 'bad'"):
        load_study(p)
    p.write_text("[study]\nrepeat = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'study.repeat'"):
        load_study(p)
