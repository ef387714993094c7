"""Small vision models of the SparseVJP paper's experiments, in plain PyTorch: a BagNet and a ViT.

Both are built from nn.Linear / nn.Conv2d modules only (attention included), so every weight
layer can be converted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from randprop.models.registry import register_model


class BagNet(nn.Module):
    """Patch-level CNN (Brendel & Bethge, 2019): 3x3 and 1x1 convs with a 9x9 receptive field,
    a 1x1 conv classifier giving logits per patch, averaged over the patches."""

    def __init__(self, in_channels: int = 1, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),  # receptive field 3
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),  # 5
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),  # 9
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(2 * w, classes, 1)
        for conv in self.features:
            if isinstance(conv, nn.Conv2d):  # He init: keeps activations O(1) through the ReLUs
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).mean(dim=(-2, -1))


class Attention(nn.Module):
    """Multi-head self-attention with separate nn.Linear projections (qkv and output)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021) for 1x28x28: 7x7 patches (16 tokens) by a
    strided conv, learned position embeddings, a class token, pre-norm blocks, linear head."""

    def __init__(
        self,
        image_size: int = 28,
        patch: int = 7,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@register_model("bagnet", (1, 28, 28), "small BagNet: 3x3/1x1 convs, 9x9-patch logits averaged")
def bagnet(in_channels: int = 1, width: int = 32, classes: int = 10) -> nn.Module:
    """Small BagNet for 1x28x28: patch logits (9x9 patches, 14x14 positions) averaged."""
    return BagNet(in_channels, width, classes)


@register_model("vit", (1, 28, 28), "small ViT: 16 patches 7x7, 2 blocks of width 64")
def vit(dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10) -> nn.Module:
    """Small ViT for 1x28x28: 16 patches of 7x7, ``depth`` blocks of width ``dim``."""
    return ViT(dim=dim, depth=depth, heads=heads, classes=classes)
