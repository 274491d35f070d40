"""Start one torchrun per co-distilling group from a single command.

Groups never share a process group: each is its own torch.distributed world with its own rendezvous
(DESIGN §4), and they exchange models only through checkpoint directories. If any group fails (past
torchrun's ``--max-restarts``), the others are stopped and the failing group's exit code is returned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from recsys_codistill.config import RunConfig, save_resolved


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(cfg: RunConfig, config_path: Path, group: int) -> list[str]:
    s = cfg.sharding
    port = s.rdzv_port + group if s.rdzv_port else free_port(s.rdzv_host)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={s.nproc}",
        f"--nnodes={s.nnodes}",
        f"--node-rank={s.node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={s.rdzv_host}:{port}",
        f"--rdzv-id=recsys-codistill-group{group}",
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
    config_path = save_resolved(cfg, run_dir)
    env = dict(os.environ)
    # Each rank is one process; without this every rank starts one OpenMP thread per core and they fight.
    threads = cfg.sharding.threads or max(1, (os.cpu_count() or 1) // (cfg.sharding.nproc * cfg.codistill.num_groups))
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
    return 0
