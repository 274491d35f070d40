"""The churn study (Anil et al. 2018, Table 1): baseline vs ensemble vs two-way codistillation.

For each of R repeats:
- four independent baselines b0..b3 (different seeds, hence different init and data order);
  baseline churn = churn(b0, b1); ensemble churn = churn(mean(b0, b2), mean(b1, b3));
- two independent codistillation runs c0, c1 (two groups each); churn = churn(c0.group0, c1.group0)
  (copy 0 of each run, as the paper);
all predicted on a hold-out that shares no row id with the training rows (checked). Finished runs and
predictions are reused, so an interrupted study resumes where it stopped. Output: ``report.md`` with the
table, per-repeat values and bootstrap CIs, PNG plots, the exact configs, versions and timings.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.manifest import MANIFEST, data_files
from recsys_codistill.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_section,
    check_ranges,
    config_dict_from_sources,
    from_dict,
    load_config,
    ranged,
    to_dict,
    to_toml,
)
from recsys_codistill.eval.evaluation import ensemble_probabilities
from recsys_codistill.eval.metrics import summary
from recsys_codistill.run_dir import RunDir

METHODS = ("baseline", "ensemble", "codistill")
METHOD_LABELS = {
    "baseline": "single model",
    "ensemble": "ensemble of two",
    "codistill": "two-way codistillation",
}


@dataclass(frozen=True)
class StudyConfig:
    out_dir: str = "runs/study"
    repeats: int = ranged(3, ge=1)
    methods: tuple[str, ...] = METHODS
    # Data: an ingested dir with train/ and valid/, or raw Criteo files to ingest, or (default) synthetic.
    data_dir: str = ""
    inputs: tuple[str, ...] = ()
    synthetic_rows: int = ranged(200_000, ge=2)
    synthetic_seed: int = ranged(0, ge=0, le=2**32 - 1)
    valid_fraction: float = ranged(0.2, gt=0.0, lt=1.0, why="the study evaluates on the held-out rows")
    split: Literal["time", "hash"] = "time"
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    bootstrap: int = ranged(1000, ge=1, zero="no confidence intervals")
    # Baseline trainings run this many at a time (each with 1 thread): uses both cores of a small box.
    parallel_runs: int = ranged(2, ge=1)


@dataclass
class Plan:
    study: StudyConfig
    base: RunConfig
    root: Path
    # Extra codistillation settings to compare, name -> --set overrides (from [study.variants]).
    variants: dict[str, list[str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def variant_tag(name: str) -> str:
    """Directory-safe name of a variant's runs."""
    return "codistill_" + "".join(ch if ch.isalnum() else "_" for ch in name)


@dataclass(frozen=True)
class Method:
    """A row of the study: a method of :data:`METHODS` and, for a codistillation variant of
    ``[study.variants]``, the variant's name."""

    name: str
    variant: str | None = None

    @property
    def key(self) -> str:
        """The row's key in ``study.json``: the method, or ``codistill[<variant>]``."""
        return self.name if self.variant is None else f"{self.name}[{self.variant}]"

    @property
    def label(self) -> str:
        """The row's name in ``report.md`` and the plots."""
        if self.variant is not None:
            return f"codistillation ({self.variant})"
        return METHOD_LABELS.get(self.name, self.name)

    def run_name(self, repeat: int, index: int) -> str:
        """Directory name of run ``index`` of ``repeat`` (rows that train runs: baseline, codistill)."""
        if self.variant is not None:
            return f"r{repeat}_{variant_tag(self.variant)}-{index}"
        return f"r{repeat}_{self.name}{index}"


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> tuple[StudyConfig, RunConfig]:
    study, base, _ = load_study_with_variants(path, overrides)
    return study, base


