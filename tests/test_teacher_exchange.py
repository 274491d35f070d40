"""Two co-distilling groups: exchange, reproducibility, data split, torn versions, fault tolerance."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import CriteoStream
from recsys_codistill.codistill.exchange import complete_versions, is_complete, version_dir
from tests.train_utils import make_dataset, metrics, predictions, run, tiny_config, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("codistill"))


CODISTILL = [
    "codistill.num_groups=2",
    "codistill.burn_in_steps=4",
    "codistill.exchange_every=4",
    "train.max_steps=16",
]


@pytest.mark.dist
def test_zero_weight_is_bit_identical_to_the_baseline(data, tmp_path):
    run(tiny_config(data, tmp_path / "base", "train.max_steps=16"))
    run(
        tiny_config(
            data, tmp_path / "w0", *CODISTILL, "codistill.distill_weight=0.0", "codistill.data=shared"
        )
    )
    wa, wb = weights(tmp_path / "base"), weights(tmp_path / "w0", group=0)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.dist
def test_lockstep_codistillation_is_reproducible_and_uses_the_teacher(data, tmp_path):
    for name in ("a", "b"):
        run(tiny_config(data, tmp_path / name, *CODISTILL, "codistill.exchange_mode=lockstep"))
    for g in (0, 1):
        pa, pb = predictions(tmp_path / "a", data, g), predictions(tmp_path / "b", data, g)
        assert np.array_equal(pa["logit"], pb["logit"]), f"group {g} differs between identical runs"
        recs = [m for m in metrics(tmp_path / "a", g) if "distill" in m]
        # burn-in: no distillation term; afterwards a positive one and a teacher at most K steps old
        assert recs[0]["distill"] == 0.0 and recs[-1]["distill"] > 0.0
        assert recs[-1]["teacher_step"] is not None and 0 <= recs[-1]["staleness"] <= 4
        # the logged gap is the KL (0 in burn-in), below the CE term by the teacher's entropy
        assert recs[0]["distill_kl"] == 0.0 and 0.0 < recs[-1]["distill_kl"] < recs[-1]["distill"]
        # lockstep, K = 4, burn-in 4, 16 steps: versions 4, 8, 12 served steps 4..15 (staleness 0..3)
        result = json.loads((tmp_path / "a" / f"group{g}" / "result.json").read_text())
        assert result["teacher_versions_loaded"] == 3 and result["distilled_steps"] == 12
        assert result["mean_staleness"] == 1.5
    # versions only serve training: gone once every group finished
    assert not (tmp_path / "a" / "exchange").exists()
    # the groups are different models (different seeds and data)
    assert not np.array_equal(
        predictions(tmp_path / "a", data, 0)["logit"], predictions(tmp_path / "a", data, 1)["logit"]
    )


def test_disjoint_groups_partition_the_training_rows(tiny_parquet):
    seen = []
    for g in (0, 1):
        for r in (0, 1):
            s = CriteoStream(
                tiny_parquet,
                batch_size=4,
                table_sizes=[10] * 26,
                group=g,
                num_groups=2,
                rank=r,
                world_size=2,
                shared=False,
                shuffle=True,
                drop_last=False,
            )
            ids = np.concatenate([b.row_ids.numpy() for b in s])
            seen.append(set(ids[ids >= 0].tolist()))
    total = json.loads((Path(tiny_parquet) / "manifest.json").read_text())["rows"]
    assert sum(len(x) for x in seen) == total
    assert set().union(*seen) == set(range(total))


def _fake_version(root: Path, step: int, *, manifest: bool = True, truncate: bool = False) -> Path:
    from recsys_codistill import atomic
    from recsys_codistill.codistill.exchange import KIND

    d = version_dir(root, 1, step)
    d.mkdir(parents=True)
    payload = os.urandom(256)
    (d / "__0_0.distcp").write_bytes(payload)
    (d / ".metadata").write_bytes(b"meta")
    if manifest:
        atomic.write_manifest(d, KIND, {"step": step, "group": 1})
    if truncate:
        (d / "__0_0.distcp").write_bytes(payload[:100])
    return d


def test_torn_versions_are_never_loaded(tmp_path):
    good = _fake_version(tmp_path, 50)
    no_manifest = _fake_version(tmp_path, 100, manifest=False)  # writer died before the manifest
    torn = _fake_version(tmp_path, 150, truncate=True)  # a file cut short after the manifest
    (tmp_path / "group1" / ".tmp-step_00000200").mkdir()  # an unfinished temp dir
    assert is_complete(good) and not is_complete(no_manifest) and not is_complete(torn)
    assert complete_versions(tmp_path, 1) == [50]


@pytest.mark.dist
@pytest.mark.slow
def test_a_killed_rank_restarts_from_its_checkpoint_and_the_run_completes(data, tmp_path):
    cfg = tiny_config(
        data,
        tmp_path / "ft",
        "codistill.num_groups=2",
        "codistill.burn_in_steps=4",
        "codistill.exchange_every=4",
        "codistill.exchange_mode=async",
        "codistill.max_staleness_steps=1000",
        "sharding.max_restarts=2",
        "checkpoint.every_steps=4",
        "data.epochs=3",
    )
    from recsys_codistill.config import save_resolved

    save_resolved(cfg, cfg.run_dir)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from recsys_codistill.train.launch import launch; from recsys_codistill.config import load_config; "
            f"import sys; sys.exit(launch(load_config('{cfg.run_dir}/config.toml'), quiet=True))",
        ],
    )
    ckpts = Path(cfg.run_dir) / "group1" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step_*")):
        time.sleep(0.2)
    assert list(ckpts.glob("step_*")), "group 1 never checkpointed"
    # kill -9 the worker process of group 1 of this run, and only of this run: its command line names this
    # run's directory (a machine-wide match would kill any other training on the machine)
    pattern = rf"recsys_codistill\.train\.worker --config {re.escape(str(Path(cfg.run_dir)))}.* --group 1"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert out, "no group 1 worker found"
    os.kill(int(out[-1]), signal.SIGKILL)
    assert proc.wait(timeout=300) == 0
    assert any(m.get("event") == "resume" for m in metrics(Path(cfg.run_dir), 1))
    for g in (0, 1):
        p = predictions(Path(cfg.run_dir), data, g)
        assert np.isfinite(p["logit"]).all() and len(p["logit"]) == 8192


def _exchange(tmp_path: Path, **codistill):  # noqa: ANN202
    from recsys_codistill.codistill.exchange import PeerExchange
    from recsys_codistill.config import CodistillConfig
    from recsys_codistill.train.trainer import DistContext

    ex = PeerExchange.__new__(PeerExchange)  # version choice needs no model
    ex.cfg = CodistillConfig(num_groups=2, **codistill)
    ex.root, ex.group, ex.wait_seconds = tmp_path, 0, 0.0
    ex.peers, ex.good, ex.bad = [1], {1: set()}, {1: set()}
    ex.ctx = DistContext(0, 1, 0, torch.device("cpu"))
    return ex


def test_version_choice_lockstep_and_async(tmp_path):
    _fake_version(tmp_path, 100)
    lock = _exchange(tmp_path, exchange_every=50)
    assert lock._find(1, 120) == 100 and lock._find(1, 160) is None  # 150 not there yet: wait
    _fake_version(tmp_path, 300)  # the peer ran ahead
    asyn = _exchange(tmp_path, exchange_every=50, exchange_mode="async", max_staleness_steps=100)
    assert asyn._find(1, 120) == 300  # the freshest, even from the peer's future (no deadlock)
    assert asyn._find(1, 450) is None  # 150 steps stale > 100: wait


def test_waiting_for_a_peer_that_never_publishes_ends_in_a_clear_error(tmp_path):
    ex = _exchange(tmp_path, exchange_every=50, wait_timeout_s=0.3)
    with pytest.raises(RuntimeError, match="waited .* for a teacher version of group 1"):
        ex._wanted(1, 100)
