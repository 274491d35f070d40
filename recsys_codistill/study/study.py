"""The churn study, v2: N independent retrains per method, all pairs, run-level intervals, verdicts.

Design (see README "The study"):

- **Runs.** Per study point ("cell": the base config, a ``[study.variants]`` entry, or one value of a
  ``[study.sweep]`` axis) the study trains ``study.runs`` = N single models and N two-way codistillation
  runs. Run ``i`` of every method uses seed index ``i``; copy 0 of codistillation run ``i`` starts from the
  same weights and sees the same data order as single model ``i`` (a paired design).
- **All pairs.** A method's churn is mean |pA − pB| averaged over all N(N−1)/2 pairs of its runs. Pairs that
  share a run are dependent, so every interval is a jackknife over *runs* (delete one run, recompute), never
  a bootstrap over pairs or rows; differences to the single model are jackknifed jointly (deleting run i
  removes it from both methods), which pairs them by seed index.
- **Derived rows** cost no training: the ensemble of two (every pair of single models; churn between
  ensembles with no shared member), the single model + post-hoc calibration, and for codistillation copy 1,
  the mean of both copies, and the within-run churn between the two copies of one run.
- **Calibration split.** The hold-out is cut in two in its own order (time order for a time split): the
  first ``study.calibration_fraction`` fits post-hoc calibrators, the rest are the evaluation rows on which
  every number of the report is measured. Churn is decomposed per method into what a global logit offset
  removes, what a monotone recalibration (isotonic) removes, and the rest (rows ranked differently).
- **Runs are content-addressed**: a run's directory is named by a hash of its resolved config, so a sweep
  point that equals another point (or the base) reuses its runs, and an interrupted study resumes where it
  stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.manifest import MANIFEST, data_files
from recsys_codistill.config import (
    CodistillConfig,
    ConfigError,
    RunConfig,
    TeacherConfig,
    apply_overrides,
    build_section,
    check_ranges,
    config_dict_from_sources,
    from_dict,
    ranged,
    to_dict,
    to_toml,
)
from recsys_codistill.eval import retrains
from recsys_codistill.eval.calibration import CALIBRATORS
from recsys_codistill.eval.metrics import log_loss, logit, roc_auc, sigmoid
from recsys_codistill.run_dir import RunDir

#: Rows a study can report; the codistillation row adds its copy-1 / both-copies / within-run lines.
METHODS = ("baseline", "calibrated", "ensemble", "codistill")


@dataclass(frozen=True)
class StudyConfig:
    out_dir: str = "runs/study"
    # Independent runs per method (seed indices 0..N-1); churn averages all N(N-1)/2 pairs.
    runs: int = ranged(6, ge=3, why="a jackknife over runs needs at least 3")
    methods: tuple[str, ...] = METHODS
    # Data: an ingested dir with train/ and valid/, or raw Criteo files to ingest, or (default) synthetic.
    data_dir: str = ""
    inputs: tuple[str, ...] = ()
    synthetic_rows: int = ranged(200_000, ge=2)
    synthetic_seed: int = ranged(0, ge=0, le=2**32 - 1)
    valid_fraction: float = ranged(0.2, gt=0.0, lt=1.0, why="the study evaluates on the held-out rows")
    split: Literal["time", "hash"] = "time"
    seed: int = ranged(0, ge=0, le=2**22)
    # The first part of the hold-out (in its order) fits post-hoc calibrators; the rest is evaluated.
    calibration_fraction: float = ranged(0.5, gt=0.0, lt=1.0, why="both calibration and evaluation rows")
    # The calibrator of the "single model + calibration" row.
    calibration: Literal["offset", "platt", "isotonic"] = "platt"
    confidence: float = ranged(0.95, gt=0.5, lt=1.0)
    # A run whose modified z-score of distance to the other runs' median exceeds this is flagged.
    outlier_threshold: float = ranged(3.5, gt=0)
    # Single-model trainings run this many at a time (each with 1 thread): uses both cores of a small box.
    parallel_runs: int = ranged(2, ge=1)


@dataclass(frozen=True)
class Cell:
    """One study point: ``overrides`` (``section.key=value``) applied to every run of it."""

    name: str
    overrides: tuple[str, ...] = ()
    axis: str | None = None  # the sweep axis it varies (None: the base point or a variant)
    value: Any = None
    rows: tuple[str, ...] = METHODS


@dataclass
class StudySpec:
    study: StudyConfig
    base: RunConfig
    variants: dict[str, list[str]] = field(default_factory=dict)
    # axis name -> list of (value label, overrides)
    sweep: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    # axis name -> its rows, where an axis names them (e.g. a setting codistillation does not support)
    axis_methods: dict[str, list[str]] = field(default_factory=dict)
    config_text: str = ""


# ---------------------------------------------------------------------------------------------------
# configuration

_REMOVED = {
    "repeats": "study.runs (N independent runs per method; churn over all pairs)",
    "bootstrap": "nothing: intervals are jackknifed over runs (study.confidence)",
}


def _toml_value(v: Any) -> str:
    """A sweep value as the right-hand side of a ``--set`` override."""
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _sweep_axes(raw: Any, source: str) -> tuple[dict[str, list[tuple[str, list[str]]]], dict[str, list[str]]]:
    """``[study.sweep.<axis>]`` tables: ``set`` templates with ``values`` (``"optim.dense_lr={}"``), or
    ``points``, a table of point name -> list of overrides; optionally ``methods``, the rows of this axis
    (default: the study's). Returns the axes and the axes' methods."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [study.sweep] must be a table of axes")
    axes: dict[str, list[tuple[str, list[str]]]] = {}
    methods: dict[str, list[str]] = {}
    for axis, spec in raw.items():
        where = f"{source}: [study.sweep.{axis}]"
        if not isinstance(spec, dict) or set(spec) - {"set", "values", "points", "grid", "methods"}:
            raise ConfigError(
                f"{where}: expected keys set + values, points or grid, and methods (got {sorted(spec)})"
            )
        if "methods" in spec:
            m = spec["methods"]
            if not isinstance(m, list) or "baseline" not in m or set(m) - set(METHODS):
                raise ConfigError(
                    f"{where}: methods must be a subset of {list(METHODS)} with 'baseline' (got {m!r})"
                )
            methods[str(axis)] = [str(x) for x in m]
        points: list[tuple[str, list[str]]] = []
        if "points" in spec:
            if not isinstance(spec["points"], dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in spec["points"].values()
            ):
                raise ConfigError(f'{where}: points must map names to lists of "section.key=value"')
            points += [(str(k), list(v)) for k, v in spec["points"].items()]
        if "values" in spec or "set" in spec:
            templates, values = spec.get("set"), spec.get("values")
            if isinstance(templates, str):
                templates = [templates]
            if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
                raise ConfigError(f'{where}: set must be "section.key={{}}" templates (got {templates!r})')
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: values must be a non-empty list (got {values!r})")
            for v in values:
                points.append((f"{v}", [t.replace("{}", _toml_value(v)) for t in templates]))
        if "grid" in spec:
            # a small grid: every combination of the templates' values, e.g. w x schedule
            grid = spec["grid"]
            if (
                not isinstance(grid, dict)
                or not grid
                or not all(
                    isinstance(t, str) and "{}" in t and isinstance(v, list) and v for t, v in grid.items()
                )
            ):
                raise ConfigError(
                    f'{where}: grid must map "section.key={{}}" templates to non-empty value lists'
                )
            for combo in itertools.product(*grid.values()):
                name = ", ".join(
                    f"{t.split('=')[0].split('.')[-1]}={v}" for t, v in zip(grid, combo, strict=True)
                )
                points.append(
                    (name, [t.replace("{}", _toml_value(v)) for t, v in zip(grid, combo, strict=True)])
                )
        if not points:
            raise ConfigError(f"{where}: no points")
        names = [p for p, _ in points]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: duplicate points {names}")
        axes[str(axis)] = points
    return axes, methods


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    """``[study]`` keys, the training config, ``[study.variants]`` (extra codistillation points, each a
    name and a list of overrides) and ``[study.sweep]`` (the regime map's axes); every point's config is
    validated now, not after an hour of training."""
    data = config_dict_from_sources(path, overrides)
    section = dict(data.pop("study", {}))
    for old, new in _REMOVED.items():
        if old in section:
            raise ConfigError(f"{path}: study.{old} was removed in study v2; use {new}")
    variants = section.pop("variants", {})
    sweep, axis_methods = _sweep_axes(section.pop("sweep", {}), str(path))
    if not isinstance(variants, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in variants.values()
    ):
        raise ConfigError(f'{path}: [study.variants] must map names to lists of "section.key=value" strings')
    study = build_section(StudyConfig, section, str(path), "study.")
    unknown = [m for m in study.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{path}: study.methods has {unknown}; expected a subset of {list(METHODS)}")
    if "baseline" not in study.methods:
        raise ConfigError(
            f"{path}: study.methods must include 'baseline' (every comparison is paired with it)"
        )
    check_ranges(study, str(path), "study.")
    base = from_dict(data, str(path))
    for name, sets in variants.items():
        other = [o for o in sets if not o.strip().startswith(("codistill.", "teacher."))]
        if other:
            raise ConfigError(
                f"{path}: study variant {name!r} sets {other}: variants change codistillation and teacher "
                "settings only "
                "(put other settings on a [study.sweep] axis, which retrains the single model too)"
            )
    spec = StudySpec(study, base, {str(k): list(v) for k, v in variants.items()}, sweep, axis_methods)
    for cell in cells(spec):
        if "ensemble" in cell.rows and study.runs < 5:
            raise ConfigError(
                f"{path}: study.runs = {study.runs}: the ensemble row (point {cell.name!r}) needs at least 5 runs "
                "(two ensembles with no shared member after deleting a run, for its jackknife); raise "
                "study.runs or drop 'ensemble'"
            )
        for kind in ("baseline", "codistill") if "codistill" in cell.rows else ("baseline",):
            try:
                run_spec(study, base, Path(study.out_dir), cell, kind, 0)
            except ConfigError as e:
                raise ConfigError(f"{path}: study point {cell.name!r} ({kind} runs): {e}") from e
    return spec


def cells(spec: StudySpec) -> list[Cell]:
    """The base point, each variant (codistillation rows only: its overrides are codistillation settings),
    then every sweep point (all rows, since an axis may change the single model too)."""
    out = [Cell("base", rows=spec.study.methods)]
    for name, sets in spec.variants.items():
        out.append(Cell(name, tuple(sets), rows=("codistill",)))
    for axis, points in spec.sweep.items():
        for label, sets in points:
            rows = tuple(m for m in spec.axis_methods.get(axis, spec.study.methods))
            out.append(Cell(f"{axis}={label}", tuple(sets), axis=axis, value=label, rows=rows))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"study points named twice: {dup}")
    return out


