"""A small vision transformer (ViT) for small grey images, built from standard modules so that tensor
parallelism can replace each block by a :class:`~mpipar.tensor_parallel.ParallelTransformerBlock`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerBlock", "VisionTransformer", "vit_tiny", "vit_small", "VIT_MODELS"]


class TransformerBlock(nn.Module):
    """Pre-norm block ``x = x + attention(norm1(x)); x = x + fc2(gelu(fc1(norm2(x))))``.

    Its attributes ``attention`` (``nn.MultiheadAttention``, ``batch_first``, no dropout),
    ``fc1``, ``fc2``, ``norm1`` and ``norm2`` are exactly the arguments of
    ``ParallelTransformerBlock``, whose ``full_state_dict()`` uses the same names. With
    ``causal`` each token attends only to itself and the tokens before it (a language model's).
    A ``recompute_unit`` (``mpipar.run.recompute``): ``--recompute full`` checkpoints each block.
    """

    recompute_unit = "block"

    def __init__(self, dim: int, heads: int, hidden: int, *, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, x.dtype) if self.causal else None
        x = x + self.attention(h, h, h, need_weights=False, attn_mask=mask, is_causal=self.causal)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patches -> tokens -> pre-norm transformer blocks -> mean over tokens -> LayerNorm -> linear head.

    The image is cut into ``patch_size`` x ``patch_size`` patches (a convolution with
    stride = kernel = ``patch_size``: one linear map per patch), a learned position
    embedding is added, ``depth`` :class:`TransformerBlock` run in ``self.blocks`` (an
    ``nn.ModuleList``: a tensor-parallel splitter replaces its entries), and the mean of the
    tokens is classified. Inputs of another floating dtype are cast to the model's
    (float32 data into a float64 model). No dropout.

    Args:
        in_channels, num_classes, image_size: the data's (``DataSplits.model_shape``).
        patch_size: must divide ``image_size``.
        dim: token width; ``heads`` must divide it.
        depth: number of blocks.
        heads: attention heads per block.
        hidden: the MLP's hidden features.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, *, patch_size: int = 7,
                 dim: int = 48, depth: int = 4, heads: int = 4, hidden: int = 192):
        super().__init__()
        if min(in_channels, num_classes, image_size, patch_size, dim, depth, heads, hidden) < 1:
            raise ValueError("every size of the vision transformer must be positive")
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the token width {dim}")
        tokens = (image_size // patch_size) ** 2
        self.patch_size, self.dim, self.heads, self.hidden = patch_size, dim, heads, hidden
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.position  # (batch, tokens, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(1)))


def vit_tiny(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> VisionTransformer:
    """7x7 patches (16 tokens of a 28x28 image), width 48, 4 blocks of 4 heads and 192 hidden features
    (splits over 1, 2 or 4 tensor-parallel ranks); 117k parameters at 28x28, 10 classes."""
    return VisionTransformer(in_channels, num_classes, image_size, patch_size=7, dim=48, depth=4, heads=4,
                             hidden=192)


def vit_small(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> VisionTransformer:
    """7x7 patches, width 96, 6 blocks of 12 heads and 384 hidden features (splits over 1, 2, 3, 4, 6 or 12
    tensor-parallel ranks); 679k parameters at 28x28, 10 classes."""
    return VisionTransformer(in_channels, num_classes, image_size, patch_size=7, dim=96, depth=6, heads=12,
                             hidden=384)


VIT_MODELS = {
    "vit-tiny": vit_tiny,
    "vit-small": vit_small,
}
"""The vision transformers the tensor-parallel ViT job offers as ``--model``: ``name -> f(in_channels,
num_classes, image_size)``. Apart from ``IMAGE_MODELS``: they are not ``nn.Sequential`` and so cannot be
cut into pipeline stages."""
