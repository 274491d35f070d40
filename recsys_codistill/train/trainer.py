"""One group's training (one rank of one torch.distributed world), in torchtitan's shape.

``Trainer.__init__`` builds the components: data, sharded model and optimizer, teachers, checkpointer,
logger and validator; ``train_step(batch)`` is one optimizer step; ``train()`` is the loop, whose phases are
epoch hooks → step → teachers → log → eval → checkpoint. Each component decides its own interval
(``should_log``, ``should_validate``, ``should_save``); the teachers plug in through the
:class:`~recsys_codistill.codistill.exchange.TeacherSource` hooks, so a new kind of teacher needs no change here.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.loader import CriteoStream
from models import build_model
from recsys_codistill import dist
from recsys_codistill.codistill.exchange import TeacherSource
from recsys_codistill.codistill.losses import CodistillTrain, LossParts, TeacherTerm, distillation_loss
from recsys_codistill.codistill.sampling import teacher_batch
from recsys_codistill.config import ConfigError, OptimConfig, RunConfig
from recsys_codistill.dist import DistContext
from recsys_codistill.run_dir import RunDir
from recsys_codistill.train.averaging import WeightAverager
from recsys_codistill.train.checkpoint import (
    Checkpointer,
    ModelState,
    NonFiniteError,
    OptimizerState,
    RNGState,
    TrainState,
)
from recsys_codistill.train.inputs import InputMapping
from recsys_codistill.train.metrics_log import MetricsLog
from recsys_codistill.train.predict import predict_batches
from recsys_codistill.train.sharding import plan_summary, reinit_embeddings, shard_model

__all__ = ["DistContext", "Trainer", "build_sharded", "train"]


def group_seed(seed: int, group: int) -> int:
    """Groups of one run start from different weights and see different data orders."""
    return seed * 1_000_003 + group * 7_919


def lr_factor(step: int, total: int, warmup: int, decay: str, floor: float = 0.0) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then a linear or cosine decay from 1 to
    ``floor`` at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return floor + (1.0 - floor) * shape


def uses_anchor(cfg: RunConfig) -> bool:
    """An anchor with λ = 0 is no anchor at all: not built, not loaded, the baseline's code path."""
    return bool(cfg.anchor.run) and cfg.anchor.weight > 0


def use_sparse_dist_pipeline(cfg: RunConfig, ctx: DistContext) -> bool:
    if cfg.train.pipeline == "auto":
        # (teachers need the batch outside the pipeline's traced forward)
        return ctx.device.type == "cuda" and cfg.codistill.num_groups == 1 and not uses_anchor(cfg)
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


def teacher_copy(cfg: RunConfig, ctx: DistContext, seed: int, plan=None, precision: str | None = None):  # noqa: ANN001, ANN201
    """A frozen copy of ``cfg``'s model for a teacher source, at ``precision`` (default
    ``cfg.teacher.precision``): fp32 as a DMP copy (``plan``: the student's, for a peer), fp16 / int8 as a
    local copy with TorchRec's quantized tables (codistill/copies.py)."""
    from recsys_codistill.codistill.copies import QuantizedCopy, ShardedCopy

    precision = precision or cfg.teacher.precision
    if precision == "fp32":
        return ShardedCopy(build_sharded(cfg, ctx, seed, frozen=True, plan=plan).model)
    return QuantizedCopy(cfg, precision, ctx.device)


def train_stream(cfg: RunConfig, group: int, ctx: DistContext, inputs: InputMapping) -> CriteoStream:
    return CriteoStream(
        cfg.data.train_dirs,
        batch_size=cfg.data.batch_size // ctx.world_size,
        **inputs.stream_options(),
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
    cfg: RunConfig, data_dir: str, ctx: DistContext, inputs: InputMapping, batch_size: int | None = None
) -> CriteoStream:
    """Every row exactly once, in a fixed order; ranks padded to equal batch counts."""
    return CriteoStream(
        data_dir,
        batch_size=batch_size or cfg.data.batch_size // ctx.world_size,
        **inputs.stream_options(),
        rank=ctx.rank,
        world_size=ctx.world_size,
        shuffle=False,
        drop_last=False,
        max_rows=cfg.data.valid_max_rows,
    )


