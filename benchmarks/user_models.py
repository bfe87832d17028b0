"""Models written the way users write them, for ``dimat bench merge --model benchmarks.user_models:NAME``.

Nothing here is tailored to dimat: no permutation tables, no tracing-friendly rewrites. Each factory has the
signature dimat's model specs use: ``factory(num_classes, width=1, in_channels=3, image_size=32)``.

* :func:`vgg_flag`: a VGG-style BatchNorm CNN whose ``forward(x, return_acts=False)`` takes a flag.
* :func:`vit`: a small vision transformer (pre-norm blocks, separate q/k/v projections, a head split by
  ``view``, ``F.scaled_dot_product_attention``, a cls token and a learned positional embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VGGFlag(nn.Module):
    """conv(c) conv(c) pool conv(2c) conv(2c) pool conv(4c) pool, global average pool, linear; BatchNorm + ReLU.

    ``forward(x, return_acts=True)`` also returns the list of the block outputs (as feature-inspection code does).
    """

    def __init__(self, num_classes: int = 20, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        c = max(1, int(round(32 * width)))

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1 = nn.Sequential(block(in_channels, c), block(c, c), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(block(c, 2 * c), block(2 * c, 2 * c), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(block(2 * c, 4 * c), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * c, num_classes)

    def forward(self, x, return_acts=False):
        acts = []
        for stage in (self.stage1, self.stage2, self.stage3):
            x = stage(x)
            acts.append(x)
        logits = self.head(x.mean(dim=(2, 3)))
        if return_acts:
            return logits, acts
        return logits


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (a strided conv), cls token, positional embedding, pre-norm blocks, LayerNorm, linear."""

    def __init__(self, num_classes: int = 20, dim: int = 96, depth: int = 4, heads: int = 3, patch: int = 4,
                 in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def vgg_flag(num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """:class:`VGGFlag` with ``32 * width`` channels in the first stage."""
    return VGGFlag(num_classes, width, in_channels, image_size)


def vit(num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """:class:`ViT`: 4 blocks, width ``96 * width`` (3 heads), patch 4."""
    dim = 3 * max(1, int(round(32 * width)))
    return ViT(num_classes, dim=dim, depth=4, heads=3, patch=4, in_channels=in_channels, image_size=image_size)
