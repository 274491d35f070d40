"""What a group's sharding plan costs: memory per rank and bytes moved per training step, per plan type.

``recsys-codistill plan --config X`` prints, for each sharding type and rank count asked for, the plan
TorchRec's planner makes (no process group needed) and an analytic model of one training step of the
group (local batch B = data.batch_size / W, fp32, one id per feature per row as the loader writes):

- **input dist** (table_wise, column_wise): every rank sends each table's ids of its B rows to the ranks
  holding that table's shards: lengths (int32) and values (int64), (W − 1) · B · 12 bytes per shard.
- **pooled all-to-all**: each shard's pooled embeddings of the W · B rows go back to the ranks that own
  the rows, (W − 1) · B · cols · 4 bytes per shard forward, and their gradients the same way backward
  (the DLRM/DES scheme: partial results move, not parameters).
- **all-reduce**: the replicated parameters' gradients, once per step: the dense layers always, and every
  data_parallel table in full (rows · dim · 4: its gradient is dense).
- **exchange**: one codistillation teacher version is the whole fp32 model (tables + dense layers).

Counts are payloads: bytes a rank hands to the process group addressed to other ranks (all-to-all), and
the buffer it all-reduces (a ring all-reduce puts 2 (W − 1) / W of it on the wire). :func:`count_collectives`
counts the same quantities on a live world, which is how the model is checked (tests, ``bench/comm.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from recsys_codistill.config import RunConfig

LENGTH_BYTES = 4  # int32 lengths (data_pipeline.batching)
ID_BYTES = 8  # int64 ids
FLOAT_BYTES = 4
PLAN_TYPES = ("table_wise", "column_wise", "data_parallel")


@dataclass
class StepBytes:
    """One training step of one group, summed over its ranks (all-reduce: per rank)."""

    sharding_type: str
    world_size: int
    batch_size_per_rank: int
    input_dist: int = 0
    pooled_forward: int = 0
    pooled_backward: int = 0
    allreduce_dense: int = 0
    allreduce_tables: int = 0
    exchange_per_version: int = 0
    # model state per rank: table shards (weights + sparse optimizer state) and replicated parameters
    memory_per_rank: list[int] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    plan_text: str = ""

    @property
    def all_to_all(self) -> int:
        return self.input_dist + self.pooled_forward + self.pooled_backward

    @property
    def allreduce(self) -> int:
        return self.allreduce_dense + self.allreduce_tables

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("tables", "plan_text")}
        return {**d, "all_to_all": self.all_to_all, "allreduce": self.allreduce}


def _tables(model: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """name -> (rows, dim, features) of every EmbeddingBagCollection table."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    out = {}
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            for c in m.embedding_bag_configs():
                out[c.name] = (c.num_embeddings, c.embedding_dim, len(c.feature_names))
    return out


def _sparse_state_bytes(rows: int, cols: int, optimizer: str) -> int:
    weights = rows * cols * FLOAT_BYTES
    if optimizer == "rowwise_adagrad":
        return weights + rows * FLOAT_BYTES
    return weights + 2 * rows * cols * FLOAT_BYTES  # adam: two moments


def _dense_state_factor(optimizer: str) -> int:
    return 2 if optimizer == "adagrad" else 3  # weights + 1 (adagrad) or 2 (adam) states


def _with_type(cfg: RunConfig, sharding_type: str) -> RunConfig:
    """``cfg`` with another sharding type, validated again (column_wise has its own constraints)."""
    from recsys_codistill.config import apply_overrides, from_dict, to_dict

    return from_dict(apply_overrides(to_dict(cfg), [f'sharding.sharding_type="{sharding_type}"']), "<plan>")


