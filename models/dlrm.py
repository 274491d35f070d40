"""DLRM (Naumov et al. 2019) and DCN-v2 on TorchRec's building blocks, returning logits of shape [B]."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM as _TorchrecDLRM
from torchrec.models.dlrm import DLRM_DCN as _TorchrecDLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class DLRM(_TorchrecDLRM):
    """DLRM: SparseArch (EBC) + DenseArch (MLP to embedding_dim) + dot InteractionArch + OverArch.

    TorchRec's module with the sub-module names its sharders and planners expect
    (``sparse_arch.embedding_bag_collection``); the only change is that ``forward`` returns logits
    of shape ``[B]`` (not ``[B, 1]``) so losses and predictions need no squeezing.

    Example::

        >>> import torch
        >>> from models.embedding_tables import build_ebc
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from data_pipeline.schema import SPARSE_COLUMNS
        >>> ebc = build_ebc([10] * 26, embedding_dim=4, device="cpu")
        >>> model = DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[8, 4],
        ...              over_arch_layer_sizes=[8, 1])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=list(SPARSE_COLUMNS), values=torch.zeros(26 * 2, dtype=torch.long),
        ...     lengths=torch.ones(26 * 2, dtype=torch.long))
        >>> model(torch.rand(2, 13), kjt).shape
        torch.Size([2])
    """

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(dense_features, sparse_features).squeeze(-1)


class DCN(_TorchrecDLRM_DCN):
    """DLRM with DCN-v2 low-rank cross layers (Wang et al. 2021) as the interaction.

    Example::

        >>> import torch
        >>> from models.embedding_tables import build_ebc
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from data_pipeline.schema import SPARSE_COLUMNS
        >>> ebc = build_ebc([10] * 26, embedding_dim=4, device="cpu")
        >>> model = DCN(ebc, dense_in_features=13, dense_arch_layer_sizes=[8, 4],
        ...             over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=list(SPARSE_COLUMNS), values=torch.zeros(26 * 2, dtype=torch.long),
        ...     lengths=torch.ones(26 * 2, dtype=torch.long))
        >>> model(torch.rand(2, 13), kjt).shape
        torch.Size([2])
    """

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(dense_features, sparse_features).squeeze(-1)
