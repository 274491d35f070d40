"""``report.md`` (the base point and variants) and ``regime.md`` (the sweep) of a churn study, with plots.

Both read only the study's result dict (``study.json``, see :mod:`recsys_codistill.study.study`): every
figure printed here is one measured there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PAPER = {  # Anil et al. 2018, Table 1 (full Criteo): validation log loss and churn
    "baseline": (0.4480, 0.029),
    "ensemble": (0.4461, 0.022),
    "codistill": (0.4458, 0.019),
}
ROW_LABELS = {
    "baseline": "single model",
    "calibrated": "single model + calibration",
    "ensemble": "ensemble of two",
    "codistill": "codistillation, copy 0",
    "codistill_g1": "codistillation, copy 1",
    "codistill_mean": "codistillation, both copies averaged",
}
FLAG = "🔴 **flagged**"


def _label(row: str, cell: str, result: dict[str, Any] | None = None) -> str:
    base = ROW_LABELS.get(row, row)
    if row == "calibrated" and result is not None:
        base += f" ({result['study']['calibration']})"
    return base if cell == "base" else f"{base} [{cell}]"


def _est(e: dict[str, Any] | None, digits: int = 4, pct: bool = False, sign: bool = False) -> str:
    if not e:
        return "—"
    f = (
        (lambda x: f"{100 * x:+.0f}%")
        if pct
        else (lambda x: f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}")
    )
    return f"{f(e['value'])} [{f(e['ci_low'])}, {f(e['ci_high'])}]"


def _significant(e: dict[str, Any]) -> bool:
    return e["ci_high"] < 0 or e["ci_low"] > 0


def verdict(label: str, r: dict[str, Any], confidence: float) -> str:
    """One sentence: the paired churn change with its interval, the log-loss change, significance."""
    c, ll = r["vs_baseline"]["churn_relative"], r["vs_baseline"]["log_loss"]
    verb = "cuts" if c["value"] < 0 else "raises"
    few = " (few runs: a small-sample t interval, wide)" if c.get("few_runs") else ""
    return (
        f"**{label}** {verb} churn by {abs(100 * c['value']):.1f}% [{100 * c['ci_low']:+.1f}%, "
        f"{100 * c['ci_high']:+.1f}%] at log loss {ll['value']:+.4f} [{ll['ci_low']:+.4f}, {ll['ci_high']:+.4f}]; "
        f"{'significant' if _significant(c) else 'not significant'} at {100 * confidence:.0f}%{few}."
    )


# ---------------------------------------------------------------------------------------------------
# plots


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, root: Path, name: str, made: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(root / name, dpi=120)
    _pyplot().close(fig)
    made.append(name)


def _rows(result: dict[str, Any], cells: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(cell, row, r) for cell in cells for row, r in result["results"][cell]["rows"].items()]


def _plots(root: Path, result: dict[str, Any], cells: list[str]) -> list[str]:
    plt = _pyplot()
    made: list[str] = []
    rows = _rows(result, cells)
    labels = [_label(row, cell, result) for cell, row, _ in rows]

    # 1. churn per row with its run-level interval
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    for i, (_, _, r) in enumerate(rows):
        c = r["churn"]
        ax.errorbar(
            c["value"], i, xerr=[[c["value"] - c["ci_low"]], [c["ci_high"] - c["value"]]], fmt="o", color="k"
        )
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("churn: mean |pA − pB| over all pairs of runs (jackknife CI over runs)")
    _save(fig, root, "churn.png", made)

    # 2. churn vs log loss, one point per row
    fig, ax = plt.subplots(figsize=(6, 4))
    for (_, _, r), lab in zip(rows, labels, strict=True):
        c, ll = r["churn"], r["log_loss"]
        ax.errorbar(
            ll["value"],
            c["value"],
            xerr=[[ll["value"] - ll["ci_low"]], [ll["ci_high"] - ll["value"]]],
            yerr=[[c["value"] - c["ci_low"]], [c["ci_high"] - c["value"]]],
            fmt="o",
            ms=4,
            lw=0.8,
        )
        ax.annotate(lab, (ll["value"], c["value"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("evaluation log loss (mean over runs)")
    ax.set_ylabel("churn")
    ax.set_title("Churn vs log loss (lower left is better)", fontsize=9)
    _save(fig, root, "churn_vs_log_loss.png", made)

    # 3. forest plot of paired differences to the single model
    others = [(cell, row, r) for cell, row, r in rows if row != "baseline"]
    if others:
        fig, axes = plt.subplots(1, 2, figsize=(9, 0.35 * len(others) + 1.4), sharey=True)
        for ax, key, title, scale in (
            (axes[0], "churn_relative", "churn change vs single model (%)", 100),
            (axes[1], "log_loss", "log-loss change vs single model", 1),
        ):
            for i, (_, _, r) in enumerate(others):
                e = r["vs_baseline"][key]
                v, lo, hi = (scale * e[k] for k in ("value", "ci_low", "ci_high"))
                ax.errorbar(v, i, xerr=[[v - lo], [hi - v]], fmt="o", color="C3" if _significant(e) else "k")
            ax.axvline(0, color="gray", lw=0.8, ls="--")
            ax.set_xlabel(title, fontsize=8)
        axes[0].set_yticks(
            range(len(others)), [_label(row, cell, result) for cell, row, _ in others], fontsize=7
        )
        axes[0].invert_yaxis()
        fig.suptitle("Paired by seed index, jackknife over runs (red: CI excludes 0)", fontsize=8)
        _save(fig, root, "forest.png", made)

    # 4. learning curves of run 0
    if any(result["curves"].values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, pts in result["curves"].items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("validation log loss (whole hold-out)")
        ax.legend(fontsize=7)
        _save(fig, root, "learning_curves.png", made)
    return made


# ---------------------------------------------------------------------------------------------------
# report.md


def _toml_block(title: str, text: str) -> list[str]:
    """A report section quoting a config verbatim."""
    return [f"## {title}", "", "```toml", text.strip(), "```", ""]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def write_report(root: Path, result: dict[str, Any], *, base_toml: str, config_text: str) -> Path:
    """``root/report.md`` and its plots for the base point and the variants."""
    root = Path(root)
    cells = [c for c, info in result["cells"].items() if info["axis"] is None]
    plots = _plots(root, result, cells)
    s, h = result["study"], result["holdout"]
    conf = s["confidence"]
    n = s["runs"]
    lines = [
        "# Prediction churn study",
        "",
        f"{n} independent runs per method (seed indices 0..{n - 1}"
        + (
            "; copy 0 of codistillation run i starts from the weights and data order of single model i"
            if all(v.get("data") == "shared" for v in result["codistill"].values())
            else ""
        )
        + "). Churn is mean |pA − pB| averaged over all "
        f"{n * (n - 1) // 2} pairs of a method's runs; intervals ({100 * conf:.0f}%) are a jackknife over runs "
        "(pairs sharing a run are dependent), and differences to the single model are paired by seed index. "
        f"The hold-out ({h['valid_rows']:,} rows; training {h['train_rows']:,}; row ids checked disjoint) is cut "
        f"in its order: the first {h['calibration_rows']:,} rows fit post-hoc calibrators, every number below is "
        f"measured on the other {h['evaluation_rows']:,}.",
    ]
    if n < 5:
        lines += [
            "",
            f"**Few runs ({n}):** intervals are small-sample t intervals with {n - 1} degrees of freedom, wide.",
        ]
    for cell in cells:
        rows = result["results"][cell]["rows"]
        train = result["trainings"][cell]
        lines += ["", f"## {'Base point' if cell == 'base' else 'Variant ' + cell}", ""]
        body = []
        for row, r in rows.items():
            paper = PAPER.get(row) if cell == "base" else None
            per_model, total = train["codistill"] if row.startswith("codistill") else train[row]
            cost = f"{per_model} / {total}"
            ac = r["after_calibration"]
            body.append(
                [
                    _label(row, cell, result),
                    cost,
                    _est(r["log_loss"]),
                    _est(r["auc"]),
                    _est(r["churn"]),
                    f"{ac['offset']['value']:.4f} / {ac['platt']['value']:.4f} / {ac['isotonic']['value']:.4f}",
                    "—" if row == "baseline" else _est(r["vs_baseline"]["churn_relative"], pct=True),
                    "—" if row == "baseline" else _est(r["vs_baseline"]["log_loss"], sign=True),
                    f"{paper[0]} / {paper[1]}" if paper else "",
                ]
            )
        lines += _table(
            [
                "row",
                "trainings per model / in all",
                "log loss",
                "AUC",
                "churn",
                "churn after offset / Platt / isotonic",
                "churn vs single model",
                "log loss vs single model",
                "paper: log loss / churn",
            ],
            body,
        )
        lines += [
            "",
            "Trainings: per served model, and in all behind the row (an ensemble serves two single models at "
            "once, and all its ensembles are made of the row's single models; a codistillation run trains two "
            "copies).",
            "",
        ]
        lines += [verdict(_label(row, cell, result), r, conf) for row, r in rows.items() if row != "baseline"]
        info = result["codistill"].get(cell)
        if info and "codistill" in rows:
            w = rows["codistill"]["within_run"]
            lines += [
                "",
                f"Within-run churn (copy 0 vs copy 1 of the same run, mean over runs): {_est(w)}, against "
                f"between-run churn {_est(rows['codistill']['churn'])} (copy 0) and {_est(rows['baseline']['churn']) if 'baseline' in rows else '—'} "
                "between single models: how close the pull brings the two copies it couples.",
                "",
                f"Settings: {info['steps']} steps, burn-in {info['burn_in_steps']}, K = {info['exchange_every']}, "
                f"w = {info['distill_weight']}, loss {info['loss']}, data {info['data']}; teacher versions loaded "
                f"per copy {info['teacher_versions_loaded']}, mean staleness {info['mean_staleness']} steps.",
            ]
            if info["never_loaded_a_teacher"]:
                lines += [
                    "",
                    f"{FLAG}: a codistillation copy of this point never loaded a teacher: it is a baseline.",
                ]
        dec = [
            [_label(row, cell, result), f"{r['churn']['value']:.4f}"]
            + [f"{r['after_calibration'][k]['value']:.4f}" for k in ("offset", "platt", "isotonic")]
            + [f"{r['rank_matched']['value']:.4f}"]
            + [
                f"{100 * r['decomposition'][k]:.0f}%"
                for k in ("global_shift", "monotone_recalibration", "reordering")
            ]
            for row, r in rows.items()
        ]
        lines += [
            "",
            "Churn decomposition: each model recalibrated on the calibration rows (a logit offset; Platt; "
            "isotonic), churn re-measured on the evaluation rows. *Rank-matched*: every model's predictions mapped, "
            "by its own ranking of the rows, onto one common distribution (no labels, no fitting noise). "
            "*Global shift* is the share of churn a per-model logit offset removes, *monotone* the share "
            "rank-matching removes (any monotone recalibration, the offset included), *reordering* what is left: "
            "rows the models rank differently, which no recalibration of each model removes. A negative share "
            "means the recalibration added churn (a fit on few rows, or a slope that stretches predictions).",
            "",
        ]
        lines += _table(
            [
                "row",
                "raw churn",
                "after offset",
                "after Platt",
                "after isotonic",
                "rank-matched",
                "global shift",
                "monotone",
                "reordering",
            ],
            dec,
        )
        per_run = result["results"][cell]["per_run"]
        flagged = [(k, x) for k, xs in per_run.items() for x in xs if x["outlier"]]
        lines += [
            "",
            "Outlier retrains: each run's distance to the consensus of the others (mean |p_run − median of the "
            f"other runs|), flagged when its modified z-score exceeds {s['outlier_threshold']} and the distance is "
            "at least 1.5 times the median run's: "
            + (
                "; ".join(
                    f"{FLAG} {ROW_LABELS[k]} run {x['index']} (seed {x['seed']}, log loss {x['log_loss']:.4f}, "
                    f"distance {x['consensus_distance']:.4f}, z {x['robust_z']:.1f})"
                    for k, x in flagged
                )
                if flagged
                else "none."
            ),
            "",
        ]
        lines += _table(
            ["runs", "index", "seed", "log loss", "consensus distance", "robust z"],
            [
                [
                    ROW_LABELS[k],
                    str(x["index"]),
                    str(x["seed"]),
                    f"{x['log_loss']:.4f}",
                    f"{x['consensus_distance']:.4f}",
                    f"{x['robust_z']:.1f}",
                ]
                for k, xs in per_run.items()
                for x in xs
            ],
        )
    if result.get("bayes_optimal"):
        b = result["bayes_optimal"]
        lines += [
            "",
            f"Bayes-optimal on the evaluation rows (synthetic truth): log loss {b['log_loss']:.4f}, AUC {b['auc']:.4f}.",
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    t = result["timings"]
    lines += [
        "",
        "## Timings",
        "",
        f"Total {t['total_s']} s this invocation; per run (s): "
        + ", ".join(f"{k}: {v['seconds']}" for k, v in t["runs"].items()),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        *_toml_block("Study config (as given)", config_text),
        *_toml_block("Resolved training config of the runs (seed and num_groups vary per run)", base_toml),
    ]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out


# ---------------------------------------------------------------------------------------------------
# regime.md


def regime_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (axis, point, row): churn, log loss and the paired changes, with intervals."""
    out = []
    for cell, info in result["cells"].items():
        if info["axis"] is None and cell != "base":
            continue
        res = result["results"][cell]
        for row, r in res["rows"].items():
            rec: dict[str, Any] = {
                "axis": info["axis"] or "base",
                "value": info["value"] or "base",
                "row": row,
            }
            for name, e in (
                ("churn", r["churn"]),
                ("log_loss", r["log_loss"]),
                ("churn_rel_vs_point_baseline", r["vs_baseline"]["churn_relative"]),
                ("log_loss_vs_point_baseline", r["vs_baseline"]["log_loss"]),
                (
                    "churn_rel_vs_base_baseline",
                    (res.get("vs_base_point") or {}).get(row, {}).get("churn_relative"),
                ),
                ("log_loss_vs_base_baseline", (res.get("vs_base_point") or {}).get(row, {}).get("log_loss")),
                ("churn_after_isotonic", r["after_calibration"]["isotonic"]),
            ):
                if cell == "base" and name.endswith("base_baseline"):
                    e = r["vs_baseline"]["churn_relative" if name.startswith("churn") else "log_loss"]
                for k in ("value", "ci_low", "ci_high"):
                    rec[f"{name}_{k}" if k != "value" else name] = None if e is None else e[k]
            w = r.get("within_run")  # every record has the column (a table takes its columns from all)
            rec["within_run_churn"] = w["value"] if w else None
            out.append(rec)
    return out


