"""Shard a model over one group's torch.distributed world with TorchRec's DistributedModelParallel.

- Plan: ``EmbeddingShardingPlanner.plan()`` (deterministic, no collective) with one
  ``ParameterConstraints`` per table pinning the configured sharding type and the ``fused`` kernel.
- Sparse optimizer: applied *in backward* (``apply_optimizer_in_backward``), which the sharders fuse into
  fbgemm's table-batched embedding kernel: tables are updated row-wise during backward, never all-reduced.
- Dense optimizer: a ``KeyedOptimizerWrapper`` over the non-embedding parameters, combined with the fused
  one in a ``CombinedOptimizer`` so one ``step``/``zero_grad``/``state_dict`` covers both.
- Init: embedding rows are filled from a seeded generator per (table, block of rows), so the weights do
  not depend on how tables are sharded or on the rank count (a 2-rank run starts from exactly the
  1-rank run's weights).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from data_pipeline.batching import sparse_keys
from models import table_name
from recsys_codistill.config import ModelConfig, OptimConfig, ShardingConfig

# Rows generated together by the sharding-independent initialiser.
_INIT_BLOCK_ROWS = 8192


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer | None
    plan: ShardingPlan


def resolve_device(cfg: ShardingConfig, local_rank: int = 0) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sharding.device = 'cuda' but CUDA is not available on this machine")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_backend(cfg: ShardingConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def table_constraints(model_cfg: ModelConfig, sharding_type: str) -> dict[str, ParameterConstraints]:
    """Pin every table to the configured sharding type and kernel (fused for sharded tables; replicated
    data_parallel tables use the dense kernel, the only one TorchRec offers for them)."""
    kernel = "dense" if sharding_type == "data_parallel" else "fused"
    return {
        table_name(f): ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[kernel])
        for f in sparse_keys(model_cfg.dense_buckets)
    }


def make_plan(
    model: nn.Module,
    model_cfg: ModelConfig,
    cfg: ShardingConfig,
    *,
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size_per_rank: int,
    sharders: list[ModuleSharder[nn.Module]],
) -> ShardingPlan:
    """Deterministic plan; raises if any table was left unsharded or got an unexpected kernel."""
    if cfg.sharding_type == "row_wise" and device.type == "cpu":
        raise ValueError(
            "sharding.sharding_type = 'row_wise' is not offered by TorchRec's planner on CPU; use "
            "table_wise, column_wise or data_parallel on CPU (row_wise works on GPU)"
        )
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    constraints = table_constraints(model_cfg, cfg.sharding_type)
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size_per_rank, constraints=constraints, debug=False
    )
    plan = planner.plan(model, sharders)
    check_plan(plan, constraints)
    return plan


def check_plan(plan: ShardingPlan, constraints: dict[str, ParameterConstraints]) -> None:
    """An empty sharder list silently yields an empty plan: refuse anything incomplete."""
    planned: dict[str, tuple[str, str]] = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            planned[name] = (ps.sharding_type, ps.compute_kernel)
    for name, c in constraints.items():
        if name not in planned:
            raise RuntimeError(f"sharding plan left table {name} unsharded; plan: {plan}")
        st, kernel = planned[name]
        if st not in (c.sharding_types or []) or kernel not in (c.compute_kernels or []):
            raise RuntimeError(
                f"table {name} planned as {st}/{kernel}, expected {c.sharding_types}/{c.compute_kernels}"
            )


def quiet_library_logs() -> None:
    """TorchRec's planner and torch.fx log several warnings per rank that users cannot act on (storage
    estimates in dry runs, fx-tracing notes); the plan itself is printed by :func:`plan_summary`."""
    for name in ("torchrec", "torch.fx._symbolic_trace", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def plan_summary(plan: ShardingPlan) -> str:
    lines = []
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = ps.ranks if ps.ranks is not None else "all"
            lines.append(
                f"  {module_path or '<root>'}.{name}: {ps.sharding_type} / {ps.compute_kernel} on ranks {ranks}"
            )
    return "sharding plan:\n" + "\n".join(sorted(lines, key=lambda s: (len(s.split(":")[0]), s)))


def _sparse_optimizer(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    if cfg.sparse_optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.sparse_lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return torch.optim.Adam, {"lr": cfg.sparse_lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def _dense_optimizer(cfg: OptimConfig):
    def make(params):
        if cfg.dense_optimizer == "adagrad":
            return torch.optim.Adagrad(params, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay)

    return make


def _block_generator(seed: int, table: str, block: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def init_rows(seed: int, table: str, num_rows: int, dim: int, row_start: int, row_end: int) -> torch.Tensor:
    """Rows ``[row_start, row_end)`` of table ``table``: uniform(±1/sqrt(num_rows)) as TorchRec's default
    init, generated per fixed block so any shard of the table gets the same numbers."""
    bound = math.sqrt(1.0 / num_rows)
    out = torch.empty(row_end - row_start, dim)
    first, last = row_start // _INIT_BLOCK_ROWS, (row_end - 1) // _INIT_BLOCK_ROWS
    for b in range(first, last + 1):
        b0 = b * _INIT_BLOCK_ROWS
        b1 = min(b0 + _INIT_BLOCK_ROWS, num_rows)
        block = torch.empty(b1 - b0, dim).uniform_(-bound, bound, generator=_block_generator(seed, table, b))
        lo, hi = max(row_start, b0), min(row_end, b1)
        out[lo - row_start : hi - row_start] = block[lo - b0 : hi - b0]
    return out


def _local_pieces(value: object) -> Iterator[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
    """(local tensor, (row offset, col offset), global (rows, cols)) for every local piece of a table."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        size = tuple(value.size())
        for shard in value.local_shards():
            off = shard.metadata.shard_offsets
            yield shard.tensor, (off[0], off[1]), size  # type: ignore[misc]
    elif isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = value.to_local()
        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        yield local, (offset[0], offset[1]), tuple(value.shape)  # type: ignore[misc]
    elif isinstance(value, torch.Tensor):
        yield value, (0, 0), tuple(value.shape)  # type: ignore[misc]


