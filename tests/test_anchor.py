"""Fixed teachers (anchor / offline distillation) and warm starts, end to end through the launcher."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from recsys_codistill.config import ConfigError
from tests.train_utils import make_dataset, metrics, predictions, run, tiny_config, weights

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("anchor"))


@pytest.fixture(scope="module")
def yesterday(data, tmp_path_factory):
    """A trained run (seed 7) to serve as the anchor / warm-start source."""
    d = tmp_path_factory.mktemp("yesterday") / "run"
    run(tiny_config(data, d, "train.max_steps=12", "train.seed=7"))
    return d


def _digest(root):
    return {
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_anchor_weight_zero_is_the_cold_retrain_and_a_positive_one_pulls_toward_the_anchor(
    data, yesterday, tmp_path
):
    before = _digest(yesterday)
    today = ["train.max_steps=12", "train.seed=1"]
    run(tiny_config(data, tmp_path / "cold", *today))
    run(tiny_config(data, tmp_path / "l0", *today, f'anchor.run="{yesterday}"', "anchor.weight=0.0"))
    wa, wb = weights(tmp_path / "cold"), weights(tmp_path / "l0")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # λ = 0: bit-identical, no teacher term at all
    run(tiny_config(data, tmp_path / "l4", *today, f'anchor.run="{yesterday}"', "anchor.weight=4.0"))
    recs = [m for m in metrics(tmp_path / "l4") if "loss" in m]
    assert all(m["anchor_kl"] > 0 and m["anchor"] > m["anchor_kl"] for m in recs)  # ψ = CE > KL
    assert recs[-1]["anchor_forwards"] == 12
    assert "anchor" not in metrics(tmp_path / "cold")[0]
    # the point of it: today's model disagrees less with yesterday's than a cold retrain does
    p_y = torch.sigmoid(torch.as_tensor(predictions(yesterday, data)["logit"]))
    churn = {
        name: float(
            (torch.sigmoid(torch.as_tensor(predictions(tmp_path / name, data)["logit"])) - p_y).abs().mean()
        )
        for name in ("cold", "l4")
    }
    assert churn["l4"] < 0.8 * churn["cold"], churn
    # the anchor is read, never written
    assert _digest(yesterday) == before


def test_warm_start_with_frozen_rates_predicts_exactly_like_its_source(data, yesterday, tmp_path):
    run(
        tiny_config(
            data,
            tmp_path / "warm",
            f'train.init_from="{yesterday}"',
            "train.max_steps=4",
            "optim.sparse_lr=0",
            "optim.dense_lr=0",
        )
    )
    a, b = predictions(yesterday, data), predictions(tmp_path / "warm", data)
    assert np.array_equal(a["logit"], b["logit"])
    # and with learning, it starts where the source ended (its first loss is the source's, not a fresh one)
    run(
        tiny_config(
            data,
            tmp_path / "warm2",
            f'train.init_from="{yesterday}"',
            "train.max_steps=4",
            "train.log_every=1",
        )
    )
    run(tiny_config(data, tmp_path / "cold2", "train.max_steps=4", "train.log_every=1"))
    first = {n: [m for m in metrics(tmp_path / n) if "loss" in m][0]["loss"] for n in ("warm2", "cold2")}
    assert first["warm2"] < first["cold2"] - 0.02, first


@pytest.mark.parametrize("key", ["anchor.run", "train.init_from"])
def test_a_teacher_with_another_input_mapping_is_refused_naming_the_keys(data, yesterday, tmp_path, key):
    lam = ["anchor.weight=1.0"]  # an anchor with λ = 0 is not read at all
    cfg = tiny_config(
        data, tmp_path / "r", f'{key}="{yesterday}"', *lam, "model.table_sizes=[500]", "train.max_steps=4"
    )
    from recsys_codistill.train.launch import launch

    with pytest.raises(ConfigError, match=rf"{key}.*other model inputs.*table_sizes"):
        launch(cfg, quiet=True)
    assert not (tmp_path / "r" / "group0" / "checkpoints").exists()  # refused before any worker
    with pytest.raises(ConfigError, match=rf"{key} = .*not a run directory"):
        launch(
            tiny_config(data, tmp_path / "r2", f'{key}="{tmp_path}"', *lam, "train.max_steps=4"), quiet=True
        )


def test_a_resumed_anchored_run_refuses_a_changed_teacher(data, yesterday, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(yesterday, teacher)
    anchored = ["anchor.weight=1.0", f'anchor.run="{teacher}"', "checkpoint.every_steps=4"]
    run(tiny_config(data, tmp_path / "r", *anchored, "train.max_steps=8"))
    # the teacher trains on (a new latest checkpoint) while the student is stopped, then the student resumes
    run(tiny_config(data, teacher, "train.max_steps=16", "train.seed=7"))
    from recsys_codistill.train.launch import launch

    code = launch(tiny_config(data, tmp_path / "r", *anchored, "train.max_steps=12"), quiet=True)
    assert code != 0
    logs = "".join(p.read_text() for p in (tmp_path / "r").glob("group*/launcher.log"))
    assert "the teacher changed under a resumed run" in logs


def test_a_sampled_anchor_resumes_exactly_and_still_pulls(data, yesterday, tmp_path):
    """teacher.fraction < 1: the anchor runs on a quarter of each batch's rows, drawn from (seed, step):
    a run stopped and resumed draws the same rows and ends bit-identical to a straight one."""
    sampled = [f'anchor.run="{yesterday}"', "anchor.weight=4.0", "teacher.fraction=0.25", "train.seed=1"]
    run(tiny_config(data, tmp_path / "straight", *sampled, "train.max_steps=12"))
    run(tiny_config(data, tmp_path / "resumed", *sampled, "train.max_steps=6"))
    run(tiny_config(data, tmp_path / "resumed", *sampled, "train.max_steps=12"))
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [m for m in metrics(tmp_path / "straight") if "loss" in m]
    assert all(m["anchor_kl"] > 0 for m in recs)
    assert recs[-1]["anchor_rows"] == 12 * 64  # ceil(0.25 * 256) rows of each of the 12 batches
    full = tmp_path / "full"
    run(tiny_config(data, full, *sampled[:2], "train.seed=1", "train.max_steps=12"))
    assert [m for m in metrics(full) if "loss" in m][-1]["anchor_rows"] == 12 * 256
    wf = weights(full)
    assert any(not torch.equal(wa[k], wf[k]) for k in wa)  # the sample is not the full batch
    cold = tmp_path / "cold"
    run(tiny_config(data, cold, "train.seed=1", "train.max_steps=12"))
    p_y = torch.sigmoid(torch.as_tensor(predictions(yesterday, data)["logit"]))
    churn = {
        d.name: float((torch.sigmoid(torch.as_tensor(predictions(d, data)["logit"])) - p_y).abs().mean())
        for d in (cold, full, tmp_path / "straight")
    }
    # a sampled pull is a noisier one, not another one: it lands with the full anchor, far from cold
    assert churn["straight"] < 0.8 * churn["cold"] and churn["full"] < 0.8 * churn["cold"], churn
