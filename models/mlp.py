"""The feed-forward network of Anil et al. (2018) for Criteo: embeddings ⊕ dense → ReLU MLP → 1 logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class OverArch(nn.Module):
    """ReLU hidden layers, linear output (no activation: the loss works on logits)."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int], device: torch.device | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for size in layer_sizes:
            layers += [nn.Linear(in_features, size, device=device), nn.ReLU()]
            in_features = size
        layers.append(nn.Linear(in_features, 1, device=device))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PaperMLP(nn.Module):
    """Concatenate the pooled embeddings of every sparse feature with the dense features and feed an MLP
    (the paper uses hidden layers 2560-1024-256).

    Example::

        >>> import torch
        >>> from models.embedding_tables import build_ebc
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from data_pipeline.schema import SPARSE_COLUMNS
        >>> ebc = build_ebc([10] * 26, embedding_dim=4, device="cpu")
        >>> model = PaperMLP(ebc, dense_in_features=13, layer_sizes=[32, 16])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=list(SPARSE_COLUMNS), values=torch.zeros(26 * 2, dtype=torch.long),
        ...     lengths=torch.ones(26 * 2, dtype=torch.long))
        >>> model(torch.rand(2, 13), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        layer_sizes: Sequence[int],
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(embedding_bag_collection)
        configs = embedding_bag_collection.embedding_bag_configs()
        sparse_width = sum(c.embedding_dim * len(c.feature_names) for c in configs)
        self.over_arch = OverArch(sparse_width + dense_in_features, layer_sizes, device=dense_device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        embedded = self.sparse_arch(sparse_features).flatten(1)  # [B, F * D]
        return self.over_arch(torch.cat([embedded, dense_features], dim=1)).squeeze(-1)