def step_bytes(cfg: RunConfig, world_size: int, sharding_type: str | None = None) -> StepBytes:
    """The analytic model of one step for ``world_size`` ranks and ``sharding_type`` (default: the
    config's), from the plan TorchRec's planner makes for this model."""
    from torchrec.distributed.sharding_plan import get_default_sharders

    from models import build_model
    from recsys_codistill.train.sharding import (
        fuse_sparse_optimizer,
        make_plan,
        plan_summary,
        quiet_library_logs,
    )

    quiet_library_logs()
    st = sharding_type or cfg.sharding.sharding_type
    cfg = _with_type(cfg, st)
    b = cfg.data.batch_size // world_size
    model = build_model(**cfg.model.build_kwargs(), device="meta", dense_device=torch.device("cpu"))
    tables = fuse_sparse_optimizer(model, cfg.optim)
    with warnings.catch_warnings():  # the planner's dry-run storage notes: nothing a user can act on
        warnings.simplefilter("ignore")
        plan = make_plan(
            model,
            cfg.model,
            cfg.sharding,
            world_size=world_size,
            local_world_size=world_size,
            device=torch.device("cpu"),
            batch_size_per_rank=b,
            sharders=get_default_sharders(),
        )
    shapes = _tables(model)
    in_tables = {id(p) for p in tables}
    dense_params = sum(p.numel() for p in model.parameters() if id(p) not in in_tables)
    out = StepBytes(st, world_size, b, plan_text=plan_summary(plan))
    memory = [0] * world_size
    w1 = world_size - 1
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            rows, dim, features = shapes[name]
            if ps.sharding_type == "data_parallel":
                if world_size > 1:
                    out.allreduce_tables += rows * dim * FLOAT_BYTES
                for r in range(world_size):
                    memory[r] += _sparse_state_bytes(rows, dim, cfg.optim.sparse_optimizer)
                out.tables.append({"table": name, "type": "data_parallel", "shards": "replicated"})
                continue
            shards = []
            for s in ps.sharding_spec.shards:  # type: ignore[union-attr]
                r = s.placement.rank()
                srows, scols = s.shard_sizes
                out.input_dist += w1 * b * features * (LENGTH_BYTES + ID_BYTES)
                out.pooled_forward += w1 * b * features * scols * FLOAT_BYTES
                out.pooled_backward += w1 * b * features * scols * FLOAT_BYTES
                memory[r] += _sparse_state_bytes(srows, scols, cfg.optim.sparse_optimizer)
                shards.append({"rank": r, "rows": srows, "cols": scols})
            out.tables.append({"table": name, "type": ps.sharding_type, "shards": shards})
    if world_size > 1:
        out.allreduce_dense = dense_params * FLOAT_BYTES
    factor = _dense_state_factor(cfg.optim.dense_optimizer)
    memory = [m + factor * dense_params * FLOAT_BYTES for m in memory]
    out.memory_per_rank = memory
    out.exchange_per_version = (sum(r * d for r, d, _ in shapes.values()) + dense_params) * FLOAT_BYTES
    return out


# ---------------------------------------------------------------------------------------------------
# counting on a live world


@dataclass
class Counted:
    """Bytes one rank handed to its process group: all-to-all payload addressed to other ranks, and
    all-reduce buffers (DDP's gradient buckets and any direct all_reduce)."""

    all_to_all: int = 0
    allreduce: int = 0
    calls: dict[str, int] = field(default_factory=dict)


def _split_bytes(t: torch.Tensor, splits: list[int] | None, rank: int, world: int) -> int:
    """Bytes of ``t`` (split along dim 0) addressed to ranks other than ``rank``."""
    row = t.element_size() * (t[0].numel() if t.dim() > 1 and t.shape[0] else 1)
    rows = t.shape[0] if t.dim() else t.numel()
    own = splits[rank] if splits else rows // world
    return (rows - own) * row


