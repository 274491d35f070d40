"""Trainer throughput vs a reference loop written like TorchRec's examples/golden_training.

Same model (DLRM, 26 tables x dim 16, dense 512-256-16, over 512-512-256-1), batch 2048, same fused
row-wise Adagrad on the tables and Adagrad on the dense part, same threads, 1 rank on CPU (gloo).
- reference: ``DLRMTrain(DLRM)`` under DMP, fed by the same Parquet loader (the goal's ratio), and again
  from batches pre-materialised in memory (no data cost at all: an upper bound);
- ours: ``recsys_codistill.train.trainer.train`` end to end, reading Parquet through our loader.
Prints one JSON line: examples/s of each, the ratio (goal >= 1.0), peak RSS and where our step time goes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS = int(os.environ.get("BENCH_STEPS", "60"))
WARMUP = 10
B = 2048
TABLE = 100_000


def config(data: Path, run_dir: Path):
    from recsys_codistill.config import load_config

    return load_config(
        None,
        [
            f'data.train_dir="{data}"',
            f"data.batch_size={B}",
            f"model.table_sizes=[{TABLE}]",
            "model.embedding_dim=16",
            "model.dense_arch=[512, 256, 16]",
            "model.over_arch=[512, 512, 256, 1]",
            f"train.max_steps={STEPS}",
            f"train.log_every={WARMUP}",
            "train.progress=false",
            "data.epochs=10",
            f'run_dir="{run_dir}"',
        ],
    )


def reference(cfg, batches) -> float:
    """golden_training style: DLRMTrain + DMP + fused optimizer + KeyedOptimizerWrapper; plain loop.
    ``batches`` is a list (pre-materialised: no data cost) or a CriteoStream (the same data path as ours)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from models import build_ebc

    torch.manual_seed(0)
    ebc = build_ebc(cfg.model.resolved_table_sizes(), 16, "meta")
    model = DLRMTrain(DLRM(ebc, 13, [512, 256, 16], [512, 512, 256, 1], dense_device=torch.device("cpu")))
    apply_optimizer_in_backward(
        RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": cfg.optim.sparse_lr}
    )
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"))
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=cfg.optim.dense_lr),
    )
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    t0 = 0.0
    it = iter(batches)
    for i in range(STEPS):
        if i == WARMUP:
            t0 = time.perf_counter()
        loss, _ = dmp(next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (STEPS - WARMUP) * B / (time.perf_counter() - t0)


def ours(cfg) -> float:
    from recsys_codistill.train.trainer import DistContext, train

    train(cfg, 0, DistContext(0, 1, 0, torch.device("cpu")))
    recs = [json.loads(x) for x in (Path(cfg.run_dir) / "group0" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if "examples_per_s" in r][1:]  # drop the first window (warm-up)
    steps = sum(WARMUP for _ in steady)
    seconds = sum(WARMUP * B / r["examples_per_s"] for r in steady)
    return steps * B / seconds


def breakdown(cfg, batches) -> dict[str, float]:
    """Where our step's time goes, on the same components the trainer uses (ms per step)."""
    from data_pipeline.loader import CriteoStream
    from recsys_codistill.codistill.losses import codistill_loss
    from recsys_codistill.train.trainer import DistContext, build_sharded

    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    sm = build_sharded(cfg, ctx, seed=1)
    stream = CriteoStream(
        cfg.data.train_dir, batch_size=B, table_sizes=cfg.model.resolved_table_sizes(), epochs=10
    )
    it = iter(stream)
    t = {"data": 0.0, "forward": 0.0, "backward_and_sparse_update": 0.0, "dense_optimizer": 0.0}
    for i in range(len(batches)):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        logits = sm.model(batch.dense_features, batch.sparse_features)
        loss = codistill_loss(logits, None, batch.labels, cfg.codistill).total
        t2 = time.perf_counter()
        sm.optimizer.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        sm.optimizer.step()
        t4 = time.perf_counter()
        if i >= WARMUP:
            for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                t[k] += dt
    n = len(batches) - WARMUP
    return {k: round(1000 * v / n, 2) for k, v in t.items()}


def main() -> None:
    from bench._common import single_rank_world, synthetic_parquet
    from data_pipeline.loader import CriteoStream

    single_rank_world(THREADS, 29611)
    tmp, data = synthetic_parquet("bench-train-", STEPS * B, B * 4)
    cfg = config(data, tmp / "run")
    stream = CriteoStream(data, batch_size=B, table_sizes=cfg.model.resolved_table_sizes(), epochs=10)
    it = iter(stream)
    batches = [next(it) for _ in range(STEPS)]

    ref_mem = reference(cfg, batches)
    ref = reference(
        cfg, CriteoStream(data, batch_size=B, table_sizes=cfg.model.resolved_table_sizes(), epochs=10)
    )
    our = ours(cfg)
    parts = breakdown(cfg, batches)
    dist.destroy_process_group()
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "train",
                "threads": THREADS,
                "batch_size": B,
                "steps": STEPS,
                "reference_golden_training_ex_per_s": round(ref),
                "reference_in_memory_batches_ex_per_s": round(ref_mem),
                "ratio_ours_vs_in_memory_reference": round(our / ref_mem, 3),
                "ours_ex_per_s": round(our),
                "ratio_ours_vs_reference": round(our / ref, 3),
                "goal_ratio_ge_1": our / ref >= 1.0,
                "step_ms": parts,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
