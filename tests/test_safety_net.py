"""The safety net of issue 14: tests that kill mutants the rest of the suite let through, and the contracts
it did not cover (several-run predict, checkpoint edge cases, study aggregates over repeats, the CLI end to
end, a fast kill -9 recovery).

Mutants these tests kill (each was applied to a scratch copy and seen to fail a test here):
- the student backpropagating only the BCE part of its loss (the distillation term never reaches it);
- a fresh start keeping an earlier attempt's exchange versions (and serving them as teachers).
Skipping the exchange's checksum verification is killed by tests/test_trust.py (a same-size corruption).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import tomllib
import torch
from torch import nn

from recsys_codistill import atomic
from recsys_codistill.cli import main as cli_main
from recsys_codistill.config import CheckpointConfig, CodistillConfig, TeacherConfig
from recsys_codistill.run_dir import RunDir
from recsys_codistill.train.checkpoint import (
    Checkpointer,
    ModelState,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
)
from tests.train_utils import TINY_RUN_TOML, make_dataset, metrics, predictions, run, tiny_config, weights

# Two groups on shared data, lockstep: group 0 sees exactly the baseline's batches in the baseline's order
# (same seed), so it matches the baseline bit for bit until the teacher's term starts at burn-in.
BURN_IN = 4
CODISTILL = [
    "codistill.num_groups=2",
    f"codistill.burn_in_steps={BURN_IN}",
    "codistill.exchange_every=4",
    "codistill.exchange_mode=lockstep",
    "codistill.data=shared",
    "codistill.distill_weight=1.0",
    "train.max_steps=16",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safety"))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    run(tiny_config(data, run_dir, "train.max_steps=16"))
    return run_dir


@pytest.fixture(scope="module")
def codistilled(data, tmp_path_factory) -> Path:
    """A finished 2-group run that kept its exchange (an "earlier attempt" for the stale-exchange test)."""
    run_dir = tmp_path_factory.mktemp("codistilled") / "run"
    run(tiny_config(data, run_dir, *CODISTILL, "codistill.keep_exchange=true"))
    return run_dir


def _by_step(run_dir: Path, group: int = 0) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run_dir, group) if "loss" in m}


# -- the distillation term reaches the student ---------------------------------------------------------------
@pytest.mark.dist
def test_the_distillation_term_reaches_the_student(baseline, codistilled):
    # Kills `parts.bce.backward()` in place of `parts.total.backward()`: the distillation term would then be
    # computed and logged (so a test of the logs alone passes) but never change a weight.
    base, co = _by_step(baseline), _by_step(codistilled)
    # Up to burn-in nothing differs: same batches, same init, plain BCE in both.
    assert co[BURN_IN]["loss"] == base[BURN_IN]["loss"] and co[BURN_IN]["distill"] == 0.0
    # Past burn-in the teacher's term is in the loss ...
    assert all(co[s]["distill"] > 0.0 and co[s]["teacher_step"] is not None for s in (8, 12, 16))
    # ... and in the gradient: the student's own BCE on the same batches moves away from the baseline's.
    assert co[8]["bce"] != base[8]["bce"]
    wb, wc = weights(baseline), weights(codistilled, group=0)
    assert any(not torch.equal(wb[k], wc[k]) for k in wb), "group 0 trained exactly like the baseline"


class _FixedTeacher:
    """A TeacherSource whose logits are given: the step's gradient can then be written down by hand."""

    def __init__(self, logits: torch.Tensor, weight: float) -> None:
        self.z = logits
        self.name, self.weight, self.loss = "distill", weight, "ce"  # the TeacherSource term

    def wants(self, step: int) -> bool:
        return True

    def logits(self, batch, step: int) -> list[torch.Tensor]:
        return [self.z]


