"""End-to-end training through the launcher (torchrun per group, gloo on 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_codistill.cli import main as cli_main
from tests.train_utils import make_dataset, metrics, predictions, run, tiny_config, weights

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train"))


def test_same_seed_gives_identical_predictions(data, tmp_path):
    for name in ("a", "b"):
        run(tiny_config(data, tmp_path / name, "train.max_steps=12"))
    pa, pb = predictions(tmp_path / "a", data), predictions(tmp_path / "b", data)
    assert np.array_equal(pa["row_id"], pb["row_id"])
    assert np.array_equal(pa["logit"], pb["logit"])
    # and training did something: loss fell
    losses = [m["loss"] for m in metrics(tmp_path / "a") if "loss" in m]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dense_optimizer", ["adagrad", "adam"])
def test_resume_continues_exactly(data, tmp_path, dense_optimizer, capsys):
    opt = [f"optim.dense_optimizer={dense_optimizer}", "optim.dense_lr=0.01"]
    straight = tiny_config(data, tmp_path / "straight", "train.max_steps=24", *opt)
    run(straight)
    # first half, stop (as if killed after the checkpoint at step 12), then resume to 24
    run(tiny_config(data, tmp_path / "resumed", "train.max_steps=12", *opt))
    run(tiny_config(data, tmp_path / "resumed", "train.max_steps=24", *opt))
    assert "differs from the one it was started with" in capsys.readouterr().err  # max_steps changed
    steps = [m["step"] for m in metrics(tmp_path / "resumed") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    assert any(m.get("event") == "resume" and m["step"] == 12 for m in metrics(tmp_path / "resumed"))
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    pa, pb = predictions(tmp_path / "straight", data), predictions(tmp_path / "resumed", data)
    assert np.array_equal(pa["logit"], pb["logit"])


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise"])
def test_two_ranks_match_one_rank_and_learn(data, tmp_path, sharding_type):
    # Same math: with learning rates 0 the weights stay at their (sharding-independent) init, so the
    # 2-rank model must predict exactly what the 1-rank model predicts.
    frozen = ["optim.sparse_lr=0.0", "optim.dense_lr=0.0", "train.max_steps=2"]
    run(tiny_config(data, tmp_path / "one", *frozen))
    run(
        tiny_config(
            data, tmp_path / "two", *frozen, "sharding.nproc=2", f"sharding.sharding_type={sharding_type}"
        )
    )
    p1, p2 = predictions(tmp_path / "one", data), predictions(tmp_path / "two", data)
    np.testing.assert_allclose(p1["logit"], p2["logit"], rtol=0, atol=1e-6)
    # and a real 2-rank run learns (checked once: the equivalence above covers the other sharding type)
    if sharding_type != "table_wise":
        return
    run(tiny_config(data, tmp_path / "learn", "sharding.nproc=2", f"sharding.sharding_type={sharding_type}"))
    losses = [m["loss"] for m in metrics(tmp_path / "learn") if "loss" in m]
    assert losses[-1] < losses[0] - 0.02
    final = [m for m in metrics(tmp_path / "learn") if m.get("final")][0]
    assert final["valid_auc"] > 0.6


@pytest.mark.parametrize(
    "override, message",
    [
        ("sharding.sharding_type=diagonal", "sharding_type"),
        ("model.table_sizes=[0]", "table_sizes"),
        ("data.batch_size=255", "not divisible"),
        ('data.train_dir="/nonexistent/data"', "no manifest.json"),
        ("model.dense_buckets=1", "dense_buckets"),
    ],
)
def test_bad_config_fails_before_any_process_starts(tmp_path, capsys, override, message):
    code = cli_main(
        ["train", "--run-dir", str(tmp_path / "r"), "--set", "sharding.nproc=2", "--set", override]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sparse_dist_pipeline_matches_the_plain_loop(data, tmp_path):
    # TorchRec's TrainPipelineSparseDist (the GPU default) runs on CPU too: same math as the plain loop,
    # and its checkpoints load into the plain model for predict.
    run(tiny_config(data, tmp_path / "plain", "train.max_steps=12", "train.pipeline=plain"))
    run(
        tiny_config(
            data, tmp_path / "pipe", "train.max_steps=12", "train.pipeline=sparse_dist", "train.eval_every=6"
        )
    )
    pa, pb = predictions(tmp_path / "plain", data), predictions(tmp_path / "pipe", data)
    np.testing.assert_allclose(pa["logit"], pb["logit"], rtol=0, atol=1e-5)


def test_dense_buckets_and_rare_id_vocabulary_end_to_end(data, tmp_path):
    # Both model-input options on: the launcher counts ids once and saves the vocabulary with the run;
    # training uses 13 more tables; predict (from a moved run directory) rebuilds the same inputs, so its
    # log loss equals the one the trainer measured on the same rows.
    import shutil

    from data_pipeline.vocab import IdVocabulary, build
    from recsys_codistill.eval import metrics as m

    cfg = tiny_config(
        data, tmp_path / "r", "model.dense_buckets=32", "data.min_id_count=3", "train.max_steps=16"
    )
    run(cfg)
    saved = IdVocabulary.load(tmp_path / "r" / "vocab.parquet")
    fresh = build(data, 3)
    assert saved.min_count == 3 and 0 < sum(saved.sizes().values()) < sum(build(data, 1).sizes().values())
    assert all(np.array_equal(a, b) for a, b in zip(saved.kept, fresh.kept, strict=True))
    assert any("t_I13_bucket" in k for k in weights(tmp_path / "r"))
    shutil.move(tmp_path / "r", tmp_path / "moved")
    p = predictions(tmp_path / "moved", data)
    final = [x for x in metrics(tmp_path / "moved") if x.get("final")][0]
    ll = m.log_loss(p["label"], 1 / (1 + np.exp(-p["logit"])))
    assert final["valid_auc"] > 0.6
    assert abs(ll - final["valid_log_loss"]) < 1e-6  # same inputs in training-time eval and in predict
    (tmp_path / "moved" / "vocab.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.parquet"):
        predictions(tmp_path / "moved", data)


def test_resume_keeps_the_vocabulary_and_refuses_a_changed_threshold(data, tmp_path):
    from recsys_codistill.config import ConfigError
    from recsys_codistill.train.launch import launch

    base = ["model.dense_buckets=32", "checkpoint.every_steps=4"]
    run(tiny_config(data, tmp_path / "r", *base, "data.min_id_count=3", "train.max_steps=8"))
    before = (tmp_path / "r" / "vocab.parquet").read_bytes()
    # Switching the threshold on a resume would move every kept id's embedding row: refused up front.
    for changed in ("data.min_id_count=5", "data.min_id_count=0"):
        with pytest.raises(ConfigError, match="min_id_count"):
            launch(tiny_config(data, tmp_path / "r", *base, changed, "train.max_steps=12"), quiet=True)
    assert (tmp_path / "r" / "vocab.parquet").read_bytes() == before
    run(tiny_config(data, tmp_path / "r", *base, "data.min_id_count=3", "train.max_steps=12"))
    assert any(x.get("event") == "resume" and x["step"] == 8 for x in metrics(tmp_path / "r"))
    assert (tmp_path / "r" / "vocab.parquet").read_bytes() == before
    # Starting over (resume = false) recounts, and drops the earlier attempt's checkpoints.
    run(
        tiny_config(
            data, tmp_path / "r", *base, "data.min_id_count=0", "train.max_steps=4", "checkpoint.resume=false"
        )
    )
    assert not (tmp_path / "r" / "vocab.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "r" / "group0" / "checkpoints").iterdir()) == ["step_00000004"]


def test_checkpoint_records_model_inputs_and_refuses_others(data, tmp_path):
    # Changing how ids map to rows under a checkpoint (here mod -> hash, which the launcher cannot see)
    # would silently scramble every embedding: the worker refuses, naming the key.
    import json

    from recsys_codistill.config import ConfigError
    from recsys_codistill.train.launch import launch

    base = ["checkpoint.every_steps=4"]
    run(tiny_config(data, tmp_path / "r", *base, "train.max_steps=4"))
    (ckpt,) = (tmp_path / "r" / "group0" / "checkpoints").iterdir()
    saved = json.loads((ckpt / "inputs.json").read_text())
    assert (
        saved["id_mapping"] == "mod" and saved["table_sizes"] == [1000] * 26 and saved["vocab_sha256"] is None
    )
    config_before = (tmp_path / "r" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="id_mapping: 'mod' -> 'hash'"):
        launch(
            tiny_config(data, tmp_path / "r", *base, 'data.id_mapping="hash"', "train.max_steps=8"),
            quiet=True,
        )
    # refused before anything was written: the run's recorded config is intact and it still predicts
    assert (tmp_path / "r" / "config.toml").read_text() == config_before
    assert len(predictions(tmp_path / "r", data)["logit"]) == 8192


def test_reinit_embeddings_each_epoch_resumes_exactly(data, tmp_path):
    # 8192 rows / 1024-row batches = 8 steps per epoch: fresh tables at steps 8 and 16 of 24. A run stopped
    # mid-epoch and resumed from the checkpoint at the first epoch end ends bit-identical to the straight run.
    import shutil

    opt = ["data.epochs=3", "data.batch_size=1024", "train.reinit_embeddings_each_epoch=true"]
    run(tiny_config(data, tmp_path / "straight", *opt))
    events = [m for m in metrics(tmp_path / "straight") if m.get("event") == "reinit_embeddings"]
    assert [(e["step"], e["epoch"]) for e in events] == [(8, 1), (16, 2)]
    # As if killed at step 12: its last checkpoint is step 8, taken just before the re-initialisation.
    run(tiny_config(data, tmp_path / "resumed", *opt, "train.max_steps=12", "checkpoint.every_steps=4"))
    shutil.rmtree(tmp_path / "resumed" / "group0" / "checkpoints" / "step_00000012")
    run(tiny_config(data, tmp_path / "resumed", *opt))
    assert any(m.get("event") == "resume" and m["step"] == 8 for m in metrics(tmp_path / "resumed"))
    replayed = [m for m in metrics(tmp_path / "resumed") if m.get("event") == "reinit_embeddings"]
    assert [(e["step"], e["epoch"]) for e in replayed] == [(8, 1), (16, 2)]  # logged once each
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ...and differs from the same run without the re-initialisation.
    run(tiny_config(data, tmp_path / "plain", *opt[:2]))
    wc = weights(tmp_path / "plain")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa if "embedding_bags" in k)


def test_resume_keeps_the_learning_rate_schedule(data, tmp_path):
    # The schedule scales the optimizer's initial rates: a resume must not take the saved (already
    # scaled) rates as its base, or warm-up and decay compound after every restart.
    sched = ["optim.warmup_steps=4", "optim.decay=linear", "train.max_steps=16", "train.log_every=1"]
    run(tiny_config(data, tmp_path / "straight", *sched))
    run(tiny_config(data, tmp_path / "resumed", *sched, "train.max_steps=8"))
    run(tiny_config(data, tmp_path / "resumed", *sched))
    lr = {m["step"]: m["lr"] for m in metrics(tmp_path / "straight") if "lr" in m}
    lr_resumed = {m["step"]: m["lr"] for m in metrics(tmp_path / "resumed") if "lr" in m}
    # (the first 8 steps ran under an 8-step schedule: only the resumed part is comparable)
    assert {s: v for s, v in lr_resumed.items() if s > 8} == {s: v for s, v in lr.items() if s > 8}


def _weights_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    from recsys_codistill.train.checkpoint import load_model_weights
    from recsys_codistill.train.predict import load_run

    _, model, _ = load_run(run_dir, 0)
    load_model_weights(run_dir / "group0" / "checkpoints" / f"step_{step:08d}", model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_weight_averaging_is_the_average_of_the_live_weights_and_resumes_exactly(data, tmp_path, kind):
    import shutil

    # the live trajectory, a checkpoint at every step
    every = ["checkpoint.every_steps=1", "checkpoint.keep_last=100", "train.max_steps=8"]
    run(tiny_config(data, tmp_path / "live", *every))
    # the last half of 8 steps starts after step 4; sampled every 2 steps: the weights of steps 6 and 8
    avg = [
        f"train.average={kind}",
        "train.average_fraction=0.5",
        "train.average_every=2",
        "train.ema_decay=0.75",
    ]
    run(tiny_config(data, tmp_path / "avg", *every, *avg))
    w6, w8, got = (
        _weights_at(tmp_path / "live", 6),
        _weights_at(tmp_path / "live", 8),
        weights(tmp_path / "avg"),
    )
    a = 0.5 if kind == "swa" else 0.75  # SWA: the mean; EMA: d · w6 + (1 − d) · w8
    for k in got:
        if got[k].is_floating_point():
            torch.testing.assert_close(got[k], a * w6[k] + (1 - a) * w8[k], rtol=1e-5, atol=1e-6, msg=k)
    # the periodic checkpoints hold the live weights; the final one (and result.json) the average
    assert all(torch.equal(_weights_at(tmp_path / "avg", 6)[k], w6[k]) for k in w6)
    import json

    assert json.loads((tmp_path / "avg" / "group0" / "result.json").read_text())["averaged_snapshots"] == 2
    # killed after step 6 (one snapshot averaged): the resumed run continues the same average
    ckpts = tmp_path / "avg" / "group0" / "checkpoints"
    for s in (7, 8):
        shutil.rmtree(ckpts / f"step_{s:08d}")
    (tmp_path / "avg" / "group0" / "result.json").unlink()
    run(tiny_config(data, tmp_path / "avg", *every, *avg))
    again = weights(tmp_path / "avg")
    assert all(torch.equal(again[k], got[k]) for k in got)
    # and the same run without averaging ends on the live weights
    assert not all(torch.equal(got[k], w8[k]) for k in got if got[k].is_floating_point())


def test_learning_rate_decays_to_its_floor(data, tmp_path):
    from recsys_codistill.train.trainer import lr_factor

    assert lr_factor(0, 10, 0, "linear", 0.1) == 1.0
    assert lr_factor(10, 10, 0, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 10, 0, "cosine", 0.25) == pytest.approx(0.25)
    assert lr_factor(5, 10, 0, "linear", 0.0) == pytest.approx(0.5)
    run(
        tiny_config(
            data,
            tmp_path / "r",
            "optim.decay=linear",
            "optim.lr_floor=0.2",
            "train.max_steps=8",
            "train.log_every=1",
            "optim.dense_lr=0.05",
        )
    )
    lr = {m["step"]: m["lr"] for m in metrics(tmp_path / "r") if "lr" in m}
    assert lr[8] == pytest.approx(0.05 * (0.2 + 0.8 * (1 - 7 / 8)))
