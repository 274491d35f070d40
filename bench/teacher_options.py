"""Each cheaper-teacher option of the real-sample regime map against the fp32 full-batch teacher, paired
by seed index: churn between independent codistillation runs (copy 0, all pairs) and log loss, each as a
jackknife interval over runs, on the study's evaluation rows (the hold-out after its calibration part).

Reads the finished study's cached predictions (run ``recsys-codistill study --config
configs/regime_criteo_sample.toml`` first); trains nothing. Prints a markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_codistill.config import from_dict, to_dict  # noqa: E402
from recsys_codistill.eval import retrains  # noqa: E402
from recsys_codistill.eval.metrics import log_loss, sigmoid  # noqa: E402
from recsys_codistill.study.study import load_spec, plan_runs, run_predictions  # noqa: E402

CONFIG = "configs/regime_criteo_sample.toml"
AXIS = "teacher_cost"


def main() -> None:
    spec = load_spec(CONFIG)
    root = Path(spec.study.out_dir)
    data = root / "data"
    d = to_dict(spec.base)  # the run addresses name the study's own data directories
    d["data"] = {**d["data"], "train_dir": str(data / "train"), "valid_dir": str(data / "valid")}
    spec.base = from_dict(d)
    plans = plan_runs(spec, root)

    def probs(point: str) -> tuple[np.ndarray, np.ndarray]:
        P, y = [], None
        for i in range(spec.study.runs):
            r = run_predictions(plans[point][("codistill", i)].cfg, data / "valid", 0)
            cut = int(len(r["logit"]) * spec.study.calibration_fraction)
            P.append(sigmoid(r["logit"][cut:]))
            y = r["label"][cut:].astype(np.float64)
        return np.stack(P), y

    base, y = probs("base")
    churn_base = retrains.pairwise_churn(base)
    ll_base = np.array([log_loss(y, p) for p in base])
    print("| option | churn vs fp32 teacher | log loss vs fp32 teacher |\n|---|---|---|")
    for point in [p for p in plans if p.startswith(f"{AXIS}=")]:
        P, _ = probs(point)
        M = retrains.pairwise_churn(P)
        ll = np.array([log_loss(y, p) for p in P])
        c = retrains.paired_difference(
            lambda idx, M=M: retrains.mean_over_pairs(M, idx),
            lambda idx: retrains.mean_over_pairs(churn_base, idx),
            len(P),
            relative=True,
        )
        dl = retrains.paired_difference(
            lambda idx, ll=ll: ll[idx].mean(), lambda idx: ll_base[idx].mean(), len(P)
        )
        print(
            f"| {point.split('=', 1)[1]} | {100 * c.value:+.1f}% [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}] "
            f"| {dl.value:+.4f} [{dl.ci_low:+.4f}, {dl.ci_high:+.4f}] |"
        )


if __name__ == "__main__":
    main()