class _FreeLogits(nn.Module):
    """A "model" whose parameters are its logits, one per example: their gradient is dL/dz itself."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z.clone())

    def forward(self, dense, sparse) -> torch.Tensor:
        return self.z


def test_one_train_step_with_a_fixed_teacher_has_the_hand_computed_gradient():
    # The unit-level kill of the BCE-only backward: the step's gradient must carry the teacher's term.
    from recsys_codistill.train.trainer import Trainer

    z = torch.tensor([0.3, -1.2, 2.0, 0.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    t = torch.tensor([1.0, 0.5, -0.7, 3.0])
    w, lr = 0.5, 0.1
    trainer = Trainer.__new__(Trainer)  # train_step needs only the model, optimizer, teachers and config
    trainer.cfg = SimpleNamespace(
        codistill=CodistillConfig(num_groups=2, distill_weight=w, loss="ce"), teacher=TeacherConfig()
    )
    trainer.model = _FreeLogits(z)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=lr)
    trainer.teachers = [_FixedTeacher(t, w)]
    trainer.state = TrainState(step=10)
    parts = trainer.train_step(SimpleNamespace(dense_features=None, sparse_features=None, labels=y))
    s, b = torch.sigmoid(z), len(z)
    expected = (s - y + w * (s - torch.sigmoid(t))) / b
    torch.testing.assert_close(trainer.model.z.grad, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(trainer.model.z.detach(), z - lr * expected, rtol=0, atol=1e-7)
    distill, total, bce = (float(x.detach()) for x in (parts.distill, parts.total, parts.bce))
    assert distill > 0 and total == pytest.approx(bce + w * distill)


# -- a fresh start never serves an earlier attempt's exchange versions ---------------------------------------
def _version_checksums(exchange: Path) -> dict[tuple[int, int], dict[str, str]]:
    out = {}
    for manifest in exchange.glob("group*/step_*/" + atomic.MANIFEST):
        meta = json.loads(manifest.read_text())
        out[(meta["group"], meta["step"])] = {n: f["sha256"] for n, f in meta["files"].items()}
    return out


@pytest.mark.dist
def test_a_fresh_start_never_serves_an_earlier_attempts_teacher_versions(codistilled, data, tmp_path):
    # Kills a launcher that keeps the exchange on a fresh start: the earlier attempt's version of a step is
    # intact, so the peer loads it as its teacher and the new run's own publish of that step keeps it.
    run_dir = tmp_path / "run"
    shutil.copytree(codistilled, run_dir)
    earlier = _version_checksums(RunDir(run_dir).exchange())
    assert earlier, "the earlier attempt left no versions (keep_exchange = true)"
    # A fresh start in the same run directory, with other weights (another seed), keeping its versions. With
    # stale versions left, a group's GC can also delete its own new version before the peer loaded it (the
    # stale ones count as the newest): the peer would wait, so a short timeout turns that into a failure.
    run(
        tiny_config(
            data,
            run_dir,
            *CODISTILL,
            "codistill.keep_exchange=true",
            "checkpoint.resume=false",
            "train.seed=1",
            "codistill.wait_timeout_s=60",
        )
    )
    now = _version_checksums(RunDir(run_dir).exchange())
    assert set(now) & set(earlier), "no step in common to compare (the test would prove nothing)"
    stale = sorted(k for k in now if now[k] == earlier.get(k))
    assert not stale, f"versions (group, step) {stale} of the earlier attempt survived the fresh start"


# -- predict with several runs ------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(path)
    return {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.dist
def test_predict_with_two_runs_writes_their_ensemble_and_each_member(baseline, codistilled, data, tmp_path):
    from recsys_codistill.train.predict import predict

    out = tmp_path / "pred.parquet"
    written = predict([baseline, codistilled], data, out)
    members = [tmp_path / "pred.member0.parquet", tmp_path / "pred.member1.parquet"]
    assert written == [out, *members]
    ens, m0, m1 = _read(out), _read(members[0]), _read(members[1])
    # Each member file is that run's own prediction, unchanged.
    for m, run_dir in ((m0, baseline), (m1, codistilled)):
        ref = predictions(run_dir, data)
        assert np.array_equal(m["row_id"], ref["row_id"]) and np.array_equal(m["logit"], ref["logit"])
    # The ensemble is the mean of the members' probabilities (the paper's ensemble), not of their logits.
    expected = (_sigmoid(m0["logit"]) + _sigmoid(m1["logit"])) / 2
    np.testing.assert_allclose(ens["probability"], expected, rtol=1e-9, atol=0)
    np.testing.assert_allclose(_sigmoid(ens["logit"]), expected, rtol=1e-9, atol=0)
    assert np.array_equal(ens["row_id"], m0["row_id"]) and np.array_equal(ens["label"], m0["label"])
    assert not np.allclose(expected, _sigmoid((m0["logit"] + m1["logit"]) / 2), rtol=0, atol=1e-12)


def test_predict_refuses_runs_that_predicted_different_rows_and_writes_nothing(
    baseline, data, tmp_path, monkeypatch
):
    from recsys_codistill.train import predict as predict_mod

    real = predict_mod.predict_logits
    calls = []

    def one_row_short_the_second_time(*args, **kwargs):
        p = real(*args, **kwargs)
        calls.append(1)
        return p if len(calls) == 1 else {k: v[:-1] for k, v in p.items()}

    monkeypatch.setattr(predict_mod, "predict_logits", one_row_short_the_second_time)
    out = tmp_path / "pred.parquet"
    with pytest.raises(ValueError, match="predicted different rows"):
        predict_mod.predict([baseline, baseline], data, out)
    assert len(calls) == 2
    # No ensemble and no member file: a refused command must not look as if it had worked.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.dist
def test_cli_predict_with_two_runs_then_eval(baseline, codistilled, data, tmp_path, capsys):
    out = tmp_path / "ens.parquet"
    code = cli_main(
        [
            "predict",
            "--run",
            str(baseline),
            "--run",
            str(codistilled),
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "1000",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    members = [tmp_path / f"ens.member{i}.parquet" for i in (0, 1)]
    for p in (out, *members):
        assert f"wrote {p}" in printed
    # A batch size other than predict()'s default changes nothing in the members (row order, values).
    ref = predictions(baseline, data)
    np.testing.assert_allclose(_read(members[0])["logit"], ref["logit"], rtol=1e-6, atol=1e-6)
    report = tmp_path / "eval.json"
    code = cli_main(
        [
            "eval",
            "--pred",
            str(members[0]),
            "--pred",
            str(members[1]),
            "--pred",
            str(out),
            "--bootstrap",
            "20",
            "--out",
            str(report),
        ]
    )
    assert code == 0
    result = json.loads(report.read_text())
    assert len(result["models"]) == 3 and len(result["pairs"]) == 3
    m0, m1 = _read(members[0]), _read(members[1])
    churn = float(np.mean(np.abs(_sigmoid(m0["logit"]) - _sigmoid(m1["logit"]))))
    pair = next(
        p
        for p in result["pairs"]
        if {p["a"], p["b"]} == {result["models"][0]["name"], result["models"][1]["name"]}
    )
    assert pair["mean_abs_diff"]["value"] == pytest.approx(churn, rel=1e-9)


# -- checkpoint edge cases ----------------------------------------------------------------------------------
def _model(value: float) -> nn.Module:
    m = nn.Linear(3, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _loaded(path: Path) -> float:
    m = nn.Linear(3, 1)
    load_model_weights(path, m)
    return float(m.weight.detach()[0, 0])


def _save(ckpt_dir: Path, step: int, value: float, keep_last: int = 5) -> Path:
    """One checkpoint of a model whose weights all equal ``value`` (so a load tells which save it was)."""
    ck = Checkpointer(ckpt_dir, CheckpointConfig(keep_last=keep_last))
    ck.register("model", ModelState(_model(value)))
    ck.register("train", TrainState(step))
    return ck.save(step)


# Checkpointer and DCP work outside a process group too (as predict does); DCP warns about it each time.
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@single_process
def test_a_torn_save_is_never_loaded_and_the_next_save_succeeds(tmp_path):
    _save(tmp_path, 4, 4.0)
    # A save killed before its rename: the temp dir (with the project's partial marker) stays behind.
    tmp = atomic.begin(tmp_path / "step_00000008", "checkpoint")
    (tmp / "__0_0.distcp").write_bytes(b"half a shard")
    # A newer final directory without a manifest (torn, or its manifest lost): not a checkpoint.
    torn = tmp_path / "step_00000012"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"junk")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert (
        latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
        and _loaded(tmp_path / "step_00000004") == 4.0
    )
    # The next saves of those steps succeed; the project's temp dir goes, the unprovable one is moved aside.
    _save(tmp_path, 8, 8.0)
    assert not tmp.exists()
    _save(tmp_path, 12, 12.0)
    aside = list(tmp_path.glob(".damaged-step_00000012-*"))
    assert len(aside) == 1 and (aside[0] / "__0_0.distcp").read_bytes() == b"junk"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 12]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000012" and _loaded(torn) == 12.0


@single_process
def test_a_resave_of_an_existing_step_replaces_it(tmp_path):
    _save(tmp_path, 8, 1.0)
    _save(tmp_path, 8, 2.0)  # a resumed run ending at the step it resumed from
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8]
    assert _loaded(tmp_path / "step_00000008") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008"]  # no .tmp- or .old- left


@single_process
def test_a_crash_while_replacing_an_existing_step_leaves_that_step_loadable(tmp_path, monkeypatch):
    _save(tmp_path, 8, 1.0, keep_last=1)
    final = tmp_path / "step_00000008"
    real_rename, real_replace = os.rename, os.replace

    def crash_on_moving_the_new_one_in(real):
        def f(src, dst, *a, **k):
            if Path(dst) == final and Path(src).name.startswith(atomic.TMP_PREFIX):
                raise OSError("simulated crash (kill -9, power loss) while replacing the checkpoint")
            return real(src, dst, *a, **k)

        return f

    # Where the atomic swap (renameat2) is available no crash can fall between two renames; take the
    # two-rename fallback that other platforms use, and crash between its renames.
    monkeypatch.setattr(atomic, "_swap", lambda a, b: False)
    monkeypatch.setattr(os, "rename", crash_on_moving_the_new_one_in(real_rename))
    monkeypatch.setattr(os, "replace", crash_on_moving_the_new_one_in(real_replace))
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 8, 2.0, keep_last=1)
    monkeypatch.undo()
    # Either the old or the new step-8 checkpoint must still be what a resume (or predict) finds.
    found = latest_checkpoint(tmp_path)
    assert found is not None and _loaded(found) in (1.0, 2.0)


@single_process
def test_pruning_keeps_the_newest_keep_last_checkpoints_and_nothing_else_is_touched(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a checkpoint")
    for step in range(1, 6):
        _save(tmp_path, step, float(step), keep_last=2)
        assert [s for s, _ in list_checkpoints(tmp_path)] == list(range(max(1, step - 1), step + 1))
    assert _loaded(latest_checkpoint(tmp_path)) == 5.0
    assert (tmp_path / "notes" / "mine.txt").is_file()
    _save(tmp_path, 6, 6.0, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]


# -- the study's numbers, recomputed from the runs' own prediction files -------------------------------------
STUDY_CLI = (
    """
