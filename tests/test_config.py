import dataclasses
import math
import typing
from pathlib import Path

import pytest

from recsys_codistill.config import (
    ConfigError,
    RunConfig,
    check_ranges,
    field_range,
    from_dict,
    load_config,
    save_resolved,
    to_toml,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, '[data]\nbatch_size = 512\n[sharding]\nsharding_type = "column_wise"\n')
    cfg = load_config(p, ["optim.dense_lr=0.5", "model.table_sizes=[100]", "codistill.loss=kl"])
    assert cfg.data.batch_size == 512
    assert cfg.sharding.sharding_type == "column_wise"
    assert cfg.optim.dense_lr == 0.5
    assert cfg.codistill.loss == "kl"
    assert cfg.model.resolved_table_sizes() == (100,) * 26


def test_unknown_key_names_key_file_and_accepted_keys(tmp_path):
    p = write(tmp_path, "[optim]\ndense_lrr = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optim.dense_lrr" in msg and str(p) in msg and "dense_lr" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_config(write(tmp_path, "[optimizer]\nlr = 1\n"))


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.batch_size=1.5", "data.batch_size.*integer"),
        ("data.shuffle=1", "true or false"),
        ("sharding.sharding_type=diagonal", "one of"),
        ("model.table_sizes=[0]", r"table_sizes\[0\]"),
        ("model.table_sizes=[5, 5]", "expected 1 or 26"),
        ("data.batch_size=1001", "not divisible"),
        ("optim", "section.key=value"),
        ("model.dense_buckets=2", "dense_buckets = 2"),
        ("data.min_id_count=-1", "min_id_count = -1"),
        ("data.min_id_count=2", "tables of >= 3 rows"),
    ],
)
def test_bad_values_are_errors(override, match):
    overrides = [override]
    if override.startswith("data.batch_size=1001"):
        overrides.append("sharding.nproc=2")
    if override.startswith("data.min_id_count=2"):
        overrides.append("model.table_sizes=[2]")
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.dense_arch=[64, 16]", 'run_dir="r"'])
    path = save_resolved(cfg, tmp_path)
    assert load_config(path) == cfg
    assert "[codistill]" in to_toml(RunConfig())


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for p in sorted(root.glob("*.toml")):
        if p.name.startswith(("study", "regime", "retrain")):
            continue
        load_config(p)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["codistill.keep_versions=1"], "keep_versions"),
        (
            [
                "codistill.exchange_mode=async",
                "codistill.exchange_every=50",
                "codistill.max_staleness_steps=10",
            ],
            "max_staleness_steps",
        ),
        (["train.log_every=0"], "log_every"),
        (["checkpoint.keep_last=0"], "keep_last"),
        (["sharding.max_restarts=2"], "every_steps"),
        (["train.pipeline=sparse_dist", "codistill.num_groups=2"], "one group only"),
        (["sharding.nnodes=2"], "rdzv_port"),
    ],
)
def test_settings_that_would_fail_late_are_refused_up_front(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.sparse_optimizer=adam"], "rowwise_adagrad"),
        (["codistill.num_groups=2"], "codistillation"),
    ],
)
def test_reinit_embeddings_refuses_combinations_it_cannot_honour(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["train.reinit_embeddings_each_epoch=true", *overrides])


# ---------------------------------------------------------------------------------------------------
# Ranges of every numeric key: declared once next to the field (config.ranged), checked before launch.

INF, NAN = float("inf"), float("nan")