# ---------------------------------------------------------------------------------------------------
# data


def prepare_data(study: StudyConfig, root: Path) -> Path:
    """An ingested data set with train/ and valid/ (made once, reused on re-runs)."""
    if study.data_dir:
        d = Path(study.data_dir)
        for sub in ("train", "valid"):
            if not (d / sub / MANIFEST).is_file():
                raise FileNotFoundError(
                    f"study.data_dir {d} has no {sub}/manifest.json (ingest with --valid-fraction)"
                )
        return d
    from data_pipeline.preprocess import ingest

    d = root / "data"
    if (d / MANIFEST).is_file():
        return d
    inputs = list(study.inputs)
    if not inputs:
        from data_pipeline.synthetic import generate

        raw = root / "raw"
        if not (raw / "synthetic.json").is_file():
            generate(raw, study.synthetic_rows, study.synthetic_seed)
        inputs = sorted(str(p) for p in raw.glob("synthetic-*.tsv.gz"))
    ingest(
        inputs,
        d,
        valid_fraction=study.valid_fraction,
        split=study.split,
        seed=study.seed,
        overwrite=True,
        progress=False,
    )
    return d


_DATA_KEYS = ("data_dir", "inputs", "synthetic_rows", "synthetic_seed", "valid_fraction", "split", "seed")