[study]
out_dir = "{out}"
runs = 5
methods = ["baseline", "ensemble"]
synthetic_rows = 4000
valid_fraction = 0.25
"""
    + TINY_RUN_TOML
    + "eval_every = 0\n"
)


@pytest.mark.slow
def test_a_study_through_the_cli_equals_brute_force_over_its_runs(tmp_path, capsys):
    import itertools

    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY_CLI.format(out=tmp_path / "out"))
    assert cli_main(["study", "--config", str(cfg), "--set", "train.max_steps=8"]) == 0
    assert f"report: {tmp_path / 'out' / 'report.md'}" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    n_cal = result["holdout"]["calibration_rows"]
    # every single model's evaluation-row probabilities, by seed index (the run's config records its seed)
    by_seed = {}
    for d in (tmp_path / "out" / "runs").iterdir():
        seed = int(tomllib.loads((d / "config.toml").read_text())["train"]["seed"])
        t = pq.read_table(d / "valid_predictions_g0.parquet")
        by_seed[seed] = (t["probability"].to_numpy()[n_cal:], t["label"].to_numpy()[n_cal:].astype(float))
    P = np.stack([by_seed[i][0] for i in range(5)])
    y = by_seed[0][1]
    rows = result["results"]["base"]["rows"]
    pairs = list(itertools.combinations(range(5), 2))
    churn = np.mean([np.abs(P[i] - P[j]).mean() for i, j in pairs])
    assert rows["baseline"]["churn"]["value"] == pytest.approx(churn, rel=1e-12)
    ens = {(i, j): (P[i] + P[j]) / 2 for i, j in pairs}
    disjoint = [(a, b) for a, b in itertools.combinations(pairs, 2) if not set(a) & set(b)]
    e_churn = np.mean([np.abs(ens[a] - ens[b]).mean() for a, b in disjoint])
    assert rows["ensemble"]["churn"]["value"] == pytest.approx(e_churn, rel=1e-12)
    ll = np.mean([-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) for p in P])
    assert rows["baseline"]["log_loss"]["value"] == pytest.approx(ll, rel=1e-9)
    rel = rows["ensemble"]["vs_baseline"]["churn_relative"]
    assert rel["value"] == pytest.approx(e_churn / churn - 1, rel=1e-9) and rel["ci_low"] <= rel["value"]
    # the five runs are different retrains (other seeds), not one run counted five times
    assert len({float(p[0]) for p in P}) == 5
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"{rows['baseline']['churn']['value']:.4f} [" in text


# -- the CLI end to end -------------------------------------------------------------------------------------
def test_cli_synth_ingest_export_round_trip(tmp_path, capsys):
    raw, ingested = tmp_path / "raw", tmp_path / "data"
    assert cli_main(["synth", "--rows", "2000", "--out", str(raw), "--files", "2", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2000
    inputs = sorted(str(p) for p in raw.glob("synthetic-*.tsv.gz"))
    assert len(inputs) == 2 and (raw / "truth.parquet").is_file()
    assert cli_main(["ingest", *inputs, "--out", str(ingested), "--valid-fraction", "0.25"]) == 0
    rows = {s: json.loads((ingested / s / "manifest.json").read_text())["rows"] for s in ("train", "valid")}
    assert rows == {"train": 1500, "valid": 500}  # time split: the last quarter of the rows
    assert cli_main(["export", str(ingested / "train"), str(tmp_path / "train.tsv")]) == 0
    assert cli_main(["export", str(ingested / "valid"), str(tmp_path / "valid.tsv.gz")]) == 0
    assert "wrote 1500 rows" in capsys.readouterr().out
    # Ingest then export gives the generator's lines back byte for byte, train rows first.
    original = b"".join(gzip.decompress(Path(p).read_bytes()) for p in inputs)
    exported = (tmp_path / "train.tsv").read_bytes() + gzip.decompress(
        (tmp_path / "valid.tsv.gz").read_bytes()
    )
    assert exported == original


def test_cli_demo_finds_its_shipped_study_config(tmp_path, monkeypatch, capsys):
    # The fast half of the demo test: everything up to training, which is replaced by a recorder.
    from recsys_codistill.study import study as study_mod

    seen = {}

    def no_training(spec):
        seen.update(study=spec.study, text=spec.config_text)
        return Path(spec.study.out_dir) / "report.md"

    monkeypatch.setattr(study_mod, "run", no_training)
    out = tmp_path / "demo"
    code = cli_main(["demo", "--out", str(out), "--set", "study.runs=5"])
    assert code == 0, capsys.readouterr().err
    assert seen["study"].out_dir == str(out) and seen["study"].runs == 5
    shipped = Path(__file__).resolve().parents[1] / "configs" / "study_demo.toml"
    assert seen["text"].startswith(shipped.read_text())  # the report records the shipped config


@pytest.mark.slow
@pytest.mark.dist
def test_cli_demo_on_tiny_settings_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = [
        "study.synthetic_rows=4000",
        "study.runs=5",
        "data.batch_size=256",
        "model.table_sizes=[1000]",
        "model.embedding_dim=8",
        "model.dense_arch=[16, 8]",
        "model.over_arch=[16, 1]",
        "train.log_every=4",
        "train.eval_every=4",
        "train.max_steps=8",
        "codistill.burn_in_steps=4",
        "codistill.exchange_every=4",
    ]
    assert cli_main(["demo", "--out", str(out), *[x for s in tiny for x in ("--set", s)]]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    for needle in ("single model", "ensemble of two", "codistillation, copy 0", "Bayes-optimal"):
        assert needle in text
    result = json.loads((out / "study.json").read_text())
    assert result["study"]["out_dir"] == str(out) and result["holdout"]["valid_rows"] == 800
    assert (out / "churn.png").stat().st_size > 1000


# -- kill -9 recovery, fast -------------------------------------------------------------------------------
def _worker_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"recsys_codistill.train.worker --config {run_dir}"], capture_output=True, text=True
    )
    return [int(x) for x in out.stdout.split()]


def test_a_killed_worker_restarts_from_its_checkpoint_and_the_run_completes(data, tmp_path, capfd):
    # The fast variant of test_teacher_exchange's slow two-group test: one group, one restart allowed.
    from recsys_codistill.train.launch import launch

    run_dir = tmp_path / "ft"
    cfg = tiny_config(
        data,
        run_dir,
        "sharding.max_restarts=1",
        "checkpoint.every_steps=4",
        "data.epochs=3",
        "data.valid_dir=''",
        "train.log_every=8",
    )
    ckpts = RunDir(run_dir).checkpoints(0)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(launch, cfg, quiet=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list_checkpoints(ckpts) and not done.done():
            time.sleep(0.05)
        assert not done.done(), f"the launch ended before any checkpoint (exit code {done.result()})"
        pids = _worker_pids(run_dir)
        assert list_checkpoints(ckpts) and pids, "the worker never checkpointed"
        assert not RunDir(run_dir).result(0).exists(), "finished before it could be killed"
        os.kill(pids[0], signal.SIGKILL)
        assert done.result(timeout=300) == 0
    assert "restarting the group (1/1)" in capfd.readouterr().err  # the launcher's restart, not a new run
    resumes = [m for m in metrics(run_dir) if m.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 4 and resumes[0]["step"] % 4 == 0
    result = json.loads(RunDir(run_dir).result(0).read_text())
    assert result["step"] == 96  # 3 epochs of 8192 rows at batch 256: the run went to its end
    assert all(torch.isfinite(w).all() for w in weights(run_dir).values())
    # No step is logged twice: the resumed run dropped what it replays.
    steps = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 96


@single_process
def test_replacing_an_existing_step_is_one_atomic_swap_where_the_platform_offers_it(tmp_path):
    from recsys_codistill.train.checkpoint import KIND

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic._swap(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename fallback is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    _save(tmp_path / "c", 8, 1.0)
    _save(tmp_path / "c", 8, 2.0)
    assert _loaded(tmp_path / "c" / "step_00000008") == 2.0
    assert not atomic.restore_interrupted(tmp_path / "c", KIND)
