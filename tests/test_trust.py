"""The trust model: nothing loaded runs code, every load is verified, nothing the project did not make is
deleted, and a launch owns its run directory and its processes (README, "Trust model")."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recsys_codistill import atomic, dcp_io
from recsys_codistill.codistill.exchange import (
    ROOT_MARKER,
    PeerExchange,
    claim_root,
    clear_versions,
    is_complete,
    publish,
    version_dir,
)
from recsys_codistill.config import ConfigError
from recsys_codistill.train.checkpoint import KIND, latest_checkpoint, list_checkpoints, load_model_weights
from tests.train_utils import make_dataset, predictions, run, tiny_config, weights


class _Planted:
    """Pickles to a call that writes a marker file: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.marker, "code ran"))


def _plant_metadata(directory: Path, marker: Path, *, fix_manifest: bool) -> None:
    (directory / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    if fix_manifest:  # an attacker who can write the file can rewrite the manifest too
        meta = json.loads((directory / atomic.MANIFEST).read_text())
        fields = {k: v for k, v in meta.items() if k not in ("created_by", "kind", "files")}
        (directory / atomic.MANIFEST).unlink()
        atomic.write_manifest(directory, meta["kind"], fields)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(tiny_config(data, run_dir, "train.max_steps=8", "checkpoint.every_steps=4", "data.valid_dir=''"))
    return run_dir


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


# -- no load executes code ---------------------------------------------------------------------------------
def test_planted_pickle_in_a_checkpoint_is_refused_by_predict(trained, data, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    ckpt = latest_checkpoint(run_dir / "group0" / "checkpoints")
    _plant_metadata(ckpt, marker, fix_manifest=True)
    with pytest.raises(dcp_io.UnsafeCheckpointError, match="refused to load.*pathlib.Path.write_text|Path"):
        predictions(run_dir, data)
    assert not marker.exists()


def test_planted_pickle_in_a_checkpoint_is_refused_on_resume(trained, data, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _plant_metadata(latest_checkpoint(run_dir / "group0" / "checkpoints"), marker, fix_manifest=True)
    cfg = tiny_config(data, run_dir, "train.max_steps=12", "checkpoint.every_steps=4", "data.valid_dir=''")
    from recsys_codistill.train.launch import launch

    assert launch(cfg, quiet=True) != 0
    assert not marker.exists()
    assert "refused to load" in (run_dir / "group0" / "launcher.log").read_text()


def test_byte_items_that_are_not_plain_weights_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    dcp_io.save({"w": torch.ones(2), "extra": _Planted(marker)}, tmp_path / "ckpt")
    assert not marker.exists()  # saving pickles the call, it does not run it
    state = {"w": torch.zeros(2), "extra": None}
    with pytest.raises(dcp_io.UnsafeCheckpointError, match="not plain weights"):
        dcp_io.load(state, tmp_path / "ckpt", single_process=True)
    assert not marker.exists()
    # plain non-tensor items (optimizer hyper-parameters) still load
    dcp_io.save({"w": torch.ones(2), "extra": {"lr": 0.1, "params": ["a"]}}, tmp_path / "ok")
    state = {"w": torch.zeros(2), "extra": {"lr": 0.0, "params": ["b"]}}
    dcp_io.load(state, tmp_path / "ok", single_process=True)
    assert state["extra"] == {"lr": 0.1, "params": ["a"]} and torch.equal(state["w"], torch.ones(2))


def _tiny_version(root: Path, step: int, group: int = 1) -> tuple[nn.Module, Path]:
    torch.manual_seed(step)
    model = nn.Linear(3, 1)
    return model, publish(root, group, step, model)


def test_planted_pickle_in_a_teacher_version_never_runs_in_the_peer(tmp_path):
    from tests.test_teacher_exchange import _exchange

    root = tmp_path / "exchange"
    _, path = _tiny_version(root, 50)
    marker = tmp_path / "PWNED"
    _plant_metadata(path, marker, fix_manifest=True)
    ex = _exchange(root, exchange_every=50)
    from recsys_codistill.codistill.copies import ShardedCopy

    ex.teachers, ex.loaded, ex.load_seconds = {1: ShardedCopy(nn.Linear(3, 1))}, {}, 0.0
    with pytest.raises(dcp_io.UnsafeCheckpointError):
        ex._refresh(60)
    assert not marker.exists()


# -- every load is verified --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [
        {"../../etc/passwd": {"bytes": 1, "sha256": "x"}},
        {"/etc/passwd": {"bytes": 1, "sha256": "x"}},
        {},
    ],
    ids=["parent-path", "absolute-path", "no-files"],
)
def test_a_forged_version_manifest_is_refused(tmp_path, files):
    _, path = _tiny_version(tmp_path, 50)
    meta = json.loads((path / atomic.MANIFEST).read_text())
    meta["files"] = files
    (path / atomic.MANIFEST).write_text(json.dumps(meta))
    assert not is_complete(path)


def test_a_version_must_name_its_own_group_and_step(tmp_path):
    _, path = _tiny_version(tmp_path, 50)
    assert is_complete(path)
    moved = version_dir(tmp_path, 1, 100)
    shutil.copytree(path, moved)  # a version of step 50 posing as step 100
    assert not is_complete(moved)
    other = version_dir(tmp_path, 0, 50)
    shutil.copytree(path, other)  # group 1's version posing as group 0's
    assert not is_complete(other)
    (path / "extra.bin").write_bytes(b"x")  # a file the manifest does not list
    assert not is_complete(path)


def test_a_corrupted_freshest_version_falls_back_to_the_older_intact_one_in_async_mode(tmp_path, capsys):
    from tests.test_teacher_exchange import _exchange

    _tiny_version(tmp_path, 50)
    _, fresh = _tiny_version(tmp_path, 100)
    shard = next(p for p in fresh.iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[-8:] = bytes(8)  # same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    asyn = _exchange(tmp_path, exchange_every=50, exchange_mode="async", max_staleness_steps=200)
    assert asyn._find(1, 120) == 50
    assert "sha256 differs" in capsys.readouterr().err
    lock = _exchange(tmp_path, exchange_every=50)
    assert "damaged" in lock._find(1, 120)  # lockstep needs exactly 100: a clear error, not a long wait


def test_a_damaged_version_is_republished(tmp_path):
    model, path = _tiny_version(tmp_path, 50)
    (path / atomic.MANIFEST).unlink()  # left without a manifest
    assert not is_complete(path)
    publish(tmp_path, 1, 50, model)
    assert is_complete(path)
    assert list(path.parent.glob(".damaged-*"))  # the unprovable one was moved aside, not deleted


def test_a_flipped_byte_in_the_latest_checkpoint_falls_back_to_the_previous_one(
    trained, data, tmp_path, capsys
):
    run_dir = _copy(trained, tmp_path / "run")
    ckpts = run_dir / "group0" / "checkpoints"
    (_, older), (_, newest) = list_checkpoints(ckpts)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])
    shard.write_bytes(bytes(raw))
    assert latest_checkpoint(ckpts) == older
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "sha256" in err
    with pytest.raises(atomic.DamagedDirectory, match="sha256"):
        load_model_weights(newest, nn.Module())
    # predict serves the intact older checkpoint, never the damaged one
    p = predictions(run_dir, data)
    assert np.isfinite(p["logit"]).all()


