"""Daily retrains: the churn a launch sees, between yesterday's model and today's, on tomorrow's traffic.

``recsys-codistill retrain --config configs/retrain_*.toml`` simulates D days of daily retrains with a
training window of W days. Version d of a method trains on days d−W+1 .. d and is evaluated on day d+1
(checked: no evaluation row comes from a training day). Each method runs as ``retrain.chains`` independent
chains (different seeds); within a chain, version d may read version d−1 of the same chain:

- ``cold``: a fresh model every day (the baseline);
- ``warm``: starts from version d−1's weights (``train.init_from``) and trains on the whole window (so
  it passes a second time over the days its predecessor saw);
- ``warm_incremental``: starts from version d−1's weights and trains on the new day d only;
- ``anchor``: distils toward version d−1 with weight λ (``[anchor]``; Jiang et al. 2022), one method per
  λ of ``retrain.anchor_weights``;
- ``warm_anchor``: both (the first λ);
- ``codistill``: two-way codistillation each day (copy 0 served);
- ``ensemble``: the average of two cold models (chain c's cold model and one more with another seed);
- ``smelu``: a cold model with SmeLU activations.

The first version of a chain (d = W−1) has no predecessor: for the methods that read one (warm, anchor)
it is the cold model itself; codistillation, the ensemble and SmeLU are themselves from the start.
Summaries cover the versions that have a predecessor (d ≥ W), for every method alike. Per version the
report has
log loss, AUC, calibration, **churn vs version d−1** (mean |p_d − p_{d−1}| on day d+1: what a launch sees,
measured from the second version on), churn vs the independent retrain of the same day (chain 0 vs
chain 1: the paper's churn), flip rates, and the compute spent (examples trained on, teacher forwards);
and, for the cold retrain, what serving a version k days late costs (log loss and churn against the fresh
version: the drift of the data).
Summaries over versions are means with a t interval over versions (versions are not independent draws,
so read the interval as a guide), and paired differences to ``cold`` version by version.

Runs are content-addressed as in the study (a chain's version d names its predecessor's directory in its
config), so an interrupted simulation resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.manifest import MANIFEST
from data_pipeline.preprocess import day_dir as day_name
from data_pipeline.preprocess import day_dirs
from recsys_codistill.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_section,
    check_ranges,
    config_dict_from_sources,
    from_dict,
    ranged,
    to_dict,
)
from recsys_codistill.eval.metrics import log_loss, roc_auc, sigmoid
from recsys_codistill.eval.retrains import jackknife
from recsys_codistill.study.study import (
    Progress,
    addressed,
    check_data_record,
    is_done,
    row_ids,
    run_predictions,
    run_result,
)

METHODS = ("cold", "warm", "warm_incremental", "anchor", "warm_anchor", "codistill", "ensemble", "smelu")


@dataclass(frozen=True)
class RetrainConfig:
    out_dir: str = "runs/retrain"
    # Data: an `ingest --days` data set, raw Criteo files to ingest with --days, or (default) synthetic.
    data_dir: str = ""
    inputs: tuple[str, ...] = ()
    synthetic_rows: int = ranged(300_000, ge=100)
    synthetic_seed: int = ranged(0, ge=0, le=2**32 - 1)
    days: int = ranged(7, ge=3, le=100, why="a window, a version and the day after it")
    # synthetic time structure (data_pipeline.synthetic: days, drift, id_turnover); the defaults give a cold
    # model's staleness the order of the real Criteo sample's (configs/retrain_synthetic.toml)
    drift: float = ranged(0.05, ge=0, le=10)
    id_turnover: float = ranged(0.002, ge=0, le=1)
    window: int = ranged(3, ge=1)
    chains: int = ranged(2, ge=2, le=99, why="two for the churn vs an independent retrain; distinct seeds")
    methods: tuple[str, ...] = METHODS
    anchor_weights: tuple[float, ...] = (1.0,)
    # train.seed = seed * 100000 + chain * 1000 + member * 500 + version: distinct for every run
    seed: int = ranged(0, ge=0, le=42_949, why="train.seed must stay below 2**32")
    confidence: float = ranged(0.95, gt=0.5, lt=1.0)
    parallel_runs: int = ranged(2, ge=1)


@dataclass(frozen=True)
class Row:
    """A method of the table: its name, λ for anchor methods, its label."""

    method: str
    weight: float | None = None

    @property
    def key(self) -> str:
        return self.method if self.weight is None else f"{self.method}[{self.weight:g}]"


def load_retrain(path: str | Path, overrides: Sequence[str] = ()) -> tuple[RetrainConfig, RunConfig]:
    data = config_dict_from_sources(path, overrides)
    section = dict(data.pop("retrain", {}))
    cfg = build_section(RetrainConfig, section, str(path), "retrain.")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or "cold" not in cfg.methods:
        raise ConfigError(
            f"{path}: retrain.methods {list(cfg.methods)}: expected a subset of {list(METHODS)} with 'cold'"
        )
    if any(not w > 0 for w in cfg.anchor_weights) or not cfg.anchor_weights:
        raise ConfigError(f"{path}: retrain.anchor_weights must be positive numbers (λ = 0 is the cold row)")
    keys = [Row("anchor", w).key for w in cfg.anchor_weights]
    if len(set(keys)) != len(keys):
        raise ConfigError(
            f"{path}: retrain.anchor_weights {list(cfg.anchor_weights)} name the same rows {keys}"
        )
    if cfg.window > cfg.days - 2:
        raise ConfigError(
            f"{path}: retrain.window = {cfg.window} leaves no second version in {cfg.days} days (a version "
            "needs the day after it, and churn vs the previous version a second one): window <= days - 2"
        )
    check_ranges(cfg, str(path), "retrain.")
    base = from_dict(data, str(path))
    return cfg, base


def rows_of(cfg: RetrainConfig) -> list[Row]:
    out = []
    for m in cfg.methods:
        if m == "anchor":
            out += [Row("anchor", w) for w in cfg.anchor_weights]
        elif m == "warm_anchor":
            out.append(Row("warm_anchor", cfg.anchor_weights[0]))
        else:
            out.append(Row(m))
    return out


# ---------------------------------------------------------------------------------------------------
# data


def day_dir(data: Path, day: int) -> Path:
    return data / day_name(day)


def prepare_days(cfg: RetrainConfig, root: Path) -> Path:
    """An ``ingest --days`` data set (made once, reused)."""
    if cfg.data_dir:
        d = Path(cfg.data_dir)
        missing = [day_dir(d, k) for k in range(cfg.days) if not (day_dir(d, k) / MANIFEST).is_file()]
        if missing:
            raise FileNotFoundError(
                f"retrain.data_dir {d} has no {missing[0].name}/manifest.json (ingest with --days {cfg.days})"
            )
        return d
    from data_pipeline.preprocess import ingest

    d = root / "data"
    if (d / MANIFEST).is_file():
        split = json.loads((d / MANIFEST).read_text()).get("split") or {}
        if split.get("days") != cfg.days:
            raise ConfigError(
                f"{d} holds {split.get('days')} days, retrain.days = {cfg.days}: use another out_dir"
            )
        return d
    inputs = list(cfg.inputs)
    if not inputs:
        from data_pipeline.synthetic import SyntheticParams, generate

        raw = root / "raw"
        if not (raw / "synthetic.json").is_file():
            params = SyntheticParams(days=cfg.days, drift=cfg.drift, id_turnover=cfg.id_turnover)
            generate(raw, cfg.synthetic_rows, cfg.synthetic_seed, params=params)
        inputs = sorted(str(p) for p in raw.glob("synthetic-*.tsv.gz"))
    ingest(inputs, d, days=cfg.days, overwrite=True, progress=False)
    return d


def check_days(data: Path, train_days: Sequence[int], eval_day: int) -> None:
    """Evaluation rows come after every training row (row ids are time order) and share none with them."""
    train = np.concatenate([row_ids(day_dir(data, k)) for k in train_days])
    valid = row_ids(day_dir(data, eval_day))
    if train.size and valid.size and not train.max() < valid.min():
        raise RuntimeError(
            f"day {eval_day} has rows at or before the training days {list(train_days)} in {data}"
        )


# ---------------------------------------------------------------------------------------------------
# runs


def versions(cfg: RetrainConfig) -> list[int]:
    """Versions d = W−1 .. D−2 (each trained on days d−W+1..d, evaluated on day d+1)."""
    return list(range(cfg.window - 1, cfg.days - 1))


def run_config(
    cfg: RetrainConfig,
    base: RunConfig,
    root: Path,
    data: Path,
    row: Row,
    chain: int,
    d: int,
    prev: RunConfig | None,
    member: int = 0,
) -> RunConfig:
    """Version ``d`` of ``chain`` of a method (``member`` 1: an ensemble's second model)."""
    sets: list[str] = []
    if row.method in ("warm", "warm_incremental", "warm_anchor") and prev is not None:
        sets.append(f'train.init_from="{prev.run_dir}"')
    if row.method in ("anchor", "warm_anchor") and prev is not None:
        sets += [f'anchor.run="{prev.run_dir}"', f"anchor.weight={row.weight}"]
    if row.method == "smelu":
        sets.append('model.activation="smelu"')
    groups = 2 if row.method == "codistill" else 1
    dd = apply_overrides(to_dict(base), sets)
    first = d - cfg.window + 1 if not (row.method == "warm_incremental" and prev is not None) else d
    dd["data"]["train_dir"] = [str(day_dir(data, k)) for k in range(first, d + 1)]
    dd["data"]["valid_dir"] = str(day_dir(data, d + 1))
    # a fresh seed per chain, version and ensemble member: a cold retrain starts from a new init every day
    dd["train"]["seed"] = cfg.seed * 100_000 + chain * 1000 + member * 500 + d
    dd["train"]["progress"] = False
    dd["sharding"]["threads"] = dd["sharding"]["threads"] or 1
    dd["checkpoint"]["keep_last"] = 1
    dd["codistill"]["num_groups"] = groups
    if groups == 1:
        dd["codistill"] = {**to_dict(RunConfig())["codistill"], "num_groups": 1}
    # a version with nothing of its method (a chain's first, or an ensemble's first member) is the cold
    # model itself: named alike, the content address makes it one run
    prefix = f"v{d:02d}-{row.method if sets or groups > 1 else 'cold'}"
    return addressed(dd, root / "runs", prefix, f"<retrain {row.key} chain {chain} version {d}>")


def plan(
    cfg: RetrainConfig, base: RunConfig, root: Path, data: Path
) -> dict[tuple[str, int, int, int], RunConfig]:
    """Every run: (row key, chain, version, member) -> config, chains in version order."""
    out: dict[tuple[str, int, int, int], RunConfig] = {}
    for row in rows_of(cfg):
        for chain in range(cfg.chains):
            prev: RunConfig | None = None
            for d in versions(cfg):
                run = run_config(cfg, base, root, data, row, chain, d, prev)
                out[(row.key, chain, d, 0)] = run
                if row.method == "ensemble":  # member 0 is the cold chain's model, member 1 another cold one
                    out[(row.key, chain, d, 1)] = run_config(
                        cfg, base, root, data, row, chain, d, None, member=1
                    )
                prev = run
    return out


# ---------------------------------------------------------------------------------------------------
# measuring


def _t_interval(values: Sequence[float | None], confidence: float) -> dict[str, Any]:
    """Mean over versions with a t interval (the jackknife of a mean is exactly that); no interval from
    fewer than two values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size < 2:
        return {"value": float(v[0]) if v.size else None, "ci_low": None, "ci_high": None, "n": int(v.size)}
    est = jackknife(lambda idx: float(v[idx].mean()), v.size, confidence, min_runs=1)
    return {**est.to_dict(), "n": int(v.size)}


def served(runs: dict, row: Row, chain: int, version: int, day: Path) -> np.ndarray:
    """The probabilities a method serves from ``version`` of ``chain`` on ``day`` (an ensemble: its two
    models averaged)."""
    name = day.name
    p = sigmoid(run_predictions(runs[(row.key, chain, version, 0)], day, 0, name)["logit"])
    if row.method == "ensemble":
        p = (p + sigmoid(run_predictions(runs[(row.key, chain, version, 1)], day, 0, name)["logit"])) / 2
    return p


def measure_version(
    cfg: RetrainConfig, base: RunConfig, runs: dict, data: Path, row: Row, d: int
) -> dict[str, Any]:
    """Version ``d`` of a method on day d+1: quality, churn vs version d−1 (the launch's), churn between
    chains (independent retrains of the same day), flips, and the compute it cost per chain."""
    day = day_dir(data, d + 1)
    y = run_predictions(runs[(row.key, 0, d, 0)], day, 0, day.name)["label"].astype(np.float64)
    P = [served(runs, row, c, d, day) for c in range(cfg.chains)]
    first = d == versions(cfg)[0]
    prev = None if first else [served(runs, row, c, d - 1, day) for c in range(cfg.chains)]
    threshold = float(y.mean())
    pairs = [(i, j) for i in range(len(P)) for j in range(i + 1, len(P))]
    rec: dict[str, Any] = {
        "version": d,
        "train_days": list(range(d - cfg.window + 1, d + 1)),
        "eval_day": d + 1,
        "log_loss": float(np.mean([log_loss(y, p) for p in P])),
        "auc": float(np.mean([roc_auc(y, p) for p in P])),
        "calibration": float(np.mean([p.mean() / threshold for p in P])),
        "churn_vs_independent": float(np.mean([np.abs(P[i] - P[j]).mean() for i, j in pairs])),
        "churn_vs_previous": None
        if prev is None
        else float(np.mean([np.abs(p - q).mean() for p, q in zip(P, prev, strict=True)])),
        "flip_vs_previous": None
        if prev is None
        else float(
            np.mean([((p >= threshold) != (q >= threshold)).mean() for p, q in zip(P, prev, strict=True)])
        ),
    }
    # compute, from the configs and step counts (a resumed process's own counters restart at 0): every
    # copy trains steps x batch examples; an anchor runs once per step, each codistillation copy's teacher
    # once per step after its burn-in
    examples = forwards = 0
    for (key, _, v, _), c in runs.items():
        if key != row.key or v != d:
            continue
        steps, groups = run_result(c, 0)["step"], c.codistill.num_groups
        examples += groups * steps * base.data.batch_size
        # (a teacher on a sample of each batch's rows, teacher.fraction q, counts q of a forward)
        q = c.teacher.fraction
        if c.anchor.run and c.anchor.weight > 0:
            forwards += q * steps
        if groups > 1 and c.codistill.distill_weight > 0:
            forwards += q * groups * max(0, steps - c.codistill.burn_in_steps)
    rec["examples"] = int(examples / cfg.chains)
    rec["teacher_forwards"] = int(forwards / cfg.chains)
    return rec


def staleness(cfg: RetrainConfig, runs: dict, data: Path) -> dict[str, Any]:
    """What skipping retrains costs: the cold version d served k days late, on day e = d+1+k, against the
    fresh cold version e−1 on the same day, paired by chain. Per lag k ≥ 1: the log loss difference and
    the churn between the stale and the fresh model, each a mean over (chain, version) with a t interval
    (pairs share days and models: a guide). This is the scale of drift a daily retrain fights; it is how
    a synthetic world's drift is matched to real data's (``configs/retrain_synthetic.toml``)."""
    cold = Row("cold")
    vs = versions(cfg)
    per: dict[int, list[dict[str, Any]]] = {}
    for d in vs:
        for e in range(d + 2, cfg.days):
            day = day_dir(data, e)
            y = run_predictions(runs[(cold.key, 0, e - 1, 0)], day, 0, day.name)["label"].astype(np.float64)
            for c in range(cfg.chains):
                stale, fresh = served(runs, cold, c, d, day), served(runs, cold, c, e - 1, day)
                per.setdefault(e - 1 - d, []).append(
                    {
                        "chain": c,
                        "version": d,
                        "eval_day": e,
                        "log_loss_stale": log_loss(y, stale),
                        "log_loss_fresh": log_loss(y, fresh),
                        "churn": float(np.abs(stale - fresh).mean()),
                    }
                )
    out = {}
    for k, recs in sorted(per.items()):
        out[str(k)] = {
            "log_loss_increase": _t_interval(
                [r["log_loss_stale"] - r["log_loss_fresh"] for r in recs], cfg.confidence
            ),
            "churn": _t_interval([r["churn"] for r in recs], cfg.confidence),
            "pairs": recs,
        }
    return out


def check_same_rows(runs: dict, day: Path) -> None:
    """Every run evaluated on ``day`` predicted the same rows in the same order (they are compared by
    position)."""
    ref: tuple[str, np.ndarray] | None = None
    for c in {c.run_dir: c for c in runs.values() if c.data.valid_dir == str(day)}.values():
        ids = run_predictions(c, day, 0, day.name)["row_id"]
        if ref is None:
            ref = (c.run_dir, ids)
        elif not np.array_equal(ids, ref[1]):
            raise RuntimeError(f"{c.run_dir} predicted other rows of {day} than {ref[0]}")


def run(cfg: RetrainConfig, base: RunConfig, config_text: str = "") -> Path:
    from recsys_codistill.train.launch import check_burn_in, launch

    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one data set per out_dir: refused when the data keys (or the days on disk) changed since
    keys = ("data_dir", "inputs", "synthetic_rows", "synthetic_seed", "days", "drift", "id_turnover")
    day_names = day_dirs(cfg.days)
    check_data_record(cfg, root, keys=keys, subdirs=day_names)
    data = prepare_days(cfg, root)
    check_data_record(cfg, root, data, keys=keys, subdirs=day_names)
    for k in range(cfg.days):
        rows = len(row_ids(day_dir(data, k)))
        if rows < base.data.batch_size:
            raise ConfigError(
                f"{day_dir(data, k)} has {rows} rows, fewer than data.batch_size {base.data.batch_size}: use fewer "
                "retrain.days or a smaller batch"
            )
    for d in versions(cfg):
        check_days(data, range(d - cfg.window + 1, d + 1), d + 1)
    runs = plan(cfg, base, root, data)
    for r in {c.run_dir: c for c in runs.values()}.values():
        if r.codistill.num_groups > 1:
            check_burn_in(r)
    # train: version by version (a version reads its predecessor), single models several at a time
    unique = {c.run_dir: c for c in runs.values()}
    todo = [c for c in unique.values() if not is_done(c)]
    progress = Progress(root, [(c, 1) for c in todo], prefix="retrain")  # ETA in runs: their sizes are alike
    print(
        f"[retrain] {len(rows_of(cfg))} methods x {cfg.chains} chains x {len(versions(cfg))} versions: "
        f"{len(unique)} trainings ({len(unique) - len(todo)} already finished); time {progress.eta(1)}",
        flush=True,
    )
    from concurrent.futures import ThreadPoolExecutor

    def train(c: RunConfig, parallel: int) -> None:
        name = Path(c.run_dir).name
        progress.started(name)
        ts = time.perf_counter()
        code = launch(c, quiet=True)
        if code:
            raise RuntimeError(f"training {c.run_dir} failed (exit {code}); see its group*/launcher.log")
        progress.finished(name, time.perf_counter() - ts, parallel)

    for d in versions(cfg):
        now = [c for (_, _, v, _), c in runs.items() if v == d and c in todo]
        now = list({c.run_dir: c for c in now}.values())
        with ThreadPoolExecutor(max_workers=cfg.parallel_runs) as pool:
            list(
                pool.map(
                    lambda c: train(c, cfg.parallel_runs), [c for c in now if c.codistill.num_groups == 1]
                )
            )
        for c in now:
            if c.codistill.num_groups > 1:  # two groups = two processes already
                train(c, 1)

    # measure: every version of every method on the day after it
    for d in versions(cfg):
        check_same_rows(runs, day_dir(data, d + 1))
    result_rows = {
        row.key: {"per_version": [measure_version(cfg, base, runs, data, row, d) for d in versions(cfg)]}
        for row in rows_of(cfg)
    }
    # summaries over the versions with a predecessor, for every method alike (the first version of the
    # methods that read one is the cold model itself, and has no launch churn)
    cold = result_rows["cold"]["per_version"][1:]
    for key, r in result_rows.items():
        pv = r["per_version"][1:]
        summary = {
            k: _t_interval([x[k] for x in pv], cfg.confidence)
            for k in ("log_loss", "auc", "churn_vs_previous", "churn_vs_independent")
        }
        if key != "cold":
            rel = [
                x["churn_vs_previous"] / c["churn_vs_previous"] - 1
                for x, c in zip(pv, cold, strict=True)
                if x["churn_vs_previous"] is not None
            ]
            dll = [x["log_loss"] - c["log_loss"] for x, c in zip(pv, cold, strict=True)]
            summary["churn_vs_previous_relative_to_cold"] = _t_interval(rel, cfg.confidence)
            summary["log_loss_vs_cold"] = _t_interval(dll, cfg.confidence)
        summary["examples_per_version"] = float(np.mean([x["examples"] for x in pv]))
        summary["teacher_forwards_per_version"] = float(np.mean([x["teacher_forwards"] for x in pv]))
        r["summary"] = summary
    result = {
        "retrain": to_dict(cfg),
        "base_config": to_dict(base),
        "rows": result_rows,
        "staleness": staleness(cfg, runs, data),
        "timings": {"total_s": round(time.perf_counter() - t0, 1), "runs": progress.timings},
    }
    (root / "retrain.json").write_text(json.dumps(result, indent=1))
    from recsys_codistill.study.report import write_retrain_report

    return write_retrain_report(root, result, config_text)


def run_retrain(config: str | Path, overrides: Sequence[str] = ()) -> Path:
    cfg, base = load_retrain(config, overrides)
    text = Path(config).read_text() + "".join(f"\n# --set {o}" for o in overrides)
    return run(cfg, base, text)
