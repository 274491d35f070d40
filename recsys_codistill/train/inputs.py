"""How a run turns ingested rows into model inputs: the loader options that are part of the *model*.

Table sizes, id mapping, dense buckets and the rare-id vocabulary decide which table row an id reaches, so
training, in-training evaluation, prediction and a peer's teacher copy must all use the same ones:
:class:`InputMapping` is the one place that reads them from a config. The vocabulary is counted once, by
the launcher on a fresh start, from ``data.train_dir`` and saved as ``<run_dir>/vocab.parquet``; a resumed
run, ``predict`` and ``eval`` reuse that file unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import vocab as vocab_lib
from data_pipeline.loader import describe_changes
from data_pipeline.vocab import IdVocabulary
from recsys_codistill.config import ConfigError, RunConfig
from recsys_codistill.run_dir import RunDir


def vocab_path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).vocab


def prepare_vocab(cfg: RunConfig, *, fresh: bool) -> IdVocabulary | None:
    """Before any worker starts. A fresh start counts ids in ``data.train_dir`` and saves the vocabulary
    with the run (removing a stale one when the threshold is off). A resume must map ids exactly as its
    checkpoint was trained, so it reuses the saved file and refuses a threshold that was switched on, off or
    changed since (the embedding rows of every kept id would move: 1 + id % (n-1) vs 2 + id % (n-2))."""
    path = vocab_path(cfg.run_dir)
    if fresh:
        if cfg.data.min_id_count == 0:
            path.unlink(missing_ok=True)
            return None
        vocab = vocab_lib.build(cfg.data.train_dirs, cfg.data.min_id_count)
        vocab.save(path)
        return vocab
    if cfg.data.min_id_count == 0:
        if path.is_file():
            raise ConfigError(
                f"{cfg.run_dir} was trained with a rare-id vocabulary ({path}); resuming it needs the same "
                "data.min_id_count (or start a new run directory)"
            )
        return None
    try:
        return load_vocab(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"cannot resume {cfg.run_dir} with data.min_id_count = {cfg.data.min_id_count}: {e}. Its checkpoints "
            "were trained with another id mapping; keep the original setting or start a new run directory"
        ) from e


def load_vocab(cfg: RunConfig) -> IdVocabulary | None:
    """The run's saved vocabulary (None when ``data.min_id_count`` is 0)."""
    if cfg.data.min_id_count == 0:
        return None
    path = vocab_path(cfg.run_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: data.min_id_count = {cfg.data.min_id_count} needs the id vocabulary that "
            "`recsys-codistill train` saves in the run directory"
        )
    vocab = IdVocabulary.load(path)
    if vocab.min_count != cfg.data.min_id_count:
        raise ValueError(
            f"{path} keeps ids seen >= {vocab.min_count} times; the config says data.min_id_count = {cfg.data.min_id_count}"
        )
    return vocab


@dataclass(frozen=True)
class InputMapping:
    """How rows become model inputs: the one value that streams, models, predict and teachers receive.

    Table sizes, id mapping, dense buckets and the rare-id vocabulary decide which table row each id
    reaches; a checkpoint records :meth:`fingerprint` and a load with another mapping is refused, naming the
    keys that differ.
    """

    table_sizes: tuple[int, ...]
    id_mapping: str = "mod"
    dense_buckets: int = 0
    vocab: IdVocabulary | None = None
    min_id_count: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, vocab: IdVocabulary | None = None) -> InputMapping:
        """The run's mapping; the vocabulary is the one saved with the run unless ``vocab`` is given."""
        return cls(
            table_sizes=cfg.model.resolved_table_sizes(),
            id_mapping=cfg.data.id_mapping,
            dense_buckets=cfg.model.dense_buckets,
            vocab=vocab if vocab is not None else load_vocab(cfg),
            min_id_count=cfg.data.min_id_count,
        )

    def stream_options(self) -> dict[str, Any]:
        """``CriteoStream`` keyword arguments."""
        return {
            "table_sizes": self.table_sizes,
            "id_mapping": self.id_mapping,
            "dense_buckets": self.dense_buckets,
            "vocab": self.vocab,
        }

    def fingerprint(self) -> dict[str, Any]:
        """What decides which table row each input reaches (JSON), stored with every checkpoint."""
        digest = None
        if self.vocab is not None:
            h = hashlib.sha256()
            for kept in self.vocab.kept:
                h.update(len(kept).to_bytes(8, "little"))
                h.update(kept.astype("<u4").tobytes())
            digest = h.hexdigest()
        return {
            "table_sizes": list(self.table_sizes),
            "id_mapping": self.id_mapping,
            "dense_buckets": self.dense_buckets,
            "min_id_count": self.min_id_count,
            "vocab_sha256": digest,
        }

    def check(self, saved: dict[str, Any], where: str | Path) -> None:
        """Raise ValueError naming every key where ``saved`` (a checkpoint's record) differs from this."""
        check_fingerprint(saved, self.fingerprint(), where)


def check_fingerprint(saved: dict[str, Any], now: dict[str, Any], where: str | Path) -> None:
    changes = describe_changes(saved, now)
    if changes:
        raise ValueError(
            f"{where} was trained with other model inputs; (checkpoint, now): {changes}. Use the run's "
            "original settings (and vocab.parquet), or start a new run directory"
        )