def check_data_record(
    study: Any,
    root: Path,
    data: Path | None = None,
    keys: Sequence[str] = _DATA_KEYS,
    subdirs: Sequence[str] = ("train", "valid"),
) -> None:
    """A study directory holds runs trained on one data set: ``data.json`` records the study keys that made
    it (and, once made, the sha256 of its manifests); a later invocation with other data keys, or whose data
    changed on disk, is refused instead of silently reusing runs trained on other rows."""
    path = root / "data.json"
    want = {k: getattr(study, k) for k in keys}
    want = json.loads(json.dumps(want))
    if data is not None:
        want["manifests"] = {
            sub: hashlib.sha256((data / sub / MANIFEST).read_bytes()).hexdigest() for sub in subdirs
        }
    if path.is_file():
        have = json.loads(path.read_text())
        diff = [k for k in want if k in have and have[k] != want[k]]
        if diff:
            raise ConfigError(
                f"output directory {root} holds runs trained on other data ({', '.join(f'{k}: {have[k]!r} -> {want[k]!r}' for k in diff)}); "
                "use another output directory (study.out_dir / retrain.out_dir), or restore the settings"
            )
        want = {**have, **want}
    path.write_text(json.dumps(want, indent=1))


def row_ids(data_dir: Path) -> np.ndarray:
    parts = [pq.read_table(path, columns=["row_id"])["row_id"].to_numpy() for path in data_files(data_dir)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def check_holdout(data: Path) -> dict[str, int]:
    train, valid = row_ids(data / "train"), row_ids(data / "valid")
    overlap = np.intersect1d(train, valid).size
    if overlap:
        raise RuntimeError(f"hold-out shares {overlap} row ids with the training rows in {data}")
    return {"train_rows": int(train.size), "valid_rows": int(valid.size), "overlap": 0}


# ---------------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class RunSpec:
    cfg: RunConfig
    kind: Literal["baseline", "codistill"]
    index: int  # seed index


# Keys added after study v2 shipped, left out of a run's address while at their default, so that adding an
# option does not rename (and retrain) every finished run. A key joins this list when it is added.
_NEW_KEYS_AT_DEFAULT = {
    ("model", "activation"): "relu",
    ("model", "smelu_beta"): 1.0,
    ("train", "init_from"): "",
    ("train", "init_group"): 0,
    ("train", "init_optimizer"): False,
}
_NEW_SECTIONS_AT_DEFAULT = ("anchor", "teacher")


def _canonical(d: dict[str, Any]) -> dict[str, Any]:
    """What defines a run's model: everything but where it lives and how it reports."""
    d = json.loads(json.dumps(d))
    d.pop("run_dir", None)
    for k in ("progress", "log_every", "eval_every"):
        d["train"].pop(k, None)
    d["checkpoint"].pop("keep_last", None)
    for (section, key), default in _NEW_KEYS_AT_DEFAULT.items():
        if d.get(section, {}).get(key) == default:
            d[section].pop(key)
    defaults = to_dict(RunConfig())
    for section in _NEW_SECTIONS_AT_DEFAULT:
        if d.get(section) == defaults[section]:
            d.pop(section)
    return d


def run_spec(study: StudyConfig, base: RunConfig, root: Path, cell: Cell, kind: str, index: int) -> RunSpec:
    d = apply_overrides(to_dict(base), cell.overrides)
    d["train"]["seed"] = study.seed * 1000 + index
    d["train"]["progress"] = False
    d["sharding"]["threads"] = d["sharding"]["threads"] or 1
    d["checkpoint"]["keep_last"] = 1  # a finished study run needs only its final model
    if kind == "baseline":
        # a single model ignores codistillation and teacher settings: the same run serves every
        # codistillation point
        d["codistill"] = to_dict(CodistillConfig())
        d["teacher"] = to_dict(TeacherConfig())
    d["codistill"]["num_groups"] = 1 if kind == "baseline" else 2
    cfg = addressed(d, root / "runs", kind, f"<study run {kind} {index} of {cell.name}>")
    return RunSpec(cfg, kind, index)  # type: ignore[arg-type]


def addressed(d: dict[str, Any], runs_dir: Path, prefix: str, source: str) -> RunConfig:
    """The run config ``d`` with its content address as run directory: ``runs_dir/<prefix>-<hash>``, the
    hash of the typed config (so 1 and 1.0 address alike) without what only places or reports the run."""
    d = to_dict(from_dict(d, source))
    key = hashlib.sha256(json.dumps(_canonical(d), sort_keys=True).encode()).hexdigest()[:12]
    d["run_dir"] = str(runs_dir / f"{prefix}-{key}")
    return from_dict(d, source)


def is_done(cfg: RunConfig) -> bool:
    """Whether the run finished; a finished run is reused only if it was trained with this very model
    config (its saved config.toml is compared), so an address can never hand back another model."""
    run = RunDir(cfg.run_dir)
    if not all(run.result(g).is_file() for g in range(cfg.codistill.num_groups)):
        return False
    from recsys_codistill.config import load_config

    saved, want = _canonical(to_dict(load_config(run.config))), _canonical(to_dict(cfg))
    if saved != want:
        diff = sorted(
            f"{s}.{k}"
            for s in want
            if isinstance(want[s], dict)
            for k in want[s]
            if saved.get(s, {}).get(k) != want[s][k]
        )
        raise ConfigError(
            f"{cfg.run_dir} finished with other settings than this study asks for ({', '.join(diff[:5])}); "
            "move it away or use another study.out_dir"
        )
    return True


class Progress:
    """One line per run started / finished, with an ETA from the seconds per training step measured so far
    (also from earlier invocations: ``timings.json`` in the study directory)."""

    def __init__(self, root: Path, todo: Sequence[tuple[RunConfig, int]], prefix: str = "study") -> None:
        self.path = root / "timings.json"
        self.prefix = prefix
        self.timings: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )
        self.todo = {Path(c.run_dir).name: steps * c.codistill.num_groups for c, steps in todo}
        self.done = 0
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()

    def rate(self) -> float | None:
        """Seconds per (group x step), over every run timed in this study directory."""
        s = sum(t["seconds"] for t in self.timings.values())
        n = sum(t["group_steps"] for t in self.timings.values())
        return s / n if n else None

    def eta(self, parallel: int) -> str:
        rate, left = self.rate(), sum(self.todo.values())
        if rate is None:
            return "estimated after the first run"
        return f"about {_duration(rate * left / max(1, parallel))}"

    def started(self, name: str) -> None:
        print(f"[{self.prefix}] start  {name}", flush=True)

    def finished(self, name: str, seconds: float, parallel: int) -> None:
        with self.lock:
            self.timings[name] = {"seconds": round(seconds, 1), "group_steps": self.todo.pop(name)}
            self.done += 1
            self.path.write_text(json.dumps(self.timings, indent=1))
            print(
                f"[{self.prefix}] finish {name} in {_duration(seconds)}; {len(self.todo)} left, {self.eta(parallel)}",
                flush=True,
            )


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def train_run(r: RunSpec, progress: Progress, parallel: int) -> None:
    from recsys_codistill.train.launch import launch

    name = Path(r.cfg.run_dir).name
    progress.started(name)
    t0 = time.perf_counter()
    code = launch(r.cfg, quiet=True)
    if code:
        raise RuntimeError(f"training {r.cfg.run_dir} failed (exit {code}); see its group*/launcher.log")
    progress.finished(name, time.perf_counter() - t0, parallel)


