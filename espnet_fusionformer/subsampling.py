"""Convolutional subsampling with a BatchNorm after every convolution and the
output projection (FusionFormer), or without (Conformer, like ESPnet's
``Conv2dSubsampling*``).

Unlike ESPnet's, output lengths are the exact convolution lengths
``(L - kernel) // stride + 1``, so no valid output frame reads padding and an
utterance gives the same frames alone or inside a padded batch.
"""

from typing import Optional, Sequence, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.embedding import RelPositionalEncoding
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError

from espnet_fusionformer.blocks import exporting
from espnet_fusionformer.fusable import Fusable, LayerBN, linear_bn

# input_layer -> (kernel, stride) of each Conv2d, as ESPnet's Conv2dSubsampling{,6,8}
SUBSAMPLING = {
    "conv2d": ((3, 2), (3, 2)),
    "conv2d6": ((3, 2), (5, 3)),
    "conv2d8": ((3, 2), (3, 2), (3, 2)),
}


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, size)`` bool mask, True on valid frames."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class Conv2dSubsampling(Fusable):
    """``(B, T, F)`` features -> ``(B, T', D)`` frames plus relative position table.

    Args:
        input_size: feature size ``F``.
        output_size: model size ``D`` (also the number of conv channels).
        input_layer: ``"conv2d"`` (T/4), ``"conv2d6"`` (T/6) or ``"conv2d8"`` (T/8).
        dropout_rate: dropout of the positional encoding.
        batch_norm: BatchNorm after each conv and after the output projection.
        max_len: initial length of the positional table (it grows as needed).
        scale_input: multiply the frames by ``sqrt(D)`` as ESPnet's positional
            encoding does (the Conformer's LayerNorms cancel it; without them it
            would make the input dominate the residual stream). (Default: ``True``)
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_layer: str = "conv2d",
        dropout_rate: float = 0.1,
        batch_norm: bool = True,
        sync: Optional[bool] = None,
        max_len: int = 5000,
        scale_input: bool = True,
    ) -> None:
        super().__init__()
        if input_layer not in SUBSAMPLING:
            raise ValueError(
                f"unknown input_layer {input_layer!r}: choose from {list(SUBSAMPLING)}"
            )
        self.specs: Sequence[Tuple[int, int]] = SUBSAMPLING[input_layer]
        freq, channels = input_size, 1
        convs = []
        for kernel, stride in self.specs:
            conv = torch.nn.Conv2d(channels, output_size, kernel, stride)
            # channels-last: faster oneDNN kernels, and the BatchNorm gathers rows
            conv.to(memory_format=torch.channels_last)
            convs.append(LayerBN(conv, batch_norm, sync, relu=True))
            freq, channels = (freq - kernel) // stride + 1, output_size
        if freq < 1:
            raise ValueError(
                f"input_size {input_size} is too small for input_layer {input_layer!r}"
            )
        self.convs = torch.nn.ModuleList(convs)
        self.conv_in: Optional[torch.nn.Linear] = None  # fused: first conv
        self.out = linear_bn(output_size * freq, output_size, batch_norm, sync)
        self.pos_enc = RelPositionalEncoding(output_size, dropout_rate, max_len)
        if not scale_input:
            self.pos_enc.xscale = 1.0

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Exact frame counts after the convolutions, ``(B,) -> (B,)``."""
        for kernel, stride in self.specs:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def min_input_length(self) -> int:
        """Shortest input that yields one output frame."""
        length = 1
        for kernel, stride in reversed(self.specs):
            length = (length - 1) * stride + kernel
        return length

    def check_length(self, shortest: int) -> None:
        """Raise ``TooShortUttError`` if ``shortest`` input frames give no output."""
        limit = self.min_input_length()
        if shortest < limit:
            raise TooShortUttError(
                f"input of {shortest} frames is too short for the subsampling: "
                f"it needs at least {limit} frames",
                shortest,
                limit,
            )

    def positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """ESPnet's relative position table ``(1, 2 length - 1, D)``."""
        self.pos_enc.extend_pe(like.new_empty(1, length))
        pe = self.pos_enc.pe
        return pe[:, pe.size(1) // 2 - length + 1 : pe.size(1) // 2 + length]

    def rate(self) -> int:
        """Subsampling factor: input frames per output frame."""
        rate = 1
        for _, stride in self.specs:
            rate *= stride
        return rate

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Subsample.

        Args:
            x: ``(B, T, F)`` features.
            lengths: ``(B,)`` valid frames per utterance.

        Returns:
            ``(B, T', D)`` frames (times sqrt(D) if ``scale_input``), ``(1, 2T'-1,
            D)`` relative position table and ``(B, T')`` bool mask of valid frames.
        """
        if self.conv_in is not None:
            return self._forward_fused(x, lengths)
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for conv, (kernel, stride) in zip(self.convs, self.specs):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            mask = valid_mask(lengths, (x.size(2) - kernel) // stride + 1)
            x = conv(x, mask[:, None, :, None])  # (B, D, T', F'), ReLU'd
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # (B, T', D * F')
        x = self.out(x, mask.unsqueeze(-1))
        x, pos_emb = self.pos_enc(x)
        return x, pos_emb, mask

    def _forward_fused(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused form of ``forward``: channels-last convolutions, no transposes."""
        kernel, stride = self.specs[0]
        if exporting():  # ONNX has no dynamic unfold; a Conv2d exports (and fuses)
            weight = self.conv_in.weight.view(-1, 1, kernel, kernel)
            h = torch.nn.functional.conv2d(
                x.unsqueeze(1), weight, self.conv_in.bias, stride
            ).relu()  # (B, C, T1, F1)
        else:
            patches = x.unfold(1, kernel, stride).unfold(2, kernel, stride)
            b, t, f = patches.shape[:3]  # (B, T1, F1, k, k)
            h = torch.relu_(self.conv_in(patches.reshape(b, t, f, kernel * kernel)))
            h = h.permute(0, 3, 1, 2)  # (B, C, T1, F1) view of channels-last memory
        b = h.size(0)
        lengths = self.output_lengths(lengths)
        for conv in self.convs:
            h = conv(h, None)
        h = h.permute(0, 2, 3, 1)  # (B, T', F', C)
        x = self.out(h.reshape(b, h.size(1), -1), None)  # scaled by sqrt(D)
        return x, self.positions(x.size(1), x), valid_mask(lengths, x.size(1))

    def fuse_(self) -> None:
        """Fused form: the first conv as a matmul over patches, the others
        channels-last, the output projection reading ``(F', C)`` order and
        including the ``sqrt(D)`` scale of the positional encoding."""
        if self.conv_in is not None:
            return
        for module in (*self.convs, self.out):
            module.fuse_()
        first = self.convs[0].layer
        conv_in = torch.nn.Linear(
            first.weight[0].numel(), first.out_channels, device=first.weight.device
        )
        out = self.out.layer
        channels = first.out_channels
        freq = out.in_features // channels
        with torch.no_grad():
            conv_in.weight.copy_(first.weight.reshape(first.out_channels, -1))
            conv_in.bias.copy_(first.bias)
            weight = out.weight.view(out.out_features, channels, freq)
            out.weight.copy_(weight.transpose(1, 2).reshape(out.out_features, -1))
            out.weight.mul_(self.pos_enc.xscale)
            out.bias.mul_(self.pos_enc.xscale)
        self.conv_in = conv_in.to(first.weight.dtype).train(self.training)
        self.convs = torch.nn.ModuleList(
            [c.to(memory_format=torch.channels_last) for c in self.convs[1:]]
        ).train(self.training)