def _ddp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every DistributedDataParallel in ``model``, including those TorchRec keeps in a plain list
    (``ShardedEmbeddingBagCollection._lookups`` of data_parallel tables), which ``modules()`` misses."""
    from torch.nn.parallel import DistributedDataParallel

    found: dict[int, torch.nn.Module] = {}
    for m in model.modules():
        candidates = [m, *[x for v in vars(m).values() if isinstance(v, list) for x in v]]
        for c in candidates:
            if isinstance(c, DistributedDataParallel):
                found[id(c)] = c
    return list(found.values())


@contextlib.contextmanager
def count_collectives(model: torch.nn.Module | None = None) -> Iterator[Counted]:
    """Count this rank's collective payloads while the block runs: ``dist.all_to_all_single`` (what
    TorchRec's input and output dists call) and ``dist.all_reduce`` are wrapped (restored on exit, also on
    an error), and DDP's gradient buckets are routed through the latter by a comm hook (the default
    all-reduce, averaged: numerics are unchanged). A DDP takes one comm hook in its life: count a model
    once (it is a measuring tool, ``plan --measure`` and tests, not part of training)."""
    counted = Counted()
    rank, world = dist.get_rank(), dist.get_world_size()
    real_a2a, real_ar = dist.all_to_all_single, dist.all_reduce

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):  # noqa: A002, ANN001, ANN202
        counted.all_to_all += _split_bytes(input, input_split_sizes, rank, world)
        counted.calls["all_to_all_single"] = counted.calls.get("all_to_all_single", 0) + 1
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def ar(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):  # noqa: ANN001, ANN202
        counted.allreduce += tensor.numel() * tensor.element_size()
        counted.calls["all_reduce"] = counted.calls.get("all_reduce", 0) + 1
        return real_ar(tensor, op=op, group=group, async_op=async_op)

    if model is not None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # DDP's reducer all-reduces in C++; a comm hook routes its buckets through dist.all_reduce (counted
        # there). DMP wraps the dense part; TorchRec wraps each data_parallel table lookup itself.
        for ddp in _ddp_modules(model):
            ddp.register_comm_hook(None, allreduce_hook)
    dist.all_to_all_single, dist.all_reduce = a2a, ar
    try:
        yield counted
    finally:
        dist.all_to_all_single, dist.all_reduce = real_a2a, real_ar


def report(cfg: RunConfig, world_sizes: list[int], sharding_types: list[str], measured: bool = False) -> str:
    """The ``plan`` command's text: per plan type and rank count, memory per rank and bytes per step;
    with ``measured``, the same step counted on a live gloo world of that many ranks beside it."""
    mb = 1e6
    own = step_bytes(cfg, cfg.sharding.nproc)
    lines = [
        f"model: {cfg.model.arch}, {len(cfg.model.resolved_table_sizes())} tables of dim "
        f"{cfg.model.embedding_dim} ({sum(cfg.model.resolved_table_sizes()):,} rows), global batch "
        f"{cfg.data.batch_size}, optimizers {cfg.optim.sparse_optimizer} / {cfg.optim.dense_optimizer}",
        f"this config ({own.sharding_type}, {own.world_size} rank(s)): {own.plan_text}",
        "",
        "Bytes per training step of one group (payloads, MB): all-to-all summed over ranks (input ids + "
        "pooled embeddings forward + their gradients backward), all-reduce per rank (dense + tables).",
        "",
    ]
    head = ["plan", "ranks", "memory / rank (MB, max)", "input ids", "pooled fwd", "pooled bwd", "all-to-all"]
    head += ["all-reduce (dense + tables)", "exchange / teacher version"]
    if measured:
        head += ["counted all-to-all", "counted all-reduce", "difference"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for st in sharding_types:
        for w in world_sizes:
            if cfg.data.batch_size % w:
                notes.append(f"{st}, {w} ranks: data.batch_size {cfg.data.batch_size} does not divide by {w}")
                continue
            try:
                s = step_bytes(cfg, w, st)
            except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
                notes.append(f"{st}, {w} ranks: not plannable: {e}")
                continue
            row = [
                st,
                str(w),
                f"{max(s.memory_per_rank) / mb:,.1f}",
                f"{s.input_dist / mb:,.3f}",
                f"{s.pooled_forward / mb:,.3f}",
                f"{s.pooled_backward / mb:,.3f}",
                f"{s.all_to_all / mb:,.3f}",
                f"{s.allreduce / mb:,.3f} ({s.allreduce_dense / mb:,.3f} + {s.allreduce_tables / mb:,.3f})",
                f"{s.exchange_per_version / mb:,.1f}",
            ]
            if measured:
                if w > 1:
                    m = measure(cfg, w, st)
                    model, counted = s.all_to_all + s.allreduce, m["all_to_all"] + m["allreduce"]
                    row += [
                        f"{m['all_to_all'] / mb:,.3f}",
                        f"{m['allreduce'] / mb:,.3f}",
                        f"{100 * (counted / model - 1):+.2f}%",
                    ]
                else:
                    row += ["—", "—", "—"]
            lines.append("| " + " | ".join(row) + " |")
    lines += [f"- skipped: {n}" for n in notes]
    lines += [
        "",
        "Memory per rank is the training model's state (no activations, no teacher copies: a codistillation "
        "group adds one copy per peer, fp32 with the student's plan or the whole model per rank at "
        "teacher.precision). A ring all-reduce puts 2 (W-1)/W of its buffer on the wire per rank; all-to-all payloads go once. "
        "Codistillation adds the exchange: each group writes one version every codistill.exchange_every "
        f"steps (now {cfg.codistill.exchange_every}) and its peers read it.",
    ]
    return "\n".join(lines)


def _random_batch(cfg: RunConfig, b: int, seed: int):  # noqa: ANN202
    """A batch of the loader's layout (one id per feature per row) with random ids and features."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from data_pipeline.batching import NUM_DENSE, sparse_keys
    from data_pipeline.schema import NUM_SPARSE

    g = torch.Generator().manual_seed(seed)
    keys = sparse_keys(cfg.model.dense_buckets)
    sizes = list(cfg.model.resolved_table_sizes()) + [cfg.model.dense_buckets] * (len(keys) - NUM_SPARSE)
    values = torch.cat([torch.randint(0, n, (b,), generator=g) for n in sizes])
    kjt = KeyedJaggedTensor(
        keys=keys, values=values, lengths=torch.ones(len(keys) * b, dtype=torch.int32), stride=b
    )
    return Batch(
        dense_features=torch.rand(b, NUM_DENSE, generator=g),
        sparse_features=kjt,
        labels=torch.randint(0, 2, (b,), generator=g).float(),
    )


