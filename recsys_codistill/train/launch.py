"""Start every co-distilling group from a single command, and supervise it.

Groups never share a process group: each is its own torch.distributed world with its own rendezvous
(docs/architecture.md), and they exchange models only through checkpoint directories. If any group fails (past
``sharding.max_restarts``), the others are stopped and the failing group's exit code is returned.

Single node (``nnodes = 1``, the default): the launcher starts the ranks itself. They meet through a
``FileStore`` in the run directory and gloo/nccl sockets on the loopback interface, so nothing listens on
the network (torch elastic's TCP store binds every interface and is unauthenticated). A rank that dies
restarts its whole group (torchrun's semantics) from the latest checkpoint, up to ``max_restarts`` times.

Multi-node: one ``torchrun`` per group with the c10d rendezvous at ``sharding.rdzv_host:rdzv_port + g``.
Its store listens on all interfaces of the host node: run it on a private network or behind a firewall
that admits only the other nodes (README, "Trust model").

Every child is in its own session and dies with the launcher (``PR_SET_PDEATHSIG``), kill -9 included;
the run directory is locked for the launcher's lifetime, and the workers read a config file of their own
launch, so two commands can never mix in one run directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from recsys_codistill import atomic
from recsys_codistill.config import ConfigError, RunConfig, save_resolved, to_toml
from recsys_codistill.run_dir import RunDir, RunDirBusy
from recsys_codistill.train.inputs import prepare_vocab


def training_steps(cfg: RunConfig) -> tuple[int, int]:
    """(steps the run trains, batches its data holds per group). Reads the manifest and Parquet footers only
    (cheap) and sizes every (group, rank) worker's share: a missing data set, a bad file or too few row
    groups for num_groups x ranks fails here, named."""
    from data_pipeline.loader import CriteoStream

    stream = CriteoStream(
        cfg.data.train_dirs,
        batch_size=cfg.data.batch_size // (cfg.sharding.nproc * cfg.sharding.nnodes),
        table_sizes=cfg.model.resolved_table_sizes(),
        num_groups=cfg.codistill.num_groups,
        world_size=cfg.sharding.nproc * cfg.sharding.nnodes,
        shared=cfg.codistill.data == "shared" or cfg.codistill.num_groups == 1,
        epochs=cfg.data.epochs,
    )
    batches = stream.num_batches()
    return min(batches, cfg.train.max_steps or batches), batches


def check_burn_in(cfg: RunConfig) -> int:
    """The run's step count; refuses a codistillation run whose burn-in covers every step, naming both."""
    steps, batches = training_steps(cfg)
    c = cfg.codistill
    if c.num_groups > 1 and c.distill_weight > 0 and c.burn_in_steps >= steps:
        # Every step would be burn-in: a "codistillation" run that is a plain baseline in disguise.
        raise ConfigError(
            f"codistill.burn_in_steps = {c.burn_in_steps} >= the run's {steps} training steps "
            f"({batches} batches of data.batch_size {cfg.data.batch_size} over data.epochs "
            f"{cfg.data.epochs}, train.max_steps {cfg.train.max_steps}): codistillation would never start; "
            "lower the burn-in or train longer"
        )
    return steps


def preflight(cfg: RunConfig) -> None:
    """Checks that would otherwise fail late, once per rank, inside torchrun."""
    from data_pipeline.loader import CriteoStream

    if not cfg.data.train_dirs:
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
    if cfg.codistill.num_groups > 1:
        check_exchange_dir(cfg)
    check_burn_in(cfg)
    if cfg.data.valid_dir:
        CriteoStream(
            cfg.data.valid_dir,
            batch_size=8,
            table_sizes=cfg.model.resolved_table_sizes(),
            shuffle=False,
            drop_last=False,
        )


def check_exchange_dir(cfg: RunConfig) -> Path:
    """The exchange root is cleaned of old versions, so it may not be (or contain) anything the user needs:
    refused if it equals or contains the run directory, a data directory, the working directory, the home
    directory or a filesystem root, if it lies inside a data directory, or if it holds files this project
    did not write."""
    from recsys_codistill.codistill.exchange import ROOT_MARKER, root_owner

    root = RunDir(cfg.run_dir).exchange(cfg.codistill.exchange_dir)
    data = {f"data.train_dir {d}": d for d in cfg.data.train_dirs}
    data["data.valid_dir"] = cfg.data.valid_dir
    try:
        resolved = atomic.check_not_protected(
            root, "codistill.exchange_dir", {"the run directory": cfg.run_dir, **data}
        )
        for name, q in data.items():
            if q and Path(q).resolve() in resolved.parents:
                raise ValueError(
                    f"codistill.exchange_dir = {root} lies inside {name} ({q}); choose another place"
                )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    owner = root_owner(root)
    inside_run = Path(cfg.run_dir).resolve() in root.resolve().parents  # moves with its run directory
    if owner is not None and owner != str(Path(cfg.run_dir).resolve()) and not inside_run:
        raise ConfigError(
            f"codistill.exchange_dir = {root} belongs to the run {owner}; every run needs its own exchange "
            "directory (two runs in one would clear and serve each other's versions)"
        )
    if root.exists() and not (root / ROOT_MARKER).is_file() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            f"codistill.exchange_dir = {root} exists and is not an exchange directory made by recsys-codistill "
            f"(no {ROOT_MARKER}); it may hold your files: choose a new or empty directory"
        )
    return root


