"""Weight averaging of the final model (``train.average``): EMA or SWA over the last part of training.

An average of the weights a run visits near its end is a cheaper cousin of an ensemble: it smooths the
end-of-training noise that a constant learning rate leaves in the final weights (part of what makes two
retrains disagree), at the cost of one extra copy of the weights. Polyak averaging / SWA (Izmailov et al.
2018) takes the uniform mean of snapshots; EMA weights recent snapshots more.

``WeightAverager`` owns its interval: it folds the live weights into the average every
``train.average_every`` steps once the last ``train.average_fraction`` of the run has begun, and at the
last step. At the end the trainer calls :meth:`WeightAverager.apply`, which writes the average into the
model, so the final checkpoint, the final validation and every prediction made from the run use the
averaged weights (the teacher versions a codistillation run publishes during training stay the live
weights: the peers distil from the model that is training).

Every rank averages only its own piece of every tensor (a table shard, a replica of a dense layer), so the
average costs no communication; it is saved as a per-rank checkpoint state, and a resumed run continues
the same average exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from recsys_codistill import dist
from recsys_codistill.config import TrainConfig
from recsys_codistill.train.checkpoint import _local_tensors


def average_start(total: int, fraction: float) -> int:
    """The first step whose weights enter the average: the last ``fraction`` of ``total`` steps."""
    return max(0, total - max(1, math.ceil(fraction * total)))


class WeightAverager:
    """A running EMA or uniform (SWA) average of this rank's pieces of the model's floating-point state."""

    def __init__(self, cfg: TrainConfig, total: int) -> None:
        self.kind, self.every, self.decay = cfg.average, cfg.average_every, cfg.ema_decay
        self.total = total
        self.start = average_start(total, cfg.average_fraction)
        self.count = 0
        self.avg: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def should_sample(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): sample every ``every`` steps from ``start`` on, and the
        last step (so the average always includes the final weights)."""
        if not self.enabled or step <= self.start:
            return False
        return (step - self.start) % self.every == 0 or step == self.total

    @staticmethod
    def _pieces(model: nn.Module) -> dict[str, torch.Tensor]:
        # Sharded tables hand out views of their storage; dense state-dict tensors share it too.
        out = {}
        for key, value in model.state_dict().items():
            for i, t in enumerate(_local_tensors(value)):
                if t.is_floating_point():
                    out[f"{key}#{i}"] = t
        return out

    @torch.no_grad()
    def sample(self, model: nn.Module) -> None:
        pieces = self._pieces(model)
        if not self.avg:
            self.avg = {k: t.detach().clone() for k, t in pieces.items()}
        else:
            if set(pieces) != set(self.avg):
                raise RuntimeError(
                    f"weight averaging: the model's tensors changed ({sorted(set(pieces) ^ set(self.avg))[:3]})"
                )
            # SWA: running mean a += (w − a) / (n + 1); EMA: a += (1 − d)(w − a)
            weight = 1.0 / (self.count + 1) if self.kind == "swa" else 1.0 - self.decay
            for k, t in pieces.items():
                self.avg[k].lerp_(t.to(self.avg[k].dtype), weight)
        self.count += 1

    @torch.no_grad()
    def apply(self, model: nn.Module) -> int:
        """Write the average into the model (in place); returns how many snapshots it holds (0: nothing
        was averaged, the model is left as it is)."""
        if not self.count:
            return 0
        state = model.state_dict()
        pieces = self._pieces(model)
        for k, t in pieces.items():
            t.copy_(self.avg[k])
        # Sharded modules hand out views, but be explicit (as sharding.init_embeddings): load it back.
        model.load_state_dict(state)
        return self.count

    # -- per-rank checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start": self.start,
            "every": self.every,
            "decay": self.decay,
            "count": self.count,
            "avg": dict(self.avg),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        saved = {k: sd.get(k) for k in ("kind", "start", "every", "decay")}
        mine = {"kind": self.kind, "start": self.start, "every": self.every, "decay": self.decay}
        if saved != mine:
            raise dist.FatalError(
                f"the checkpoint's weight average was taken with {saved}, this run asks for {mine} "
                "(train.average / average_fraction / average_every / ema_decay changed): it cannot continue it"
            )
        self.count = int(sd["count"])
        self.avg = {k: v.clone() for k, v in sd["avg"].items()}
