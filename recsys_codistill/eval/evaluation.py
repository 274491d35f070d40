"""Evaluate prediction files: per-model quality metrics and churn between every pair of models.

Input: Parquet prediction files (written by the ``predict`` command) with columns ``row_id`` int64,
``label`` (int8/float, null for unlabelled rows), ``logit`` and ``probability`` float64. Only
``row_id``, ``label`` and ``probability`` are read.

:func:`evaluate` returns a JSON-serialisable dict (the contract of ``recsys-codistill eval``)::

    {"schema": "recsys_codistill.eval/1",
     "threshold": ..., "threshold_source": ...,
     "models": [{"name", "path", "rows", "labelled_rows", "base_rate", "mean_probability",
                 "auc", "log_loss", "normalized_entropy", "calibration", "label_metrics"}, ...],
     "pairs":  [{"a", "b", **churn_report(...)}, ...],          # every i < j
     "feature": "C1" or None, "feature_reference": ..., "warnings": [...]}

A file without labelled rows (``predict`` on an unlabelled data set writes ``label`` null on every row)
gets no label metrics: ``base_rate``, ``auc``, ``log_loss``, ``normalized_entropy`` and ``calibration``
are None and ``label_metrics`` says why; churn between files needs no labels and is still computed.

:func:`format_table` renders it as plain text, :func:`write_json` saves it.

:func:`ensemble_probabilities` / :func:`ensemble_logits` are the one ensemble of the project (the paper's
ensemble row: the mean of the members' probabilities), used by ``predict`` and by the study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.manifest import MANIFEST, data_files
from recsys_codistill.eval import metrics
from recsys_codistill.eval.churn import align, check_threshold, churn_report
from recsys_codistill.eval.predictions import Predictions, _read_columns, load_predictions

__all__ = [
    "EVAL_SCHEMA",
    "ensemble_logits",
    "ensemble_probabilities",
    "evaluate",
    "format_table",
    "load_predictions",
    "write_json",
]

EVAL_SCHEMA = "recsys_codistill.eval/1"
# Missing categorical values become this sentinel (outside uint32), so "missing" is one frequent value.
MISSING_FEATURE = -1


def ensemble_probabilities(member_probabilities: Sequence[Any]) -> np.ndarray:
    """Row-wise mean of the members' predicted probabilities (the paper's ensemble).

    Parameters
    ----------
    member_probabilities : sequence of array-like of shape (n_rows,)
        One probability vector per member, all on the same rows in the same order.

    Returns
    -------
    numpy.ndarray of shape (n_rows,)
        The ensemble's probabilities.
    """
    members = list(member_probabilities)
    if not members:
        raise ValueError("an ensemble needs at least one member")
    sizes = {np.shape(m) for m in members}
    if len(sizes) > 1:
        raise ValueError(f"ensemble members have different shapes: {sorted(sizes)}")
    return np.mean(members, axis=0)


def ensemble_logits(member_logits: Sequence[Any]) -> np.ndarray:
    """The ensemble of members given as logits, as a logit: ``logit(mean(sigmoid(z_i)))``.

    Probabilities are averaged (:func:`ensemble_probabilities`), not logits, and the mean is clipped to
    ``[1e-12, 1 - 1e-12]`` before the log-odds (:func:`~recsys_codistill.eval.metrics.logit`), so the result is
    finite.

    Parameters
    ----------
    member_logits : sequence of array-like of shape (n_rows,)
        One logit vector per member, all on the same rows in the same order.

    Returns
    -------
    numpy.ndarray of shape (n_rows,)
        The ensemble's logits.
    """
    return metrics.logit(ensemble_probabilities([metrics.sigmoid(z) for z in member_logits]))


def _model_metrics(name: str, pred: Predictions, warnings: list[str]) -> dict[str, Any]:
    mask = np.isfinite(pred.label)
    y = pred.label[mask].astype(np.bool_)
    p = pred.probability[mask]
    rows, labelled = int(pred.row_id.size), int(mask.sum())
    out: dict[str, Any] = {
        "name": name,
        "path": str(pred.path),
        "rows": int(pred.row_id.size),
        "labelled_rows": int(mask.sum()),
        "mean_probability": float(pred.probability.mean()) if pred.probability.size else None,
        "base_rate": None,
        "auc": None,
        "log_loss": None,
        "normalized_entropy": None,
        "calibration": None,
        # Which rows the label metrics cover, or why there are none (never scored against made-up labels).
        "label_metrics": f"on all {rows} rows"
        if labelled == rows
        else f"on the {labelled} labelled of {rows} rows",
    }
    if y.size == 0:
        out["label_metrics"] = (
            "skipped: no labelled rows (label is null on every row: unlabelled data); "
            "base rate, AUC, log loss, NE and calibration are not computed"
        )
        warnings.append(f"{name}: no labelled rows, quality metrics skipped")
        return out
    out["base_rate"] = metrics.base_rate(y)
    out["log_loss"] = metrics.log_loss(y, p)
    # AUC, NE and calibration are undefined on one-class labels: report None and say why.
    for key, fn in (
        ("auc", metrics.roc_auc),
        ("normalized_entropy", metrics.normalized_entropy),
        ("calibration", metrics.calibration),
    ):
        try:
            out[key] = fn(y, p)
        except ValueError as exc:
            warnings.append(f"{name}: {key} undefined ({exc})")
    return out


def _load_feature(data_dir: Path, feature: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, feature value) of every row of an ingested Parquet directory; nulls -> MISSING_FEATURE."""
    files = data_files(data_dir)  # the one manifest reader: entries may not lead outside data_dir
    if not files:
        raise ValueError(f"{data_dir / MANIFEST}: lists no files")
    ids, vals = [], []
    for path in files:
        table = _read_columns(path, ("row_id", feature), "data")
        ids.append(table.column("row_id").to_numpy().astype(np.int64, copy=False))
        col = pc.cast(table.column(feature), pa.int64()).fill_null(MISSING_FEATURE)
        vals.append(col.to_numpy())
    return np.concatenate(ids), np.concatenate(vals)


