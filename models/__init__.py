"""Pure model definitions (no device placement, loss or optimizer inside).

Every model maps ``(dense_features [B, 13], sparse_features KJT) -> logits [B]`` and keeps its tables in
``sparse_arch.embedding_bag_collection`` so TorchRec's planner and sharders find them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from data_pipeline.schema import NUM_DENSE
from models.activations import ACTIVATIONS, SmeLU, set_activation, smelu
from models.dlrm import DCN, DLRM
from models.embedding_tables import build_ebc, embedding_bag_configs, table_name
from models.mlp import PaperMLP

ARCHS = ("dlrm", "dcn", "mlp")

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "SmeLU",
    "DCN",
    "DLRM",
    "PaperMLP",
    "build_ebc",
    "build_model",
    "embedding_bag_configs",
    "set_activation",
    "smelu",
    "table_name",
]


def build_model(
    arch: str,
    *,
    table_sizes: Sequence[int],
    embedding_dim: int,
    dense_arch: Sequence[int] = (512, 256, 16),
    over_arch: Sequence[int] = (512, 512, 256, 1),
    dcn_num_layers: int = 3,
    dcn_low_rank: int = 64,
    mlp_layers: Sequence[int] = (2560, 1024, 256),
    num_dense: int = NUM_DENSE,
    dense_buckets: int = 0,
    activation: str = "relu",
    smelu_beta: float = 1.0,
    device: str | torch.device = "meta",
    dense_device: str | torch.device | None = None,
) -> nn.Module:
    """Build a model with its embedding tables on ``device`` (``meta``: no memory until DMP shards them)
    and dense layers on ``dense_device`` (defaults to ``device``). ``dense_buckets > 0`` adds 13 tables for the
    binned dense features, which the batches must then carry (``CriteoStream(dense_buckets=...)``).
    ``activation`` is every hidden layer's: ``relu`` or ``smelu`` (half-width ``smelu_beta``)."""
    ebc = build_ebc(table_sizes, embedding_dim, device, dense_buckets)
    dd = torch.device(dense_device if dense_device is not None else device)
    model: nn.Module
    if arch == "dlrm":
        model = DLRM(ebc, num_dense, list(dense_arch), list(over_arch), dense_device=dd)
    elif arch == "dcn":
        model = DCN(
            ebc, num_dense, list(dense_arch), list(over_arch), dcn_num_layers, dcn_low_rank, dense_device=dd
        )
    elif arch == "mlp":
        model = PaperMLP(ebc, num_dense, list(mlp_layers), dense_device=dd)
    else:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {ARCHS}")
    return set_activation(model, activation, smelu_beta)
