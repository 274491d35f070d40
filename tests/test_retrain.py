"""Daily retrains end to end on a tiny drifting synthetic world: chains, evaluation days, resumability."""

from __future__ import annotations

import json

import pytest

from recsys_codistill.config import ConfigError, load_config
from recsys_codistill.study.retrain import check_days, load_retrain, run_retrain
from tests.train_utils import TINY_RUN_TOML

TINY = (
    """
[retrain]
out_dir = "{out}"
synthetic_rows = 7500
days = 5
window = 2
chains = 2
drift = 0.5
id_turnover = 0.05
methods = ["cold", "warm", "warm_incremental", "anchor", "ensemble"]
anchor_weights = [2.0]
"""
    + TINY_RUN_TOML
)


@pytest.mark.dist
def test_tiny_retrain_simulation_writes_its_report_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "retrain.toml"
    cfg.write_text(TINY.format(out=tmp_path / "out"))
    report = run_retrain(cfg)
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    # 3 versions (1, 2, 3: windows of 2 days, each evaluated on the next); cold 6, warm, warm_incremental
    # and anchor 4 each (their first versions are the cold models), the ensemble's second members 6
    assert "[retrain] 5 methods x 2 chains x 3 versions: 24 trainings (0 already finished)" in printed
    assert printed.count("[retrain] finish") == 24
    text = report.read_text()
    for needle in ("churn vs previous", "anchor[2]", "ensemble", "Per version", "retrain_tradeoff.png"):
        assert needle in text, needle
    assert (out / "retrain_tradeoff.png").stat().st_size > 1000
    result = json.loads((out / "retrain.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"cold", "warm", "warm_incremental", "anchor[2]", "ensemble"}
    for r in rows.values():
        pv = r["per_version"]
        assert [x["version"] for x in pv] == [1, 2, 3] and [x["eval_day"] for x in pv] == [2, 3, 4]
        assert pv[0]["churn_vs_previous"] is None and all(0 < x["churn_vs_previous"] < 0.5 for x in pv[1:])
        assert all(0 < x["churn_vs_independent"] < 0.5 for x in pv)
    # the first version has no predecessor: warm and anchor serve the cold model there
    assert rows["warm"]["per_version"][0] == {**rows["cold"]["per_version"][0]}
    # compute: an anchored version ran one teacher forward per step; an ensemble trained twice the examples
    cold_ex = rows["cold"]["per_version"][1]["examples"]
    assert rows["anchor[2]"]["per_version"][1]["teacher_forwards"] == cold_ex // 256
    assert rows["ensemble"]["per_version"][1]["examples"] == 2 * cold_ex
    # summaries cover the versions with a predecessor (2 and 3), for every method
    assert rows["anchor[2]"]["summary"]["log_loss"]["n"] == 2 == rows["cold"]["summary"]["log_loss"]["n"]
    # the incremental warm start trains on the new day only: about half the examples of a 2-day window
    inc = rows["warm_incremental"]["per_version"][1]["examples"]
    assert 0.35 * cold_ex < inc < 0.65 * cold_ex
    # staleness: cold version d on day d+1+k against the fresh version of day d+k, per chain (versions 1..3,
    # days 0..4: lag 1 from versions 1 and 2, lag 2 from version 1); the fresh side is the per-version row
    stale = result["staleness"]
    assert {k: len(v["pairs"]) for k, v in stale.items()} == {"1": 4, "2": 2}
    cold_ll = {x["version"]: x["log_loss"] for x in rows["cold"]["per_version"]}
    for k, v in stale.items():
        for e in {r["eval_day"] for r in v["pairs"]}:
            fresh = [r["log_loss_fresh"] for r in v["pairs"] if r["eval_day"] == e]
            assert sum(fresh) / len(fresh) == pytest.approx(cold_ll[e - 1], abs=1e-12)
        inc = [r["log_loss_stale"] - r["log_loss_fresh"] for r in v["pairs"]]
        assert v["log_loss_increase"]["value"] == pytest.approx(sum(inc) / len(inc))
        assert all(r["eval_day"] - 1 - r["version"] == int(k) and r["churn"] > 0 for r in v["pairs"])
    assert "## Staleness (cold retrain)" in text
    # a chain's version reads its own predecessor
    runs = {p.name: load_config(p / "config.toml") for p in (out / "runs").iterdir()}
    warm2 = [c for n, c in runs.items() if n.startswith("v02-warm-")]
    assert len(warm2) == 2 and all(c.train.init_from.startswith(str(out / "runs" / "v01-")) for c in warm2)
    anchor3 = [c for n, c in runs.items() if n.startswith("v03-anchor")]
    assert all(c.anchor.weight == 2.0 and "v02-anchor" in c.anchor.run for c in anchor3)
    assert all(
        c.data.train_dirs[-1].endswith("day03") and c.data.valid_dir.endswith("day04") for c in anchor3
    )
    inc3 = [c for n, c in runs.items() if n.startswith("v03-warm_incremental")]
    assert len(inc3) == 2
    assert all(len(c.data.train_dirs) == 1 and "v02-warm_incremental" in c.train.init_from for c in inc3)
    # resumable: a second invocation trains nothing
    run_retrain(cfg)
    assert "[retrain] start" not in capsys.readouterr().out


def test_evaluation_rows_must_come_after_every_training_row(tmp_path):
    from tests.conftest import write_tiny_parquet

    write_tiny_parquet(tmp_path / "day00", rows_per_file=(20,))
    write_tiny_parquet(tmp_path / "day01", rows_per_file=(10,))  # row ids 0..9 again: not later
    with pytest.raises(RuntimeError, match="day 1 has rows at or before the training days"):
        check_days(tmp_path, [0], 1)


def test_retrain_config_errors(tmp_path):
    p = tmp_path / "r.toml"
    for text, message in (
        ('[retrain]\nmethods = ["warm"]\n', "with 'cold'"),
        ("[retrain]\nanchor_weights = [0.0]\n", "positive"),
        ("[retrain]\ndays = 5\nwindow = 4\n", "window <= days - 2"),
        ("[retrain]\nchains = 1\n", "retrain.chains"),
        ("[retrain]\nseed = 50000\n", "retrain.seed"),
        ("[retrain]\nanchor_weights = [1.0, 1.0000001]\n", "name the same rows"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_retrain(p)