# Out-of-range values per key, written into a TOML file as they are. Every numeric key of every section
# must appear here (test_every_numeric_key_has_bad_values), so a new key cannot skip its range.
BAD_VALUES: dict[str, list] = {
    "data.batch_size": [0, -1],
    "data.epochs": [0, -3],
    "data.shuffle_window": [0, -1],
    "data.min_id_count": [-1],
    "data.valid_max_rows": [-1],
    "model.embedding_dim": [0, -16],
    "model.table_sizes": [[1], [-5], [100] * 25 + [1]],
    "model.max_table_size": [1, 0, -1],
    "model.dense_arch": [[0, 16], [-1, 16]],
    "model.over_arch": [[0, 1], [16, -1, 1]],
    "model.dcn_num_layers": [0, -1],
    "model.dcn_low_rank": [0, -64],
    "model.mlp_layers": [[0], [256, -1]],
    "model.dense_buckets": [-1, 1, 2, 2**31],
    "model.smelu_beta": [0, -1.0, INF, NAN],
    "sharding.nproc": [0, -2],
    "sharding.rdzv_port": [-1, 65536],
    "sharding.nnodes": [0, -1],
    "sharding.node_rank": [-1],
    "sharding.max_restarts": [-1],
    "sharding.threads": [-1],
    "optim.sparse_lr": [-0.1, -1e-300, INF, -INF, NAN],
    "optim.dense_lr": [-0.01, INF, NAN],
    "optim.eps": [0, -1e-8, 2.0, INF, NAN],
    "optim.weight_decay": [-0.1, INF, NAN],
    "optim.warmup_steps": [-1],
    "optim.lr_floor": [-0.1, 1.5, INF, NAN],
    "train.seed": [-1, 2**32],
    "train.max_steps": [-5, -1],
    "train.log_every": [0, -1],
    "train.eval_every": [-1],
    "train.average_fraction": [0, -0.5, 1.5, NAN],
    "train.init_group": [-1],
    "anchor.group": [-1],
    "anchor.weight": [-1.0, INF, NAN],
    "teacher.fraction": [0.0, -0.5, 1.5, INF, NAN],
    "train.average_every": [0, -1],
    "train.ema_decay": [0, 1, 1.5, NAN],
    "codistill.num_groups": [0, -1],
    "codistill.burn_in_steps": [-1],
    "codistill.exchange_every": [0, -50],
    "codistill.distill_weight": [-1, -0.5, INF, NAN],
    "codistill.max_staleness_steps": [-1],
    "codistill.keep_versions": [1, 0, -3],
    "codistill.wait_timeout_s": [0, -1.0, INF, NAN],
    "checkpoint.every_steps": [-1],
    "checkpoint.keep_last": [0, -1],
    "eval.threshold": [-0.1, 1, 1.5, INF, NAN],
    "eval.bootstrap": [-1],
    "eval.seed": [-1, 2**32],
}

# Values at the edges of the accepted ranges (and the "0 means ..." sentinels) that must still load.
GOOD_VALUES: list[tuple[str, object]] = [
    ("train.max_steps", 0),
    ("train.max_steps", 1),
    ("train.seed", 2**32 - 1),
    ("train.eval_every", 0),
    ("data.min_id_count", 0),
    ("data.valid_max_rows", 0),
    ("model.dense_buckets", 0),
    ("model.dense_buckets", 3),
    ("sharding.rdzv_port", 65535),
    ("sharding.threads", 0),
    ("optim.weight_decay", 0.0),
    ("optim.lr_floor", 0.0),
    ("optim.lr_floor", 1.0),
    ("train.average_fraction", 1.0),
    ("optim.sparse_lr", 0.0),
    ("optim.dense_lr", 0.0),
    ("optim.eps", 1.0),
    ("codistill.distill_weight", 0.0),
    ("codistill.burn_in_steps", 0),
    ("codistill.keep_versions", 2),
    ("eval.threshold", 0.0),
    ("eval.threshold", 0.5),
    ("eval.bootstrap", 0),
    ("checkpoint.every_steps", 0),
]


