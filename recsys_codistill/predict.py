"""Predictions of trained runs on a Parquet data set, in one process.

The checkpoint's shards (from any number of training ranks) are resharded by DCP into a plain, unsharded
copy of the model, so prediction needs no process group. Output Parquet: ``row_id, label, logit,
probability``, one row per input row, sorted by row id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from data_pipeline.loader import CriteoStream
from models import build_model
from recsys_codistill.checkpoint import check_inputs, latest_checkpoint, load_model_weights
from recsys_codistill.config import RunConfig, load_config, replace
from recsys_codistill.features import input_fingerprint, load_vocab, stream_options
from recsys_codistill.sharding import quiet_library_logs


def load_run(
    run_dir: str | Path, group: int = 0, device: str | torch.device = "cpu"
) -> tuple[RunConfig, nn.Module, int]:
    """(config, model with the latest checkpoint's weights, its step) of ``run_dir/group{group}``."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a training run directory?")
    # The run directory may have moved since training: files saved with the run are found from here.
    cfg = replace(load_config(cfg_path), run_dir=str(run_dir))
    ckpt = latest_checkpoint(run_dir / f"group{group}" / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / f'group{group}' / 'checkpoints'}")
    m = cfg.model
    quiet_library_logs()
    model = build_model(**m.build_kwargs(), device=device)
    check_inputs(ckpt, input_fingerprint(cfg, load_vocab(cfg)))
    step = load_model_weights(ckpt, model)
    return cfg, model.eval(), step


@torch.no_grad()
def predict_logits(
    model: nn.Module, cfg: RunConfig, data_dir: str | Path, batch_size: int = 8192
) -> dict[str, np.ndarray]:
    stream = CriteoStream(
        data_dir,
        batch_size=batch_size,
        **stream_options(cfg),
        shuffle=False,
        drop_last=False,
    )
    device = next(model.parameters()).device
    ids, labels, logits = [], [], []
    for batch in stream:
        keep = batch.row_ids >= 0
        batch = batch.to(device)
        out = model(batch.dense_features, batch.sparse_features).float().cpu()
        ids.append(batch.row_ids.cpu()[keep])
        labels.append(batch.labels.cpu()[keep])
        logits.append(out[keep])
    row_id = torch.cat(ids).numpy()
    order = np.argsort(row_id, kind="stable")
    return {
        "row_id": row_id[order],
        "label": torch.cat(labels).numpy()[order],
        "logit": torch.cat(logits).double().numpy()[order],
    }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def write_predictions(path: str | Path, row_id: np.ndarray, label: np.ndarray, logit: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "row_id": pa.array(row_id, pa.int64()),
            "label": pa.array(label.astype(np.int8), pa.int8()),
            "logit": pa.array(logit, pa.float64()),
            "probability": pa.array(_sigmoid(logit), pa.float64()),
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def predict(
    runs: Sequence[str | Path],
    data_dir: str | Path,
    out: str | Path,
    *,
    group: int = 0,
    batch_size: int = 8192,
) -> list[Path]:
    """Write predictions of one run to ``out``; with several runs, ``out`` holds their ensemble (mean of
    probabilities, the paper's ensemble row) and each member goes to ``<out stem>.member{i}.parquet``."""
    if not runs:
        raise ValueError("predict needs at least one --run")
    out = Path(out)
    members = []
    for run in runs:
        cfg, model, _ = load_run(run, group)
        members.append(predict_logits(model, cfg, data_dir, batch_size))
    written = []
    if len(members) == 1:
        m = members[0]
        return [write_predictions(out, m["row_id"], m["label"], m["logit"])]
    for i, m in enumerate(members):
        if not np.array_equal(m["row_id"], members[0]["row_id"]):
            raise ValueError(f"run {runs[i]} predicted different rows than {runs[0]}")
        written.append(
            write_predictions(
                out.with_name(f"{out.stem}.member{i}.parquet"), m["row_id"], m["label"], m["logit"]
            )
        )
    p = np.mean([_sigmoid(m["logit"]) for m in members], axis=0)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    written.insert(
        0, write_predictions(out, members[0]["row_id"], members[0]["label"], np.log(p) - np.log1p(-p))
    )
    return written
