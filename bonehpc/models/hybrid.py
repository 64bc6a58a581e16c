"""The student: a hybrid CNN + Transformer classifier (convolutional stem and stages, then a ViT encoder).

The convolutions bring the locality bias that a small data set needs and shrink the image 16x cheaply; the
transformer then mixes the whole token grid (global context across the radiograph). Layout:

    image [B, C, H, W]
      -> stem: 3x3 conv stride 2, BN, GELU                              H/2
      -> 3 stages: 3x3 conv stride 2 (downsample) + residual conv blocks   H/4, H/8, H/16
      -> 1x1 projection to the embedding width, flattened: tokens [B, (H/16)*(W/16), D]
      -> + learned position embedding (resampled for another input size), prepend a class token
      -> transformer encoder (pre-norm timm ViT blocks, stochastic depth)
      -> LayerNorm, [class token ; mean of the grid tokens], dropout, Linear -> logits [B, num_classes]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from bonehpc.models.registry import register_model

STRIDE = 16


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional GELU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU() if act else nn.Identity(),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (the second BN starts at zero: the block starts as identity)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels)
        self.conv2 = ConvBNAct(channels, channels, act=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class HybridNet(nn.Module):
    """Convolutional stages (stride 16) feeding a transformer encoder; class token + mean-pool head.

    Args:
        num_classes: Classifier outputs.
        in_chans: Input channels (3: the gray radiograph replicated, as the loaders deliver it).
        img_size: Input side the position embedding is made for; other sizes resample it (bicubic).
        channels: Widths of the stem-then-three conv stages.
        conv_depths: Residual blocks per conv stage (after each stride-2 downsample).
        embed_dim: Token width of the transformer.
        depth: Transformer blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly to this value over the transformer blocks.
        attn_drop_rate: Dropout of the attention weights.
        pool: ``cls`` (class token only) or ``cls+mean`` (class token concatenated with the mean grid token).
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        img_size: int = 224,
        channels: tuple[int, int, int, int] | list[int] = (32, 48, 96, 192),
        conv_depths: tuple[int, int, int] | list[int] = (0, 1, 1),
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        pool: str = "cls+mean",
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(conv_depths) != 3:
            raise ValueError(f"HybridNet: need 4 channels and 3 conv_depths, got {channels} and {conv_depths}")
        if img_size % STRIDE:
            raise ValueError(f"HybridNet: img_size must be a multiple of {STRIDE}, got {img_size}")
        if embed_dim % num_heads:
            raise ValueError(f"HybridNet: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if pool not in ("cls", "cls+mean"):
            raise ValueError(f"HybridNet: pool must be cls or cls+mean, got {pool!r}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.pool = pool
        self.grid = (img_size // STRIDE, img_size // STRIDE)
        self.input_size = (in_chans, img_size, img_size)

        stages: list[nn.Module] = [ConvBNAct(in_chans, channels[0], stride=2)]
        for cin, cout, n in zip(channels[:-1], channels[1:], conv_depths, strict=True):
            stages.append(nn.Sequential(ConvBNAct(cin, cout, stride=2), *[ResidualBlock(cout) for _ in range(n)]))
        self.stem = nn.Sequential(*stages)
        # 1x1 projection: the last conv width need not equal the token width.
        self.proj = nn.Conv2d(channels[-1], embed_dim, 1)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim * (2 if pool == "cls+mean" else 1), num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                # Each residual branch starts at zero, so the conv stack starts as a plain downsampling path.
                bn = m.conv2[1]
                assert isinstance(bn, nn.BatchNorm2d)
                nn.init.zeros_(bn.weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters an optimizer should not decay (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == self.grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=[h, w], old_size=list(self.grid), num_prefix_tokens=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens [B, 1 + h*w, D] (class token first)."""
        x = self.proj(self.stem(x))
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self._pos_embed(h, w)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return self.norm(self.blocks(x))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the tokens of `forward_features`."""
        feats = tokens[:, 0]
        if self.pool == "cls+mean":
            feats = torch.cat([feats, tokens[:, 1:].mean(dim=1)], dim=1)
        return self.head(self.head_drop(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _hybrid(defaults: dict[str, Any], kwargs: dict[str, Any]) -> HybridNet:
    return HybridNet(**{**defaults, **kwargs})


@register_model
def hybrid_tiny(**kwargs: Any) -> HybridNet:
    """About 0.3 M parameters: for CPU tests and smoke runs."""
    return _hybrid(
        dict(channels=(16, 16, 32, 64), conv_depths=(0, 1, 1), embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
        kwargs,
    )


@register_model
def hybrid_small(**kwargs: Any) -> HybridNet:
    """The default student."""
    return _hybrid(
        dict(channels=(32, 48, 96, 192), conv_depths=(0, 1, 1), embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
        kwargs,
    )


@register_model
def hybrid_base(**kwargs: Any) -> HybridNet:
    """A wider, deeper student for GPU runs."""
    return _hybrid(
        dict(channels=(32, 64, 128, 256), conv_depths=(1, 1, 1), embed_dim=288, depth=8, num_heads=6, mlp_ratio=4.0),
        kwargs,
    )