def check_resumable(cfg: RunConfig, vocab: object) -> None:
    """A checkpoint trained under another input mapping must be refused here, before config.toml is
    overwritten (the workers check too, but by then the run's recorded settings would be gone)."""
    from recsys_codistill.train.checkpoint import check_inputs, latest_checkpoint
    from recsys_codistill.train.inputs import InputMapping

    for g in range(cfg.codistill.num_groups):
        # Only inputs.json is read here; the worker hashes and verifies the checkpoint it loads (and warns
        # about damaged ones), so the launcher does not read every checkpoint file a second time.
        ckpt = latest_checkpoint(RunDir(cfg.run_dir).checkpoints(g), checksums=False, warn=False)
        if ckpt is not None:
            try:
                check_inputs(ckpt, InputMapping.from_config(cfg, vocab))  # type: ignore[arg-type]
            except ValueError as e:
                raise ConfigError(str(e)) from e


def check_teacher_runs(cfg: RunConfig, vocab: object, fresh: bool) -> None:
    """The runs a training reads (``anchor.run``, ``train.init_from``) must be trained runs with an intact
    checkpoint and this run's input mapping: refused here, naming the differing keys, before any worker."""
    from recsys_codistill import dist
    from recsys_codistill.codistill.fixed import teacher_checkpoint
    from recsys_codistill.train.checkpoint import check_inputs
    from recsys_codistill.train.inputs import InputMapping

    for what, run, group, needed in (
        ("anchor.run", cfg.anchor.run, cfg.anchor.group, cfg.anchor.weight > 0),
        # a resumed run continues from its own checkpoint: the warm-start source is not read again
        ("train.init_from", cfg.train.init_from, cfg.train.init_group, fresh),
    ):
        if not run or not needed:
            continue
        if Path(run).resolve() == Path(cfg.run_dir).resolve():
            raise ConfigError(f"{what} = {run} is this run's own directory; name the run to read from")
        try:
            check_inputs(teacher_checkpoint(run, group, what), InputMapping.from_config(cfg, vocab))  # type: ignore[arg-type]
        except (ValueError, dist.FatalError) as e:
            raise ConfigError(f"{what}: {e}" if what not in str(e) else str(e)) from e
        if what == "train.init_from":
            # the same weights under another activation load without error (same state dict): say so
            from recsys_codistill.config import load_config

            src = load_config(RunDir(run).config).model
            changed = [k for k in ("activation", "smelu_beta") if getattr(src, k) != getattr(cfg.model, k)]
            if changed:
                print(
                    f"recsys-codistill: warning: train.init_from = {run} was trained with "
                    + ", ".join(f"model.{k} = {getattr(src, k)!r}" for k in changed)
                    + f"; this run uses {', '.join(repr(getattr(cfg.model, k)) for k in changed)}",
                    file=sys.stderr,
                )


def warn_if_config_changed(cfg: RunConfig, run_dir: Path) -> None:
    """Resuming under a changed config silently mixes two experiments: say which keys changed."""
    import difflib

    old = RunDir(run_dir).config
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
    from recsys_codistill.train.checkpoint import list_checkpoints, unverifiable_checkpoints

    if not cfg.checkpoint.resume:
        return True
    # Every checkpoint directory counts, damaged or unverifiable too: the workers fall back past damaged
    # ones or refuse to start over silently, where a fresh start would clear the exchange and the log.
    rd = RunDir(cfg.run_dir)
    return all(
        not list_checkpoints(rd.checkpoints(g)) and not unverifiable_checkpoints(rd.checkpoints(g))
        for g in range(cfg.codistill.num_groups)
    )


WORKER_MODULE = "recsys_codistill.train.worker"
STORE_ENV = "RECSYS_CODISTILL_STORE"  # FileStore path of a launcher-spawned group (worker.py reads it)
EXIT_NO_RESTART = 3  # a worker's "restarting would fail the same way" (dist.FatalError and refused loads)


