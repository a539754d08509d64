"""FusionFormer blocks: feed-forward, relative-position attention, convolution module.

All modules take ``(B, T, D)`` features and a bool ``mask`` of shape ``(B, T, 1)``
(True on valid frames). ``batch_norm=True`` appends a BatchNorm to every linear and
convolution layer (FusionFormer); ``False`` gives the plain Conformer layers.
"""

import math
from typing import Optional

import torch

from espnet_fusionformer.fusable import LayerBN, Reparameterizable, linear_bn
from espnet_fusionformer.norm import make_norm

ACTIVATIONS = {"relu": torch.nn.ReLU, "swish": torch.nn.SiLU}


def make_activation(name: str) -> torch.nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}: choose from {list(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


class FeedForward(torch.nn.Module):
    """``Linear(D, U) -> [BN] -> act -> dropout -> Linear(U, D) -> [BN]``."""

    def __init__(
        self,
        size: int,
        units: int,
        dropout_rate: float,
        activation: str,
        batch_norm: bool,
        sync: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.w_1 = linear_bn(size, units, batch_norm, sync)
        self.activation = make_activation(activation)
        self.dropout = torch.nn.Dropout(dropout_rate)
        self.w_2 = linear_bn(units, size, batch_norm, sync)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        x = self.dropout(self.activation(self.w_1(x, mask)))
        return self.w_2(x, mask)


class RelPositionAttention(Reparameterizable):
    """Multi-head self-attention with relative positions (Transformer-XL, as ESPnet's
    ``RelPositionMultiHeadedAttention`` with ``rel_pos_type: latest``).

    The query/key/value/output projections carry a BatchNorm when ``batch_norm``;
    the positional projection ``linear_pos`` acts on the sinusoidal table, not on
    data, and has none. The deploy form (``reparameterize``) folds the BatchNorms and
    merges query/key/value into one ``(D, 3D)`` matmul.
    """

    def __init__(
        self,
        size: int,
        heads: int,
        dropout_rate: float,
        batch_norm: bool,
        sync: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if size % heads != 0:
            raise ValueError(f"output_size {size} is not divisible by heads {heads}")
        self.heads = heads
        self.d_k = size // heads
        self.linear_q = linear_bn(size, size, batch_norm, sync)
        self.linear_k = linear_bn(size, size, batch_norm, sync)
        self.linear_v = linear_bn(size, size, batch_norm, sync)
        self.linear_qkv: Optional[torch.nn.Linear] = None
        self.linear_out = linear_bn(size, size, batch_norm, sync)
        self.linear_pos = torch.nn.Linear(size, size, bias=False)
        self.pos_bias_u = torch.nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = torch.nn.Parameter(torch.empty(heads, self.d_k))
        torch.nn.init.xavier_uniform_(self.pos_bias_u)
        torch.nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = torch.nn.Dropout(dropout_rate)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, H, T, d_k)``."""
        return x.view(x.size(0), -1, self.heads, self.d_k).transpose(1, 2)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, 2T-1) -> (B, H, T, T)``: score of query i for key j."""
        b, h, t, p = x.shape
        x = torch.nn.functional.pad(x, (1, 0)).view(b, h, p + 1, t)
        return x[:, :, 1:].view(b, h, t, p)[:, :, :, : p // 2 + 1]

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        key_pad: torch.Tensor,
        pos_emb: torch.Tensor,
    ) -> torch.Tensor:
        """Attend over the valid frames.

        Args:
            x: ``(B, T, D)``.
            mask: ``(B, T, 1)`` bool, True on valid frames (BatchNorm statistics).
            key_pad: ``(B, 1, 1, T)`` bool, True on padded keys.
            pos_emb: ``(1, 2T-1, D)`` relative position table.

        Returns:
            ``(B, T, D)``.
        """
        if self.linear_qkv is not None:
            q, k, v = self.linear_qkv(x).chunk(3, dim=-1)
        else:
            q = self.linear_q(x, mask)
            k = self.linear_k(x, mask)
            v = self.linear_v(x, mask)
        q = q.view(q.size(0), -1, self.heads, self.d_k)  # (B, T, H, d_k)
        k, v = self._heads(k), self._heads(v)  # (B, H, T, d_k)
        p = self._heads(self.linear_pos(pos_emb))  # (1, H, 2T-1, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scores = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        scores = scores + self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))
        scores = (scores / math.sqrt(self.d_k)).masked_fill(
            key_pad, torch.finfo(scores.dtype).min
        )
        attn = torch.softmax(scores, dim=-1).masked_fill(key_pad, 0.0)
        ctx = torch.matmul(self.dropout(attn), v)  # (B, H, T, d_k)
        ctx = ctx.transpose(1, 2).reshape(x.size(0), -1, self.heads * self.d_k)
        return self.linear_out(ctx, mask)

    def reparameterize(self) -> None:
        """Fold the BatchNorms and merge q/k/v into ``linear_qkv`` (idempotent)."""
        if self.linear_qkv is not None:
            return
        for proj in (self.linear_q, self.linear_k, self.linear_v, self.linear_out):
            proj.reparameterize()
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
    never reaches valid frames.
    """

    def __init__(
        self,
        size: int,
        kernel_size: int,
        activation: str,
        batch_norm: bool,
        glu: bool,
        sync: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.glu = glu
        self.pointwise_conv1 = linear_bn(
            size, 2 * size if glu else size, batch_norm, sync
        )
        depthwise = torch.nn.Conv1d(
            size, size, kernel_size, padding=kernel_size // 2, groups=size
        )
        self.depthwise_conv = LayerBN(depthwise, batch_norm=True, sync=sync)
        self.activation = make_activation(activation)
        self.pointwise_conv2 = linear_bn(size, size, batch_norm, sync)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        x = self.pointwise_conv1(x, mask)
        if self.glu:
            x = torch.nn.functional.glu(x, dim=-1)
        else:
            x = self.activation(x)
        x = x.masked_fill(~mask, 0.0).transpose(1, 2)  # (B, D, T)
        x = self.depthwise_conv(x, mask.transpose(1, 2))
        x = self.activation(x).transpose(1, 2)  # (B, T, D)
        return self.pointwise_conv2(x, mask)


class FusionFormerBlock(torch.nn.Module):
    """Macaron FFN, self-attention, convolution module, FFN, each with a residual.

    ``pre_norm`` puts a norm before each module plus a final one, as the Conformer
    does (``"layer"``), BatchNorm in those places (``"batch"``), or none (``None``).
    """

    def __init__(
        self,
        size: int,
        attention: RelPositionAttention,
        feed_forward: FeedForward,
        feed_forward_macaron: Optional[FeedForward],
        conv_module: Optional[ConvModule],
        dropout_rate: float,
        pre_norm: Optional[str],
        sync: Optional[bool] = None,
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
        self.norm_conv = (
            make_norm(pre_norm, size, sync) if conv_module is not None else None
        )
        self.norm_ff = make_norm(pre_norm, size, sync)
        self.norm_final = make_norm(pre_norm, size, sync)
        self.dropout = torch.nn.Dropout(dropout_rate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        key_pad: torch.Tensor,
        pos_emb: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``; see ``RelPositionAttention`` for the masks."""
        if self.feed_forward_macaron is not None:
            h = x if self.norm_ff_macaron is None else self.norm_ff_macaron(x, mask)
            x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(h, mask))
        h = x if self.norm_mha is None else self.norm_mha(x, mask)
        x = x + self.dropout(self.attention(h, mask, key_pad, pos_emb))
        if self.conv_module is not None:
            h = x if self.norm_conv is None else self.norm_conv(x, mask)
            x = x + self.dropout(self.conv_module(h, mask))
        h = x if self.norm_ff is None else self.norm_ff(x, mask)
        x = x + self.ff_scale * self.dropout(self.feed_forward(h, mask))
        if self.norm_final is not None:
            x = self.norm_final(x, mask)
        return x
