"""Local training and evaluation on in-memory tensors (plain tensor batching: no DataLoader, no worker processes).

An agent's data is a pair of tensors ``(x, y)``, shuffled every epoch by the agent's own ``torch.Generator`` so
that a run (and a resumed run) is reproducible.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["make_optimizer", "optimizer_factory", "shuffled_batches", "train_epochs", "evaluate"]

#: momentum of the ``msgd`` optimizer
MSGD_MOMENTUM = 0.9


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd``, ``msgd`` (SGD with momentum 0.9) or ``adam``; ValueError for another name."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "msgd":
        return torch.optim.SGD(params, lr=lr, momentum=MSGD_MOMENTUM, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of sgd, msgd, adam")


def optimizer_factory(name: str, lr: float, weight_decay: float = 0.0) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """A function ``model -> optimizer`` over the model's parameters (checked now, built later)."""
    make_optimizer(name, [torch.zeros(1, requires_grad=True)], lr, weight_decay)  # fail early on a bad name
    return lambda model: make_optimizer(name, model.parameters(), lr, weight_decay)


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images (N, C, H, W) left-right."""
    mask = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                     flip: bool = False, passes: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(x, y)``: pass after pass over the samples, each pass in a fresh random order.

    Parameters
    ----------
    generator : the agent's RNG: it alone decides the orders and the flips, so runs (and resumed runs) repeat.
    flip : mirror a random half of every batch of images (N, C, H, W) left-right.
    passes : how many passes; None for an endless stream.
    """
    done = 0
    while passes is None or done < passes:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx]
            if flip and xb.dim() == 4:
                xb = _flip(xb, generator)
            yield xb, y[idx]
        done += 1


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    flip: bool = False,
) -> float:
    """Train ``model`` in place for ``epochs`` passes over ``(x, y)`` with cross-entropy; shuffled every epoch.

    Parameters
    ----------
    generator : the agent's RNG: it alone decides the shuffling and the flips, so runs are reproducible.
    flip : mirror a random half of every batch left-right (images only).

    Returns
    -------
    Mean training loss over all batches seen (nan when there were none).
    """
    device = next(model.parameters()).device
    model.train()
    total, count = 0.0, 0
    for xb, yb in shuffled_batches(x, y, batch_size, generator, flip=flip, passes=epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        count += 1
    return total / count if count else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> Tuple[float, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy of ``model`` on ``(x, y)``; (nan, nan) if empty.

    The model is evaluated in eval mode and its previous mode restored.
    """
    if len(x) == 0:
        return float("nan"), float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            out = model(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(x), loss / len(x)
