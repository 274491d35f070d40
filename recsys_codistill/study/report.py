"""``report.md`` and PNG plots of a churn study (see :mod:`recsys_codistill.study.study`).

The study's result dict is keyed by each row's :attr:`~recsys_codistill.study.Method.key` (as
``study.json`` is); the report is given the :class:`~recsys_codistill.study.Method` rows themselves and
takes their labels from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from recsys_codistill.study.study import Method

PAPER = {  # Anil et al. 2018, Table 1 (full Criteo): validation log loss and churn
    "baseline": (0.4480, 0.029),
    "ensemble": (0.4461, 0.022),
    "codistill": (0.4458, 0.019),
}


def _paper(method: Method) -> tuple[float, float] | None:
    """The paper's (log loss, churn) for a method's own row; variants have none."""
    return PAPER.get(method.name) if method.variant is None else None


def _pm(s: dict[str, float], digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['half_range']:.{digits}f}"


def _plot(root: Path, result: dict[str, Any], labels: dict[str, str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []

    def save(fig, name: str) -> None:  # noqa: ANN001
        fig.tight_layout()
        fig.savefig(root / name, dpi=120)
        plt.close(fig)
        made.append(name)

    # 1. churn per method: one dot per repeat, the median as a bar.
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    methods = list(result["per_repeat"])
    for i, m in enumerate(methods):
        vals = [x["churn"]["mean_abs_diff"]["value"] for x in result["per_repeat"][m]]
        lo = [x["churn"]["mean_abs_diff"]["ci_low"] for x in result["per_repeat"][m]]
        hi = [x["churn"]["mean_abs_diff"]["ci_high"] for x in result["per_repeat"][m]]
        ax.bar(i, float(np.median(vals)), color="#9ecae1", width=0.6)
        xs = [i + (j - (len(vals) - 1) / 2) * 0.08 for j in range(len(vals))]
        if None not in lo and None not in hi:
            ax.errorbar(
                xs,
                vals,
                yerr=[
                    [v - a for v, a in zip(vals, lo, strict=True)],
                    [b - v for v, b in zip(vals, hi, strict=True)],
                ],
                fmt="o",
                color="k",
                ms=3,
                lw=0.8,
            )
        else:
            ax.plot(xs, vals, "ko", ms=3)
    ax.set_xticks(
        range(len(methods)), [labels[m] for m in methods], fontsize=7, rotation=15 if len(methods) > 3 else 0
    )
    ax.set_ylabel("churn: mean |pA − pB|")
    ax.set_title("Churn between two retrains (bars: median; dots: repeats, row-bootstrap 95% CI)", fontsize=8)
    save(fig, "churn.png")

    # 2. churn vs staleness (exchange interval K), when the study compares several K.
    settings = result.get("codistill_settings", {})
    ks = {v["exchange_every"] for v in settings.values()}
    if len(ks) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        pts = sorted(
            (
                settings[m]["exchange_every"],
                float(np.median([x["churn"]["mean_abs_diff"]["value"] for x in result["per_repeat"][m]])),
                m,
            )
            for m in settings
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="codistillation")
        for k, v, m in pts:
            ax.annotate(
                labels[m].replace("codistillation ", ""),
                (k, v),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if "baseline" in result["per_repeat"]:
            base = float(
                np.median([x["churn"]["mean_abs_diff"]["value"] for x in result["per_repeat"]["baseline"]])
            )
            ax.axhline(base, color="gray", ls="--", lw=0.8, label="single model")
        ax.set_xscale("log")
        ax.set_xlabel("exchange interval K (steps; staleness up to K)")
        ax.set_ylabel("median churn")
        ax.legend(fontsize=8)
        ax.set_title("Churn vs teacher staleness", fontsize=9)
        save(fig, "churn_vs_staleness.png")

    # 3. learning curves of repeat 0.
    if any(result["curves"].values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, pts in result["curves"].items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        if result.get("bayes_optimal"):
            ax.axhline(
                result["bayes_optimal"]["log_loss"], color="gray", ls="--", lw=0.8, label="Bayes optimum"
            )
        ax.set_xlabel("step")
        ax.set_ylabel("validation log loss")
        ax.legend(fontsize=8)
        ax.set_title("Learning curves (repeat 0)", fontsize=9)
        save(fig, "learning_curves.png")
    return made


def write_report(
    root: Path, result: dict[str, Any], *, methods: Sequence[Method], base_toml: str, config_text: str
) -> Path:
    """Write ``root/report.md`` (and its plots) for a study ``result`` whose rows are ``methods``."""
    root = Path(root)
    by_key = {m.key: m for m in methods}
    labels = {key: m.label for key, m in by_key.items()}
    plots = _plot(root, result, labels)
    t = result["table"]
    lines = [
        "# Prediction churn study",
        "",
        f"{result['study']['repeats']} repeats; hold-out of {result['holdout']['valid_rows']:,} rows "
        f"(training {result['holdout']['train_rows']:,} rows; row ids checked disjoint). "
        "Values are mean ± half-range over repeats (the paper's convention), median in brackets. Log loss, "
        "AUC and NE pool both runs of every repeat; churn is mean |pA − pB| between the two independent "
        "runs of a method on the same hold-out rows (copy 0 of each codistillation run).",
        "",
        "| method | val log loss | AUC | NE | churn mean abs diff [median] | symmetric PD | flip rate "
        "| paper: log loss / churn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, row in t.items():
        paper = _paper(by_key[m])
        lines.append(
            f"| {labels[m]} | {_pm(row['log_loss'])} | {_pm(row['auc'])} | {_pm(row['ne'])} | "
            f"{_pm(row['churn'])} [{row['churn']['median']:.4f}] | {_pm(row['symmetric_pd'])} | "
            f"{_pm(row['flip_rate'])} | " + (f"{paper[0]} / {paper[1]} |" if paper else " |")
        )
    if "baseline" in t:
        base = t["baseline"]["churn"]["median"]
        rel = ", ".join(
            f"{labels[m]} {100 * (t[m]['churn']['median'] / base - 1):+.0f}%" for m in t if m != "baseline"
        )
        if rel:
            lines += [
                "",
                f"Median churn relative to the single model: {rel} "
                "(paper: ensemble −24%, codistillation −35%).",
            ]
    paired = result.get("paired_vs_baseline") or {}
    if paired:
        lines += [
            "",
            "Paired by repeat (each method's runs share seeds and hold-out rows with the single-model runs), "
            "churn minus the single model's, mean over repeats with a bootstrap 95% CI over repeats (this is "
            "the retrain-to-retrain uncertainty; the per-repeat CIs below only cover the hold-out rows):",
            "",
            "| method | churn − single model | relative | repeats lower |",
            "|---|---|---|---|",
        ]
        for m, d in paired.items():
            lines.append(
                f"| {labels[m]} | {d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | "
                f"{100 * d['mean_relative']:+.0f}% "
                f"[{100 * d['relative_ci_low']:+.0f}%, {100 * d['relative_ci_high']:+.0f}%] | "
                f"{d['repeats_lower']}/{d['repeats']} |"
            )
    if result.get("bayes_optimal"):
        b = result["bayes_optimal"]
        lines += [
            "",
            f"Bayes-optimal on this hold-out (synthetic truth): log loss {b['log_loss']:.4f}, "
            f"AUC {b['auc']:.4f}.",
        ]
    settings = result.get("codistill_settings", {})
    if settings:
        lines += [
            "",
            "Codistillation settings: "
            + "; ".join(
                f"{labels[m]}: K={v['exchange_every']}, burn-in {v['burn_in_steps']}, "
                f"w={v['distill_weight']}, loss {v['loss']}, data {v['data']}"
                for m, v in settings.items()
            )
            + ".",
        ]
    lines += [
        "",
        "## Per repeat (95% paired bootstrap CIs)",
        "",
        "| method | repeat | churn [95% CI] | flip rate [95% CI] | log loss A / B |",
        "|---|---|---|---|---|",
    ]
    for m, reps in result["per_repeat"].items():
        for r, x in enumerate(reps):
            c, f = x["churn"]["mean_abs_diff"], x["churn"]["flip_rate"]

            def ci(e: dict[str, Any]) -> str:
                return (
                    f"{e['value']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"
                    if e["ci_low"] is not None
                    else f"{e['value']:.4f}"
                )

            log_losses = f"{x['quality_a']['log_loss']:.4f} / {x['quality_b']['log_loss']:.4f}"
            lines.append(f"| {labels[m]} | {r} | {ci(c)} | {ci(f)} | {log_losses} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    timings = result["timings_s"]
    lines += [
        "",
        "## Timings (s)",
        "",
        ", ".join(f"{k}: {v}" for k, v in timings.items()),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "## Study config (as given)",
        "",
        "```toml",
        config_text.strip(),
        "```",
        "",
        "## Resolved training config of the runs (seed and num_groups vary per run)",
        "",
        "```toml",
        base_toml.strip(),
        "```",
        "",
    ]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