def _toml_value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def _numeric_keys() -> dict[str, tuple[type, str, type]]:
    """'section.key' -> (section class, field name, int or float) for every numeric key of RunConfig."""
    out = {}
    for sec in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[sec.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for name, tp in typing.get_type_hints(cls).items():
            elem = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
            if elem in (int, float):
                out[f"{sec.name}.{name}"] = (cls, name, elem)
    return out


def test_every_numeric_key_declares_a_range_and_has_bad_values():
    keys = _numeric_keys()
    assert len(keys) > 30  # the walk found the sections
    undeclared = [k for k, (cls, name, _) in keys.items() if field_range(cls, name) is None]
    assert not undeclared, f"numeric keys without a declared Range: {undeclared}"
    assert sorted(BAD_VALUES) == sorted(keys), "BAD_VALUES must cover exactly the numeric keys"
    # Every declared range accepts its own default.
    check_ranges(RunConfig(), "<defaults>")


@pytest.mark.parametrize(
    "key, value", [(k, v) for k, vs in BAD_VALUES.items() for v in vs], ids=lambda x: _toml_value(x)[:20]
)
def test_out_of_range_values_are_refused_naming_key_file_value_and_range(tmp_path, key, value):
    section, name = key.split(".")
    p = write(tmp_path, f"[{section}]\n{name} = {_toml_value(value)}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    cls, _, kind = _numeric_keys()[key]
    bad = (
        value
        if not isinstance(value, list)
        else next(x for x in value if not field_range(cls, name).accepts(x))
    )
    assert str(p) in msg and key in msg, msg
    assert f"= {bad!r}" in msg, msg
    assert field_range(cls, name).describe(kind is int) in msg, msg


@pytest.mark.parametrize("key, value", GOOD_VALUES, ids=lambda x: str(x))
def test_edge_values_inside_the_ranges_load(tmp_path, key, value):
    section, name = key.split(".")
    load_config(write(tmp_path, f"[{section}]\n{name} = {_toml_value(value)}\n"))


def test_ranges_apply_to_overrides_and_from_dict():
    with pytest.raises(ConfigError, match=r"--set train.max_steps=-5: train.max_steps = -5 is out of range"):
        load_config(None, ["train.max_steps=-5"])
    with pytest.raises(ConfigError, match=r"<d>: optim.sparse_lr = inf"):
        from_dict({"optim": {"sparse_lr": INF}}, "<d>")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["sharding.nnodes=2", "sharding.rdzv_port=29500", "sharding.node_rank=2"],
            r"node_rank = 2.*\[0, 1\]",
        ),
        (["model.arch=dcn", "model.dense_arch=[64, 8]"], "dense_arch must end in embedding_dim"),
        (["model.dense_arch=[]"], "dense_arch must end in embedding_dim"),
        (["model.over_arch=[16, 2]"], "over_arch .* end in 1"),
        (["model.over_arch=[1]"], "over_arch must have at least 2 layers"),
        (["sharding.rdzv_port=65535", "codistill.num_groups=2"], "rdzv_port <= 65534"),
        (['run_dir=""'], "run_dir = ''; expected a non-empty string"),
        (['sharding.rdzv_host=" "'], "rdzv_host = ' '; expected a non-empty string"),
    ],
)
def test_cross_field_ranges(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
    # The paper's MLP uses neither dense_arch nor over_arch.
    if overrides[0].startswith("model.") and "model.arch=dcn" not in overrides:
        load_config(None, ["model.arch=mlp", *overrides])


def test_shipped_study_configs_load_their_run_configs():
    from recsys_codistill.study.study import cells, load_spec

    root = Path(__file__).resolve().parents[1] / "configs"
    studies = sorted([*root.glob("study*.toml"), *root.glob("regime*.toml")])
    assert len(studies) >= 4
    for p in studies:
        spec = load_spec(p)  # validates every point's single-model and codistillation run configs
        assert cells(spec)[0].name == "base"


def test_shipped_retrain_configs_load():
    from recsys_codistill.study.retrain import load_retrain, rows_of

    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = sorted(root.glob("retrain*.toml"))
    assert len(shipped) >= 2
    for p in shipped:
        cfg, _ = load_retrain(p)
        assert rows_of(cfg)[0].key == "cold"