def quality(pred: dict[str, np.ndarray]) -> dict[str, float]:
    from recsys_codistill.eval import metrics

    p = metrics.sigmoid(pred["logit"])
    return {**metrics.summary(pred["label"], p), "rows": int(len(p))}


# -- components that own their intervals -----------------------------------------------------------------
class TrainLogger:
    """Running means of the loss parts between log lines, every ``log_every`` steps and at the end.

    The sums stay tensors (no per-step host sync, which matters on GPU); the host reads them only when a
    line is written. A non-finite loss stops training on every rank at that line."""

    def __init__(
        self, log: MetricsLog, every: int, total: int, world_batch: int, group: int, step: int
    ) -> None:
        self.log, self.every, self.total, self.world_batch, self.group = log, every, total, world_batch, group
        self.t_last, self.step_last = time.perf_counter(), step
        self.sums: list[Any] = [0.0, 0.0, 0.0, 0.0]
        self.term_sums: dict[str, list[Any]] = {}

    def restart_clock(self) -> None:
        self.t_last = time.perf_counter()

    def add(self, parts: LossParts) -> None:
        for i, t in enumerate((parts.total, parts.bce, parts.distill, parts.kl)):
            self.sums[i] += t.detach()
        for name, (psi, gap) in parts.terms.items():  # other teachers (the anchor): ψ and KL
            s = self.term_sums.setdefault(name, [0.0, 0.0])
            s[0] += psi.detach()
            s[1] += gap.detach()

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def record(self, step: int, lr: float, extra: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        n = step - self.step_last
        loss, bce, distill, kl = (float(x) / n for x in self.sums)
        rec = {
            "step": step,
            "loss": loss,
            "bce": bce,
            # the loss term ψ (a cross entropy for loss = "ce") and the student-teacher gap KL(p̄ ‖ p)
            "distill": distill,
            "distill_kl": kl,
            **{
                k: float(v[i]) / n
                for name, v in self.term_sums.items()
                for i, k in enumerate((name, f"{name}_kl"))
            },
            "examples_per_s": n * self.world_batch / (now - self.t_last),
            "lr": lr,
            **extra,
        }
        self.log.write(**rec)
        self.t_last, self.step_last, self.sums = now, step, [0.0, 0.0, 0.0, 0.0]
        self.term_sums = {}
        # every rank agrees, or the ranks that did not see it would hang in the next collective
        if not dist.all_true(math.isfinite(loss)):
            raise NonFiniteError(
                f"group {self.group}: the training loss became non-finite by step {step} (NaN or inf; last "
                f"logged loss {loss}); stopping without saving. Lower optim.dense_lr / optim.sparse_lr or "
                "check the data"
            )
        return rec


class Validator:
    """Validation metrics on a fixed stream every ``eval_every`` steps (the final one is the trainer's)."""

    def __init__(self, stream: CriteoStream | None, every: int, total: int, world_size: int) -> None:
        self.stream, self.every, self.total, self.world_size = stream, every, total, world_size

    def should_validate(self, step: int) -> bool:
        return self.stream is not None and bool(self.every) and step % self.every == 0 and step < self.total

    def run(self, model: nn.Module) -> dict[str, float]:
        assert self.stream is not None
        return quality(predict_batches(model, self.stream, self.world_size))


class LRSchedule:
    """Warm-up and decay of every parameter group's learning rate (``optim.warmup_steps``, ``decay``)."""

    def __init__(self, optimizer: Any, cfg: OptimConfig, total: int) -> None:
        self.optimizer, self.cfg, self.total = optimizer, cfg, total
        self.base = [g["lr"] for g in optimizer.param_groups]

    def apply(self, step: int) -> None:
        # The fused optimizer pushes param_groups' lr into its kernel at zero_grad, before backward.
        factor = lr_factor(step, self.total, self.cfg.warmup_steps, self.cfg.decay, self.cfg.lr_floor)
        for g, lr in zip(self.optimizer.param_groups, self.base, strict=True):
            g["lr"] = lr * factor


class EpochReinit:
    """``train.reinit_embeddings_each_epoch`` (Fan et al. 2023): fresh tables at every epoch after the
    first; the dense layers keep what they learned. Batches run across epoch ends, so a step belongs to the
    epoch of its first row."""

    def __init__(self, enabled: bool, stream: CriteoStream, seed: int) -> None:
        self.enabled, self.stream, self.seed = enabled, stream, seed

    def epoch_of(self, step: int) -> int:
        return step * self.stream.batch_size // self.stream.epoch_rows

    def maybe_reinit(self, step: int, model: nn.Module, optimizer: Any) -> int | None:
        if not self.enabled or step == 0 or (epoch := self.epoch_of(step)) <= self.epoch_of(step - 1):
            return None
        reinit_embeddings(model, optimizer, self.seed + 104_729 * epoch)
        return epoch


class StreamState:
    """The loader's cursor at the train state's step, as a per-rank checkpoint state. A state at a step,
    not the stream's own cursor: TorchRec's train pipeline reads batches ahead."""

    def __init__(self, stream: CriteoStream, train_state: TrainState) -> None:
        self.stream, self.train_state = stream, train_state

    def state_dict(self) -> dict[str, Any]:
        return {"loader": json.dumps(self.stream.state_at(self.train_state.step), sort_keys=True)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stream.load_state_dict(json.loads(sd["loader"]))


class Trainer:
    def __init__(self, cfg: RunConfig, group: int, ctx: DistContext) -> None:
        self.cfg, self.group, self.ctx = cfg, group, ctx
        run = RunDir(cfg.run_dir)
        seed = group_seed(cfg.train.seed, group)

        # data: the input mapping (with the vocabulary the launcher saved) is shared by every stream
        self.inputs = InputMapping.from_config(cfg)
        self.stream = train_stream(cfg, group, ctx, self.inputs)
        self.total_steps = self.stream.num_batches()
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        # model and optimizer, sharded by DMP
        self.pipelined = use_sparse_dist_pipeline(cfg, ctx)
        sm = build_sharded(cfg, ctx, seed, wrap=self.pipelined)
        self.model, self.optimizer = sm.model, sm.optimizer
        if ctx.is_main:
            print(f"[group {group}] {plan_summary(sm.plan)}", flush=True)

        # teachers: today the peers of a codistillation run (the loop only knows the TeacherSource hooks)
        self.teachers: list[TeacherSource] = []
        if cfg.codistill.num_groups > 1:
            from recsys_codistill.codistill.exchange import PeerExchange

            self.teachers.append(
                PeerExchange(
                    cfg.codistill,
                    run.exchange(cfg.codistill.exchange_dir),
                    group,
                    ctx,
                    lambda: teacher_copy(cfg, ctx, seed, sm.plan),
                    tables="fp32" if cfg.teacher.precision == "fp32" else "fp16",
                )
            )

        if uses_anchor(cfg):
            from recsys_codistill.codistill.fixed import FixedTeacher

            a = cfg.anchor
            self.teachers.append(
                FixedTeacher(
                    "anchor",
                    a.run,
                    a.group,
                    a.weight,
                    a.loss,
                    self.inputs,
                    lambda tcfg: teacher_copy(tcfg, ctx, seed, None, precision=cfg.teacher.precision),
                )
            )

        if self.teachers and self.pipelined:
            # TorchRec's pipeline traces a forward whose only input is the batch: no teacher term there.
            raise ConfigError(
                "train.pipeline = 'sparse_dist' cannot train with teachers; use 'plain' or 'auto'"
            )

        # the lr schedule scales the optimizer's initial rates (captured before a resume overwrites them)
        self.lr = LRSchedule(self.optimizer, cfg.optim, self.total_steps)

        # checkpoint: a registry of Stateful objects; resume restores them all
        self.state = TrainState()
        self.checkpointer = Checkpointer(run.checkpoints(group), cfg.checkpoint, inputs=self.inputs)
        self.checkpointer.register("model", ModelState(self.model))
        self.checkpointer.register("optim", OptimizerState(self.optimizer))
        self.checkpointer.register("train", self.state)
        self.checkpointer.register("stream", StreamState(self.stream, self.state), per_rank=True)
        self.checkpointer.register("rng", RNGState(), per_rank=True)
        for teacher in self.teachers:
            if getattr(teacher, "stateful", False):  # a fixed teacher: resume only against the same one
                self.checkpointer.register(teacher.name, teacher, per_rank=True)
        self.averager = WeightAverager(cfg.train, self.total_steps)
        if self.averager.enabled:  # registered only when used, so older checkpoints still resume
            self.checkpointer.register("average", self.averager, per_rank=True)
        resumed_from = self.checkpointer.maybe_resume()
        if resumed_from is None and cfg.train.init_from:
            self._warm_start()

        log = MetricsLog(run.metrics(group), ctx.is_main, resume_step=self.state.step)
        if resumed_from is not None and ctx.is_main:
            print(f"[group {group}] resumed from {resumed_from} at step {self.state.step}", flush=True)
            log.write(event="resume", step=self.state.step, path=str(resumed_from))
        self.metrics_log = log
        self.logger = TrainLogger(
            log, cfg.train.log_every, self.total_steps, cfg.data.batch_size, group, self.state.step
        )
        valid = eval_stream(cfg, cfg.data.valid_dir, ctx, self.inputs) if cfg.data.valid_dir else None
        self.validator = Validator(valid, cfg.train.eval_every, self.total_steps, ctx.world_size)
        self.reinit = EpochReinit(cfg.train.reinit_embeddings_each_epoch, self.stream, seed)
        self.run_dir = run

    def _warm_start(self) -> None:
        """``train.init_from``: a fresh run starts from another run's weights (and optimizer state)."""
        from recsys_codistill import dcp_io
        from recsys_codistill.codistill.fixed import teacher_checkpoint
        from recsys_codistill.train.checkpoint import check_inputs

        t = self.cfg.train
        path = teacher_checkpoint(t.init_from, t.init_group, "train.init_from")
        try:
            check_inputs(path, self.inputs)
        except ValueError as e:
            raise dist.FatalError(f"train.init_from: {e}") from e
        states: dict[str, Any] = {"model": ModelState(self.model)}
        if t.init_optimizer:
            states["optim"] = OptimizerState(self.optimizer)
            states["optim"].prepare_load()  # Adam's moments exist only after a step: create them to load
        # (the learning rates stay this run's: LRSchedule captured them before and sets them every step)
        dcp_io.load(states, path)
        if self.ctx.is_main:
            print(f"[group {self.group}] warm start from {path}", flush=True)

    def train_step(self, batch: Any) -> LossParts:
        """Forward the student (and the teachers past burn-in), backward (the fused sparse update runs
        inside it), dense update."""
        step = self.state.step
        logits = self.model(batch.dense_features, batch.sparse_features)
        # the teachers run on every row, or on rows drawn from the student's predictions (teacher.fraction)
        tb, rows = batch, None
        tc = self.cfg.teacher
        if tc.fraction < 1.0 and any(t.wants(step) for t in self.teachers):
            draw = (self.cfg.train.seed, self.group, self.ctx.rank, step)
            tb, rows = teacher_batch(batch, logits, tc.fraction, tc.sampling, draw)
        terms = [TeacherTerm(t.name, t.weight, t.loss, t.logits(tb, step), rows) for t in self.teachers]
        parts = distillation_loss(logits, batch.labels, terms)
        self.optimizer.zero_grad()
        parts.total.backward()
        self.optimizer.step()
        return parts

    def _progress(self):  # noqa: ANN202
        if not (self.ctx.is_main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        # one line per group on the same terminal (each group is its own world)
        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=f"group {self.group}",
            unit="step",
            dynamic_ncols=True,
            position=self.group,
        )

    def train(self) -> dict[str, Any]:
        it, pipeline, bar = iter(self.stream), None, self._progress()
        if self.pipelined:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            # Copies batch i+2 to the device and runs batch i+1's input all-to-all while batch i computes.
            # (No teachers on this path: the pipeline traces a forward whose only input is the batch.)
            pipeline = TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device)
        for teacher in self.teachers:
            teacher.start(self.model, self.state.step)
        self.model.train()
        self.logger.restart_clock()  # examples/s counts the loop only, not the set-up above
        while self.state.step < self.total_steps:
            # epoch hooks: optionally fresh embedding tables at an epoch boundary
            epoch = self.reinit.maybe_reinit(self.state.step, self.model, self.optimizer)
            if epoch is not None:
                self.metrics_log.write(event="reinit_embeddings", step=self.state.step, epoch=epoch)
            # step: schedule the lr, then one optimizer step (the pipeline's zero_grad/fwd/bwd/step inside)
            self.lr.apply(self.state.step)
            if pipeline is not None:
                parts = pipeline.progress(it)[0]
            else:
                parts = self.train_step(next(it).to(self.ctx.device, non_blocking=True))
            self.state.step += 1
            step = self.state.step
            self.logger.add(parts)
            # teachers: publish this group's model for the peers, every K steps
            for teacher in self.teachers:
                teacher.after_step(self.model, step)
            # average: fold the weights into the final model's running average (train.average)
            if self.averager.should_sample(step):
                self.averager.sample(self.model)
            # log: running means since the last line
            if self.logger.should_log(step):
                extra = {k: v for t in self.teachers for k, v in t.metrics(step).items()}
                rec = self.logger.record(step, self.optimizer.param_groups[-1]["lr"], extra)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            # eval: validation metrics at an interval
            if self.validator.should_validate(step):
                if pipeline is not None:
                    pipeline.detach()  # restore the sharded modules' own forward for evaluation
                q = self.validator.run(self.model)
                self.metrics_log.write(step=step, **{f"valid_{k}": v for k, v in q.items()})
            # checkpoint: periodically (the final one is written below)
            if self.checkpointer.should_save(step, self.total_steps):
                self.checkpointer.save(step)
                for teacher in self.teachers:
                    teacher.on_checkpoint(step)
        if bar is not None:
            bar.close()
        if pipeline is not None:
            pipeline.detach()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The final checkpoint and validation; ``result.json``."""
        step = self.state.step
        result: dict[str, Any] = {"group": self.group, "step": step}
        if self.averager.enabled:
            # the final model is the average (its checkpoint, validation and predictions)
            result["averaged_snapshots"] = self.averager.apply(self.model)
            result["average"] = self.cfg.train.average
        result["checkpoint"] = str(self.checkpointer.save(step))
        for teacher in self.teachers:
            result.update(teacher.metrics(step))
        if self.validator.stream is not None:
            q = quality(predict_batches(self.model, self.validator.stream, self.ctx.world_size))
            self.metrics_log.write(step=step, final=True, **{f"valid_{k}": v for k, v in q.items()})
            result.update({f"valid_{k}": v for k, v in q.items()})
        if self.ctx.is_main:
            self.run_dir.result(self.group).write_text(json.dumps(result, indent=2))
        return result


def train(cfg: RunConfig, group: int, ctx: DistContext) -> dict[str, Any]:
    return Trainer(cfg, group, ctx).train()