def die_with_parent() -> None:
    """Get SIGKILL when the parent process dies (Linux ``PR_SET_PDEATHSIG``), so a worker under torchrun
    does not outlive its agent. Elsewhere a no-op. (The launcher's own children get the same from
    ``_CHILD_PRELUDE`` before exec.)"""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# Run in the child before the real command: the death signal survives exec, and setting it in the child
# itself avoids subprocess's preexec_fn, which is unsafe in threaded programs (a study launches from threads).
_CHILD_PRELUDE = (  # self-contained (no project import: that would load torch once more per child)
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('recsys-codistill: the launcher is gone; not starting')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def worker_command(config_path: Path, group: int) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, "--config", str(config_path), "--group", str(group)]


def torchrun_command(cfg: RunConfig, config_path: Path, group: int) -> list[str]:
    """Multi-node: torchrun with the c10d rendezvous on ``rdzv_host:rdzv_port + group``."""
    s = cfg.sharding
    run_id = hashlib.sha256(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={s.nproc}",
        f"--nnodes={s.nnodes}",
        f"--node-rank={s.node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={s.rdzv_host}:{s.rdzv_port + group}",
        f"--rdzv-id=recsys-codistill-{run_id}-group{group}",
        f"--max-restarts={s.max_restarts}",
        *worker_command(config_path, group)[1:],
    ]


def _spawn(cmd: list[str], env: dict[str, str], out: object) -> subprocess.Popen:
    # Own session: a terminal's Ctrl-C reaches the launcher only, which stops the children in order, and a
    # child's whole session (its own helper processes too) can be signalled at once.
    wrapped = [sys.executable, "-c", _CHILD_PRELUDE, str(os.getpid()), *cmd]
    return subprocess.Popen(wrapped, env=env, stdout=out, stderr=out, start_new_session=True)


