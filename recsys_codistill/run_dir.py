"""RunDir: the one owner of the names inside a run directory.

<run_dir>/config.toml            resolved config of the run (what predict and a resume read)
<run_dir>/vocab.parquet          rare-id vocabulary (data.min_id_count)
<run_dir>/.lock                  held by the launcher for its lifetime (one launch per run directory)
<run_dir>/launches/launch-*.toml the config a launch's workers read (theirs alone)
<run_dir>/exchange/              teacher versions (codistill.exchange_dir may move it)
<run_dir>/group{g}/              checkpoints/, metrics.jsonl, result.json, launcher.log
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class RunDirBusy(RuntimeError):
    """Another launcher holds this run directory."""


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.parquet"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def launches(self) -> Path:
        return self.root / "launches"

    def exchange(self, exchange_dir: str = "") -> Path:
        return Path(exchange_dir) if exchange_dir else self.root / "exchange"

    def group(self, g: int) -> Path:
        return self.root / f"group{g}"

    def checkpoints(self, g: int) -> Path:
        return self.group(g) / "checkpoints"

    def metrics(self, g: int) -> Path:
        return self.group(g) / "metrics.jsonl"

    def result(self, g: int) -> Path:
        return self.group(g) / "result.json"

    def launcher_log(self, g: int) -> Path:
        return self.group(g) / "launcher.log"

    def lock(self) -> IO[str]:
        """Take the run directory for this process (released when the returned file is closed or the
        process dies, kill -9 included: an flock, not a pid file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.lock_file.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunDirBusy(
                f"run directory {self.root} is in use by another recsys-codistill launch ({holder}); wait for "
                "it to finish or use another --run-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        return f
