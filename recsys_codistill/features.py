"""How a run turns ingested rows into model inputs: the loader options that are part of the *model*.

Table sizes, id mapping, dense buckets and the rare-id vocabulary decide which table row an id reaches, so
training, in-training evaluation, prediction and a peer's teacher copy must all use the same ones:
:func:`stream_options` is the one place that reads them from a config. The vocabulary is counted once, by
the launcher on a fresh start, from ``data.train_dir`` and saved as ``<run_dir>/vocab.parquet``; a resumed
run, ``predict`` and ``eval`` reuse that file unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline import vocab as vocab_lib
from data_pipeline.vocab import IdVocabulary
from recsys_codistill.config import RunConfig

VOCAB_FILE = "vocab.parquet"


def vocab_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / VOCAB_FILE


def prepare_vocab(cfg: RunConfig, *, rebuild: bool) -> IdVocabulary | None:
    """Count ids in ``data.train_dir`` and save the vocabulary with the run (``rebuild``: a fresh start),
    or check the saved one is there (a resume must keep the vocabulary its checkpoint was trained with)."""
    if cfg.data.min_id_count == 0:
        return None
    path = vocab_path(cfg.run_dir)
    if not rebuild and path.is_file():
        return IdVocabulary.load(path)
    vocab = vocab_lib.build(cfg.data.train_dir, cfg.data.min_id_count)
    vocab.save(path)
    return vocab


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


def stream_options(cfg: RunConfig, vocab: IdVocabulary | None = None) -> dict[str, Any]:
    """``CriteoStream`` keyword arguments that map rows to table rows (pass a loaded ``vocab`` to reuse it)."""
    return {
        "table_sizes": cfg.model.resolved_table_sizes(),
        "id_mapping": cfg.data.id_mapping,
        "dense_buckets": cfg.model.dense_buckets,
        "vocab": vocab if vocab is not None else load_vocab(cfg),
    }