def _feature_for_rows(
    data_ids: np.ndarray, data_vals: np.ndarray, row_id: np.ndarray, feature: str
) -> np.ndarray:
    order = np.argsort(data_ids, kind="stable")
    sid = data_ids[order]
    pos = np.minimum(np.searchsorted(sid, row_id), max(sid.size - 1, 0))
    found = sid[pos] == row_id if sid.size else np.zeros(row_id.size, dtype=np.bool_)
    if not found.all():
        missing = row_id[~found]
        raise ValueError(
            f"{missing.size} of {row_id.size} predicted row ids are not in the data directory "
            f"(needed for feature {feature!r}); e.g. row_id {int(missing[0])}"
        )
    return data_vals[order[pos]]


def _default_names(paths: Sequence[Path]) -> list[str]:
    names = [p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    # Same file name in several run directories (the usual case: runA/predictions.parquet): add parents.
    names = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def evaluate(
    pred_paths: Sequence[str | Path],
    *,
    names: Sequence[str] | None = None,
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    data_dir: str | Path | None = None,
    feature: str = "C1",
) -> dict[str, Any]:
    """Per-model metrics for each file and churn (with bootstrap CIs) for every pair of files.

    Parameters
    ----------
    pred_paths : sequence of path
        Prediction Parquet files (one per model), all on the same row ids for churn.
    names : sequence of str, optional
        Display names (default: file stems, disambiguated by parent directory).
    threshold : float, optional
        Flip threshold, a finite number in (0, 1); None uses the base rate of the first file's labels
        (0.5, with a warning, if it has none or they are all of one class).
    bootstrap, seed : int
        Bootstrap replicates and seed for :func:`~recsys_codistill.eval.churn.churn_report`.
    data_dir : path, optional
        Ingested Parquet directory (``manifest.json`` + shards with ``row_id`` and ``C1..C26``); adds
        churn per frequency bucket of ``feature``, frequency counted over all rows of ``data_dir``.
    feature : str, default "C1"
        Categorical column for the frequency buckets.

    Returns
    -------
    dict
        The ``recsys_codistill.eval/1`` result described in the module docstring.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file (and column) at fault; ValueError also when two files' row ids differ (churn
        needs identical rows) or when ``threshold``, ``bootstrap`` or ``seed`` is out of range.
    """
    paths = [Path(p) for p in pred_paths]
    if not paths:
        raise ValueError("evaluate needs at least one predictions file")
    # Checked before any file is read: a NaN threshold would compare false everywhere and report 0 flips.
    if threshold is not None:
        check_threshold(threshold, "threshold")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap = {bootstrap!r}: expected an integer >= 0 (0 = no intervals)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed = {seed!r}: expected an integer >= 0")
    if names is None:
        names = _default_names(paths)
    names = list(names)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} prediction files")
    preds = [load_predictions(p) for p in paths]
    warnings: list[str] = []

    models = [_model_metrics(nm, pr, warnings) for nm, pr in zip(names, preds, strict=True)]
    if threshold is None:
        base = models[0]["base_rate"]
        if base is not None and 0.0 < base < 1.0:
            threshold, source = float(base), f"base rate of {names[0]}'s labels"
        elif base is not None:
            # All labels of one class: a threshold of 0 or 1 would make every row one class and hide flips.
            threshold, source = 0.5, f"default 0.5 ({names[0]}'s labels are all {int(base)})"
            warnings.append(f"{names[0]}'s labels are all {int(base)}: flip threshold defaults to 0.5")
        else:
            threshold, source = 0.5, "default 0.5 (first file has no labels)"
            warnings.append(f"{names[0]} has no labels: flip threshold defaults to 0.5")
    else:
        threshold, source = float(threshold), "given"

    data_ids = data_vals = None
    if data_dir is not None:
        data_ids, data_vals = _load_feature(Path(data_dir), feature)

    pairs = []
    for i in range(len(preds)):
        for j in range(i + 1, len(preds)):
            pa_, pb_ = preds[i], preds[j]
            try:
                al = align(pa_.row_id, pa_.probability, pb_.row_id, pb_.probability)
            except ValueError as exc:
                raise ValueError(f"cannot compare {pa_.path} (A) with {pb_.path} (B): {exc}") from exc
            # Labels travel with A; they come from the same data, so note any disagreement.
            lab_a = _aligned(pa_.row_id, pa_.label, al.row_id)
            lab_b = _aligned(pb_.row_id, pb_.label, al.row_id)
            both = np.isfinite(lab_a) & np.isfinite(lab_b)
            n_disagree = int(np.count_nonzero(lab_a[both] != lab_b[both]))
            if n_disagree:
                warnings.append(
                    f"{names[i]} vs {names[j]}: labels differ on {n_disagree} rows; using {names[i]}'s"
                )
            fvals = None
            if data_ids is not None and data_vals is not None:
                fvals = _feature_for_rows(data_ids, data_vals, al.row_id, feature)
            rep = churn_report(
                al.p_a,
                al.p_b,
                threshold=threshold,
                bootstrap=bootstrap,
                seed=seed,
                labels=lab_a if np.isfinite(lab_a).any() else None,
                feature_values=fvals,
                feature_reference=data_vals if fvals is not None else None,
            )
            pairs.append({"a": names[i], "b": names[j], **rep})

    return {
        "schema": EVAL_SCHEMA,
        "threshold": threshold,
        "threshold_source": source,
        "bootstrap": {"replicates": int(bootstrap), "seed": int(seed)},
        "feature": feature if data_dir is not None else None,
        "feature_reference": f"all rows of {data_dir}" if data_dir is not None else None,
        "models": models,
        "pairs": pairs,
        "warnings": warnings,
    }


