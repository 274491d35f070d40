"""Start one torchrun per co-distilling group from a single command.

Groups never share a process group: each is its own torch.distributed world with its own rendezvous
(DESIGN §4), and they exchange models only through checkpoint directories. If any group fails (past
torchrun's ``--max-restarts``), the others are stopped and the failing group's exit code is returned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from recsys_codistill.config import ConfigError, RunConfig, save_resolved, to_toml
from recsys_codistill.features import prepare_vocab


def preflight(cfg: RunConfig) -> None:
    """Checks that would otherwise fail late, once per rank, inside torchrun."""
    from data_pipeline.loader import CriteoStream

    if not cfg.data.train_dir:
        raise ConfigError(
            "data.train_dir is not set (an ingested Parquet directory, see `recsys-codistill ingest`)"
        )
    if cfg.sharding.sharding_type == "row_wise" and not (
        cfg.sharding.device != "cpu" and torch_cuda_available()
    ):
        raise ConfigError(
            "sharding.sharding_type = 'row_wise' needs CUDA; TorchRec's CPU planner does not offer it"
        )
    if cfg.sharding.backend == "nccl" and not torch_cuda_available():
        raise ConfigError("sharding.backend = 'nccl' needs CUDA; use gloo (or auto) on CPU")
    world = cfg.sharding.nproc * cfg.sharding.nnodes
    # Reads the manifest and Parquet footers only (cheap), and sizes every (group, rank) worker's share: a
    # missing data set, a bad file or too few row groups for num_groups x ranks fails here, named.
    CriteoStream(
        cfg.data.train_dir,
        batch_size=cfg.data.batch_size // world,
        table_sizes=cfg.model.resolved_table_sizes(),
        num_groups=cfg.codistill.num_groups,
        world_size=world,
        shared=cfg.codistill.data == "shared" or cfg.codistill.num_groups == 1,
        epochs=cfg.data.epochs,
    )
    if cfg.data.valid_dir:
        CriteoStream(
            cfg.data.valid_dir,
            batch_size=8,
            table_sizes=cfg.model.resolved_table_sizes(),
            shuffle=False,
            drop_last=False,
        )


def check_resumable(cfg: RunConfig, vocab: object) -> None:
    """A checkpoint trained under another input mapping must be refused here, before config.toml is
    overwritten (the workers check too, but by then the run's recorded settings would be gone)."""
    from recsys_codistill.checkpoint import check_inputs, latest_checkpoint
    from recsys_codistill.features import input_fingerprint

    for g in range(cfg.codistill.num_groups):
        ckpt = latest_checkpoint(Path(cfg.run_dir) / f"group{g}" / "checkpoints")
        if ckpt is not None:
            try:
                check_inputs(ckpt, input_fingerprint(cfg, vocab))  # type: ignore[arg-type]
            except ValueError as e:
                raise ConfigError(str(e)) from e


def warn_if_config_changed(cfg: RunConfig, run_dir: Path) -> None:
    """Resuming under a changed config silently mixes two experiments: say which keys changed."""
    import difflib

    old = run_dir / "config.toml"
    if not old.is_file() or fresh_start(cfg):
        return
    new_text = to_toml(cfg)
    diff = [
        line
        for line in difflib.unified_diff(
            old.read_text().splitlines(), new_text.splitlines(), lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    if diff:
        print(
            f"recsys-codistill: warning: resuming {run_dir} with a config that differs from the one it was "
            "started with (the checkpoint was trained under the old values):\n  " + "\n  ".join(diff),
            file=sys.stderr,
        )


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def fresh_start(cfg: RunConfig) -> bool:
    """No group has a checkpoint to resume from."""
    from recsys_codistill.checkpoint import latest_checkpoint

    if not cfg.checkpoint.resume:
        return True
    return all(
        latest_checkpoint(Path(cfg.run_dir) / f"group{g}" / "checkpoints") is None
        for g in range(cfg.codistill.num_groups)
    )


def torchrun_command(cfg: RunConfig, config_path: Path, group: int) -> list[str]:
    s = cfg.sharding
    if s.nnodes == 1 and s.rdzv_port == 0:
        # Single node: torchrun's own store on a port it picks and holds, so concurrent runs (a study
        # trains several at once) can never meet in one rendezvous.
        rdzv = ["--standalone"]
    else:
        run_id = hashlib.sha256(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]
        rdzv = [
            f"--nnodes={s.nnodes}",
            f"--node-rank={s.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={s.rdzv_host}:{s.rdzv_port + group}",
            f"--rdzv-id=recsys-codistill-{run_id}-group{group}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={s.nproc}",
        *rdzv,
        f"--max-restarts={s.max_restarts}",
        "-m",
        "recsys_codistill.worker",
        "--config",
        str(config_path),
        "--group",
        str(group),
    ]


def launch(cfg: RunConfig, *, quiet: bool = False) -> int:
    """Run every group to completion; returns 0 or the first failing group's exit code."""
    run_dir = Path(cfg.run_dir)
    preflight(cfg)
    fresh = fresh_start(cfg)
    exchange = Path(cfg.codistill.exchange_dir or run_dir / "exchange")
    if cfg.codistill.num_groups > 1 and fresh and exchange.exists():
        # Versions left by an earlier attempt in this run directory must never serve as teachers.
        shutil.rmtree(exchange)
    if not cfg.checkpoint.resume:
        # Starting over in a used run directory: the earlier attempt's checkpoints (higher steps) would
        # otherwise outlive the new ones in keep-last-N pruning and be what `predict` loads.
        for old in sorted(run_dir.glob("group*/checkpoints")):
            print(f"recsys-codistill: checkpoint.resume = false: removing {old} of an earlier attempt", file=sys.stderr)
            shutil.rmtree(old)
    warn_if_config_changed(cfg, run_dir)
    # Counted here, once, before any worker starts: every rank of every group then loads the same file.
    vocab = prepare_vocab(cfg, fresh=fresh)
    if not fresh:
        check_resumable(cfg, vocab)
    config_path = save_resolved(cfg, run_dir)
    env = dict(os.environ)
    # Each rank is one process; without this every rank starts one OpenMP thread per core and they fight.
    threads = cfg.sharding.threads or max(
        1, (os.cpu_count() or 1) // (cfg.sharding.nproc * cfg.codistill.num_groups)
    )
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    procs: list[subprocess.Popen] = []
    logs = []
    for g in range(cfg.codistill.num_groups):
        (run_dir / f"group{g}").mkdir(parents=True, exist_ok=True)
        log = (run_dir / f"group{g}" / "launcher.log").open("ab")
        logs.append(log)
        out = log if quiet else None
        procs.append(subprocess.Popen(torchrun_command(cfg, config_path, g), env=env, stdout=out, stderr=out))
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for g, p in enumerate(procs):
                if p.poll() not in (None, 0) and failed is None:
                    failed = (g, p.returncode)
            if failed is not None:
                break
            time.sleep(0.5)
        for g, p in enumerate(procs):
            if failed is None and p.returncode not in (None, 0):
                failed = (g, p.returncode)
    except KeyboardInterrupt:
        failed = (-1, 130)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
    if failed is not None:
        g, code = failed
        print(
            f"recsys-codistill: group {g} failed with exit code {code}; see {run_dir / f'group{g}'} "
            "(launcher.log, metrics.jsonl) and the torchrun output above",
            file=sys.stderr,
        )
        return code or 1
    if cfg.codistill.num_groups > 1 and not cfg.codistill.keep_exchange and exchange.exists():
        shutil.rmtree(exchange)  # every group finished: no one will load these versions again
    return 0