def write_regime(root: Path, result: dict[str, Any]) -> Path:
    """``regime.md`` (a table per axis), ``regime.csv`` / ``regime.parquet`` (all rows) and one plot per axis."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    root = Path(root)
    records = regime_table(result)
    table = pa.Table.from_pylist(records)
    pq.write_table(table, root / "regime.parquet")
    pacsv.write_csv(table, root / "regime.csv")
    plt = _pyplot()
    axes = list(dict.fromkeys(r["axis"] for r in records if r["axis"] != "base"))
    base = [r for r in records if r["axis"] == "base"]
    lines = [
        "# Regime map",
        "",
        "Each axis is varied one at a time around the base point; every point trains its own runs of the rows "
        f"it compares ({result['study']['runs']} each; points that differ only in codistillation settings "
        "share the single models). Changes are paired by seed index, jackknifed over runs: *vs point* compares "
        "with the single model trained at the same point, *vs base* with the single model of the base point "
        "(is this setting better than not changing anything?).",
        "",
    ]
    for axis in axes:
        recs = base + [r for r in records if r["axis"] == axis]
        lines += [f"## {axis}", ""]
        lines += _table(
            [
                "point",
                "row",
                "churn",
                "churn vs point single model",
                "churn vs base single model",
                "log loss",
                "log loss vs base",
            ],
            [
                [
                    str(r["value"]),
                    ROW_LABELS.get(r["row"], r["row"]),
                    _fmt3(r, "churn"),
                    _fmt3(r, "churn_rel_vs_point_baseline", pct=True) if r["row"] != "baseline" else "—",
                    _fmt3(r, "churn_rel_vs_base_baseline", pct=True)
                    if r["axis"] != "base" or r["row"] != "baseline"
                    else "—",
                    _fmt3(r, "log_loss"),
                    _fmt3(r, "log_loss_vs_base_baseline", sign=True)
                    if r["axis"] != "base" or r["row"] != "baseline"
                    else "—",
                ]
                for r in recs
            ],
        )
        lines += ["", f"![{axis}](regime_{_safe(axis)}.png)", ""]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        points = list(dict.fromkeys(r["value"] for r in recs))
        for j, row in enumerate(dict.fromkeys(r["row"] for r in recs)):
            rs = [r for r in recs if r["row"] == row]
            xs = [points.index(r["value"]) + 0.08 * (j - 2) for r in rs]
            for ax, key, scale in (
                (a1, "churn_rel_vs_base_baseline", 100),
                (a2, "log_loss_vs_base_baseline", 1),
            ):
                v = np.array([np.nan if r[key] is None else scale * r[key] for r in rs], dtype=float)
                lo = np.array(
                    [np.nan if r[f"{key}_ci_low"] is None else scale * r[f"{key}_ci_low"] for r in rs], float
                )
                hi = np.array(
                    [np.nan if r[f"{key}_ci_high"] is None else scale * r[f"{key}_ci_high"] for r in rs],
                    float,
                )
                ax.errorbar(
                    xs, v, yerr=[v - lo, hi - v], fmt="o-", ms=4, lw=0.8, label=ROW_LABELS.get(row, row)
                )
        for ax, title in (
            (a1, "churn change vs base single model (%)"),
            (a2, "log-loss change vs base single model"),
        ):
            ax.axhline(0, color="gray", lw=0.8, ls="--")
            ax.set_xticks(range(len(points)), points, fontsize=7, rotation=20)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(axis)
        a1.legend(fontsize=6)
        made: list[str] = []
        _save(fig, root, f"regime_{_safe(axis)}.png", made)
    lines += ["Full table: `regime.csv` / `regime.parquet` (one row per axis point and row, with intervals)."]
    out = root / "regime.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _fmt3(r: dict[str, Any], key: str, pct: bool = False, sign: bool = False) -> str:
    if r.get(key) is None:
        return "—"
    return _est(
        {"value": r[key], "ci_low": r[f"{key}_ci_low"], "ci_high": r[f"{key}_ci_high"]}, pct=pct, sign=sign
    )


# ---------------------------------------------------------------------------------------------------
# retrain.md


def _err(e: dict[str, Any]) -> list[list[float]] | None:
    """matplotlib's asymmetric error bars of an estimate (None without an interval)."""
    if e.get("ci_low") is None:
        return None
    return [[e["value"] - e["ci_low"]], [e["ci_high"] - e["value"]]]


