"""``metrics.jsonl``: the training log of one group (rank 0 writes it), continued exactly across resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _before(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl record stays when resuming at ``resume_step``: results of steps up to it do;
    a re-initialisation logged at ``resume_step`` happens after that checkpoint, so it is replayed."""
    rec = json.loads(line)
    step = rec.get("step", 0)
    return step < resume_step if rec.get("event") == "reinit_embeddings" else step <= resume_step


class MetricsLog:
    """``metrics.jsonl`` on rank 0: one JSON object per line. A resumed run continues the file from its
    checkpoint's step: records of the steps it is about to replay are dropped, so no step appears twice."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                lines = path.read_text().splitlines()
                kept = [line for line in lines if line.strip() and _before(line, resume_step)]
                path.write_text("".join(line + "\n" for line in kept))
            self.f = path.open("a")

    def write(self, **record: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
