"""A decoder-only transformer language model (GPT) as a flat ``nn.Sequential``, its head tied to its embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpipar.models.vit import TransformerBlock

__all__ = ["TokenEmbedding", "TiedHead", "gpt", "gpt_name", "BYTE_VOCAB"]

BYTE_VOCAB = 256
"""The default vocabulary: a token is a byte of UTF-8 text."""


class TokenEmbedding(nn.Module):
    """Token ids ``(batch, tokens)`` -> ``tokens(ids) + position[:tokens]``, ``(batch, tokens, width)``."""

    def __init__(self, vocab: int, width: int, seq_len: int):
        super().__init__()
        self.seq_len = seq_len
        self.tokens = nn.Embedding(vocab, width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] > self.seq_len:
            raise ValueError(f"{ids.shape[-1]} tokens, but the model's positions stop at --seq-len {self.seq_len}")
        return self.tokens(ids) + self.position[:ids.shape[-1]]


class TiedHead(nn.Module):
    """Final LayerNorm, then logits with the token embedding's weight (the same ``nn.Parameter``).

    The logits come as ``(batch, vocab, tokens)``, the class dimension second, as
    ``F.cross_entropy`` takes them with ``(batch, tokens)`` targets: every strategy's loss and
    evaluation then count each token's next-token loss unchanged.
    """

    def __init__(self, embedding: TokenEmbedding):
        super().__init__()
        self.norm = nn.LayerNorm(embedding.tokens.embedding_dim)
        self.weight = embedding.tokens.weight  # tied: a pipeline sums its gradient over the stages that hold it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.weight).transpose(1, 2)


def gpt(*, vocab: int = BYTE_VOCAB, width: int = 128, layers: int = 4, heads: int = 4, seq_len: int = 128,
        hidden: int = 0) -> nn.Sequential:
    """``TokenEmbedding``, ``layers`` causal pre-norm :class:`TransformerBlock` (``hidden`` MLP features,
    default ``4 * width``), ``TiedHead``: a Sequential that pipelines cut and tensor parallelism splits
    block by block. Raises ValueError naming the sizes."""
    hidden = hidden or 4 * width
    if min(vocab, width, layers, heads, seq_len, hidden) < 1:
        raise ValueError(f"every size of the GPT must be positive: vocab {vocab}, --width {width}, --layers "
                         f"{layers}, --heads {heads}, --seq-len {seq_len}, hidden {hidden}")
    if width % heads:
        raise ValueError(f"--heads {heads} does not divide --width {width}")
    embedding = TokenEmbedding(vocab, width, seq_len)
    blocks = [TransformerBlock(width, heads, hidden, causal=True) for _ in range(layers)]
    return nn.Sequential(embedding, *blocks, TiedHead(embedding))


def gpt_name(*, layers: int, width: int, heads: int, seq_len: int, vocab: int = BYTE_VOCAB) -> str:
    """The ``model`` label of a run (stored in its settings, so a resume must match it)."""
    return f"gpt-l{layers}-w{width}-h{heads}-t{seq_len}" + ("" if vocab == BYTE_VOCAB else f"-v{vocab}")