def _signal_session(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM every child's session, then SIGKILL whatever is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            _signal_session(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_session(p, signal.SIGKILL)  # stragglers of a session whose leader already exited, too
        if p.poll() is None:
            p.wait()


def exit_code(code: int) -> int:
    """A shell-style status: -N (killed by signal N) becomes 128 + N."""
    return code if code >= 0 else 128 - code


class Group:
    """One group's processes: ``nproc`` ranks spawned here (single node) or one torchrun (multi-node)."""

    def __init__(
        self, cfg: RunConfig, group: int, config_path: Path, env: dict[str, str], out: object
    ) -> None:
        self.cfg, self.group, self.config_path, self.env, self.out = cfg, group, config_path, env, out
        self.own_ranks = cfg.sharding.nnodes == 1
        self.restarts = 0
        self.procs: list[subprocess.Popen] = []
        self.store: Path | None = None

    def start(self) -> None:
        if not self.own_ranks:
            self.procs = [
                _spawn(torchrun_command(self.cfg, self.config_path, self.group), self.env, self.out)
            ]
            return
        # A fresh store file per attempt: a FileStore keeps every key it was ever given.
        self.store = self.config_path.with_name(
            f"{self.config_path.stem}.group{self.group}.try{self.restarts}.store"
        )
        n = self.cfg.sharding.nproc
        self.procs = []
        for r in range(n):
            env = {
                **self.env,
                STORE_ENV: str(self.store),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "GROUP_RANK": "0",
                "TORCHELASTIC_RESTART_COUNT": str(self.restarts),
            }
            self.procs.append(_spawn(worker_command(self.config_path, self.group), env, self.out))

    def poll(self) -> int | None:
        """None while running, else the group's exit code (0 = every rank finished). A failed rank stops
        its group; with restarts left, the whole group starts again and resumes from its checkpoint."""
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if not failed:
            return 0 if all(c == 0 for c in codes) else None
        self.stop()
        if (
            self.own_ranks
            and self.restarts < self.cfg.sharding.max_restarts
            and EXIT_NO_RESTART not in failed
        ):
            self.restarts += 1
            print(
                f"recsys-codistill: group {self.group}: a rank exited with code {exit_code(failed[0])}; "
                f"restarting the group ({self.restarts}/{self.cfg.sharding.max_restarts})",
                file=sys.stderr,
                flush=True,
            )
            self.start()
            return None
        return exit_code(failed[0])

    def stop(self) -> None:
        stop_all(self.procs)
        if self.store is not None:
            self.store.unlink(missing_ok=True)  # the launcher's own file


def launch(cfg: RunConfig, *, quiet: bool = False) -> int:
    """Run every group to completion; returns 0 or the first failing group's exit code."""
    preflight(cfg)
    rd = RunDir(cfg.run_dir)
    try:
        lock = rd.lock()
    except RunDirBusy as e:
        raise ConfigError(str(e)) from None
    try:
        return _launch_locked(cfg, rd, quiet)
    finally:
        lock.close()


def _clean_earlier_attempt(cfg: RunConfig, rd: RunDir, fresh: bool) -> None:
    """Remove what an earlier attempt in this run directory left and must not be reused, and only what this
    project provably wrote (checkpoints and versions carry its manifest, the exchange root its marker)."""
    from recsys_codistill.codistill.exchange import claim_root, clear_versions
    from recsys_codistill.train.checkpoint import KIND, list_checkpoints

    if cfg.codistill.num_groups > 1:
        root = rd.exchange(cfg.codistill.exchange_dir)
        if fresh:
            clear_versions(root, cfg.codistill.num_groups)  # never serve an earlier attempt's versions
        claim_root(root, cfg.run_dir)
    if not cfg.checkpoint.resume:
        # Starting over in a used run directory: the earlier attempt's checkpoints (higher steps) would
        # otherwise outlive the new ones in keep-last-N pruning and be what `predict` loads.
        for g in range(cfg.codistill.num_groups):
            old = list_checkpoints(rd.checkpoints(g))
            if old:
                print(
                    f"recsys-codistill: checkpoint.resume = false: removing {len(old)} checkpoint(s) of an earlier "
                    f"attempt under {rd.checkpoints(g)}",
                    file=sys.stderr,
                )
            for _, path in old:
                atomic.remove_owned(path, KIND)


def _launch_locked(cfg: RunConfig, rd: RunDir, quiet: bool) -> int:
    fresh = fresh_start(cfg)
    _clean_earlier_attempt(cfg, rd, fresh)
    warn_if_config_changed(cfg, rd.root)
    # Counted here, once, before any worker starts: every rank of every group then loads the same file.
    vocab = prepare_vocab(cfg, fresh=fresh)
    if not fresh:
        check_resumable(cfg, vocab)
    check_teacher_runs(cfg, vocab, fresh)
    save_resolved(cfg, rd.root)  # the run's record (predict, resume)
    # The workers' own copy: a file no other launch writes, so they train exactly what this launch resolved.
    rd.launches.mkdir(exist_ok=True)
    for stale in rd.launches.glob("launch-*"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()  # left by a launcher killed earlier (we hold the lock: no one else uses them)
    config_path = rd.launches / f"launch-{int(time.time())}-{os.getpid()}-{secrets.token_hex(3)}.toml"
    config_path.write_text(to_toml(cfg))
    env = dict(os.environ)
    # Each rank is one process; without this every rank starts one OpenMP thread per core and they fight.
    threads = cfg.sharding.threads or max(
        1, (os.cpu_count() or 1) // (cfg.sharding.nproc * cfg.codistill.num_groups)
    )
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    if cfg.sharding.nnodes == 1:
        # Collective sockets on loopback only: nothing of a single-node run is reachable from the network.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    groups: list[Group] = []
    logs = []
    failed: tuple[int, int] | None = None
    try:
        for g in range(cfg.codistill.num_groups):
            rd.group(g).mkdir(parents=True, exist_ok=True)
            log = rd.launcher_log(g).open("ab")
            logs.append(log)
            groups.append(Group(cfg, g, config_path, env, log if quiet else None))
        for grp in groups:  # tracked before anything is spawned: an interrupt mid-way leaves no orphan
            grp.start()
        done: set[int] = set()
        while failed is None and len(done) < len(groups):
            for g, grp in enumerate(groups):
                code = None if g in done else grp.poll()
                if code == 0:
                    done.add(g)
                elif code is not None:
                    failed = (g, code)
                    break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = (-1, 130)
    finally:
        # every session gets SIGTERM at once, then one shared grace period (not 30 s per group in turn)
        stop_all([p for grp in groups for p in grp.procs])
        for grp in groups:
            grp.stop()  # reaped already; drops the store files
        for log in logs:
            log.close()
        config_path.unlink(missing_ok=True)
    if failed is not None:
        g, code = failed
        if g < 0:
            print(
                "recsys-codistill: interrupted; every group was stopped (re-running resumes from the "
                "latest checkpoint, if any)",
                file=sys.stderr,
            )
        else:
            print(
                f"recsys-codistill: group {g} failed with exit code {code}; see {rd.group(g)} (launcher.log, "
                "metrics.jsonl) and the output above",
                file=sys.stderr,
            )
        return code or 1
    if cfg.codistill.num_groups > 1 and not cfg.codistill.keep_exchange:
        # Every group finished: no one will load these versions again (only ours are removed).
        from recsys_codistill.codistill.exchange import clear_versions

        clear_versions(rd.exchange(cfg.codistill.exchange_dir), cfg.codistill.num_groups)
    return 0