def run_predictions(cfg: RunConfig, valid: Path, group: int, name: str = "valid") -> dict[str, np.ndarray]:
    """One copy's logits on a data set (the hold-out; cached next to the run as ``<name>_predictions``)."""
    from recsys_codistill.eval.predictions import write_predictions
    from recsys_codistill.train.predict import load_run, predict_logits

    out = Path(cfg.run_dir) / f"{name}_predictions_g{group}.parquet"
    if not out.is_file():
        run_cfg, model, _ = load_run(cfg.run_dir, group)
        p = predict_logits(model, run_cfg, valid)
        write_predictions(out, p["row_id"], p["label"], p["logit"])
    t = pq.read_table(out, columns=["row_id", "label", "logit"])
    return {c: t[c].to_numpy() for c in ("row_id", "label", "logit")}


def run_result(cfg: RunConfig, group: int = 0) -> dict[str, Any]:
    return json.loads(RunDir(cfg.run_dir).result(group).read_text())


def learning_curve(cfg: RunConfig, group: int = 0) -> list[tuple[int, float]]:
    path = RunDir(cfg.run_dir).metrics(group)
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if "valid_log_loss" in rec:
            by_step[rec["step"]] = rec["valid_log_loss"]  # a resumed run re-logs steps: keep the last
    return sorted(by_step.items())