def _aligned(row_id: np.ndarray, values: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """``values`` reordered to ``target_ids`` (same id set, checked by :func:`align` before)."""
    if row_id.size == target_ids.size and np.array_equal(row_id, target_ids):
        return values
    order = np.argsort(row_id, kind="stable")
    return values[order[np.searchsorted(row_id[order], target_ids)]]


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_est(est: dict[str, Any] | None, digits: int = 4) -> str:
    """'value [lo, hi]' for an estimate dict."""
    if not est or est.get("value") is None:
        return "-"
    s = f"{est['value']:.{digits}f}"
    if est.get("ci_low") is not None:
        s += f" [{est['ci_low']:.{digits}f}, {est['ci_high']:.{digits}f}]"
    return s


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_table(result: dict[str, Any]) -> str:
    """Readable plain-text summary of an :func:`evaluate` result."""
    out = []
    models = result.get("models", [])
    out.append("Models")
    out.append(
        _table(
            ["model", "rows", "labelled", "AUC", "log loss", "NE", "calib", "base rate"],
            [
                [
                    m["name"],
                    str(m["rows"]),
                    str(m["labelled_rows"]),
                    _fmt(m["auc"]),
                    _fmt(m["log_loss"]),
                    _fmt(m["normalized_entropy"]),
                    _fmt(m["calibration"]),
                    _fmt(m["base_rate"]),
                ]
                for m in models
            ],
        )
    )
    for m in models:
        if m.get("labelled_rows") == 0 and m.get("label_metrics"):
            out.append(f"{m['name']}: label metrics {m['label_metrics']}")
    pairs = result.get("pairs", [])
    if pairs:
        boot = result.get("bootstrap", {})
        out.append("")
        out.append(
            f"Churn (threshold {_fmt(result.get('threshold'))}, {result.get('threshold_source', '')}; "
            f"95% paired bootstrap CIs, {boot.get('replicates', '?')} replicates, "
            f"seed {boot.get('seed', '?')})"
        )
        out.append(
            _table(
                ["A vs B", "rows", "mean |dp|", "sym PD", "flip rate", "0->1", "1->0", "top1% shared"],
                [
                    [
                        f"{p['a']} vs {p['b']}",
                        str(p["rows"]),
                        _fmt_est(p["mean_abs_diff"]),
                        _fmt_est(p["symmetric_pd"]),
                        _fmt_est(p["flip_rate"]),
                        _fmt(p["flip_0_to_1"]["value"]),
                        _fmt(p["flip_1_to_0"]["value"]),
                        _fmt(p["topk_overlap"]["shared_fraction"], 3),
                    ]
                    for p in pairs
                ],
            )
        )
        for p in pairs:
            out.append("")
            out.append(f"{p['a']} vs {p['b']}: churn by mean prediction (pA+pB)/2")
            out.append(
                _table(
                    ["bucket", "rows", "mean |dp|", "flip rate"],
                    [
                        [
                            f"[{b['lo']:.2f}, {b['hi']:.2f})",
                            str(b["rows"]),
                            _fmt_est(b["mean_abs_diff"]),
                            _fmt_est(b["flip_rate"]),
                        ]
                        for b in p["by_probability"]
                    ],
                )
            )
            if p.get("by_feature_frequency"):
                out.append("")
                out.append(
                    f"{p['a']} vs {p['b']}: churn by frequency of {result.get('feature')} "
                    f"(count in {result.get('feature_reference')})"
                )
                out.append(
                    _table(
                        ["count", "rows", "values", "mean |dp|", "flip rate"],
                        [
                            [
                                b["bucket"],
                                str(b["rows"]),
                                str(b["distinct_values"]),
                                _fmt_est(b["mean_abs_diff"]),
                                _fmt_est(b["flip_rate"]),
                            ]
                            for b in p["by_feature_frequency"]
                        ],
                    )
                )
            if p.get("labelled") and p["labelled"].get("log_loss_diff"):
                lab = p["labelled"]
                out.append(
                    f"log loss on {lab['rows']} labelled rows: A {_fmt_est(lab['log_loss_a'])}, "
                    f"B {_fmt_est(lab['log_loss_b'])}, A-B {_fmt_est(lab['log_loss_diff'])}"
                )
    for w in result.get("warnings", []):
        out.append(f"warning: {w}")
    return "\n".join(out) + "\n"


def _jsonable(x: Any) -> Any:
    """Plain Python types only; NaN/inf become None so the file is strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as strict, indented JSON (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