def load_study_with_variants(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[StudyConfig, RunConfig, dict[str, list[str]]]:
    """``[study]`` keys, the training config, and ``[study.variants]``: extra codistillation rows, each a
    name and a list of ``section.key=value`` overrides (e.g. ``"K=10" = ["codistill.exchange_every=10"]``)."""
    data = config_dict_from_sources(path, overrides)
    section = dict(data.pop("study", {}))
    variants = section.pop("variants", {})
    if not isinstance(variants, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in variants.values()
    ):
        raise ConfigError(f'{path}: [study.variants] must map names to lists of "section.key=value" strings')
    study = build_section(StudyConfig, section, str(path), "study.")
    unknown = [m for m in study.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"{path}: study.methods has {unknown}; expected a subset of {list(METHODS)}")
    check_ranges(study, str(path), "study.")
    base = from_dict(data, str(path))
    tags = [variant_tag(str(n)) for n in variants]
    if len(set(tags)) != len(tags):
        raise ConfigError(
            f"{path}: [study.variants] names {list(variants)} collide once made directory-safe ({tags})"
        )
    for name, sets in variants.items():  # fail now, not after an hour of baselines
        try:
            load_config(None, sets)
        except ConfigError as e:
            raise ConfigError(f"{path}: study variant {name!r}: {e}") from e
    return study, base, {str(k): list(v) for k, v in variants.items()}


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


def run_config(plan: Plan, name: str, seed: int, num_groups: int, sets: Sequence[str] = ()) -> RunConfig:
    d = apply_overrides(to_dict(plan.base), sets)
    d["run_dir"] = str(plan.root / "runs" / name)
    d["train"]["seed"] = seed
    d["train"]["progress"] = False
    d["codistill"]["num_groups"] = num_groups
    d["sharding"]["threads"] = d["sharding"]["threads"] or 1
    d["checkpoint"]["keep_last"] = 1  # a finished study run needs only its final model
    return from_dict(d, f"<study run {name}>")


def is_done(cfg: RunConfig) -> bool:
    return all(RunDir(cfg.run_dir).result(g).is_file() for g in range(cfg.codistill.num_groups))


def train_run(plan: Plan, cfg: RunConfig) -> None:
    from recsys_codistill.train.launch import launch

    if is_done(cfg):
        return
    t0 = time.perf_counter()
    code = launch(cfg, quiet=True)
    if code:
        raise RuntimeError(f"training {cfg.run_dir} failed (exit {code}); see its group*/launcher.log")
    plan.timings[Path(cfg.run_dir).name] = round(time.perf_counter() - t0, 1)


def predictions(cfg: RunConfig, valid: Path) -> dict[str, np.ndarray]:
    """Copy 0's predictions on the hold-out (cached next to the run)."""
    from recsys_codistill.eval.predictions import write_predictions
    from recsys_codistill.train.predict import load_run, predict_logits

    out = Path(cfg.run_dir) / "valid_predictions.parquet"
    if not out.is_file():
        run_cfg, model, _ = load_run(cfg.run_dir, 0)
        p = predict_logits(model, run_cfg, valid)
        write_predictions(out, p["row_id"], p["label"], p["logit"])
    t = pq.read_table(out)
    return {c: t[c].to_numpy() for c in ("row_id", "label", "probability")}


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


def measure_pair(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], threshold: float, study: StudyConfig, rep: int
) -> dict[str, Any]:
    from recsys_codistill.eval.churn import align, churn_report

    al = align(a["row_id"], a["probability"], b["row_id"], b["probability"])
    report = churn_report(
        al.p_a, al.p_b, threshold=threshold, bootstrap=study.bootstrap, seed=study.seed * 1000 + rep
    )
    y = a["label"].astype(np.float64)
    return {
        "quality_a": summary(y, a["probability"]),
        "quality_b": summary(y, b["probability"]),
        "churn": report,
    }