# ---------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Split:
    """The hold-out cut in its own order: calibration rows first, evaluation rows after."""

    n_cal: int
    y_cal: np.ndarray
    y_eval: np.ndarray
    row_id: np.ndarray


def make_split(labels: np.ndarray, row_id: np.ndarray, fraction: float) -> Split:
    n_cal = int(round(fraction * labels.size))
    if n_cal < 2 or labels.size - n_cal < 2:
        raise ValueError(f"hold-out of {labels.size} rows is too small for calibration_fraction {fraction}")
    y = labels.astype(np.float64)
    return Split(n_cal, y[:n_cal], y[n_cal:], row_id)


def _estimate_dict(e: retrains.Estimate) -> dict[str, Any]:
    return e.to_dict()


class CellMeasure:
    """Every statistic of one cell from its runs' hold-out logits (``(N, rows)`` arrays)."""

    def __init__(self, study: StudyConfig, split: Split, logits: dict[str, np.ndarray]) -> None:
        self.study, self.split, self.conf = study, split, study.confidence
        self.Z = logits  # "baseline", "codistill", "codistill_g1" (whichever trained)
        self.cal = split.n_cal
        self._stats: dict[tuple[str, str | None], dict[str, Callable[[np.ndarray], float]]] = {}

    # -- each row's served models, as logits on every hold-out row -----------------------------------------
    def served(self, row: str) -> tuple[np.ndarray, list[tuple[int, int]] | None] | None:
        """(models × rows logits, for an ensemble the member pair of each model); None when not trained.
        The calibrated row is the single model after ``study.calibration`` (fit on the calibration rows);
        an ensemble is the average of two single models' probabilities; ``codistill_mean`` both copies of a
        run averaged."""
        Z = self.Z
        if row in ("baseline", "codistill", "codistill_g1"):
            return (Z[row], None) if row in Z else None
        if row == "calibrated":
            P, _ = retrains.calibrated(
                Z["baseline"], Z["baseline"][:, : self.cal], self.split.y_cal, self.study.calibration
            )
            return logit(P), None
        if row == "ensemble":
            S = sigmoid(Z["baseline"])
            pairs = retrains.ensemble_members(S.shape[0])
            return logit(np.stack([(S[i] + S[j]) / 2 for i, j in pairs])), pairs
        if row == "codistill_mean":
            if "codistill_g1" not in Z:
                return None
            return logit((sigmoid(Z["codistill"]) + sigmoid(Z["codistill_g1"])) / 2), None
        raise ValueError(f"unknown study row {row!r}")

    def probabilities(self, row: str, calibration: str | None = None) -> np.ndarray:
        """The row's served models on the evaluation rows: as trained, recalibrated (``offset`` / ``platt`` /
        ``isotonic``, fit per model on the calibration rows), or rank-matched (``rank``, see
        :func:`~recsys_codistill.eval.retrains.rank_matched`)."""
        got = self.served(row)
        assert got is not None, row
        Z = got[0]
        if calibration == "rank":
            return retrains.rank_matched(sigmoid(Z[:, self.cal :]))
        if calibration:
            return retrains.calibrated(Z[:, self.cal :], Z[:, : self.cal], self.split.y_cal, calibration)[0]
        return sigmoid(Z[:, self.cal :])

    # -- run-indexed statistics: stat(idx) over the kept runs, for the jackknife ---------------------------
    def stats(self, row: str, calibration: str | None = None) -> dict[str, Callable[[np.ndarray], float]]:
        key = (row, calibration)
        if key not in self._stats:
            self._stats[key] = self._make_stats(row, calibration)
        return self._stats[key]

    def _make_stats(self, row: str, calibration: str | None) -> dict[str, Callable[[np.ndarray], float]]:
        P = self.probabilities(row, calibration)
        y = self.split.y_eval
        ll = np.array([log_loss(y, p) for p in P])
        auc = np.array([roc_auc(y, p) for p in P])
        M = retrains.pairwise_churn(P)
        pairs = self.served(row)[1]  # type: ignore[index]
        if pairs is not None:
            # ensembles: churn only between ensembles with no shared member; a run's deletion drops every
            # ensemble it is in
            for a, (i, j) in enumerate(pairs):
                for b, (k, m) in enumerate(pairs):
                    if {i, j} & {k, m}:
                        M[a, b] = np.nan
            return {
                "churn": lambda idx: retrains.mean_over_disjoint_ensembles(M, pairs, idx),
                "log_loss": lambda idx: retrains.ensemble_mean_over_runs(ll, pairs, idx),
                "auc": lambda idx: retrains.ensemble_mean_over_runs(auc, pairs, idx),
            }
        return {
            "churn": lambda idx: retrains.mean_over_pairs(M, idx),
            "log_loss": lambda idx: float(ll[idx].mean()),
            "auc": lambda idx: float(auc[idx].mean()),
        }

    def row(self, row: str, base: CellMeasure | None = None) -> dict[str, Any]:
        """A row's churn and quality with intervals, its churn after each recalibration and rank-matched, and
        its paired differences to the single model of ``base`` (default: this cell's)."""
        n = next(iter(self.Z.values())).shape[0]
        k = 4 if row == "ensemble" else 2  # runs every delete-one set must keep

        def jack(f: Callable[[np.ndarray], float], scale: str = "linear") -> dict[str, Any]:
            return _estimate_dict(retrains.jackknife(f, n, self.conf, min_runs=k, scale=scale))  # type: ignore[arg-type]

        def paired(f: Callable, g: Callable, relative: bool = False) -> dict[str, Any]:
            return _estimate_dict(
                retrains.paired_difference(f, g, n, relative=relative, confidence=self.conf, min_runs=k)
            )

        st = self.stats(row)
        # churn is positive and right-skewed: its interval is taken on the log scale (never below 0)
        out: dict[str, Any] = {
            "churn": jack(st["churn"], "log"),
            "log_loss": jack(st["log_loss"]),
            "auc": jack(st["auc"]),
            "after_calibration": {c: jack(self.stats(row, c)["churn"], "log") for c in CALIBRATORS},
            "rank_matched": jack(self.stats(row, "rank")["churn"], "log"),
        }
        out["decomposition"] = retrains.decompose(
            out["churn"]["value"], out["after_calibration"]["offset"]["value"], out["rank_matched"]["value"]
        )
        b = (base or self).stats("baseline")
        out["vs_baseline"] = {
            "churn_relative": paired(st["churn"], b["churn"], relative=True),
            "churn": paired(st["churn"], b["churn"]),
            "log_loss": paired(st["log_loss"], b["log_loss"]),
        }
        return out

    def per_run(self, row: str) -> list[dict[str, Any]]:
        """Each run's log loss and its distance to the consensus of the others (outlier retrains)."""
        P = self.probabilities(row)
        assert P is not None
        d = retrains.consensus_distance(P)
        z = retrains.robust_z(d)
        flags = retrains.flag_outliers(d, self.study.outlier_threshold)
        y = self.split.y_eval
        return [
            {
                "index": i,
                "seed": self.study.seed * 1000 + i,
                "log_loss": log_loss(y, P[i]),
                "consensus_distance": float(d[i]),
                "robust_z": float(z[i]),
                "outlier": bool(flags[i]),
            }
            for i in range(P.shape[0])
        ]


