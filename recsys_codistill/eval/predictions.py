"""Prediction files: the Parquet contract between ``predict``, ``eval`` and the study (torch-free).

Columns: ``row_id`` int64, ``label`` int8 (null on unlabelled rows), ``logit`` and ``probability``
float64, one row per input row, sorted by row id. Written atomically; non-finite logits are refused, so a
diverged model is never served.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_codistill.eval.metrics import sigmoid

PRED_COLUMNS: tuple[str, ...] = ("row_id", "label", "probability")


class Predictions:
    """One prediction file in memory: ids, labels (NaN = unlabelled) and probabilities."""

    def __init__(self, path: Path, row_id: np.ndarray, label: np.ndarray, probability: np.ndarray) -> None:
        self.path = path
        self.row_id = row_id
        self.label = label
        self.probability = probability


def _read_columns(path: Path, columns: Sequence[str], what: str) -> pa.Table:
    """Read ``columns`` of a Parquet file with errors that name the file and the missing column."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise ValueError(f"{what} file {path} is not a readable Parquet file: {exc}") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(
            f"{what} file {path} lacks column(s) {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(schema.names)})"
        )
    return pq.read_table(path, columns=list(columns))


def load_predictions(path: str | Path) -> Predictions:
    """Read and validate one prediction file."""
    path = Path(path)
    table = _read_columns(path, PRED_COLUMNS, "predictions")
    ids_col = table.column("row_id")
    if ids_col.null_count:
        raise ValueError(f"predictions file {path}: column 'row_id' has {ids_col.null_count} nulls")
    if not pa.types.is_integer(ids_col.type):
        raise ValueError(f"predictions file {path}: column 'row_id' must be integer, got {ids_col.type}")
    prob_col = table.column("probability")
    if prob_col.null_count:
        raise ValueError(f"predictions file {path}: column 'probability' has {prob_col.null_count} nulls")
    row_id = ids_col.to_numpy().astype(np.int64, copy=False)
    prob = pc.cast(prob_col, pa.float64()).to_numpy()
    if prob.size and (np.isnan(prob).any() or prob.min() < 0 or prob.max() > 1):
        raise ValueError(f"predictions file {path}: column 'probability' has NaN or values outside [0, 1]")
    # Nulls become NaN (= unlabelled); cast first so an int8 column with nulls converts cleanly.
    label = pc.cast(table.column("label"), pa.float64()).to_numpy(zero_copy_only=False)
    lab = label[np.isfinite(label)]
    if np.any((lab != 0) & (lab != 1)):
        raise ValueError(f"predictions file {path}: column 'label' must be 0/1 or null")
    return Predictions(path, row_id, label, prob)


def check_finite(logit: np.ndarray, what: str) -> None:
    """Refuse non-finite logits: a NaN/inf model output (diverged training, damaged weights) must never be
    served as a probability."""
    bad = int(np.count_nonzero(~np.isfinite(logit)))
    if bad:
        raise ValueError(
            f"{what}: {bad} of {logit.size} rows have a non-finite logit (NaN or inf); refusing to write "
            "predictions (the model's weights are probably non-finite: a diverged or damaged checkpoint)"
        )


def check_replaceable(path: Path) -> None:
    """A predictions file may replace an earlier predictions file, never anything else (a user's file, a
    data shard): the existing file must be a Parquet file with the predictions columns."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_file():
        raise FileExistsError(f"{path} exists and is not a predictions file; refusing to replace it")
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise FileExistsError(
            f"{path} exists and is not a predictions file ({e}); refusing to replace it"
        ) from e
    if not set(PRED_COLUMNS) <= set(names) or "logit" not in names:
        raise FileExistsError(
            f"{path} exists and is not a predictions file (columns {names}); refusing to replace it"
        )


def write_predictions(
    path: str | Path, row_id: np.ndarray, label: np.ndarray, logit: np.ndarray, *, what: str = ""
) -> Path:
    """Write one predictions file atomically. ``label`` NaN = unlabelled row, written as null; ``what``
    names the model in errors (default: the output path)."""
    path = Path(path)
    check_finite(logit, what or f"predictions for {path}")
    label = np.asarray(label, dtype=np.float64)
    missing = np.isnan(label)
    if np.any((label[~missing] != 0) & (label[~missing] != 1)):
        raise ValueError(f"{what or f'predictions for {path}'}: labels must be 0, 1 or NaN (unlabelled)")
    probability = sigmoid(logit)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "row_id": pa.array(row_id, pa.int64()),
            "label": pa.array(np.where(missing, 0, label).astype(np.int8), pa.int8(), mask=missing),
            "logit": pa.array(logit, pa.float64()),
            "probability": pa.array(probability, pa.float64()),
        }
    )
    check_replaceable(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # ours alone
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
