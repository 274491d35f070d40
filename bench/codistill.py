"""Step time of a codistilling group vs the baseline trainer (same model, batch, threads; 1 rank, CPU).

Codistill step = teacher forward (frozen DMP copy, no_grad, eval) + student step with the distillation
term. Also measures one exchange: bytes published, publish time and teacher load time, and the per-step
cost amortised over ``exchange_every`` = 50 steps (the paper's best). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
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

STEPS = int(os.environ.get("BENCH_STEPS", "40"))
WARMUP = 5
B = 2048
K = 50


def main() -> None:
    from bench._common import single_rank_world, synthetic_parquet
    from data_pipeline.loader import CriteoStream
    from recsys_codistill import dcp_io
    from recsys_codistill.codistill.exchange import publish
    from recsys_codistill.codistill.losses import codistill_loss
    from recsys_codistill.config import load_config
    from recsys_codistill.train.trainer import DistContext, build_sharded

    single_rank_world(THREADS, 29612)
    tmp, _ = synthetic_parquet("bench-codistill-", STEPS * B, B * 4)
    cfg = load_config(
        None,
        [
            f"data.batch_size={B}",
            "model.table_sizes=[100000]",
            "model.dense_arch=[512, 256, 16]",
            "model.over_arch=[512, 512, 256, 1]",
            "codistill.num_groups=2",
        ],
    )
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    student = build_sharded(cfg, ctx, seed=1)
    teacher = build_sharded(cfg, ctx, seed=2, frozen=True, plan=student.plan).model.eval()
    stream = CriteoStream(tmp / "data", batch_size=B, table_sizes=cfg.model.resolved_table_sizes(), epochs=10)
    batches = [b for _, b in zip(range(STEPS), stream, strict=False)]

    def run(with_teacher: bool) -> float:
        t0 = 0.0
        for i, batch in enumerate(batches):
            if i == WARMUP:
                t0 = time.perf_counter()
            t_logits = None
            if with_teacher:
                with torch.no_grad():
                    t_logits = [teacher(batch.dense_features, batch.sparse_features)]
            logits = student.model(batch.dense_features, batch.sparse_features)
            loss = codistill_loss(logits, t_logits, batch.labels, cfg.codistill).total
            student.optimizer.zero_grad()
            loss.backward()
            student.optimizer.step()
        return (time.perf_counter() - t0) / (len(batches) - WARMUP)

    base = run(False)
    codist = run(True)
    base2 = run(False)  # again, to see drift
    base = min(base, base2)

    t0 = time.perf_counter()
    path = publish(tmp / "exchange", 0, 50, student.model)
    publish_s = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in path.iterdir())
    t0 = time.perf_counter()
    state = {"model": teacher.state_dict()}
    dcp_io.load(state, path)  # what the trainer does: restricted unpickler, weights_only byte items
    teacher.load_state_dict(state["model"])
    load_s = time.perf_counter() - t0
    dist.destroy_process_group()
    shutil.rmtree(tmp, ignore_errors=True)
    amortised = codist + (publish_s + load_s) / K
    print(
        json.dumps(
            {
                "bench": "codistill",
                "threads": THREADS,
                "batch_size": B,
                "baseline_step_ms": round(1000 * base, 2),
                "codistill_step_ms": round(1000 * codist, 2),
                "ratio_codistill_vs_baseline": round(codist / base, 3),
                "teacher_forward_share_of_baseline_step": round((codist - base) / base, 3),
                "exchange_bytes": nbytes,
                "exchange_publish_s": round(publish_s, 3),
                "exchange_load_s": round(load_s, 3),
                "ratio_incl_exchange_every_50": round(amortised / base, 3),
                "goal_ratio_le_1.25": amortised / base <= 1.25,
            }
        )
    )


if __name__ == "__main__":
    main()
