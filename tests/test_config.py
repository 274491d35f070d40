from pathlib import Path

import pytest

from recsys_codistill.config import ConfigError, RunConfig, load_config, save_resolved, to_toml


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
    cfg = load_config(None, ["model.dense_arch=[64, 16]", "run_dir=\"r\""])
    path = save_resolved(cfg, tmp_path)
    assert load_config(path) == cfg
    assert "[codistill]" in to_toml(RunConfig())


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for p in sorted(root.glob("*.toml")):
        if p.name.startswith("study"):
            continue
        load_config(p)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["codistill.keep_versions=1"], "keep_versions"),
        (["codistill.exchange_mode=async", "codistill.exchange_every=50", "codistill.max_staleness_steps=10"], "max_staleness_steps"),
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
