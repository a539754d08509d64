"""Positional encodings: ``pos_enc_layer_type`` -> module.

Each takes the subsampled frames ``(B, T, D)`` with their valid-frame mask and
returns the frames with positions applied plus, for the relative ones, the
relative position table ``(1, 2T-1, D)`` the attention reads (``None`` for the
others). The sinusoid tables are ESPnet's. ``scale_input=False`` drops ESPnet's
``sqrt(D)`` input scale, which only a final LayerNorm cancels (FusionFormer).
"""

import math
from typing import Optional, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.embedding import (
    PositionalEncoding,
    RelPositionalEncoding,
)

from espnet_fusionformer.blocks import TimeConv, dropout

Positions = Tuple[torch.Tensor, Optional[torch.Tensor]]


class RelPositions(RelPositionalEncoding):
    """``rel_pos`` / ``legacy_rel_pos``: ``x * xscale`` and the relative table.

    Relative position ``r`` (query frame minus key frame) is row ``T - 1 - r`` of
    the ``(1, 2T-1, D)`` table; the legacy attention uses its ``r >= 0`` half,
    which holds the sinusoids of ESPnet's ``LegacyRelPositionalEncoding``.
    """

    relative = True
    streamable = True

    def __init__(
        self, size: int, dropout_rate: float, max_len: int, scale_input: bool
    ) -> None:
        super().__init__(size, dropout_rate, max_len)
        if not scale_input:
            self.xscale = 1.0

    def positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """The table for ``length`` frames ``(1, 2 length - 1, D)``."""
        self.extend_pe(like.new_empty(1, length))
        pe = self.pe
        return pe[:, pe.size(1) // 2 - length + 1 : pe.size(1) // 2 + length]

    def max_length(self) -> int:
        """Frames the current table covers (it grows when needed)."""
        return (self.pe.size(1) + 1) // 2

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], offset: int = 0
    ) -> Positions:
        """``(B, T, D) -> (B, T, D), (1, 2T-1, D)``."""
        if self.xscale != 1.0:
            x = x * self.xscale
        pos_emb = self.positions(x.size(1), x)
        return dropout(self.dropout, x), dropout(self.dropout, pos_emb)


class AbsPositions(PositionalEncoding):
    """``abs_pos``: ``x * xscale + pe[offset : offset + T]`` (sinusoids)."""

    relative = False
    streamable = True

    def __init__(
        self, size: int, dropout_rate: float, max_len: int, scale_input: bool
    ) -> None:
        super().__init__(size, dropout_rate, max_len)
        if not scale_input:
            self.xscale = 1.0

    def table(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """``pe[offset : offset + T]`` as ``(1, T, D)``."""
        self.extend_pe(x.new_empty(1, offset + x.size(1)))
        return self.pe[:, offset : offset + x.size(1)]

    def max_length(self) -> int:
        """Frames the current table covers (it grows when needed)."""
        return self.pe.size(1)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], offset: int = 0
    ) -> Positions:
        """``(B, T, D) -> (B, T, D), None``; ``offset``: frames before ``x``."""
        if self.xscale != 1.0:
            x = x * self.xscale
        return dropout(self.dropout, x + self.table(x, offset)), None


class ScaledAbsPositions(AbsPositions):
    """``scaled_abs_pos``: ``x + alpha * pe[offset : offset + T]`` with a learned
    ``alpha`` (ESPnet's ``ScaledPositionalEncoding``: no input scale)."""

    def __init__(
        self, size: int, dropout_rate: float, max_len: int, scale_input: bool
    ) -> None:
        super().__init__(size, dropout_rate, max_len, scale_input=False)
        self.alpha = torch.nn.Parameter(torch.tensor(1.0))

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], offset: int = 0
    ) -> Positions:
        return dropout(self.dropout, x + self.alpha * self.table(x, offset)), None


class ConvPositions(torch.nn.Module):
    """``conv``: ESPnet's ``ConvolutionalPositionalEmbedding`` (wav2vec 2.0): the
    frames are replaced by ``act(conv(x))``, a convolution over 128 frames in 16
    groups, with a BatchNorm and ReLU (FusionFormer) or GELU. It looks 63 frames
    ahead, so it cannot stream."""

    relative = False
    streamable = False
    xscale = 1.0

    def __init__(
        self,
        size: int,
        batch_norm: bool,
        sync: Optional[bool] = None,
        kernel_size: int = 128,
        groups: int = 16,
    ) -> None:
        super().__init__()
        self.conv = TimeConv(
            size, size, kernel_size, batch_norm, sync, relu=batch_norm, groups=groups
        )
        self.activation = None if batch_norm else torch.nn.GELU()
        if not batch_norm:  # ESPnet's initialization
            std = math.sqrt(4.0 / (kernel_size * size))
            torch.nn.init.normal_(self.conv.conv.layer.weight, mean=0, std=std)
            torch.nn.init.zeros_(self.conv.conv.layer.bias)

    def max_length(self) -> None:
        return None  # no table

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], offset: int = 0
    ) -> Positions:
        """``(B, T, D), (B, T, 1) -> (B, T, D), None``."""
        x = self.conv(x, mask)
        return (x if self.activation is None else self.activation(x)), None


# pos_enc_layer_type -> (module, the relative position scheme of the attention it
# goes with: see blocks.ATTENTIONS)
POSITIONAL = {
    "rel_pos": (RelPositions, "latest"),
    "legacy_rel_pos": (RelPositions, "legacy"),
    "abs_pos": (AbsPositions, None),
    "scaled_abs_pos": (ScaledAbsPositions, None),
    "conv": (ConvPositions, None),
}


def make_positions(
    kind: str,
    size: int,
    dropout_rate: float,
    max_len: int,
    scale_input: bool,
    batch_norm: bool,
    sync: Optional[bool] = None,
) -> torch.nn.Module:
    """The ``pos_enc_layer_type`` module for model size ``size``."""
    if kind not in POSITIONAL:
        raise ValueError(
            f"unknown pos_enc_layer_type {kind!r}: choose from {list(POSITIONAL)}"
        )
    cls = POSITIONAL[kind][0]
    if cls is ConvPositions:  # the only one with weights to normalize
        return ConvPositions(size, batch_norm, sync)
    return cls(size, dropout_rate, max_len, scale_input)
