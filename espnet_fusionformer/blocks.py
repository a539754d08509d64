"""FusionFormer blocks: feed-forward, self-attention, convolution module, block.

All modules take ``(B, T, D)`` features and an optional bool ``mask`` of shape
``(B, T, 1)`` (True on valid frames; ``None`` when no frame is padded, which the
fused form uses to skip masking). ``batch_norm=True`` appends a BatchNorm to every
linear and convolution layer (FusionFormer); ``False`` gives the Conformer's layers.

Each module's ``fuse_()`` turns it into its fused form once its
``LayerBN`` children are fused (``espnet_fusionformer.fuse`` walks children
first): constant scales go into the weights, q/k/v become one matmul and the
positional projection is cached.
"""

import math
from typing import Optional, Tuple

import torch

from espnet_fusionformer.fusable import Fusable, LayerBN, linear_bn
from espnet_fusionformer.norm import make_norm

# activation -> module, as ESPnet's ``get_activation`` (``activation_type``). In place:
# an activation always follows a layer whose output is fresh.
ACTIVATIONS = {
    "relu": lambda: torch.nn.ReLU(inplace=True),
    "swish": lambda: torch.nn.SiLU(inplace=True),
    "tanh": torch.nn.Tanh,
    "hardtanh": lambda: torch.nn.Hardtanh(inplace=True),
    "selu": lambda: torch.nn.SELU(inplace=True),
}


def make_activation(name: str) -> Optional[torch.nn.Module]:
    """The activation that follows a ``LayerBN``: ``None`` for ReLU, which the
    ``LayerBN`` applies itself (fused with its BatchNorm)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}: choose from {list(ACTIVATIONS)}"
        )
    return None if name == "relu" else ACTIVATIONS[name]()


def activate(activation: Optional[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if activation is None else activation(x)


def dropout(module: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, without the module call where it is the identity (eval)."""
    return module(x) if module.training and module.p > 0 else x


def exporting() -> bool:
    """Tracing for TorchScript/ONNX: no value-dependent shortcuts or caches."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _scale_(layer: torch.nn.Module, scale: float) -> None:
    """Multiply the output of a Linear/Conv/LayerNorm by ``scale`` (its weight and
    bias)."""
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)


class TimeConv(torch.nn.Module):
    """A convolution over time on ``(B, T, C)`` frames + [BN] (+ ReLU), same length.

    Padded frames are zeroed first, so that a bias (or a folded BatchNorm) written
    into them never reaches valid frames. The kernel sees ``K // 2`` past and
    ``(K - 1) // 2`` future frames (ESPnet's ``padding=K // 2``, for an even kernel
    without the last output frame).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        batch_norm: bool,
        sync: Optional[bool] = None,
        relu: bool = False,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{in_channels} -> {out_channels} channels do not split into "
                f"{groups} groups"
            )
        self.pad = (kernel_size // 2, (kernel_size - 1) // 2)
        conv = torch.nn.Conv1d(
            in_channels, out_channels, kernel_size, groups=groups, bias=not batch_norm
        )
        self.conv = LayerBN(conv, batch_norm, sync, relu)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, T, Cin), (B, T, 1) -> (B, T, Cout)``."""
        if mask is not None:
            x = x.masked_fill(~mask, 0.0)
            mask = mask.transpose(1, 2)  # (B, 1, T)
        x = torch.nn.functional.pad(x.transpose(1, 2), self.pad)  # (B, Cin, T+K-1)
        return self.conv(x, mask).transpose(1, 2)


# positionwise_layer_type -> (w_1 convolves over time, w_2 convolves over time), as
# ESPnet's PositionwiseFeedForward, MultiLayeredConv1d and Conv1dLinear
POSITIONWISE = {
    "linear": (False, False),
    "conv1d": (True, True),
    "conv1d-linear": (True, False),
}


class FeedForward(torch.nn.Module):
    """``w_1 (D -> U) -> [BN] -> act -> dropout -> w_2 (U -> D) -> [BN]``.

    ``w_1``/``w_2`` are Linear layers (``positionwise_layer_type: linear``) or
    convolutions over time with ``kernel_size`` (``conv1d``, ``conv1d-linear``;
    see :class:`TimeConv`).
    """

    def __init__(
        self,
        size: int,
        units: int,
        dropout_rate: float,
        activation: str,
        batch_norm: bool,
        sync: Optional[bool] = None,
        kind: str = "linear",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if kind not in POSITIONWISE:
            raise ValueError(
                f"unknown positionwise_layer_type {kind!r}: "
                f"choose from {list(POSITIONWISE)}"
            )
        relu = activation == "relu"
        conv_1, conv_2 = POSITIONWISE[kind]
        self.rows = not (conv_1 or conv_2)
        self.w_1 = (
            TimeConv(size, units, kernel_size, batch_norm, sync, relu)
            if conv_1
            else linear_bn(size, units, batch_norm, sync, relu)
        )
        self.activation = make_activation(activation)
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.w_2 = (
            TimeConv(units, size, kernel_size, batch_norm, sync)
            if conv_2
            else linear_bn(units, size, batch_norm, sync)
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``. Linear layers run on ``(B*T, D)`` rows:
        exported to ONNX as Gemm + bias + ReLU, which ONNX Runtime fuses."""
        if not self.rows:
            h = activate(self.activation, self.w_1(x, mask))
            return self.w_2(dropout(self.dropout, h), mask)
        rows = x.reshape(-1, x.size(-1))  # (B*T, D)
        row_mask = None if mask is None else mask.reshape(-1, 1)
        h = dropout(self.dropout, activate(self.activation, self.w_1(rows, row_mask)))
        return self.w_2(h, row_mask).view(x.shape)


