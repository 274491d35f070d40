"""Frozen teacher copies: what a teacher source runs its forward on (``teacher.precision``).

- ``fp32``: a copy with the student's own sharding plan (DMP, fused fp32 tables): collectives like the
  student's, memory like the student's shards.
- ``fp16`` / ``int8``: a local, unsharded copy on every rank whose embedding tables are TorchRec's quantized
  ``EmbeddingBagCollection`` (``torchrec.quant``: fbgemm's ``IntNBitTableBatchedEmbeddingBagsCodegen``, CPU
  and GPU; int8 is row-wise, each row with its own fp16 scale and bias), dense layers in fp32. The paper
  notes that distillation is "not very sensitive to the exact values of the predictions"; the teacher's
  lookups then move a half or a quarter of the bytes and need no all-to-all. Memory per rank: the whole
  teacher at that precision on the device, and, while a version loads, its fp32 weights in host memory.

Either copy loads a version (a peer's exchanged model, or a checkpoint) with :func:`load`, through
:mod:`recsys_codistill.dcp_io` (no code in it can run), from the same verified directories as before: the
exchange's guarantees (a torn or damaged version is never loaded) do not depend on the precision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from recsys_codistill import dcp_io
from recsys_codistill.config import RunConfig

PRECISIONS = ("fp32", "fp16", "int8")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        if p.is_leaf:  # fused tables expose non-leaf views; they only run under no_grad anyway
            p.requires_grad_(False)
    return model


def quantize_tables(model: nn.Module, precision: str) -> nn.Module:
    """Replace every EmbeddingBagCollection of an unsharded float model by TorchRec's quantized one (in
    place; returns ``model``)."""
    from torch.ao.quantization import PlaceholderObserver, QConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    dtype = {"fp16": torch.float16, "int8": torch.qint8}[precision]
    qconfig = QConfig(
        activation=PlaceholderObserver.with_args(dtype=torch.float),
        weight=PlaceholderObserver.with_args(dtype=dtype),
    )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                child.qconfig = qconfig
                setattr(parent, name, QuantEmbeddingBagCollection.from_float(child))
    return model


class ShardedCopy:
    """``fp32``: a frozen DMP copy with the student's plan."""

    precision = "fp32"

    def __init__(self, model: nn.Module) -> None:
        self.model = _freeze(model)

    def load(self, path: Path) -> None:
        from recsys_codistill.train.checkpoint import ModelState

        dcp_io.load({"model": ModelState(self.model)}, path)

    def __call__(self, dense: torch.Tensor, sparse) -> torch.Tensor:  # noqa: ANN001
        return self.model(dense, sparse)


class QuantizedCopy:
    """``fp16`` / ``int8``: an unsharded copy of ``cfg``'s model on every rank, tables quantized after
    each load (the fp32 weights are read into a float model, then converted)."""

    def __init__(self, cfg: RunConfig, precision: str, device: torch.device) -> None:
        if precision not in ("fp16", "int8"):
            raise ValueError(f"teacher.precision {precision!r}: expected one of {list(PRECISIONS)}")
        self.cfg, self.precision, self.device = cfg, precision, device
        self.model: nn.Module | None = None

    def load(self, path: Path) -> None:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        from models import build_model
        from recsys_codistill.train.checkpoint import ModelState

        self.model = None  # the previous version goes before the next one is read
        cpu = torch.device("cpu")
        # The fp32 weights are read on the host, quantized, and only the quantized model goes to the
        # device. Tables are built on meta and materialised uninitialised (every weight is then read from
        # the version); the dense part is built for real, since it holds computed buffers (DLRM's triu
        # indices), under a forked RNG so that loading a teacher never moves the training's random state.
        with torch.random.fork_rng(devices=[]):
            model = build_model(**self.cfg.model.build_kwargs(), device="meta", dense_device=cpu)
        for m in model.modules():
            if isinstance(m, EmbeddingBagCollection):
                m.to_empty(device=cpu)
        dcp_io.load({"model": ModelState(model)}, path, single_process=True)
        self.model = _freeze(quantize_tables(model, self.precision).to(self.device))

    def __call__(self, dense: torch.Tensor, sparse) -> torch.Tensor:  # noqa: ANN001
        if self.model is None:
            raise RuntimeError("a quantized teacher copy was used before any version was loaded")
        return self.model(dense, sparse)
