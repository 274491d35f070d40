"""Low-precision teacher copies (teacher.precision): TorchRec's quantized tables against the fp32 model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_utils import make_dataset, metrics, run, tiny_config

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("copies")
    data = make_dataset(root / "data")
    run(tiny_config(data, root / "run", "train.max_steps=30", "train.seed=7"))
    return data, root / "run"


def _batch(cfg, data):
    from data_pipeline.loader import CriteoStream

    stream = CriteoStream(data, batch_size=512, table_sizes=cfg.model.resolved_table_sizes(), epochs=1)
    item = next(iter(stream))
    return item[1] if isinstance(item, tuple) else item


# Stated tolerances on a trained model's logits (sd ~0.6): fp16 rounds each table entry to ~3 significant
# digits, int8 to 1/255 of its row's range; either is ~100x below the churn a study measures (~0.04).
TOLERANCE = {"fp16": (1e-3, 2e-4), "int8": (1e-2, 2e-3)}  # (max, mean) |logit difference|


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_quantized_copy_predicts_within_tolerance_of_the_fp32_model(trained, precision):
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    from recsys_codistill.codistill.copies import QuantizedCopy
    from recsys_codistill.run_dir import RunDir
    from recsys_codistill.train.checkpoint import latest_checkpoint
    from recsys_codistill.train.predict import load_run

    data, run_dir = trained
    cfg, model, _ = load_run(run_dir)
    copy = QuantizedCopy(cfg, precision, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before any version was loaded"):
        copy(torch.zeros(1, 13), None)
    copy.load(latest_checkpoint(RunDir(run_dir).checkpoints(0)))
    assert any(isinstance(m, QuantEBC) for m in copy.model.modules())
    batch = _batch(cfg, data)
    with torch.no_grad():
        ref = model(batch.dense_features, batch.sparse_features)
        out = copy(batch.dense_features, batch.sparse_features)
    diff = (out - ref).abs()
    worst, mean = TOLERANCE[precision]
    assert float(diff.max()) < worst and float(diff.mean()) < mean, (float(diff.max()), float(diff.mean()))
    assert float(diff.max()) > 0  # it really is another precision
    # the stored tables shrink: int8 rows carry their own scale and bias
    float_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "embedding_bags" in n)
    quant_bytes = sum(
        t.numel() * t.element_size() for n, t in copy.model.state_dict().items() if "embedding_bags" in n
    )
    assert quant_bytes <= 0.55 * float_bytes


def test_an_int8_anchor_and_fp16_peers_train(trained, tmp_path):
    data, run_dir = trained
    run(
        tiny_config(
            data,
            tmp_path / "a",
            f'anchor.run="{run_dir}"',
            "anchor.weight=2.0",
            'teacher.precision="int8"',
            "train.max_steps=8",
        )
    )
    recs = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert all(m["anchor_kl"] > 0 for m in recs) and recs[-1]["anchor_precision"] == "int8"
    peers = ["codistill.num_groups=2", "codistill.burn_in_steps=2", "codistill.exchange_every=2"]
    peers += ["train.max_steps=8", "codistill.keep_exchange=true"]
    run(tiny_config(data, tmp_path / "c", *peers, 'teacher.precision="fp16"'))
    recs = [m for m in metrics(tmp_path / "c", group=1) if "loss" in m and m["step"] > 4]
    assert recs and all(m["distill_kl"] > 0 for m in recs) and recs[-1]["teacher_precision"] == "fp16"
    # the groups published their tables in fp16: each version is about half an fp32 one
    run(tiny_config(data, tmp_path / "c32", *peers))
    size = {
        name: sum(
            f.stat().st_size for f in (tmp_path / name / "exchange" / "group0" / "step_00000004").iterdir()
        )
        for name in ("c", "c32")
    }
    assert 0.45 < size["c"] / size["c32"] < 0.65, size
    manifest = json.loads(
        (tmp_path / "c" / "exchange" / "group0" / "step_00000004" / "manifest.json").read_text()
    )
    assert manifest["tables"] == "fp16"