# selfattention_layer_type -> relative position scheme of the attention
ATTENTIONS = {
    "selfattn": None,
    "rel_selfattn": "latest",
    "legacy_rel_selfattn": "legacy",
}


def right_of_query(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """``(Tq, Tk)`` bool: True where key ``j`` lies after query ``i`` (frame
    ``Tk - Tq + i``)."""
    keys = torch.arange(t_k, device=device)
    return keys[None, :] > torch.arange(t_q, device=device)[:, None] + (t_k - t_q)


class SelfAttention(Fusable):
    """Multi-head self-attention, as ESPnet's ``MultiHeadedAttention`` (``relative=
    None``, ``selfattention_layer_type: selfattn``) or with Transformer-XL relative
    positions (``"latest"``: ``RelPositionMultiHeadedAttention``; ``"legacy"``:
    ``LegacyRelPositionMultiHeadedAttention``).

    The legacy scheme has a positional term only for keys at or before the query
    (as ``zero_triu`` makes it for the latest one). ``qk_norm`` applies a LayerNorm
    to each head's queries and keys (ESPnet: ``selfattn`` only); it stays in the
    fused form.

    The query/key/value/output projections carry a BatchNorm when ``batch_norm``;
    the positional projection ``linear_pos`` acts on the sinusoidal table, not on
    data, and has none. The fused form folds the BatchNorms and ``1/sqrt(d_k)``
    into the weights, merges query/key/value into one ``(D, 3D)`` matmul and caches
    the projected position table (it depends only on the length).
    """

    def __init__(
        self,
        size: int,
        heads: int,
        dropout_rate: float,
        batch_norm: bool,
        sync: Optional[bool] = None,
        relative: Optional[str] = "latest",
        zero_triu: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if size % heads != 0:
            raise ValueError(f"output_size {size} is not divisible by heads {heads}")
        if relative not in ATTENTIONS.values():
            raise ValueError(f"unknown relative position scheme {relative!r}")
        self.heads = heads
        self.d_k = size // heads
        self.score_scale = 1.0 / math.sqrt(self.d_k)
        self.linear_q = linear_bn(size, size, batch_norm, sync)
        self.linear_k = linear_bn(size, size, batch_norm, sync)
        self.linear_v = linear_bn(size, size, batch_norm, sync)
        self.linear_qkv: Optional[torch.nn.Linear] = None
        self.linear_out = linear_bn(size, size, batch_norm, sync)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = torch.nn.LayerNorm(self.d_k, eps=1e-12)
            self.k_norm = torch.nn.LayerNorm(self.d_k, eps=1e-12)
        self.linear_pos: Optional[torch.nn.Linear] = None
        if relative is not None:
            self.linear_pos = torch.nn.Linear(size, size, bias=False)
            self.pos_bias_u = torch.nn.Parameter(torch.empty(heads, self.d_k))
            self.pos_bias_v = torch.nn.Parameter(torch.empty(heads, self.d_k))
            torch.nn.init.xavier_uniform_(self.pos_bias_u)
            torch.nn.init.xavier_uniform_(self.pos_bias_v)
        self.zero_triu = relative is not None and (zero_triu or relative == "legacy")
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.pos_cache: Optional[torch.Tensor] = None  # fused: (1, H, 2L-1, d_k)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, H, T, d_k)``."""
        return x.view(x.size(0), -1, self.heads, self.d_k).transpose(1, 2)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """``(B, H, Tq, 2Tk-1) -> (B, H, Tq, Tk)``: ``out[i, j] = x[i, Tq-1-i+j]``.

        Query ``i`` is frame ``Tk - Tq + i`` (the first ``Tk - Tq`` keys are cached
        frames); the table holds relative positions ``Tk-1 .. -(Tk-1)``.
        """
        b, h, t_q, p = x.shape
        t_k = (p + 1) // 2
        if t_q == t_k and (exporting() or not x.is_contiguous()):
            x = torch.nn.functional.pad(x, (1, 0)).view(b, h, p + 1, t_q)
            return x[:, :, 1:].view(b, h, t_q, p)[:, :, :, : p // 2 + 1]
        x = x.contiguous()
        # the same entries as a strided view: row i starts at i * (p - 1) + Tq - 1
        return x.as_strided(
            (b, h, t_q, t_k),
            (x.stride(0), x.stride(1), p - 1, 1),
            x.storage_offset() + t_q - 1,
        )

    def _positions(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """``pos_emb (1, 2T-1, D)`` -> projected table ``(1, H, 2T-1, d_k)``."""
        if self.pos_cache is None or self.training or exporting():
            return self._heads(self.linear_pos(pos_emb))
        cache, n = self.pos_cache, pos_emb.size(1)
        if cache.size(2) < n or cache.dtype != pos_emb.dtype:
            cache = self._heads(self.linear_pos(pos_emb))
            self.pos_cache = cache
        start = (cache.size(2) - n) // 2  # tables are centred on relative position 0
        return cache[:, :, start : start + n]

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        att_mask: Optional[torch.Tensor],
        pos_emb: Optional[torch.Tensor],
        cache: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend over the allowed frames.

        Args:
            x: ``(B, Tq, D)``.
            mask: ``(B, Tq, 1)`` bool, True on valid frames (BatchNorm statistics).
            att_mask: ``(B, 1, 1|Tq, Tk)`` bool, True where a query must not attend
                (padding, future chunks); ``None``: attend everywhere.
            pos_emb: ``(1, 2Tk-1, D)`` relative position table (``None`` without
                relative positions).
            cache: streaming: ``(1, H, Tc, 2 d_k)`` keys and values of earlier
                frames (``Tk = Tc + Tq``); ``None`` outside streaming.

        Returns:
            ``(B, Tq, D)``, and the new cache ``(1, H, Tk, 2 d_k)`` when ``cache``
            was given.
        """
        if self.linear_qkv is not None:
            q, k, v = self.linear_qkv(x).chunk(3, dim=-1)
        else:
            q = self.linear_q(x, mask)
            k = self.linear_k(x, mask)
            v = self.linear_v(x, mask)
        q = q.view(q.size(0), -1, self.heads, self.d_k)  # (B, Tq, H, d_k)
        k, v = self._heads(k), self._heads(v)  # (B, H, Tq, d_k)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        new_cache: Optional[torch.Tensor] = None
        if cache is not None:
            if cache.size(2) > 0:
                k_cache, v_cache = cache.split(self.d_k, dim=-1)
                k = torch.cat([k_cache, k], dim=2)  # (1, H, Tk, d_k)
                v = torch.cat([v_cache, v], dim=2)
            new_cache = torch.cat([k, v], dim=-1)
        if self.linear_pos is None:
            scores = torch.matmul(q.transpose(1, 2), k.transpose(-2, -1))
        else:
            p = self._positions(pos_emb)  # (1, H, 2Tk-1, d_k)
            q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, Tq, d_k)
            q_v = (q + self.pos_bias_v).transpose(1, 2)
            scores = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, Tq, Tk)
            by_position = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))
            if self.zero_triu:
                right = right_of_query(q.size(1), k.size(2), x.device)
                by_position = by_position.masked_fill(right, 0.0)
            scores = scores + by_position
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        if att_mask is not None:
            scores = scores.masked_fill(att_mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1)
        if att_mask is not None:
            attn = attn.masked_fill(att_mask, 0.0)
        ctx = torch.matmul(dropout(self.dropout, attn), v)  # (B, H, Tq, d_k)
        ctx = ctx.transpose(1, 2).reshape(x.size(0), -1, self.heads * self.d_k)
        return self.linear_out(ctx, mask), new_cache

    def fuse_(self) -> None:
        """Fused form: merged q/k/v, scale in the weights, cached positions."""
        if self.linear_qkv is not None:
            return
        for proj in (self.linear_q, self.linear_k, self.linear_v, self.linear_out):
            proj.fuse_()
        # the scale goes where the queries are last linear in: the projection or
        # the affine part of their LayerNorm
        _scale_(
            self.linear_q.layer if self.q_norm is None else self.q_norm,
            self.score_scale,
        )
        if self.linear_pos is not None:
            with torch.no_grad():
                self.pos_bias_u.mul_(self.score_scale)
                self.pos_bias_v.mul_(self.score_scale)
            self.pos_cache = torch.empty(1, self.heads, 0, self.d_k)
        self.score_scale = 1.0
        layers = [p.layer for p in (self.linear_q, self.linear_k, self.linear_v)]
        weight = torch.cat([lin.weight for lin in layers], dim=0)
        bias = torch.cat([lin.bias for lin in layers], dim=0)
        qkv = torch.nn.Linear(weight.size(1), weight.size(0), device=weight.device)
        qkv.to(weight.dtype).train(self.training)
        with torch.no_grad():
            qkv.weight.copy_(weight)
            qkv.bias.copy_(bias)
        self.linear_qkv = qkv
        self.linear_q = self.linear_k = self.linear_v = None


class ConvModule(torch.nn.Module):
    """Conformer convolution module without GLU (FusionFormer) or with it (reference).

    ``pointwise_conv1 (D -> D, or D -> 2D + GLU) -> [BN] -> act -> mask ->
    depthwise_conv -> BN -> act -> pointwise_conv2 -> [BN]``. Pointwise convolutions
    are ``Linear`` on ``(B, T, D)``. Padded frames are zeroed right before the
    depthwise convolution, so that a bias (or a folded BatchNorm) written into them
    never reaches valid frames. The depthwise convolution is a ``(K, 1)`` Conv2d on
    the channels-last view ``(B, D, T, 1)`` of ``(B, T, D)``: no transposed copies,
    and oneDNN's fast channels-last kernels. ``causal`` makes it look only at the
    current and ``K - 1`` past frames (streaming), which a cache carries over.
    """

    def __init__(
        self,
        size: int,
        kernel_size: int,
        activation: str,
        batch_norm: bool,
        glu: bool,
        sync: Optional[bool] = None,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.glu = glu
        self.lorder = kernel_size - 1 if causal else 0  # frames of left context
        relu = activation == "relu"
        self.pointwise_conv1 = linear_bn(
            size, 2 * size if glu else size, batch_norm, sync, relu and not glu
        )
        depthwise = torch.nn.Conv2d(
            size,
            size,
            (kernel_size, 1),
            padding=(0 if causal else kernel_size // 2, 0),
            groups=size,
        )
        depthwise.to(memory_format=torch.channels_last)
        self.depthwise_conv = LayerBN(depthwise, True, sync, relu)
        self.activation = make_activation(activation)
        self.pointwise_conv2 = linear_bn(size, size, batch_norm, sync)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(B, T, D) -> (B, T, D)``.

        ``cache`` (streaming, causal only): the last ``K - 1`` depthwise inputs
        ``(1, K-1, D)``; the new one is returned beside the output.
        """
        x = self.pointwise_conv1(x, mask)
        if self.glu:
            x = torch.nn.functional.glu(x, dim=-1)
        else:
            x = activate(self.activation, x)
        x_mask: Optional[torch.Tensor] = None
        if mask is not None:
            x = x.masked_fill(~mask, 0.0)
            x_mask = mask.transpose(1, 2).unsqueeze(-1)  # (B, 1, T, 1)
        new_cache: Optional[torch.Tensor] = None
        if cache is not None:
            x = torch.cat([cache, x], dim=1)  # (1, K-1+T, D)
            new_cache = x[:, x.size(1) - self.lorder :]
        elif self.lorder > 0:
            x = torch.nn.functional.pad(x, (0, 0, self.lorder, 0))
        x = self.depthwise_conv(x.transpose(1, 2).unsqueeze(-1), x_mask)  # (B,D,T,1)
        x = activate(self.activation, x.squeeze(-1).transpose(1, 2))  # (B, T, D)
        return self.pointwise_conv2(x, mask), new_cache


class FusionFormerBlock(Fusable):
    """Macaron FFN, self-attention, convolution module, FFN, each with a residual.

    ``pre_norm`` puts a norm before each module plus a final one after the
    convolution module, as the Conformer does (``"layer"``), BatchNorm in those
    places (``"batch"``), or none (``None``). ``concat_after`` (ESPnet's option)
    replaces the attention's residual branch by ``Linear(concat(input,
    attention)) -> [BN]``. ``stochastic_depth_rate``: in training, skip the block
    with this probability and scale its residual branches by ``1 / (1 - p)``
    otherwise. The fused form folds the macaron ``0.5`` into the FFN output weights.
    """

    def __init__(
        self,
        size: int,
        attention: SelfAttention,
        feed_forward: FeedForward,
        feed_forward_macaron: Optional[FeedForward],
        conv_module: Optional[ConvModule],
        dropout_rate: float,
        pre_norm: Optional[str],
        sync: Optional[bool] = None,
        concat_after: bool = False,
        batch_norm: bool = False,
        stochastic_depth_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.ff_scale = 0.5 if feed_forward_macaron is not None else 1.0
        self.norm_ff_macaron = (
            make_norm(pre_norm, size, sync)
            if feed_forward_macaron is not None
            else None
        )
        self.norm_mha = make_norm(pre_norm, size, sync)
        self.concat_linear = (
            linear_bn(2 * size, size, batch_norm, sync) if concat_after else None
        )
        self.norm_conv = self.norm_final = None
        if conv_module is not None:
            self.norm_conv = make_norm(pre_norm, size, sync)
            self.norm_final = make_norm(pre_norm, size, sync)
        self.norm_ff = make_norm(pre_norm, size, sync)
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.stochastic_depth_rate = stochastic_depth_rate

    def _ffn(
        self,
        ffn: FeedForward,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        y = dropout(self.dropout, ffn(x, mask))
        return y if scale == 1.0 else scale * y

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        att_mask: Optional[torch.Tensor],
        pos_emb: Optional[torch.Tensor],
        att_cache: Optional[torch.Tensor] = None,
        cnn_cache: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(B, T, D) -> (B, T, D)``; see ``SelfAttention`` for the masks.

        With caches (streaming, batch 1), also returns the new attention cache
        ``(1, H, Tk, 2 d_k)`` and convolution cache ``(1, K-1, D)``.
        """
        depth = 1.0  # stochastic depth: the scale of every residual branch
        if self.training and self.stochastic_depth_rate > 0:
            if torch.rand(1).item() < self.stochastic_depth_rate:
                return x, att_cache, cnn_cache
            depth = 1.0 / (1.0 - self.stochastic_depth_rate)
        if self.feed_forward_macaron is not None:
            h = x if self.norm_ff_macaron is None else self.norm_ff_macaron(x, mask)
            x = x + self._ffn(self.feed_forward_macaron, h, mask, depth * self.ff_scale)
        h = x if self.norm_mha is None else self.norm_mha(x, mask)
        a, att_cache = self.attention(h, mask, att_mask, pos_emb, att_cache)
        if self.concat_linear is not None:
            a = self.concat_linear(torch.cat([h, a], dim=-1), mask)
        else:
            a = dropout(self.dropout, a)
        x = x + (a if depth == 1.0 else depth * a)
        if self.conv_module is not None:
            h = x if self.norm_conv is None else self.norm_conv(x, mask)
            h, cnn_cache = self.conv_module(h, mask, cnn_cache)
            h = dropout(self.dropout, h)
            x = x + (h if depth == 1.0 else depth * h)
        h = x if self.norm_ff is None else self.norm_ff(x, mask)
        x = x + self._ffn(self.feed_forward, h, mask, depth * self.ff_scale)
        if self.norm_final is not None:
            x = self.norm_final(x, mask)
        return x, att_cache, cnn_cache

    def fuse_(self) -> None:
        """Fused form: the FFN scale goes into the FFN output projections."""
        if self.ff_scale == 1.0:
            return
        for ffn in (self.feed_forward, self.feed_forward_macaron):
            if ffn is not None:  # w_2 is fused already: a plain layer output
                out = ffn.w_2.conv if isinstance(ffn.w_2, TimeConv) else ffn.w_2
                out.fuse_()
                _scale_(out.layer, self.ff_scale)
        self.ff_scale = 1.0
