"""One group's training loop (one rank of one torch.distributed world).

Read top to bottom: set-up (data, model, sharding, teacher, resume), then the loop, whose phases are
step → teacher refresh/publish → log → eval → checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.loader import CriteoStream
from data_pipeline.vocab import IdVocabulary
from models import build_model
from recsys_codistill import dist as dist_helpers
from recsys_codistill.checkpoint import Checkpointer, NonFiniteError, is_wrapped
from recsys_codistill.codistill import CodistillTrain, codistill_loss
from recsys_codistill.config import RunConfig
from recsys_codistill.features import input_fingerprint, load_vocab, stream_options
from recsys_codistill.sharding import plan_summary, reinit_embeddings, shard_model


def group_seed(seed: int, group: int) -> int:
    """Groups of one run start from different weights and see different data orders."""
    return seed * 1_000_003 + group * 7_919


def group_dir(run_dir: str | Path, group: int) -> Path:
    return Path(run_dir) / f"group{group}"


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def use_sparse_dist_pipeline(cfg: RunConfig, ctx: DistContext) -> bool:
    if cfg.train.pipeline == "auto":
        return ctx.device.type == "cuda" and cfg.codistill.num_groups == 1
    return cfg.train.pipeline == "sparse_dist"


def build_sharded(
    cfg: RunConfig, ctx: DistContext, seed: int, *, frozen: bool = False, plan=None, wrap: bool = False
):  # noqa: ANN001
    """The group's model on meta, sharded by DMP; ``frozen`` gives a teacher copy (no optimizer).
    ``wrap`` shards ``CodistillTrain(model)`` instead (``batch -> (loss, output)``), the contract of
    TorchRec's train pipelines."""
    m = cfg.model
    torch.manual_seed(seed)  # dense layers; tables get the sharding-independent init in shard_model
    model = build_model(**m.build_kwargs(), device="meta", dense_device=ctx.device)
    if wrap:
        model = CodistillTrain(model, cfg.codistill)
    return shard_model(
        model,
        m,
        cfg.sharding,
        None if frozen else cfg.optim,
        device=ctx.device,
        batch_size_per_rank=cfg.data.batch_size // ctx.world_size,
        seed=seed,
        plan=plan,
    )


def train_stream(
    cfg: RunConfig, group: int, ctx: DistContext, vocab: IdVocabulary | None = None
) -> CriteoStream:
    return CriteoStream(
        cfg.data.train_dir,
        batch_size=cfg.data.batch_size // ctx.world_size,
        **stream_options(cfg, vocab),
        group=group,
        num_groups=cfg.codistill.num_groups,
        rank=ctx.rank,
        world_size=ctx.world_size,
        shared=cfg.codistill.data == "shared" or cfg.codistill.num_groups == 1,
        shuffle=cfg.data.shuffle,
        shuffle_window=cfg.data.shuffle_window,
        seed=group_seed(cfg.train.seed, group),
        epochs=cfg.data.epochs,
        drop_last=True,
    )


def eval_stream(
    cfg: RunConfig,
    data_dir: str,
    ctx: DistContext,
    batch_size: int | None = None,
    vocab: IdVocabulary | None = None,
) -> CriteoStream:
    """Every row exactly once, in a fixed order; ranks padded to equal batch counts."""
    return CriteoStream(
        data_dir,
        batch_size=batch_size or cfg.data.batch_size // ctx.world_size,
        **stream_options(cfg, vocab),
        rank=ctx.rank,
        world_size=ctx.world_size,
        shuffle=False,
        drop_last=False,
        max_rows=cfg.data.valid_max_rows,
    )


