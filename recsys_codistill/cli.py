"""``recsys-codistill``: the command line. Each sub-command is a thin shell over a library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_synth(a: argparse.Namespace) -> int:
    from data_pipeline.synthetic import SyntheticParams, generate

    params = SyntheticParams(days=a.days, drift=a.drift, id_turnover=a.id_turnover)
    summary = generate(a.out, a.rows, a.seed, num_files=a.files, params=params, progress=True)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, indent=2))
    return 0


def _cmd_ingest(a: argparse.Namespace) -> int:
    from pathlib import Path

    from data_pipeline.preprocess import REJECTS_NAME, ingest
    from data_pipeline.sources import IngestError

    try:
        manifest = ingest(
            a.inputs,
            a.out,
            valid_fraction=a.valid_fraction,
            split=a.split,
            seed=a.seed,
            rows_per_file=a.rows_per_file,
            row_group_size=a.row_group_size,
            overwrite=a.overwrite,
            max_reject_fraction=a.max_reject_fraction,
            progress=True,
            days=a.days,
        )
    except IngestError as e:  # the same message with options spelled as this command's flags
        raise IngestError(e.cli_message) from e
    keys = ("rows_in", "rows_ok", "rows_rejected", "rows", "positive_rate")
    print(json.dumps({k: manifest[k] for k in keys if k in manifest}, indent=2))
    print(f"wrote {a.out}")
    # One line on stderr whatever stdout is piped into, so rejected rows are never silent.
    print(
        f"ingest: {manifest['rows_in']} rows in, {manifest['rows_ok']} ok, {manifest['rows_rejected']} rejected "
        f"(rejects: {Path(a.out) / REJECTS_NAME})",
        file=sys.stderr,
    )
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from data_pipeline.preprocess import export_tsv
    from data_pipeline.sources import IngestError

    try:
        rows = export_tsv(a.parquet_dir, a.out, overwrite=a.overwrite)
    except IngestError as e:
        raise IngestError(e.cli_message) from e
    print(f"wrote {rows} rows to {a.out}")
    return 0


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (argparse names the flag in its error)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _load(a: argparse.Namespace):  # noqa: ANN202
    from recsys_codistill.config import load_config

    overrides = list(a.set or [])
    if getattr(a, "run_dir", None):
        overrides.append(f"run_dir={json.dumps(a.run_dir)}")
    return load_config(a.config, overrides)


def _cmd_train(a: argparse.Namespace) -> int:
    from recsys_codistill.config import to_toml
    from recsys_codistill.train.launch import launch

    cfg = _load(a)
    print("# resolved config\n" + to_toml(cfg), flush=True)
    code = launch(cfg)
    if code == 0:
        print(f"run directory: {cfg.run_dir}")
    return code


def _cmd_predict(a: argparse.Namespace) -> int:
    from recsys_codistill.train.predict import predict

    # Checked here so the error names the flag, not the library's keyword.
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size}: expected an integer >= 1")
    if a.group < 0:
        raise ValueError(f"--group {a.group}: expected an integer >= 0 (a group of the run)")
    for path in predict(a.run, a.data, a.out, group=a.group, batch_size=a.batch_size):
        print(f"wrote {path}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from recsys_codistill.eval.churn import check_threshold
    from recsys_codistill.eval.evaluation import evaluate, format_table, write_json

    # Checked here so the errors name the flags, not the library's keywords. A NaN threshold would
    # otherwise make every row "negative" in both models and report a flip rate of 0.
    if a.threshold is not None:
        check_threshold(a.threshold, "--threshold")
    if a.bootstrap < 0:
        raise ValueError(f"--bootstrap {a.bootstrap}: expected an integer >= 0 (0 = no intervals)")
    if a.seed < 0:
        raise ValueError(f"--seed {a.seed}: expected an integer >= 0")
    if a.name is not None and len(a.name) != len(a.pred):
        raise ValueError(
            f"--name given {len(a.name)} times for {len(a.pred)} --pred files; give one per --pred"
        )
    result = evaluate(
        a.pred,
        names=a.name,
        threshold=a.threshold,
        bootstrap=a.bootstrap,
        seed=a.seed,
        data_dir=a.data,
        feature=a.feature,
    )
    print(format_table(result))
    if a.out:
        write_json(result, a.out)
        print(f"wrote {a.out}")
    return 0


def _cmd_study(a: argparse.Namespace) -> int:
    from recsys_codistill.study.study import run_study

    report = run_study(a.config, overrides=a.set or [])
    print(f"report: {report}")
    if (report.parent / "regime.md").is_file():
        print(f"regime map: {report.parent / 'regime.md'}")
    return 0


def _cmd_retrain(a: argparse.Namespace) -> int:
    from recsys_codistill.study.retrain import run_retrain

    report = run_retrain(a.config, overrides=a.set or [])
    print(f"report: {report}")
    return 0


def _ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _plan_types(text: str) -> list[str]:
    from recsys_codistill.train.comm_plan import PLAN_TYPES

    values = text.split(",")
    bad = [v for v in values if v not in PLAN_TYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown plan type(s) {bad}; expected some of {list(PLAN_TYPES)}")
    return values


def _cmd_plan(a: argparse.Namespace) -> int:
    from recsys_codistill.train.comm_plan import report

    print(report(_load(a), a.ranks, a.types, measured=a.measure))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from recsys_codistill.study.study import run_demo

    report = run_demo(a.out, overrides=a.set or [])
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsys-codistill", description="Sparse CTR training with online codistillation"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic Criteo-format data set with a known optimum")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--files", type=int, default=1, help="number of .tsv.gz files")
    s.add_argument("--days", type=int, default=1, help="equal days in row order (ingest --days cuts alike)")
    s.add_argument(
        "--drift", type=float, default=0.0, help="daily random-walk step of every id effect, in effect sds"
    )
    s.add_argument(
        "--id-turnover",
        type=float,
        default=0.0,
        help="share of each vocabulary by which the popular ids slide per day (new ids appear, old fade)",
    )
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("ingest", help="Criteo TSV/.gz/CSV -> Parquet shards + manifest + rejects")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--valid-fraction", type=float, default=0.0, help="hold out this fraction as valid/")
    s.add_argument("--split", choices=["time", "hash"], default="time", help="time = last rows in file order")
    s.add_argument("--seed", type=int, default=0, help="seed of the hash split")
    s.add_argument(
        "--days",
        type=int,
        default=0,
        help="split into day00..dayNN of equal row counts in file (= time) order, for daily retrains",
    )
    s.add_argument("--rows-per-file", type=int, default=1_000_000)
    s.add_argument("--row-group-size", type=int, default=8192)
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a data set an earlier ingest wrote (never any other directory)",
    )
    s.add_argument(
        "--max-reject-fraction",
        type=_fraction,
        default=0.5,  # preprocess.DEFAULT_MAX_REJECT_FRACTION, spelled out: importing it here loads pyarrow
        help="fail, writing nothing, if more than this share of one input's lines is rejected (default 0.5: "
        "real Criteo data rejects ~0 lines, a wrong format ~all of them)",
    )
    s.set_defaults(fn=_cmd_ingest)

    s = sub.add_parser("export", help="ingested Parquet -> Criteo TSV (.gz by extension)")
    s.add_argument("parquet_dir")
    s.add_argument("out")
    s.add_argument("--overwrite", action="store_true", help="replace out if it exists")
    s.set_defaults(fn=_cmd_export)

    for name, fn, helptext in (
        ("train", _cmd_train, "train one group, or num_groups co-distilling groups"),
        ("study", _cmd_study, "N retrains per method, all-pairs churn, verdicts; [study.sweep] regime map"),
        ("retrain", _cmd_retrain, "simulate daily retrains: churn vs yesterday's model for each method"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", required=name in ("study", "retrain"))
        s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
        if name == "train":
            s.add_argument("--run-dir", help="shorthand for --set run_dir=...")
        s.set_defaults(fn=fn)

    s = sub.add_parser(
        "plan",
        help="the sharding plan, memory per rank and bytes moved per step, per plan type and rank count",
    )
    s.add_argument("--config")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    s.add_argument(
        "--ranks", type=_ints, default=[1, 2, 4], help="rank counts, comma-separated (default 1,2,4)"
    )
    s.add_argument(
        "--types",
        type=_plan_types,
        default=["table_wise", "column_wise", "data_parallel"],
        help="plan types, comma-separated (default table_wise,column_wise,data_parallel)",
    )
    s.add_argument(
        "--measure",
        action="store_true",
        help="also count the bytes of 3 training steps on a live gloo world per plan and rank count (starts "
        "that many processes on this machine)",
    )
    s.set_defaults(fn=_cmd_plan)

    s = sub.add_parser("predict", help="predict a data set with one run (or an ensemble of several)")
    s.add_argument("--run", action="append", required=True, help="run directory (repeat for an ensemble)")
    s.add_argument("--data", required=True, help="ingested Parquet directory")
    s.add_argument("--out", required=True, help="predictions .parquet")
    s.add_argument("--group", type=int, default=0, help="which group's model of a codistillation run")
    s.add_argument("--batch-size", type=int, default=8192)
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("eval", help="quality per model and churn between every pair of prediction files")
    s.add_argument("--pred", action="append", required=True)
    s.add_argument("--name", action="append", help="display name per --pred")
    s.add_argument(
        "--threshold", type=float, help="flip-rate threshold, in (0, 1) (default: the first file's base rate)"
    )
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0 = no intervals)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (>= 0)")
    s.add_argument("--data", help="ingested Parquet dir for per-feature-frequency churn")
    s.add_argument("--feature", default="C1")
    s.add_argument("--out", help="write the full result as JSON")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("demo", help="the study on the embedded synthetic data, end to end")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipeline.loader import DatasetError
    from data_pipeline.sources import IngestError
    from recsys_codistill.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, IngestError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"recsys-codistill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