def test_a_deleted_rank_file_is_reported_as_missing(trained, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    newest = latest_checkpoint(run_dir / "group0" / "checkpoints")
    (newest / "rank00000.pt").unlink()
    with pytest.raises(atomic.DamagedDirectory, match=r"missing \['rank00000.pt'\]"):
        atomic.verify(newest, KIND)


# -- nothing the project did not make is deleted -----------------------------------------------------------
def _user_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "thesis.tex").write_text("years of work")
    return d


@pytest.mark.parametrize("where", ["unrelated", "run_dir", "cwd", "root", "data"])
def test_exchange_dir_that_could_hold_user_files_is_refused_before_launch(data, tmp_path, where, monkeypatch):
    from recsys_codistill.train.launch import preflight

    run_dir = tmp_path / "run"
    target = {
        "unrelated": _user_files(tmp_path / "mine"),
        "run_dir": _user_files(run_dir),
        "cwd": _user_files(tmp_path / "cwd"),
        "root": Path("/"),
        "data": data,
    }[where]
    if where == "cwd":
        monkeypatch.chdir(target)
        target = Path(".")
    cfg = tiny_config(data, run_dir, "codistill.num_groups=2", f'codistill.exchange_dir="{target}"')
    with pytest.raises(ConfigError, match="codistill.exchange_dir"):
        preflight(cfg)
    if where in ("unrelated", "run_dir", "cwd"):
        assert (target / "thesis.tex").read_text() == "years of work"


