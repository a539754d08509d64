"""Input layers (``input_layer``): ``(B, T, F)`` features -> ``(B, T', D)`` frames,
then positions (``positions.py``).

``conv2d*`` are ESPnet's ``Conv2dSubsampling*`` with a BatchNorm after every
convolution and the output projection (FusionFormer), or without (Conformer).
Unlike ESPnet's, output lengths are the exact convolution lengths
``(L - kernel) // stride + 1``, so no valid output frame reads padding and an
utterance gives the same frames alone or inside a padded batch. ``linear`` is
``Linear -> BN`` (FusionFormer; ESPnet: ``Linear -> LayerNorm``) and dropout,
``embed`` an embedding of token ids ``(B, T)``, ``None`` the features themselves.
"""

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError

from espnet_fusionformer.blocks import dropout, exporting
from espnet_fusionformer.fusable import Fusable, LayerBN, linear_bn
from espnet_fusionformer.norm import make_norm

# input_layer -> (kernel, stride) of each Conv2d, as ESPnet's Conv2dSubsampling*
SUBSAMPLING = {
    "conv2d": ((3, 2), (3, 2)),
    "conv2d1": ((3, 1), (3, 1)),
    "conv2d2": ((3, 2), (3, 1)),
    "conv2d6": ((3, 2), (5, 3)),
    "conv2d8": ((3, 2), (3, 2), (3, 2)),
}