def measure_cell(
    spec: StudySpec, cell: Cell, split: Split, logits: dict[str, np.ndarray], base: CellMeasure | None
) -> tuple[CellMeasure, dict[str, Any]]:
    m = CellMeasure(spec.study, split, logits)
    rows: dict[str, Any] = {}
    for row in cell.rows:
        if row == "codistill":
            # copy 0 (paired with single model i by seed), copy 1, and both copies averaged
            for name in ("codistill", "codistill_g1", "codistill_mean"):
                rows[name] = m.row(name)
            P0, P1 = (
                sigmoid(logits["codistill"][:, split.n_cal :]),
                sigmoid(logits["codistill_g1"][:, split.n_cal :]),
            )
            rows["codistill"]["within_run"] = _estimate_dict(
                retrains.within_run_churn(P0, P1, spec.study.confidence)
            )
        else:
            rows[row] = m.row(row)
    out = {"rows": rows, "per_run": {r: m.per_run(r) for r in ("baseline", "codistill") if r in logits}}
    if cell.axis is not None and base is not None:
        # the same rows against the base point's single model (is this point better than not changing it?)
        out["vs_base_point"] = {
            row: m.row(row, base)["vs_baseline"]
            for row in rows
            if row not in ("codistill_g1", "codistill_mean")
        }
    return m, out


