"""Predictions of trained runs on a Parquet data set, in one process.

The checkpoint's shards (from any number of training ranks) are resharded by DCP into a plain, unsharded
copy of the model, so prediction needs no process group. Output Parquet: ``row_id, label, logit,
probability``, one row per input row, sorted by row id.

``label`` is null on every row of an unlabelled data set (as its manifest records), never a made-up 0, so
``eval`` cannot score a model against labels that do not exist. Non-finite logits (a diverged or damaged
model) are refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from data_pipeline.loader import CriteoStream
from data_pipeline.manifest import load_manifest
from models import build_model
from recsys_codistill.config import RunConfig, load_config, replace
from recsys_codistill.eval.evaluation import ensemble_logits
from recsys_codistill.eval.predictions import check_finite, write_predictions
from recsys_codistill.run_dir import RunDir
from recsys_codistill.train.checkpoint import check_inputs, is_wrapped, latest_checkpoint, load_model_weights
from recsys_codistill.train.inputs import InputMapping
from recsys_codistill.train.sharding import quiet_library_logs


def load_run(
    run_dir: str | Path, group: int = 0, device: str | torch.device = "cpu"
) -> tuple[RunConfig, nn.Module, int]:
    """(config, model with the latest checkpoint's weights, its step) of ``run_dir/group{group}``."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg_path = rd.config
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a training run directory?")
    # The run directory may have moved since training: files saved with the run are found from here.
    cfg = replace(load_config(cfg_path), run_dir=str(run_dir))
    if not 0 <= group < cfg.codistill.num_groups:
        n = cfg.codistill.num_groups
        raise ValueError(f"{run_dir} trained {n} group(s), numbered 0..{n - 1}; it has no group {group}")
    ckpt = latest_checkpoint(rd.checkpoints(group))
    if ckpt is None:
        raise FileNotFoundError(f"no intact checkpoint under {rd.checkpoints(group)}")
    m = cfg.model
    quiet_library_logs()
    model = build_model(**m.build_kwargs(), device=device)
    check_inputs(ckpt, InputMapping.from_config(cfg))
    step = load_model_weights(ckpt, model, verified=True)  # latest_checkpoint verified it
    return cfg, model.eval(), step


def dataset_is_labelled(data_dir: str | Path) -> bool:
    """Whether the ingested data set ``data_dir`` has labels, as its ``manifest.json`` records.

    Ingest writes ``labelled`` (and ``positives: null`` for unlabelled data); a manifest with neither (older
    or hand-written) is decided from the Parquet footers: unlabelled iff every ``label`` value is null. The
    loader turns a null label into 0, so this cannot be read back from the batches.
    """
    _, manifest = load_manifest(data_dir)
    files = manifest["files"]
    if isinstance(manifest.get("labelled"), bool):
        return bool(manifest["labelled"])
    if "positives" in manifest:
        return manifest["positives"] is not None
    for entry in files:
        meta = pq.ParquetFile(Path(data_dir) / entry["path"]).metadata
        index = meta.schema.to_arrow_schema().get_field_index("label")
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(index)
            stats = chunk.statistics
            if stats is None or not stats.has_null_count or stats.null_count != chunk.num_values:
                return True
    return False


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    if is_wrapped(model):
        return model(batch)[1][1].float()  # CodistillTrain: (loss, (parts, logits, labels))
    return model(batch.dense_features, batch.sparse_features).float()


@torch.no_grad()
def predict_batches(model: nn.Module, stream: CriteoStream, world_size: int = 1) -> dict[str, np.ndarray]:
    """``row_id``, ``label`` and ``logit`` (float64) of every real row of ``stream``, sorted by row id: the
    one predictions path of in-training evaluation and ``predict``. With ``world_size > 1`` this is a
    collective: each rank predicts its share and every rank gets all rows (padding rows dropped)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, labels, logits = [], [], []
    for batch in stream:
        batch = batch.to(device)
        ids.append(batch.row_ids)
        labels.append(batch.labels)
        logits.append(_logits(model, batch))
    model.train(was_training)
    local = [torch.cat(x) if x else torch.empty(0, device=device) for x in (ids, labels, logits)]
    if world_size > 1:
        gathered = []
        for t in local:
            parts = [torch.empty_like(t) for _ in range(world_size)]
            torch.distributed.all_gather(parts, t.contiguous())
            gathered.append(torch.cat(parts))
        local = gathered
    row_ids, y, z = (t.cpu().numpy() for t in local)
    keep = row_ids >= 0  # drop padding rows
    order = np.argsort(row_ids[keep], kind="stable")
    return {
        "row_id": row_ids[keep][order],
        "label": y[keep][order],
        "logit": z[keep][order].astype(np.float64),
    }


def predict_logits(
    model: nn.Module, cfg: RunConfig, data_dir: str | Path, batch_size: int = 8192
) -> dict[str, np.ndarray]:
    """``row_id``, ``label`` (float32; NaN on every row of an unlabelled data set) and ``logit`` (float64)
    of every row of ``data_dir``, sorted by row id."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labelled = dataset_is_labelled(data_dir)
    inputs = InputMapping.from_config(cfg)
    stream = CriteoStream(
        data_dir, batch_size=batch_size, **inputs.stream_options(), shuffle=False, drop_last=False
    )
    pred = predict_batches(model, stream)
    if not labelled:  # the loader's 0s stand for missing labels
        pred["label"] = np.full(pred["label"].shape, np.nan, dtype=np.float32)
    return pred


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
    if Path(data_dir).resolve() in out.resolve().parents:
        raise ValueError(
            f"--out {out} lies inside the data directory {data_dir}; write predictions elsewhere"
        )
    members, names = [], []
    # Every member is predicted and checked before any file is written: a bad member must not leave the
    # other members' files (or a stale ensemble) behind as if the command had worked.
    for run in runs:
        cfg, model, step = load_run(run, group)
        names.append(f"run {run} (group {group}, checkpoint step {step})")
        m = predict_logits(model, cfg, data_dir, batch_size)
        check_finite(m["logit"], names[-1])
        members.append(m)
    if len(members) == 1:
        m = members[0]
        return [write_predictions(out, m["row_id"], m["label"], m["logit"], what=names[0])]
    for i, m in enumerate(members):
        if not np.array_equal(m["row_id"], members[0]["row_id"]):
            raise ValueError(f"run {runs[i]} predicted different rows than {runs[0]}")
    written = [
        write_predictions(
            out.with_name(f"{out.stem}.member{i}.parquet"), m["row_id"], m["label"], m["logit"], what=names[i]
        )
        for i, m in enumerate(members)
    ]
    # The ensemble averages probabilities (the paper's ensemble row), stored as the logit of the mean.
    written.insert(
        0,
        write_predictions(
            out,
            members[0]["row_id"],
            members[0]["label"],
            ensemble_logits([m["logit"] for m in members]),
            what=f"ensemble of {len(runs)} runs",
        ),
    )
    return written
