"""Helpers for tests that really train: a small learnable data set and a tiny model config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from recsys_codistill.config import RunConfig, load_config


def make_dataset(root: Path, rows: int = 8192, seed: int = 0) -> Path:
    """Synthetic rows (planted signal) in the ingested layout, row groups small enough for 2 ranks."""
    from data_pipeline.synthetic import generate_parquet

    d = root / "data"
    if not (d / "manifest.json").is_file():
        generate_parquet(d, rows, seed, row_group_size=1024)
    return d


# The tiny model of the tests that drive a study or a retrain simulation from TOML (the same as tiny_config's).
TINY_RUN_TOML = """
[data]
batch_size = 256

[model]
table_sizes = [1000]
embedding_dim = 8
dense_arch = [16, 8]
over_arch = [16, 1]

[train]
log_every = 4
"""


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> RunConfig:
    base = [
        f'data.train_dir="{data}"',
        f'data.valid_dir="{data}"',
        "data.batch_size=256",
        "model.table_sizes=[1000]",
        "model.embedding_dim=8",
        "model.dense_arch=[16, 8]",
        "model.over_arch=[16, 1]",
        "optim.sparse_lr=0.05",
        "optim.dense_lr=0.05",
        "train.progress=false",
        "train.log_every=4",
        "sharding.threads=1",
        f'run_dir="{run_dir}"',
    ]
    return load_config(None, [*base, *overrides])


def run(cfg: RunConfig) -> None:
    from recsys_codistill.train.launch import launch

    code = launch(cfg, quiet=True)
    if code:
        logs = "\n".join(
            p.read_text(errors="replace")[-3000:] for p in Path(cfg.run_dir).glob("group*/launcher.log")
        )
        raise AssertionError(f"training failed with exit code {code}:\n{logs}")


def predictions(run_dir: Path, data: Path, group: int = 0) -> dict[str, np.ndarray]:
    from recsys_codistill.train.predict import load_run, predict_logits

    cfg, model, _ = load_run(run_dir, group)
    return predict_logits(model, cfg, data)


def weights(run_dir: Path, group: int = 0) -> dict[str, torch.Tensor]:
    from recsys_codistill.train.predict import load_run

    _, model, _ = load_run(run_dir, group)
    return {k: v.clone() for k, v in model.state_dict().items()}


def metrics(run_dir: Path, group: int = 0) -> list[dict]:
    import json

    return [json.loads(x) for x in (run_dir / f"group{group}" / "metrics.jsonl").read_text().splitlines()]


def read_rows(path: Path) -> np.ndarray:
    return pq.read_table(path)["row_id"].to_numpy()