@torch.no_grad()
def init_embeddings(model: nn.Module, seed: int) -> None:
    """Overwrite every embedding table (sharded or not) with the sharding-independent init."""
    state = model.state_dict()
    for key, value in state.items():
        if ".embedding_bags." not in key or not key.endswith(".weight"):
            continue
        table = key.split(".embedding_bags.")[1].rsplit(".", 1)[0]
        for local, (r0, c0), (rows, cols) in _local_pieces(value):
            n, d = local.shape
            full = init_rows(seed, table, rows, cols, r0, r0 + n)
            local.copy_(full[:, c0 : c0 + d].to(local.device, local.dtype))
    # Sharded modules hand out views, but be explicit: push the values through load_state_dict.
    model.load_state_dict(state)


def _zero_(value: object) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            shard.tensor.zero_()
    elif isinstance(value, DTensor):
        value.to_local().zero_()
    elif isinstance(value, torch.Tensor):
        value.zero_()


@torch.no_grad()
def reinit_embeddings(model: nn.Module, optimizer: Any, seed: int) -> None:
    """Fresh tables (the sharding-independent init with ``seed``) and a fresh fused-optimizer state for them
    (row-wise Adagrad's accumulators, Adam's moments): as if the tables had just been created."""
    init_embeddings(model, seed)
    # Sharded tables keep their state in the fused optimizer; data_parallel (replicated) tables are
    # trained by the dense optimizer: reset the state of every table parameter, wherever it lives.
    for _, opt in getattr(optimizer, "optimizers", []):
        for key, param in opt.params.items():
            if ".embedding_bags." in f".{key}":
                for value in opt.state.get(param, {}).values():
                    _zero_(value)


def fuse_sparse_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> list[nn.Parameter]:
    """Give every embedding table the sparse optimizer, applied in backward (what the sharders fuse into
    fbgemm's kernel; the planner needs it to offer the fused kernel). Returns the table parameters."""
    sparse_cls, sparse_kwargs = _sparse_optimizer(optim_cfg)
    tables = [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]
    apply_optimizer_in_backward(sparse_cls, tables, sparse_kwargs)
    return tables


def shard_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    sharding_cfg: ShardingConfig,
    optim_cfg: OptimConfig | None,
    *,
    device: torch.device,
    batch_size_per_rank: int,
    seed: int,
    pg: dist.ProcessGroup | None = None,
    plan: ShardingPlan | None = None,
) -> ShardedModel:
    """Wrap ``model`` (tables on ``meta``) in DMP over ``pg`` (default world).

    ``optim_cfg = None`` builds a frozen copy (a teacher): same plan, no dense optimizer. Its tables still
    get the fused kernel, which needs an optimizer type, but it is never stepped (no backward runs).
    """
    pg = pg or dist.group.WORLD
    world_size = dist.get_world_size(pg)
    fuse_sparse_optimizer(model, optim_cfg or OptimConfig())
    sharders = get_default_sharders()
    if plan is None:
        plan = make_plan(
            model,
            model_cfg,
            sharding_cfg,
            world_size=world_size,
            local_world_size=min(get_local_size(world_size), world_size),
            device=device,
            batch_size_per_rank=batch_size_per_rank,
            sharders=sharders,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dmp = DistributedModelParallel(
            module=model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders
        )
    init_embeddings(dmp, seed)
    optimizer = None
    if optim_cfg is not None:
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())), _dense_optimizer(optim_cfg)
        )
        optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return ShardedModel(dmp, optimizer, plan)
