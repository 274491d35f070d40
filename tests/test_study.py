"""The study end to end on tiny configs: every artefact, resumability, the sweep, and config errors."""

from __future__ import annotations

import json

import pytest

from recsys_codistill.config import ConfigError
from recsys_codistill.study.study import cells, check_holdout, load_spec, run_study
from tests.train_utils import TINY_RUN_TOML

TINY = (
    """
[study]
out_dir = "{out}"
runs = {runs}
methods = {methods}
synthetic_rows = 6000
valid_fraction = 0.25
{extra}
"""
    + TINY_RUN_TOML
    + """eval_every = 8

[codistill]
burn_in_steps = 4
exchange_every = 4
data = "shared"
"""
)
ALL = '["baseline", "calibrated", "ensemble", "codistill"]'


def _write(tmp_path, runs=5, methods=ALL, extra=""):
    cfg = tmp_path / "study.toml"
    cfg.write_text(TINY.format(out=tmp_path / "out", runs=runs, methods=methods, extra=extra))
    return cfg


@pytest.mark.dist
def test_tiny_study_writes_every_artefact_and_resumes(tmp_path, capsys):
    cfg = _write(tmp_path)
    report = run_study(cfg)
    out = tmp_path / "out"
    assert report == out / "report.md"
    printed = capsys.readouterr().out
    # the plan first (trainings and time), then one line per run started / finished with what is left
    assert "[study] 1 point(s), 5 runs per method: 10 trainings" in printed.splitlines()[0]
    assert printed.count("[study] start") == 10 and printed.count("[study] finish") == 10
    assert "0 left" in printed
    text = report.read_text()
    for needle in (
        "single model",
        "single model + calibration (platt)",
        "ensemble of two",
        "codistillation, copy 0",
        "codistillation, copy 1",
        "both copies averaged",
        "Within-run churn",
        "teacher versions loaded",
        "Churn decomposition",
        "Outlier retrains",
        "Bayes-optimal",
        "significant at 95%",
        "torchrec",
    ):
        assert needle in text, needle
    for png in ("churn.png", "churn_vs_log_loss.png", "forest.png", "learning_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    result = json.loads((out / "study.json").read_text())
    h = result["holdout"]
    assert h["overlap"] == 0 and h["valid_rows"] == 1500
    assert h["calibration_rows"] == 750 and h["evaluation_rows"] == 750
    rows = result["results"]["base"]["rows"]
    for m in ("baseline", "calibrated", "ensemble", "codistill", "codistill_g1", "codistill_mean"):
        c = rows[m]["churn"]
        assert 0 < c["value"] < 0.5 and c["ci_low"] <= c["value"] <= c["ci_high"], m
        assert len(c["replicates"]) == 5  # jackknife over the 5 runs
    # the ensemble really averages models; calibration moves predictions
    assert rows["ensemble"]["churn"]["value"] < rows["baseline"]["churn"]["value"]
    assert rows["calibrated"]["churn"]["value"] != rows["baseline"]["churn"]["value"]
    assert rows["calibrated"]["churn"]["value"] == rows["baseline"]["after_calibration"]["platt"]["value"]
    # the decomposition's reordering share is the rank-matched churn over the raw churn
    for m in ("baseline", "ensemble", "codistill"):
        d, r = rows[m]["decomposition"], rows[m]["rank_matched"]["value"]
        assert d["reordering"] == pytest.approx(r / rows[m]["churn"]["value"], rel=1e-12)
    assert "| rank-matched |" in text
    info = result["codistill"]["base"]
    assert info["steps"] == 17 and info["burn_in_steps"] == 4 and not info["never_loaded_a_teacher"]
    assert all(v >= 3 for v in info["teacher_versions_loaded"])
    # (per served model, in all)
    assert result["trainings"]["base"] == {
        "baseline": [1, 5],
        "calibrated": [1, 5],
        "ensemble": [2, 5],
        "codistill": [2, 10],
    }
    assert len(result["results"]["base"]["per_run"]["baseline"]) == 5
    # resumable: a second invocation trains nothing and measures the same
    run_study(cfg)
    printed = capsys.readouterr().out
    assert "(10 already finished" in printed and "[study] start" not in printed
    again = json.loads((out / "study.json").read_text())
    assert again["results"] == result["results"]


@pytest.mark.dist
def test_sweep_reuses_finished_runs_and_tabulates_every_point(tmp_path, capsys):
    import pyarrow.csv as pacsv

    sweep = """
[study.sweep.learning_rate]
set = ["optim.dense_lr={}", "optim.sparse_lr={}"]
values = [0.02, 0.1]
"""
    cfg = _write(tmp_path, runs=3, methods='["baseline", "calibrated"]', extra=sweep)
    run_study(cfg)
    first = capsys.readouterr().out
    # base + 2 points, 3 runs each: 9 single models
    assert "3 point(s), 3 runs per method: 9 trainings" in first and first.count("[study] finish") == 9
    out = tmp_path / "out"
    regime = (out / "regime.md").read_text()
    assert "## learning_rate" in regime and (out / "regime_learning_rate.png").stat().st_size > 1000
    table = pacsv.read_csv(out / "regime.csv").to_pylist()
    points = [(r["axis"], str(r["value"]), r["row"]) for r in table]
    assert points == [
        ("base", "base", "baseline"),
        ("base", "base", "calibrated"),
        ("learning_rate", "0.02", "baseline"),
        ("learning_rate", "0.02", "calibrated"),
        ("learning_rate", "0.1", "baseline"),
        ("learning_rate", "0.1", "calibrated"),
    ]
    for r in table:
        assert r["churn_ci_low"] <= r["churn"] <= r["churn_ci_high"]
        if r["axis"] != "base":
            assert r["churn_rel_vs_base_baseline_ci_low"] <= r["churn_rel_vs_base_baseline"]
    # a second invocation trains nothing
    run_study(cfg)
    assert "[study] start" not in capsys.readouterr().out


def test_overlapping_holdout_is_refused(tmp_path):
    from tests.conftest import write_tiny_parquet

    write_tiny_parquet(tmp_path / "train", rows_per_file=(20,))
    write_tiny_parquet(tmp_path / "valid", rows_per_file=(10,))  # row ids 0..9 again
    with pytest.raises(RuntimeError, match="shares 10 row ids"):
        check_holdout(tmp_path)


def test_study_whose_burn_in_covers_its_steps_is_refused_before_training(tmp_path, capsys):
    cfg = _write(tmp_path, runs=3, methods='["baseline", "codistill"]')
    with pytest.raises(ConfigError, match=r"burn_in_steps = 40 >= the run's 17 training steps"):
        run_study(cfg, ["codistill.burn_in_steps=40"])
    assert "[study] start" not in capsys.readouterr().out
    assert not (tmp_path / "out" / "runs").exists()


def test_study_config_errors(tmp_path):
    p = tmp_path / "s.toml"
    for text, message in (
        ('[study]\nmethods = ["baseline", "bagging"]\n', "bagging"),
        ('[study]\nmethods = ["codistill"]\n', "must include 'baseline'"),
        ("[study]\nruns = 4\n", r"ensemble row \(point 'base'\) needs at least 5 runs"),
        (
            '[study]\nruns = 3\nmethods = ["baseline"]\n[study.sweep.e]\nmethods = ["baseline", "ensemble"]\n'
            'set = "optim.dense_lr={}"\nvalues = [0.1]\n',
            r"point 'e=0.1'\) needs at least 5 runs",
        ),
        (
            '[study.variants]\nlr = ["optim.dense_lr=0.1"]\n',
            "variants change codistillation and teacher settings only",
        ),
        ("[study]\nruns = 2\n", "study.runs"),
        ("[study]\nrepeats = 3\n", "study.repeats was removed in study v2; use study.runs"),
        ("[study]\nrepeat = 3\n", "unknown key 'study.repeat'"),
        ('[study.variants]\nbad = ["codistill.exchange_every=0"]\n', "point 'bad'"),
        ('[study.sweep.lr]\nset = "optim.dense_lr=1"\nvalues = [1]\n', "templates"),
        ('[study.sweep.lr]\nset = "optim.dense_lr={}"\nvalues = [-1]\n', "point 'lr=-1'"),
        ("[study.sweep.lr]\nvalues = [1, 2]\nfoo = 1\n", "expected keys"),
        ('[study.sweep.g]\ngrid = {"optim.dense_lr=1" = [1]}\n', "grid must map"),
        ('[study.sweep.k]\npoints = {a = ["codistill.exchange_every=3"], b = "x"}\n', "points must map"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_spec(p)


def test_sweep_points_from_templates_and_named_points(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(
        """
[study.variants]
"K=8" = ["codistill.exchange_every=8"]
[study.sweep.schedule]
set = ["optim.decay={}"]
values = ["linear", "cosine"]
[study.sweep.floor]
points = {"linear to 0.1" = ["optim.decay=linear", "optim.lr_floor=0.1"]}
[study.sweep.w_by_decay]
grid = {"codistill.distill_weight={}" = [1, 4], "optim.decay={}" = ["none", "linear"]}
"""
    )
    got = [(c.name, c.overrides, c.axis, c.rows) for c in cells(load_spec(p))]
    assert got[0][0] == "base" and got[1] == ("K=8", ("codistill.exchange_every=8",), None, ("codistill",))
    assert [g[:3] for g in got[2:]] == [
        ("schedule=linear", ('optim.decay="linear"',), "schedule"),
        ("schedule=cosine", ('optim.decay="cosine"',), "schedule"),
        ("floor=linear to 0.1", ("optim.decay=linear", "optim.lr_floor=0.1"), "floor"),
        (
            "w_by_decay=distill_weight=1, decay=none",
            ("codistill.distill_weight=1", 'optim.decay="none"'),
            "w_by_decay",
        ),
        (
            "w_by_decay=distill_weight=1, decay=linear",
            ("codistill.distill_weight=1", 'optim.decay="linear"'),
            "w_by_decay",
        ),
        (
            "w_by_decay=distill_weight=4, decay=none",
            ("codistill.distill_weight=4", 'optim.decay="none"'),
            "w_by_decay",
        ),
        (
            "w_by_decay=distill_weight=4, decay=linear",
            ("codistill.distill_weight=4", 'optim.decay="linear"'),
            "w_by_decay",
        ),
    ]


def test_runs_are_content_addressed(tmp_path):
    from recsys_codistill.config import RunConfig
    from recsys_codistill.study.study import Cell, StudyConfig, run_spec

    study, base = StudyConfig(), RunConfig()

    def run_dir(kind, *sets, index=0):
        return run_spec(study, base, tmp_path, Cell("x", tuple(sets)), kind, index).cfg.run_dir

    # a typed config names the run: w = 1 (an integer in a sweep) is the base's w = 1.0
    assert run_dir("codistill", "codistill.distill_weight=1") == run_dir("codistill")
    assert run_dir("codistill", "codistill.distill_weight=2") != run_dir("codistill")
    # a single model ignores codistillation settings: codistillation-only points share it
    assert run_dir("baseline", "codistill.exchange_every=7") == run_dir("baseline")
    # what only reports differently is the same model; the seed index and the model are not
    assert run_dir("baseline", "train.log_every=3") == run_dir("baseline")
    assert run_dir("baseline", index=1) != run_dir("baseline")
    assert run_dir("baseline", "optim.dense_lr=0.5") != run_dir("baseline")


def test_a_study_directory_refuses_other_data(tmp_path):
    from dataclasses import replace

    from recsys_codistill.study.study import StudyConfig, check_data_record

    study = StudyConfig(synthetic_rows=1000)
    check_data_record(study, tmp_path)
    check_data_record(study, tmp_path)  # the same keys again: fine
    with pytest.raises(ConfigError, match=r"other data \(synthetic_rows: 1000 -> 2000\)"):
        check_data_record(replace(study, synthetic_rows=2000), tmp_path)