def _measure_worker(rank: int, world: int, port: int, cfg: RunConfig, steps: int, out: Any) -> None:
    import os

    from recsys_codistill.dist import DistContext
    from recsys_codistill.train.sharding import quiet_library_logs
    from recsys_codistill.train.trainer import build_sharded

    torch.set_num_threads(1)
    quiet_library_logs()
    warnings.filterwarnings("ignore")  # fbgemm's autograd-fallback note, once per backward
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, rank, torch.device("cpu"))
        sm = build_sharded(cfg, ctx, seed=1)
        b = cfg.data.batch_size // world

        def step(i: int) -> None:
            batch = _random_batch(cfg, b, seed=1000 * i + rank)
            logits = sm.model(batch.dense_features, batch.sparse_features)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
            sm.optimizer.zero_grad()
            loss.backward()
            sm.optimizer.step()

        step(0)  # the first step builds TorchRec's lazy state; count the steady ones
        with count_collectives(sm.model) as c:
            for i in range(1, steps + 1):
                step(i)
        counts = [None] * world
        dist.all_gather_object(counts, (c.all_to_all, c.allreduce, c.calls))
        if rank == 0:
            out.put(counts)
    finally:
        dist.destroy_process_group()


def measure(cfg: RunConfig, world_size: int, sharding_type: str, steps: int = 3) -> dict[str, Any]:
    """Count the collectives of ``steps`` training steps on a ``world_size``-rank gloo world on this
    machine (one process per rank): per step, all-to-all payload summed over ranks, all-reduce per rank."""
    import socket

    import torch.multiprocessing as mp

    cfg = _with_type(cfg, sharding_type)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _measure_worker, args=(world_size, port, cfg, steps, q), nprocs=world_size, start_method="spawn"
    )
    counts = q.get()
    return {
        "all_to_all": sum(c[0] for c in counts) / steps,
        "allreduce": max(c[1] for c in counts) / steps,
        "calls_per_rank": counts[0][2],
    }