def patches(h: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """im2col by strided slices: ``(B, T, F, C)`` channels-last -> ``(B, T', F',
    kernel * kernel * C)``, in a conv weight's (kernel row, column, channel) order
    (no padding; ``T' = (T - kernel) // stride + 1``, ``F'`` alike)."""
    k, s = kernel, stride
    t, f = (h.size(1) - k) // s + 1, (h.size(2) - k) // s + 1
    cols = [
        h[:, i : i + s * (t - 1) + 1 : s, j : j + s * (f - 1) + 1 : s]
        for i in range(k)
        for j in range(k)
    ]  # k * k views (B, T', F', C)
    return torch.cat(cols, -1)


def conv2d_as_matmul(conv: torch.nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv`` (square kernel and stride, no padding) as strided slices and one
    matmul: ``(B, T, F, Cin)`` channels-last -> ``(B, T', F', Cout)``.

    The ONNX form of the subsampling's inner convolutions (all of them under
    ``im2col_export``, the int8 form): ONNX Runtime's dynamic int8 quantizer
    quantizes ``MatMul`` (its ``ConvInteger`` measured 2x slower than float), so
    this is what lets int8 cover the model's largest layer, and
    ``quantize.quantize_before_slicing`` then slices the int8 input
    (``docs/bench/README.md``).
    """
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    cols = patches(h, conv.kernel_size[0], conv.stride[0])
    return torch.nn.functional.linear(cols, weight, conv.bias)


def two_convs_by_taps(
    x: torch.Tensor, conv_in: torch.nn.Linear, kernel: int, stride: int, conv
) -> torch.Tensor:
    """The first two convolutions straight from the input, one matmul per tap of
    the second: ``(B, T, F)`` -> ``(B, T2, F2, C)``, ``conv``'s output before its
    ReLU.

    ``conv_in`` is the first conv (one input channel, ``kernel``, ``stride``) as a
    matmul over patches, ``conv`` the second (``torch.nn.Conv2d``, square). Tap
    ``(i, j)`` of ``conv`` reads the first conv's output on a grid of stride
    ``stride * conv.stride``, which is ``conv_in`` of the input's patches on that
    grid: so no copy of the first conv's output, the largest activation, is
    sliced into an im2col matrix (the float ONNX form; ``docs/bench/README.md``).
    """
    k2, s2 = conv.kernel_size[0], conv.stride[0]
    window = stride * (k2 - 1) + kernel  # input rows/columns of one output
    cols = patches(x.unsqueeze(-1), window, stride * s2)  # (B, T2, F2, window**2)
    b, t, f = cols.shape[:3]
    cols = cols.reshape(-1, window, window)  # 2-D matmuls: bias and ReLU fuse
    out = None
    for i in range(k2):
        for j in range(k2):
            rows = cols[:, stride * i : stride * i + kernel]
            tap = rows[:, :, stride * j : stride * j + kernel].reshape(-1, kernel**2)
            h = torch.relu(conv_in(tap))  # (B * T2 * F2, C): first conv, tap's grid
            bias = conv.bias if out is None else None
            y = torch.nn.functional.linear(h, conv.weight[:, :, i, j], bias)
            out = y if out is None else out + y
    return out.view(b, t, f, -1)


_IM2COL = False  # ONNX form of the subsampling: see ``im2col_export``


@contextlib.contextmanager
def im2col_export() -> Iterator[None]:
    """ONNX export in the form that int8 quantizes best: every convolution as
    im2col slices and one matmul (``conv2d_as_matmul``), whose input
    ``quantize.quantize_before_slicing`` quantizes once. The float form
    (``two_convs_by_taps``) measured faster in float and slower in int8."""
    global _IM2COL
    saved, _IM2COL = _IM2COL, True
    try:
        yield
    finally:
        _IM2COL = saved


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``(B,)`` lengths -> ``(B, size)`` bool mask, True on valid frames."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class InputLayer(Fusable):
    """Frames, then positions: ``forward`` returns ``(B, T', D)`` frames, the
    relative position table (or ``None``) and the ``(B, T')`` valid-frame mask.

    Subclasses implement ``frames``; ``specs`` lists the ``(kernel, stride)`` of
    their convolutions over time (none: one output frame per input frame).

    Args:
        pos_enc: a module of ``positions.POSITIONAL``.
    """

    specs: Sequence[Tuple[int, int]] = ()
    takes_tokens = False  # input is (B, T) token ids, not (B, T, F) features

    def __init__(self, input_layer: Optional[str], pos_enc: torch.nn.Module) -> None:
        super().__init__()
        self.input_layer = input_layer
        self.pos_enc = pos_enc

    def frames(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, F), (B,) -> (B, T', D)`` frames and ``(B, T')`` valid mask."""
        raise NotImplementedError

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

    def rate(self) -> int:
        """Subsampling factor: input frames per output frame."""
        rate = 1
        for _, stride in self.specs:
            rate *= stride
        return rate

    def positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """ESPnet's relative position table ``(1, 2 length - 1, D)``."""
        return self.pos_enc.positions(length, like)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, offset: int = 0
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Frames and positions.

        Args:
            x: ``(B, T, F)`` features (``(B, T)`` token ids for ``embed``).
            lengths: ``(B,)`` valid frames per utterance.
            offset: output frames before ``x`` (streaming; absolute positions).

        Returns:
            ``(B, T', D)`` frames, ``(1, 2T'-1, D)`` relative position table or
            ``None``, ``(B, T')`` bool mask of valid frames.
        """
        x, valid = self.frames(x, lengths)
        x, pos_emb = self.pos_enc(x, valid.unsqueeze(-1), offset)
        return x, pos_emb, valid

    def fuse_(self) -> None:
        """Nothing beyond the ``LayerBN`` children, which ``fuse()`` folds."""


class Conv2dSubsampling(InputLayer):
    """``(B, T, F)`` features -> ``(B, T', D)`` frames by 2-D convolutions.

    Args:
        input_size: feature size ``F``.
        output_size: model size ``D`` (also the number of conv channels).
        input_layer: ``"conv2d"`` (T/4), ``"conv2d1"`` (T - 4), ``"conv2d2"`` (T/2),
            ``"conv2d6"`` (T/6) or ``"conv2d8"`` (T/8).
        pos_enc: the positional encoding (see :class:`InputLayer`).
        batch_norm: BatchNorm after each conv and after the output projection.
        sync: cross-rank statistics of the BatchNorms.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_layer: str,
        pos_enc: torch.nn.Module,
        batch_norm: bool = True,
        sync: Optional[bool] = None,
    ) -> None:
        super().__init__(input_layer, pos_enc)
        self.specs = SUBSAMPLING[input_layer]
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

    def frames(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, F), (B,) -> (B, T', D)`` frames and ``(B, T')`` valid mask."""
        if self.conv_in is not None:
            return self._forward_fused(x, lengths)
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for conv, (kernel, stride) in zip(self.convs, self.specs):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            mask = valid_mask(lengths, (x.size(2) - kernel) // stride + 1)
            x = conv(x, mask[:, None, :, None])  # (B, D, T', F'), ReLU'd
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # (B, T', D * F')
        return self.out(x, mask.unsqueeze(-1)), mask

    def _forward_fused(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fused form of ``forward``: channels-last convolutions, no transposes."""
        kernel, stride = self.specs[0]
        b = x.size(0)
        lengths = self.output_lengths(lengths)
        if torch.onnx.is_in_onnx_export():  # MatMuls, channels-last throughout
            convs = list(self.convs)  # (no NCHW reorder of the largest activation)
            if _IM2COL:
                h = torch.relu(self.conv_in(patches(x.unsqueeze(-1), kernel, stride)))
            else:
                conv = convs.pop(0)
                h = two_convs_by_taps(x, self.conv_in, kernel, stride, conv.layer)
                h = h.relu() if conv.relu else h
            for conv in convs:  # (B, T', F', C)
                h = conv2d_as_matmul(conv.layer, h)
                h = h.relu() if conv.relu else h
        else:
            if exporting():  # TorchScript: no dynamic unfold; a Conv2d traces
                weight = self.conv_in.weight.view(-1, 1, kernel, kernel)
                h = torch.nn.functional.conv2d(
                    x.unsqueeze(1), weight, self.conv_in.bias, stride
                ).relu()  # (B, C, T1, F1)
            else:
                cols = x.unfold(1, kernel, stride).unfold(2, kernel, stride)
                t, f = cols.shape[1:3]  # (B, T1, F1, k, k)
                h = torch.relu_(self.conv_in(cols.reshape(b, t, f, kernel * kernel)))
                h = h.permute(0, 3, 1, 2)  # (B, C, T1, F1) view of channels-last
            for conv in self.convs:
                h = conv(h, None)
            h = h.permute(0, 2, 3, 1)  # (B, T', F', C)
        x = self.out(h.reshape(b, h.size(1), -1), None)  # times the input scale
        return x, valid_mask(lengths, x.size(1))

    def fuse_(self) -> None:
        """Fused form: the first conv as a matmul over patches, the others
        channels-last, the output projection reading ``(F', C)`` order and
        including the input scale of the positional encoding (``sqrt(D)``)."""
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
            scale = getattr(self.pos_enc, "xscale", 1.0)
            out.weight.mul_(scale)
            out.bias.mul_(scale)
        if scale != 1.0:
            self.pos_enc.xscale = 1.0
        self.conv_in = conv_in.to(first.weight.dtype).train(self.training)
        self.convs = torch.nn.ModuleList(
            [c.to(memory_format=torch.channels_last) for c in self.convs[1:]]
        ).train(self.training)


class LinearInput(InputLayer):
    """``linear``: ``Linear(F, D) -> [BN] -> [norm] -> dropout`` per frame (ESPnet:
    ``Linear -> LayerNorm -> Dropout``; here the BatchNorm of FusionFormer or the
    norm of the ablation, see ``make_norm``)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        pos_enc: torch.nn.Module,
        batch_norm: bool,
        norm: Optional[str],
        dropout_rate: float,
        sync: Optional[bool] = None,
    ) -> None:
        super().__init__("linear", pos_enc)
        self.out = linear_bn(input_size, output_size, batch_norm, sync)
        self.norm = make_norm(norm, output_size, sync)
        self.dropout = torch.nn.Dropout(dropout_rate)

    def frames(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        valid = valid_mask(lengths, x.size(1))
        mask = valid.unsqueeze(-1)
        x = self.out(x, mask)
        if self.norm is not None:
            x = self.norm(x, mask)
        return dropout(self.dropout, x), valid


class EmbedInput(InputLayer):
    """``embed``: ``Embedding(F, D, padding_idx)`` of ``(B, T)`` token ids (ids on
    padded frames may be anything: they are read as 0)."""

    takes_tokens = True

    def __init__(
        self,
        input_size: int,
        output_size: int,
        pos_enc: torch.nn.Module,
        padding_idx: Optional[int] = -1,
    ) -> None:
        super().__init__("embed", pos_enc)
        self.embedding = torch.nn.Embedding(
            input_size, output_size, padding_idx=padding_idx
        )

    def frames(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        valid = valid_mask(lengths, x.size(1))
        return self.embedding(x.masked_fill(~valid, 0)), valid


class NoInput(InputLayer):
    """``input_layer: null``: the features are the frames (``F == D``)."""

    def __init__(self, input_size: int, output_size: int, pos_enc: torch.nn.Module):
        if input_size != output_size:
            raise ValueError(
                f"input_layer None needs input_size ({input_size}) == output_size "
                f"({output_size}): the features enter the blocks as they are"
            )
        super().__init__(None, pos_enc)

    def frames(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return x, valid_mask(lengths, x.size(1))


def make_input_layer(
    input_layer: Optional[str],
    input_size: int,
    output_size: int,
    pos_enc: torch.nn.Module,
    batch_norm: bool,
    norm: Optional[str],
    dropout_rate: float,
    sync: Optional[bool] = None,
    padding_idx: Optional[int] = -1,
) -> InputLayer:
    """The ``input_layer`` module (see the module docstring)."""
    builders: Dict[Optional[str], object] = {
        **{
            name: lambda: Conv2dSubsampling(
                input_size, output_size, input_layer, pos_enc, batch_norm, sync
            )
            for name in SUBSAMPLING
        },
        "linear": lambda: LinearInput(
            input_size, output_size, pos_enc, batch_norm, norm, dropout_rate, sync
        ),
        "embed": lambda: EmbedInput(input_size, output_size, pos_enc, padding_idx),
        None: lambda: NoInput(input_size, output_size, pos_enc),
    }
    if input_layer not in builders:
        raise ValueError(
            f"unknown input_layer {input_layer!r}: choose from {list(builders)}"
        )
    return builders[input_layer]()