# ---------------------------------------------------------------------------------------------------
# the study


def run_study(config: str | Path, overrides: Sequence[str] = ()) -> Path:
    spec = load_spec(config, overrides)
    spec.config_text = Path(config).read_text() + "".join(f"\n# --set {o}" for o in overrides)
    return run(spec)


def run_demo(out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """``make demo``: the study on the embedded synthetic generator, sized for 2 CPU cores."""
    cfg_path = Path(__file__).resolve().parents[2] / "configs" / "study_demo.toml"
    return run_study(cfg_path, [f'study.out_dir="{out}"', *overrides])


def plan_runs(spec: StudySpec, root: Path) -> dict[str, dict[tuple[str, int], RunSpec]]:
    """Per cell, its runs keyed by (kind, seed index)."""
    out: dict[str, dict[tuple[str, int], RunSpec]] = {}
    for cell in cells(spec):
        # every point pairs its rows with its own single models (shared with the base point, by content
        # address, when its overrides only change codistillation settings)
        kinds = ["baseline"] + (["codistill"] if "codistill" in cell.rows else [])
        out[cell.name] = {
            (k, i): run_spec(spec.study, spec.base, root, cell, k, i)
            for k in kinds
            for i in range(spec.study.runs)
        }
    return out


def run(spec: StudySpec) -> Path:
    from recsys_codistill.train.launch import check_burn_in

    study = spec.study
    root = Path(study.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    check_data_record(study, root)
    data = prepare_data(study, root)
    check_data_record(study, root, data)
    holdout = check_holdout(data)
    d = to_dict(spec.base)
    d["data"] = {**d["data"], "train_dir": str(data / "train"), "valid_dir": str(data / "valid")}
    spec.base = from_dict(d)
    valid = data / "valid"

    # plan: every run of every point, checked before anything trains (a burn-in >= steps is refused here)
    plan = plan_runs(spec, root)
    unique: dict[str, RunSpec] = {}
    steps: dict[str, int] = {}
    for cell_name, runs in plan.items():
        for r in runs.values():
            name = Path(r.cfg.run_dir).name
            if name not in unique:
                try:
                    steps[name] = check_burn_in(r.cfg)
                except ConfigError as e:
                    raise ConfigError(f"study point {cell_name!r}: {e}") from e
                unique[name] = r
    todo = [(r, steps[n]) for n, r in unique.items() if not is_done(r.cfg)]
    progress = Progress(root, [(r.cfg, steps) for r, steps in todo])
    n_base = sum(1 for r, _ in todo if r.kind == "baseline")
    print(
        f"[study] {len(plan)} point(s), {study.runs} runs per method: {len(unique)} trainings "
        f"({len(unique) - len(todo)} already finished; to train: {n_base} single models, "
        f"{len(todo) - n_base} codistillation runs of 2 groups; {sum(s for _, s in todo)} run-steps); "
        f"time {progress.eta(1)}",
        flush=True,
    )
    singles = [r for r, _ in todo if r.kind == "baseline"]
    with ThreadPoolExecutor(max_workers=max(1, study.parallel_runs)) as pool:
        list(pool.map(lambda r: train_run(r, progress, study.parallel_runs), singles))
    for r, _ in todo:
        if r.kind == "codistill":  # two groups = two processes already
            train_run(r, progress, 1)

    # measure: every run's logits on the hold-out, the same rows in the same order
    first = next(iter(plan["base"].values()))
    ref = run_predictions(first.cfg, valid, 0)
    split = make_split(ref["label"], ref["row_id"], study.calibration_fraction)

    def logits_of(runs: dict[tuple[str, int], RunSpec]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        for (kind, _), r in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            for g in range(r.cfg.codistill.num_groups):
                p = run_predictions(r.cfg, valid, g)
                if not np.array_equal(p["row_id"], ref["row_id"]):
                    raise RuntimeError(
                        f"{r.cfg.run_dir} predicted other hold-out rows than {first.cfg.run_dir}"
                    )
                out.setdefault(kind if g == 0 else f"{kind}_g{g}", []).append(p["logit"])
        return {k: np.stack(v) for k, v in out.items()}

    all_cells = cells(spec)
    base_measure, base_result = measure_cell(spec, all_cells[0], split, logits_of(plan["base"]), None)
    results = {"base": base_result}
    for cell in all_cells[1:]:
        _, results[cell.name] = measure_cell(spec, cell, split, logits_of(plan[cell.name]), base_measure)

    # what each point's codistillation runs did: steps, burn-in, K, teacher versions loaded
    codistill_info = {}
    for cell in all_cells:
        runs = [r for (k, _), r in plan[cell.name].items() if k == "codistill"]
        if runs:
            c = runs[0].cfg.codistill
            res = [run_result(r.cfg, g) for r in runs for g in range(2)]
            codistill_info[cell.name] = {
                "steps": steps[Path(runs[0].cfg.run_dir).name],
                "burn_in_steps": c.burn_in_steps,
                "exchange_every": c.exchange_every,
                "distill_weight": c.distill_weight,
                "loss": c.loss,
                "data": c.data,
                "teacher_versions_loaded": [x.get("teacher_versions_loaded") for x in res],
                "mean_staleness": [x.get("mean_staleness") for x in res],
                "never_loaded_a_teacher": any(not x.get("teacher_versions_loaded") for x in res),
            }
    base_runs = plan["base"]
    curves = {"single model (run 0)": learning_curve(base_runs[("baseline", 0)].cfg)}
    if ("codistill", 0) in base_runs:
        for g in (0, 1):
            curves[f"codistillation run 0, copy {g}"] = learning_curve(base_runs[("codistill", 0)].cfg, g)
    result = {
        "study": to_dict(study),
        "base_config": to_dict(spec.base),
        "holdout": {**holdout, "calibration_rows": split.n_cal, "evaluation_rows": int(split.y_eval.size)},
        "bayes_optimal": bayes_reference(root, ref["row_id"][split.n_cal :], split.y_eval),
        "cells": {
            c.name: {"overrides": list(c.overrides), "axis": c.axis, "value": c.value} for c in all_cells
        },
        "results": results,
        "codistill": codistill_info,
        "trainings": {c.name: _trainings(plan[c.name]) for c in all_cells},
        "curves": curves,
        "timings": {"total_s": round(time.perf_counter() - t_start, 1), "runs": progress.timings},
        "versions": versions(),
    }
    (root / "study.json").write_text(json.dumps(result, indent=1, default=_json_default))
    from recsys_codistill.study.report import write_regime, write_report

    report = write_report(root, result, base_toml=to_toml(spec.base), config_text=spec.config_text)
    if spec.sweep:
        write_regime(root, result)
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(type(x))


def _trainings(runs: dict[tuple[str, int], RunSpec]) -> dict[str, int]:
    """Trainings (model copies trained) behind each row of a point."""
    n_b = sum(1 for k, _ in runs if k == "baseline")
    n_c = sum(1 for k, _ in runs if k == "codistill")
    # (per served model, behind the row): an ensemble serves two single models at once, and its N(N-1)/2
    # ensembles are made of the row's N single models; a codistillation run trains two copies
    return {
        "baseline": [1, n_b],
        "calibrated": [1, n_b],
        "ensemble": [2, n_b],
        "codistill": [2, 2 * n_c],
    }


def bayes_reference(root: Path, row_id: np.ndarray, labels: np.ndarray) -> dict[str, float] | None:
    """Bayes-optimal log loss / AUC on the evaluation rows when the data is synthetic (truth.parquet)."""
    truth = root / "raw" / "truth.parquet"
    if not truth.is_file():
        return None
    prob = pq.read_table(truth, columns=["probability"])["probability"].to_numpy()[row_id]
    return {"log_loss": log_loss(labels, prob), "auc": roc_auc(labels, prob)}


def versions() -> dict[str, str]:
    import pyarrow
    import torch
    import torchrec

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": torchrec.__version__,
        "pyarrow": pyarrow.__version__,
        "machine": platform.machine(),
    }