def test_clearing_the_exchange_removes_only_what_the_project_wrote(tmp_path):
    root = tmp_path / "exchange"
    claim_root(root, tmp_path / "run")
    _tiny_version(root, 50)
    _tiny_version(root, 100, group=0)
    _user_files(root / "group1")
    (root / "group0" / "step_00000200").mkdir()  # not provably ours: no manifest
    clear_versions(root, 2)
    assert (root / "group1" / "thesis.tex").is_file() and (root / "group0" / "step_00000200").is_dir()
    assert not version_dir(root, 1, 50).exists() and not version_dir(root, 0, 100).exists()
    assert (root / ROOT_MARKER).is_file()  # the root stays while anything else is in it
    with pytest.raises(ValueError, match="not an exchange directory"):
        claim_root(_user_files(tmp_path / "mine"), tmp_path / "run")


def test_resume_false_removes_only_checkpoints_the_project_wrote(trained, data, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    ckpts = run_dir / "group0" / "checkpoints"
    _user_files(ckpts / "notes")
    run(tiny_config(data, run_dir, "train.max_steps=4", "checkpoint.resume=false", "data.valid_dir=''"))
    assert (ckpts / "notes" / "thesis.tex").is_file()
    assert [s for s, _ in list_checkpoints(ckpts)] == [4]


def test_atomic_commit_never_removes_a_directory_it_cannot_prove_it_made(tmp_path):
    final = _user_files(tmp_path / "step_00000001")
    tmp = atomic.begin(final, KIND)
    (tmp / "a.bin").write_bytes(b"1")
    atomic.commit(tmp, final, KIND, {"step": 1}, replace=True)
    aside = list(tmp_path.glob(".damaged-step_00000001-*"))
    assert len(aside) == 1 and (aside[0] / "thesis.tex").is_file()
    assert atomic.is_complete(final, KIND, {"step": 1})
    assert not atomic.remove_owned(aside[0], KIND)  # and it stays unremovable by the project


@pytest.mark.parametrize("where", ["root", "cwd", "home"])
def test_protected_paths(tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = {"root": "/", "cwd": ".", "home": "~"}[where]
    with pytest.raises(ValueError, match="refusing"):
        atomic.check_not_protected(path, "x", {})
    atomic.check_not_protected(tmp_path / "sub", "x", {})  # inside the working directory is fine


# -- a launch owns its run directory and its processes ------------------------------------------------------
def _launcher(cfg_path: Path) -> subprocess.Popen:
    code = (
        "import sys; from recsys_codistill.train.launch import launch; from recsys_codistill.config import load_config; "
        f"sys.exit(launch(load_config('{cfg_path}'), quiet=True))"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _worker_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"recsys_codistill.train.worker --config {run_dir}"], capture_output=True, text=True
    )
    return [int(x) for x in out.stdout.split()]


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        kids = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        todo += [int(k) for k in kids if int(k) not in out]
        out |= {int(k) for k in kids}
    return out


def _wait_for(cond, timeout: float = 60.0) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.dist
def test_one_launch_per_run_dir_workers_listen_on_loopback_only_and_die_with_the_launcher(data, tmp_path):
    from recsys_codistill.config import save_resolved
    from recsys_codistill.train.launch import launch

    run_dir = tmp_path / "run"
    cfg = tiny_config(data, run_dir, "sharding.nproc=2", "data.epochs=1000", "train.eval_every=0")
    cfg_path = save_resolved(cfg, tmp_path / "cfg")
    proc = _launcher(cfg_path)
    try:
        assert _wait_for(lambda: len(_worker_pids(run_dir)) == 2), "the workers never started"
        pids = _worker_pids(run_dir)
        # the workers read their launch's own config file, not the run's config.toml
        cmdline = Path(f"/proc/{pids[0]}/cmdline").read_text().split("\0")
        assert str(run_dir / "launches") in cmdline[cmdline.index("--config") + 1]
        # a second launch on the same run directory is refused, naming the holder
        with pytest.raises(ConfigError, match="in use by another recsys-codistill launch"):
            launch(cfg, quiet=True)
        # every listening socket of the workers is on loopback
        if shutil.which("ss"):
            assert _wait_for(lambda: (run_dir / "group0" / "metrics.jsonl").is_file())
            # the launcher's whole process tree: a torchrun agent's store would show up here too
            tree = _descendants(proc.pid)
            assert set(pids) <= tree
            ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
            mine = [line for line in ss if any(f"pid={p}," in line for p in tree)]
            assert mine, "no listening socket found for the workers (gloo listens on one)"
            for line in mine:
                local = line.split()[3]
                assert local.startswith(("127.", "[::1]", "::1")), line
        # kill -9 the launcher: its workers must not train on as orphans
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: not any(_alive(p) for p in pids), timeout=30), (
            "workers outlived the launcher"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _worker_pids(run_dir):
            os.kill(p, signal.SIGKILL)


@pytest.mark.dist
def test_a_non_finite_loss_stops_training_without_a_checkpoint(data, tmp_path):
    from recsys_codistill.train.launch import EXIT_NO_RESTART, launch

    cfg = tiny_config(
        data, tmp_path / "nan", "optim.dense_lr=1e30", "optim.sparse_lr=1e30", "train.max_steps=8",
        "checkpoint.every_steps=2", "sharding.max_restarts=2", "data.valid_dir=''",
    )  # fmt: skip
    assert launch(cfg, quiet=True) == EXIT_NO_RESTART  # and not restarted: it would replay into the same NaN
    log = (tmp_path / "nan" / "group0" / "launcher.log").read_text()
    assert "non-finite" in log or "NaN" in log
    if list_checkpoints(tmp_path / "nan" / "group0" / "checkpoints"):  # saved before it diverged: finite
        assert all(torch.isfinite(w).all() for w in weights(tmp_path / "nan").values())


@pytest.mark.dist
def test_a_failing_group_stops_the_others_and_its_exit_code_is_returned(data, tmp_path):
    from recsys_codistill.config import save_resolved

    run_dir = tmp_path / "run"
    cfg = tiny_config(
        data, run_dir, "codistill.num_groups=2", "codistill.burn_in_steps=4", "codistill.exchange_every=4",
        "data.epochs=1000", "train.eval_every=0", "codistill.data=shared",
    )  # fmt: skip
    proc = _launcher(save_resolved(cfg, tmp_path / "cfg"))
    try:
        assert _wait_for(lambda: len(_worker_pids(run_dir)) == 2), "the workers never started"
        group1 = subprocess.run(
            ["pgrep", "-f", f"recsys_codistill.train.worker --config {run_dir}.* --group 1"],
            capture_output=True,
            text=True,
        ).stdout.split()
        pids = _worker_pids(run_dir)
        os.kill(int(group1[0]), signal.SIGKILL)
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL
        assert _wait_for(lambda: not any(_alive(p) for p in pids), timeout=30), "group 0 trained on"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "damage", ["truncated-shard", "deleted-shard", "damaged-metadata", "deleted-manifest"]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(trained, tmp_path, damage, capsys):
    run_dir = _copy(trained, tmp_path / "run")
    ckpts = run_dir / "group0" / "checkpoints"
    (_, older), (_, newest) = list_checkpoints(ckpts)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "deleted-shard":
        shard.unlink()
    elif damage == "damaged-metadata":
        (newest / ".metadata").write_bytes(b"\x80\x04garbage")
    else:
        (newest / atomic.MANIFEST).unlink()
    assert latest_checkpoint(ckpts) == older
    if damage != "deleted-manifest":  # without a manifest it is not a checkpoint at all: silently ignored
        assert "skipping damaged checkpoint" in capsys.readouterr().err


def test_an_exchange_root_serves_one_run_only(data, tmp_path):
    from recsys_codistill.train.launch import preflight

    shared = tmp_path / "shared-exchange"
    claim_root(shared, tmp_path / "runA")
    _tiny_version(shared, 50)
    cfg = tiny_config(data, tmp_path / "runB", "codistill.num_groups=2", f'codistill.exchange_dir="{shared}"')
    with pytest.raises(ConfigError, match="belongs to the run"):
        preflight(cfg)
    with pytest.raises(ValueError, match="belongs to the run"):
        claim_root(shared, tmp_path / "runB")
    assert is_complete(version_dir(shared, 1, 50))  # run A's version is untouched


def test_checkpoints_without_a_manifest_are_never_loaded_nor_silently_started_over(trained, data, tmp_path):
    from recsys_codistill.train.launch import launch

    run_dir = _copy(trained, tmp_path / "run")
    for _, path in list_checkpoints(run_dir / "group0" / "checkpoints"):
        (path / atomic.MANIFEST).unlink()  # as an older version wrote them, or with the manifest lost
    log_before = (run_dir / "group0" / "metrics.jsonl").read_text()
    cfg = tiny_config(data, run_dir, "train.max_steps=12", "checkpoint.every_steps=4", "data.valid_dir=''")
    assert launch(cfg, quiet=True) != 0
    assert "refusing to start over silently" in (run_dir / "group0" / "launcher.log").read_text()
    assert (run_dir / "group0" / "metrics.jsonl").read_text() == log_before  # the log was not cut


def test_dcp_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    import dataclasses

    (tmp_path / "secret.bin").write_bytes(b"not yours")
    dcp_io.save({"w": torch.ones(2)}, tmp_path / "ckpt")
    meta = dcp_io.read_metadata_file(tmp_path / "ckpt" / ".metadata")
    meta.storage_data = {
        k: dataclasses.replace(v, relative_path="../secret.bin") for k, v in meta.storage_data.items()
    }
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(dcp_io.UnsafeCheckpointError, match="points at '../secret.bin'"):
        dcp_io.load({"w": torch.zeros(2)}, tmp_path / "ckpt", single_process=True)


def test_predictions_replace_only_an_earlier_predictions_file(tmp_path):
    from recsys_codistill.eval.predictions import write_predictions

    mine = tmp_path / "notes.parquet"
    mine.write_text("my own file")
    with pytest.raises(FileExistsError, match="not a predictions file"):
        write_predictions(mine, np.arange(3), np.zeros(3), np.zeros(3))
    assert mine.read_text() == "my own file"
    out = write_predictions(tmp_path / "p.parquet", np.arange(3), np.zeros(3), np.zeros(3))
    write_predictions(out, np.arange(3), np.ones(3), np.zeros(3))  # an earlier predictions file: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.parquet", "p.parquet"]  # no temp left


def test_a_codistillation_run_that_would_never_leave_burn_in_is_refused_before_launch(data, tmp_path):
    from recsys_codistill.train.launch import preflight

    # 8192 rows, split between 2 groups (disjoint data), 256 per step = 16 steps
    cfg = tiny_config(data, tmp_path / "r", "codistill.num_groups=2", "codistill.burn_in_steps=16")
    with pytest.raises(ConfigError, match=r"burn_in_steps = 16 >= the run's 16 training steps"):
        preflight(cfg)
    cfg = tiny_config(
        data, tmp_path / "r", "codistill.num_groups=2", "codistill.burn_in_steps=8", "train.max_steps=8"
    )
    with pytest.raises(ConfigError, match=r"burn_in_steps = 8 >= the run's 8 training steps"):
        preflight(cfg)
    preflight(tiny_config(data, tmp_path / "r", "codistill.num_groups=2", "codistill.burn_in_steps=15"))


def test_keep_exchange_keeps_every_version(tmp_path):
    from recsys_codistill.config import CodistillConfig
    from recsys_codistill.dist import DistContext

    ex = PeerExchange.__new__(PeerExchange)
    ex.cfg = CodistillConfig(num_groups=2, exchange_every=50, keep_versions=2, keep_exchange=True)
    ex.root, ex.group, ex.peers = tmp_path, 1, [0]
    ex.ctx = DistContext(0, 1, 0, torch.device("cpu"))
    for step in (50, 100, 150, 200):
        _tiny_version(tmp_path, step)
    ex._gc()
    assert [s for s in (50, 100, 150, 200) if is_complete(version_dir(tmp_path, 1, s))] == [50, 100, 150, 200]
    ex.cfg = CodistillConfig(num_groups=2, exchange_every=50, keep_versions=2)
    ex._gc()
    assert [s for s in (50, 100, 150, 200) if is_complete(version_dir(tmp_path, 1, s))] == [150, 200]