def write_retrain_report(root: Path, result: dict[str, Any], config_text: str) -> Path:
    """``retrain.md``: per method the churn a launch sees and its quality, per version and summarised, and a
    churn-vs-log-loss trade-off plot (one point per method and λ, with intervals over versions)."""
    root = Path(root)
    cfg = result["retrain"]
    rows = result["rows"]
    pct = 100 * cfg["confidence"]
    lines = [
        "# Daily retrains",
        "",
        f"{cfg['days']} days, training window {cfg['window']} days: version d trains on days d−{cfg['window'] - 1}..d "
        f"and is evaluated on day d+1; {cfg['chains']} independent chains per method (different seeds). *Churn vs "
        "previous* is mean |p_d − p_{d−1}| on day d+1 (what a launch sees; from the second version on), *churn vs "
        "independent* the churn between the chains' version d (the paper's). Summaries: mean over the versions "
        f"that have a predecessor (d ≥ {cfg['window']}) with a {pct:.0f}% t interval over versions (versions share "
        "days, so read it as a guide); changes to `cold` are "
        "paired version by version. Compute is per chain and version: examples trained on (copies x steps x "
        "batch) and teacher forwards.",
        "",
    ]
    body = []
    for key, r in rows.items():
        sm = r["summary"]
        body.append(
            [
                key,
                _est(sm["log_loss"]),
                _est(sm["churn_vs_previous"]),
                "—" if key == "cold" else _est(sm["churn_vs_previous_relative_to_cold"], pct=True),
                "—" if key == "cold" else _est(sm["log_loss_vs_cold"], sign=True),
                _est(sm["churn_vs_independent"]),
                f"{sm['examples_per_version']:,.0f}",
                f"{sm['teacher_forwards_per_version']:,.0f}",
            ]
        )
    lines += _table(
        [
            "method",
            "log loss",
            "churn vs previous",
            "vs cold",
            "log loss vs cold",
            "churn vs independent",
            "examples / version",
            "teacher forwards / version",
        ],
        [[("—" if x is None else x) for x in b] for b in body],
    )
    lines += ["", "## Per version", ""]
    lines += _table(
        [
            "method",
            "version",
            "train days",
            "eval day",
            "log loss",
            "AUC",
            "calibration",
            "churn vs previous",
            "flips vs previous",
            "churn vs independent",
        ],
        [
            [
                key,
                str(x["version"]),
                "-".join(str(k) for k in (x["train_days"][0], x["train_days"][-1])),
                str(x["eval_day"]),
                f"{x['log_loss']:.4f}",
                f"{x['auc']:.4f}",
                f"{x['calibration']:.3f}",
                "—" if x["churn_vs_previous"] is None else f"{x['churn_vs_previous']:.4f}",
                "—" if x["flip_vs_previous"] is None else f"{x['flip_vs_previous']:.4f}",
                f"{x['churn_vs_independent']:.4f}",
            ]
            for key, r in rows.items()
            for x in r["per_version"]
        ],
    )
    stale = result.get("staleness") or {}
    if stale:
        lines += [
            "",
            "## Staleness (cold retrain)",
            "",
            "The cold version d served k days late, on day d+1+k, against the fresh cold version of the day "
            "before; mean over chains and versions with a t interval (pairs share days: a guide). It is the "
            "drift a daily retrain fights.",
            "",
        ]
        lines += _table(
            ["days late", "pairs", "log loss increase", "churn stale vs fresh"],
            [
                [k, str(len(v["pairs"])), _est(v["log_loss_increase"], sign=True), _est(v["churn"])]
                for k, v in stale.items()
            ],
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in rows.items():
        c, ll = r["summary"]["churn_vs_previous"], r["summary"]["log_loss"]
        if c["value"] is None:
            continue
        ax.errorbar(ll["value"], c["value"], xerr=_err(ll), yerr=_err(c), fmt="o", ms=4, lw=0.8)
        ax.annotate(key, (ll["value"], c["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("log loss on the next day (mean over versions)")
    ax.set_ylabel("churn vs the previous version")
    ax.set_title("Daily retrains: launch churn vs quality (lower left is better)", fontsize=9)
    made: list[str] = []
    _save(fig, root, "retrain_tradeoff.png", made)
    lines += ["", "![trade-off](retrain_tradeoff.png)", "", *_toml_block("Config (as given)", config_text)]
    out = root / "retrain.md"
    out.write_text("\n".join(lines))
    return out
