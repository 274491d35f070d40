"""The 26 Criteo categorical features as TorchRec embedding tables (one table per feature), plus, optionally,
13 tables for the binned dense features (``I1_bucket..I13_bucket``, see ``data_pipeline.batching``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from data_pipeline.batching import BUCKET_KEYS, sparse_keys
from data_pipeline.schema import SPARSE_COLUMNS


def table_name(feature: str) -> str:
    return f"t_{feature}"


def embedding_bag_configs(
    table_sizes: Sequence[int], embedding_dim: int, features: Sequence[str] = SPARSE_COLUMNS
) -> list[EmbeddingBagConfig]:
    if len(table_sizes) != len(features):
        raise ValueError(f"got {len(table_sizes)} table sizes for {len(features)} features")
    return [
        EmbeddingBagConfig(
            name=table_name(f),
            embedding_dim=embedding_dim,
            num_embeddings=int(n),
            feature_names=[f],
            pooling=PoolingType.SUM,
        )
        for f, n in zip(features, table_sizes, strict=True)
    ]


def build_ebc(
    table_sizes: Sequence[int],
    embedding_dim: int,
    device: str | torch.device = "meta",
    dense_buckets: int = 0,
) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection on ``device`` (``meta`` by default: DMP materialises the shards).

    ``dense_buckets > 0`` adds one ``dense_buckets``-row table per dense feature after the 26 categorical ones.
    """
    sizes = list(table_sizes) + ([dense_buckets] * len(BUCKET_KEYS) if dense_buckets else [])
    return EmbeddingBagCollection(
        tables=embedding_bag_configs(sizes, embedding_dim, sparse_keys(dense_buckets)),
        device=torch.device(device),
    )
