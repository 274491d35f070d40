"""Activations of the models' MLPs: ReLU (default) or SmeLU (Shamir, Lin & Coviello 2020).

SmeLU, the smooth ReLU, replaces ReLU's kink at 0 by a quadratic of half-width β::

    smelu(x) = 0                 x <= -β
               (x + β)² / (4β)   |x| < β
               x                 x >= β

It is continuous with a continuous gradient (0 → 1 over [-β, β]). Shamir et al. report that this alone
makes retrains of deep CTR models markedly more reproducible (ReLU's kink sends nearby inputs down very
different paths when the weights differ slightly), at no cost in model size: the cheapest churn method to
compare, needing no second model.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("relu", "smelu")


def smelu(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """SmeLU with half-width ``beta`` > 0 (see the module docstring)."""
    if not beta > 0:
        raise ValueError(f"SmeLU beta must be > 0, got {beta}")
    quadratic = (x + beta).square() / (4.0 * beta)
    return torch.where(x >= beta, x, torch.where(x <= -beta, torch.zeros_like(x), quadratic))


class SmeLU(nn.Module):
    """:func:`smelu` as a module. β is a plain attribute, not a buffer: a model's state dict (and so its
    checkpoints) is the same whichever activation it uses; the config records the activation."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"SmeLU beta must be > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smelu(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def set_activation(model: nn.Module, activation: str, beta: float = 1.0) -> nn.Module:
    """Use ``activation`` in every hidden layer of ``model`` (in place; returns it): TorchRec's MLP
    ``Perceptron`` layers (DLRM / DCN dense and over arches) and ``nn.ReLU`` modules (the paper's MLP).
    Output layers have no activation and stay linear."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if activation == "relu":
        return model
    from torchrec.modules.mlp import Perceptron

    for module in list(model.modules()):
        # only ReLUs: an identity or sigmoid output activation stays what it is
        if isinstance(module, Perceptron) and (
            module._activation_fn is torch.relu or isinstance(module._activation_fn, nn.ReLU)
        ):
            module._activation_fn = SmeLU(beta)
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, SmeLU(beta))
    return model