@torch.no_grad()
def predict_stream(model: nn.Module, stream: CriteoStream, ctx: DistContext) -> dict[str, np.ndarray]:
    """Logits of every real row, gathered on every rank, sorted by row id."""
    was_training = model.training
    model.eval()
    ids, labels, logits = [], [], []
    for batch in stream:
        batch = batch.to(ctx.device)
        if is_wrapped(model):
            out = model(batch)[1][1].float()  # (loss, (parts, logits, labels))
        else:
            out = model(batch.dense_features, batch.sparse_features).float()
        ids.append(batch.row_ids)
        labels.append(batch.labels)
        logits.append(out)
    model.train(was_training)
    local = [torch.cat(x) if x else torch.empty(0) for x in (ids, labels, logits)]
    if ctx.world_size > 1:
        gathered = []
        for t in local:
            parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
            dist.all_gather(parts, t.contiguous())
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


def quality(pred: dict[str, np.ndarray]) -> dict[str, float]:
    from recsys_codistill import metrics

    p = 1.0 / (1.0 + np.exp(-pred["logit"]))
    return {**metrics.summary(pred["label"], p), "rows": int(len(p))}


def _before(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl record stays when resuming at ``resume_step``: results of steps up to it do;
    a re-initialisation logged at ``resume_step`` happens after that checkpoint, so it is replayed."""
    rec = json.loads(line)
    step = rec.get("step", 0)
    return step < resume_step if rec.get("event") == "reinit_embeddings" else step <= resume_step


class MetricsLog:
    """``metrics.jsonl`` on rank 0: one JSON object per line. A resumed run continues the file from its
    checkpoint's step: records of the steps it is about to replay are dropped, so no step appears twice."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if line.strip() and _before(line, resume_step)]
                path.write_text("".join(line + "\n" for line in kept))
            self.f = path.open("a")

    def write(self, **record: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()


def train(cfg: RunConfig, group: int, ctx: DistContext) -> dict[str, Any]:
    gdir = group_dir(cfg.run_dir, group)
    seed = group_seed(cfg.train.seed, group)
    world_batch = cfg.data.batch_size

    # --- set-up: data, sharded model, optional teacher, resume ------------------------------------------
    vocab = load_vocab(cfg)  # None unless data.min_id_count; saved by the launcher
    stream = train_stream(cfg, group, ctx, vocab)
    total_steps = stream.num_batches()
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    pipelined = use_sparse_dist_pipeline(cfg, ctx)
    sm = build_sharded(cfg, ctx, seed, wrap=pipelined)
    model, optimizer = sm.model, sm.optimizer
    if ctx.is_main:
        print(f"[group {group}] {plan_summary(sm.plan)}", flush=True)

    exchange = None
    if cfg.codistill.num_groups > 1:
        from recsys_codistill.teacher_exchange import TeacherExchange

        exchange = TeacherExchange(
            cfg, group, ctx, lambda: build_sharded(cfg, ctx, seed, frozen=True, plan=sm.plan).model
        )

    ckpt = Checkpointer(gdir / "checkpoints", cfg.checkpoint, inputs=input_fingerprint(cfg, vocab))
    step, loader_state, resumed_from = ckpt.maybe_resume(model, optimizer)
    if loader_state is not None:
        stream.load_state_dict(loader_state)
    log = MetricsLog(gdir / "metrics.jsonl", ctx.is_main, resume_step=step)
    if resumed_from is not None and ctx.is_main:
        print(f"[group {group}] resumed from {resumed_from} at step {step}", flush=True)
        log.write(event="resume", step=step, path=str(resumed_from))

    if exchange is not None:
        exchange.start(model, step)

    valid = eval_stream(cfg, cfg.data.valid_dir, ctx, vocab=vocab) if cfg.data.valid_dir else None
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    bar = None
    if ctx.is_main and cfg.train.progress:
        from tqdm import tqdm

        # one line per group on the same terminal (each group is its own torchrun)
        bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"group {group}",
            unit="step",
            dynamic_ncols=True,
            position=group,
        )

    # --- the loop --------------------------------------------------------------------------------------
    model.train()
    t_last, step_last = time.perf_counter(), step
    sum_loss = sum_bce = sum_distill = 0.0
    it = iter(stream)
    pipeline = None
    if pipelined:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        # Copies batch i+2 to the device and runs batch i+1's input all-to-all while batch i computes.
        # It reads ahead, which is why checkpoints store stream.state_at(step), not the stream's cursor.
        pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    def epoch_of(s: int) -> int:
        return s * stream.batch_size // stream.epoch_rows

    while step < total_steps:
        # new epoch: optionally fresh embedding tables (the dense layers keep what they learned). Batches
        # run across epoch ends, so a step belongs to the epoch of its first row.
        if cfg.train.reinit_embeddings_each_epoch and step > 0 and (epoch := epoch_of(step)) > epoch_of(step - 1):
            reinit_embeddings(model, optimizer, seed + 104_729 * epoch)
            if ctx.is_main:
                log.write(event="reinit_embeddings", step=step, epoch=epoch)
        # step: forward student (and teacher past burn-in), backward (fused sparse update), dense update.
        # The fused optimizer pushes param_groups' lr into its kernel at zero_grad, before backward.
        factor = lr_factor(step, total_steps, cfg.optim.warmup_steps, cfg.optim.decay)
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        if pipeline is not None:
            parts, _, _ = pipeline.progress(it)  # zero_grad, forward, backward, optimizer.step inside
        else:
            batch = next(it).to(ctx.device, non_blocking=True)
            teacher_logits = exchange.teacher_logits(batch, step) if exchange is not None else None
            logits = model(batch.dense_features, batch.sparse_features)
            parts = codistill_loss(logits, teacher_logits, batch.labels, cfg.codistill)
            optimizer.zero_grad()
            parts.total.backward()
            optimizer.step()
        step += 1
        # running sums stay tensors: no per-step host sync (it matters on GPU)
        sum_loss += parts.total.detach()
        sum_bce += parts.bce.detach()
        sum_distill += parts.distill.detach()

        # teacher exchange: publish this group's model every K steps for the peers.
        if exchange is not None:
            exchange.after_step(model, step)

        # log: rank 0's running means since the last log line.
        if step % cfg.train.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            n = step - step_last
            rec = {
                "step": step,
                "loss": float(sum_loss) / n,
                "bce": float(sum_bce) / n,
                "distill": float(sum_distill) / n,
                "examples_per_s": n * world_batch / (now - t_last),
                "lr": optimizer.param_groups[-1]["lr"],
            }
            if exchange is not None:
                rec.update(exchange.status(step))
            log.write(**rec)
            # every rank agrees, or the ranks that did not see it would hang in the next collective
            if not dist_helpers.all_true(math.isfinite(rec["loss"])):
                raise NonFiniteError(
                    f"group {group}: the training loss became non-finite by step {step} (NaN or inf; last "
                    f"logged loss {rec['loss']}); stopping without saving. Lower optim.dense_lr / "
                    "optim.sparse_lr or check the data"
                )
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            t_last, step_last = now, step
            sum_loss = sum_bce = sum_distill = 0.0
        if bar is not None:
            bar.update(1)

        # eval: validation metrics at an interval.
        if (
            valid is not None
            and cfg.train.eval_every
            and step % cfg.train.eval_every == 0
            and step < total_steps
        ):
            if pipeline is not None:
                pipeline.detach()  # restore the sharded modules' own forward for evaluation
            q = quality(predict_stream(model, valid, ctx))
            log.write(step=step, **{f"valid_{k}": v for k, v in q.items()})

        # checkpoint: periodically (the final one is written below).
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            ckpt.save(step, model, optimizer, stream.state_at(step))
            if exchange is not None:
                exchange.note_checkpoint(step)

    if bar is not None:
        bar.close()
    if pipeline is not None:
        pipeline.detach()
    final = ckpt.save(step, model, optimizer, stream.state_at(step))
    result: dict[str, Any] = {"group": group, "step": step, "checkpoint": str(final)}
    if valid is not None:
        q = quality(predict_stream(model, valid, ctx))
        log.write(step=step, final=True, **{f"valid_{k}": v for k, v in q.items()})
        result.update({f"valid_{k}": v for k, v in q.items()})
    if ctx.is_main:
        (gdir / "result.json").write_text(json.dumps(result, indent=2))
    return result