def ensemble(*members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ensemble row's predictions: members' probabilities averaged (:func:`ensemble_probabilities`)."""
    for m in members[1:]:
        if not np.array_equal(m["row_id"], members[0]["row_id"]):
            raise ValueError("ensemble members predicted different rows")
    return {
        "row_id": members[0]["row_id"],
        "label": members[0]["label"],
        "probability": ensemble_probabilities([m["probability"] for m in members]),
    }


def summarise(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "half_range": float((v.max() - v.min()) / 2),
        "median": float(np.median(v)),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "n": int(v.size),
    }


def paired_vs_baseline(
    per_repeat: dict[str, list[dict[str, Any]]], seed: int, resamples: int = 10_000
) -> dict[str, dict[str, Any]]:
    """Per repeat, churn(method) − churn(single model): the two share seeds and hold-out rows, so the
    difference removes much of the repeat-to-repeat noise. Mean with a bootstrap 95% CI over repeats
    (retrain-to-retrain uncertainty, unlike the row-bootstrap CIs of a single repeat) and a sign count."""
    if "baseline" not in per_repeat:
        return {}
    base = np.array([x["churn"]["mean_abs_diff"]["value"] for x in per_repeat["baseline"]])
    rng = np.random.default_rng(seed)
    out = {}
    for m, reps in per_repeat.items():
        if m == "baseline":
            continue
        d = np.array([x["churn"]["mean_abs_diff"]["value"] for x in reps]) - base
        rel = d / base
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        boot = d[idx].mean(axis=1)
        boot_rel = rel[idx].mean(axis=1)
        out[m] = {
            "mean_diff": float(d.mean()),
            "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)),
            "mean_relative": float(rel.mean()),
            "relative_ci_low": float(np.percentile(boot_rel, 2.5)),
            "relative_ci_high": float(np.percentile(boot_rel, 97.5)),
            "repeats_lower": int((d < 0).sum()),
            "repeats": int(d.size),
        }
    return out


def bayes_reference(root: Path, holdout: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Bayes-optimal metrics on the hold-out rows (``holdout``: row_id and label of any model's
    predictions) when the data is synthetic and truth.parquet is known."""
    truth = root / "raw" / "truth.parquet"
    if not truth.is_file():
        return None
    prob = pq.read_table(truth, columns=["probability"])["probability"].to_numpy()[holdout["row_id"]]
    return summary(holdout["label"].astype(np.float64), prob)


# ---------------------------------------------------------------------------------------------------
# the study


def run_study(config: str | Path, overrides: Sequence[str] = ()) -> Path:
    study, base, variants = load_study_with_variants(config, overrides)
    text = Path(config).read_text() + "".join(f"\n# --set {o}" for o in overrides)
    return run(study, base, config_text=text, variants=variants)


def run(
    study: StudyConfig, base: RunConfig, config_text: str = "", variants: dict[str, list[str]] | None = None
) -> Path:
    root = Path(study.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = prepare_data(study, root)
    holdout = check_holdout(data)
    base = from_dict(
        {
            **to_dict(base),
            "data": {
                **to_dict(base)["data"],
                "train_dir": str(data / "train"),
                "valid_dir": str(data / "valid"),
            },
        }
    )
    plan = Plan(study, base, root, variants=dict(variants or {}))
    valid = data / "valid"

    # Every run of every repeat, baselines several at a time (each uses one core).
    n_base = 4 if "ensemble" in study.methods else 2
    baseline = Method("baseline")  # its runs also make the ensemble row and set the flip threshold
    baselines = {
        (r, i): run_config(plan, baseline.run_name(r, i), study.seed * 100 + 10 * r + i, 1)
        for r in range(study.repeats)
        for i in range(n_base)
    }
    # codistillation rows: the configured one, then each variant; (row, repeat, run) -> config
    rows = [Method("codistill")] if "codistill" in study.methods else []
    rows += [Method("codistill", v) for v in plan.variants]
    codistills: dict[tuple[Method, int, int], RunConfig] = {}
    for row in rows:
        sets = plan.variants[row.variant] if row.variant is not None else []
        for r in range(study.repeats):
            for i in range(2):
                seed = study.seed * 100 + 10 * r + i
                codistills[(row, r, i)] = run_config(plan, row.run_name(r, i), seed, 2, sets)
    with ThreadPoolExecutor(max_workers=max(1, study.parallel_runs)) as pool:
        list(pool.map(lambda c: train_run(plan, c), baselines.values()))
    for c in codistills.values():  # two groups = two processes already
        train_run(plan, c)

    # Measure: churn between the two runs of each method, per repeat.
    methods = list(dict.fromkeys([Method(m) for m in study.methods if m != "codistill"] + rows))
    per_method: dict[Method, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(study.repeats):
        b = [predictions(baselines[(r, i)], valid) for i in range(n_base)]
        threshold = base.eval.threshold or float(np.mean(b[0]["label"]))
        for m in methods:
            if m.name == "baseline":
                pair = b[0], b[1]
            elif m.name == "ensemble":
                pair = ensemble(b[0], b[2]), ensemble(b[1], b[3])
            else:
                pair = tuple(predictions(codistills[(m, r, i)], valid) for i in range(2))
            per_method[m].append(measure_pair(*pair, threshold, study, r))
    per_repeat = {m.key: reps for m, reps in per_method.items()}

    table = {}
    for m, reps in per_repeat.items():
        table[m] = {
            "log_loss": summarise(
                [q for x in reps for q in (x["quality_a"]["log_loss"], x["quality_b"]["log_loss"])]
            ),
            "auc": summarise([q for x in reps for q in (x["quality_a"]["auc"], x["quality_b"]["auc"])]),
            "ne": summarise([q for x in reps for q in (x["quality_a"]["ne"], x["quality_b"]["ne"])]),
            "churn": summarise([x["churn"]["mean_abs_diff"]["value"] for x in reps]),
            "symmetric_pd": summarise([x["churn"]["symmetric_pd"]["value"] for x in reps]),
            "flip_rate": summarise([x["churn"]["flip_rate"]["value"] for x in reps]),
        }
    curves = {
        "baseline": learning_curve(baselines[(0, 0)]),
        **(
            {
                "codistill group0": learning_curve(codistills[(rows[0], 0, 0)], 0),
                "codistill group1": learning_curve(codistills[(rows[0], 0, 0)], 1),
            }
            if rows
            else {}
        ),
    }
    # what each codistillation row used, for the churn-vs-staleness plot and the report
    settings = {
        row.key: {
            k: getattr(codistills[(row, 0, 0)].codistill, k)
            for k in ("exchange_every", "burn_in_steps", "distill_weight", "loss", "data")
        }
        for row in rows
    }
    result = {
        "study": to_dict(study),
        "base_config": to_dict(base),
        "holdout": holdout,
        "bayes_optimal": bayes_reference(root, predictions(baselines[(0, 0)], valid)),
        "table": table,
        "per_repeat": per_repeat,
        "paired_vs_baseline": paired_vs_baseline(per_repeat, study.seed),
        "curves": curves,
        "codistill_settings": settings,
        "timings_s": {**plan.timings, "total": round(time.perf_counter() - t_start, 1)},
        "versions": versions(),
    }
    (root / "study.json").write_text(json.dumps(result, indent=1))
    from recsys_codistill.study.report import write_report

    return write_report(root, result, methods=methods, base_toml=to_toml(base), config_text=config_text)


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


def run_demo(out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """``make demo``: the study on the embedded synthetic generator, sized for 2 CPU cores."""
    cfg_path = Path(__file__).resolve().parents[2] / "configs" / "study_demo.toml"
    overrides = [f'study.out_dir="{out}"', *overrides]
    study, base, variants = load_study_with_variants(cfg_path, overrides)
    text = cfg_path.read_text() + "".join(f"\n# --set {o}" for o in overrides)
    return run(study, base, config_text=text, variants=variants)
