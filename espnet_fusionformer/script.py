"""``ScriptableChunkEncoder``: the fused encoder's ``forward_chunk`` for TorchScript.

WeNet's runtime convention (``wenet/transformer/encoder.py``): a module whose
``forward_chunk(xs, offset, required_cache_size, att_cache, cnn_cache) -> (ys,
att_cache, cnn_cache)`` compiles with ``torch.jit.script``, with explicit caches, so
that ``torch.jit.save``/``torch.jit.load`` (or LibTorch) runs the streaming loop
without Python. The training module (``FusionFormerEncoder``) keeps its Python
features (optional modules, config dicts, the fused-copy cache, input checks); this
is its deploy form, built from the *fused* encoder (timm's ``reparameterize``
idea): it shares the fused layers (``LayerBN`` with its BatchNorm folded, merged
q/k/v) and re-states only the chunk path in TorchScript-clean code, so it computes
what the eager ``forward_chunk`` computes, operation for operation.

Usage::

    module = torch.jit.script(ScriptableChunkEncoder(encoder.eval()))
    att_cache = cnn_cache = torch.zeros(0, 0, 0, 0)
    offset = 0
    for xs in windows:  # (1, (C-1) * rate + context, F), stride C * rate
        ys, att_cache, cnn_cache = module.forward_chunk(
            xs, offset, required_cache_size, att_cache, cnn_cache
        )
        offset += ys.size(1)

The positional tables are copied at their current length (``max_pos_emb_len``,
5000 output frames by default); a chunk that needs positions beyond them raises.
"""

import copy
from typing import Dict, List, Optional, Tuple

import torch

from espnet_fusionformer.norm import MaskedBatchNorm


def _not_fused(what: str) -> ValueError:
    return ValueError(f"{what} is not in fused form: build from fuse(encoder)")


class _Norm(torch.nn.Module):
    """A pre-norm in eval form: ``MaskedLayerNorm`` or ``MaskedBatchNorm``
    (running statistics, as ``MaskedBatchNorm.forward`` computes them in eval)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.layer = isinstance(norm, torch.nn.LayerNorm)
        self.eps = float(norm.eps)
        self.shape: List[int] = [int(norm.weight.numel())]
        if self.layer:
            self.weight = norm.weight
            self.bias = norm.bias
        elif isinstance(norm, MaskedBatchNorm):
            with torch.no_grad():
                scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
                shift = norm.bias - norm.running_mean * scale
            self.register_buffer("weight", scale.detach().clone())
            self.register_buffer("bias", shift.detach().clone())
        else:
            raise ValueError(f"cannot script the norm {type(norm).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer:
            return torch.nn.functional.layer_norm(
                x, self.shape, self.weight, self.bias, self.eps
            )
        return torch.addcmul(self.bias.view(1, 1, -1), x, self.weight.view(1, 1, -1))


def _norm(norm: Optional[torch.nn.Module]) -> Optional[_Norm]:
    return None if norm is None else _Norm(norm)


class _FeedForward(torch.nn.Module):
    """``FeedForward`` (``positionwise_layer_type: linear``) in eval form."""

    def __init__(self, ffn: torch.nn.Module) -> None:
        super().__init__()
        if not ffn.rows:
            raise ValueError("a convolutional feed-forward module cannot stream")
        self.w_1 = ffn.w_1
        self.activation = ffn.activation
        self.w_2 = ffn.w_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (T, D)
        h = self.w_1(rows, None)
        if self.activation is not None:
            h = self.activation(h)
        return self.w_2(h, None).view(x.shape)


class _Attention(torch.nn.Module):
    """Fused ``SelfAttention`` with a key/value cache (batch 1)."""

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        if attention.linear_qkv is None:
            raise _not_fused("the self-attention")
        self.heads = int(attention.heads)
        self.d_k = int(attention.d_k)
        self.score_scale = float(attention.score_scale)
        self.zero_triu = bool(attention.zero_triu)
        self.linear_qkv = attention.linear_qkv
        self.linear_out = attention.linear_out
        self.q_norm = attention.q_norm
        self.k_norm = attention.k_norm
        self.linear_pos = attention.linear_pos
        self.sliced_shift = False  # ONNX: rel_shift by reshapes (no as_strided)
        if attention.linear_pos is not None:
            self.pos_bias_u = attention.pos_bias_u
            self.pos_bias_v = attention.pos_bias_v
        else:
            self.register_buffer("pos_bias_u", torch.zeros(0))
            self.register_buffer("pos_bias_v", torch.zeros(0))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1, self.heads, self.d_k).transpose(1, 2)

    @staticmethod
    def _rel_shift(x: torch.Tensor) -> torch.Tensor:
        """``SelfAttention.rel_shift``: ``(1, H, Tq, 2Tk-1) -> (1, H, Tq, Tk)``."""
        b, h, t_q, p = x.size(0), x.size(1), x.size(2), x.size(3)
        t_k = (p + 1) // 2
        x = x.contiguous()
        return x.as_strided(
            (b, h, t_q, t_k),
            (x.stride(0), x.stride(1), p - 1, 1),
            x.storage_offset() + t_q - 1,
        )

    @staticmethod
    def _sliced_rel_shift(x: torch.Tensor) -> torch.Tensor:
        """``_rel_shift`` by a slice of the flattened scores (exports to ONNX):
        row ``i`` starts at flat index ``i * (P - 1) + Tq - 1``."""
        b, h, t_q, p = x.size(0), x.size(1), x.size(2), x.size(3)
        t_k = (p + 1) // 2
        if t_k == 1:
            return x
        flat = x.reshape(b, h, t_q * p)[:, :, t_q - 1 : t_q - 1 + t_q * (p - 1)]
        return flat.reshape(b, h, t_q, p - 1)[:, :, :, :t_k]

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        cache: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(1, Tq, D)``, ``(1, 2Tk-1, D)`` table, ``(1, H, Tc, 2 d_k)`` cache ->
        ``(1, Tq, D)``, ``(1, H, Tk, 2 d_k)``. ``key_mask``: ``(1, 1, 1, Tk)`` bool,
        False for keys no query may see (empty slots of a fixed-size cache)."""
        q, k, v = self.linear_qkv(x).chunk(3, dim=-1)
        q = q.view(q.size(0), -1, self.heads, self.d_k)  # (1, Tq, H, d_k)
        k, v = self._heads(k), self._heads(v)  # (1, H, Tq, d_k)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if cache.size(2) > 0:
            k_cache, v_cache = cache.split(self.d_k, dim=-1)
            k = torch.cat([k_cache, k], dim=2)  # (1, H, Tk, d_k)
            v = torch.cat([v_cache, v], dim=2)
        new_cache = torch.cat([k, v], dim=-1)
        linear_pos = self.linear_pos
        if linear_pos is None:
            scores = torch.matmul(q.transpose(1, 2), k.transpose(-2, -1))
        else:
            p = self._heads(linear_pos(pos_emb))  # (1, H, 2Tk-1, d_k)
            q_u = (q + self.pos_bias_u).transpose(1, 2)  # (1, H, Tq, d_k)
            q_v = (q + self.pos_bias_v).transpose(1, 2)
            scores = torch.matmul(q_u, k.transpose(-2, -1))  # (1, H, Tq, Tk)
            by_position = torch.matmul(q_v, p.transpose(-2, -1))
            if self.sliced_shift:
                by_position = self._sliced_rel_shift(by_position)
            else:
                by_position = self._rel_shift(by_position)
            if self.zero_triu:
                t_q, t_k = q.size(1), k.size(2)
                keys = torch.arange(t_k, device=x.device)
                queries = torch.arange(t_q, device=x.device)
                right = keys[None, :] > queries[:, None] + (t_k - t_q)
                by_position = by_position.masked_fill(right, 0.0)
            scores = scores + by_position
        if self.score_scale != 1.0:
            scores = scores * self.score_scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, -1e30)
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v)  # (1, H, Tq, d_k)
        ctx = ctx.transpose(1, 2).reshape(x.size(0), -1, self.heads * self.d_k)
        return self.linear_out(ctx, None), new_cache


class _ConvModule(torch.nn.Module):
    """Causal ``ConvModule`` with its ``(1, K-1, D)`` cache."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        if conv.lorder <= 0:
            raise ValueError("the convolution module is not causal: it cannot stream")
        self.lorder = int(conv.lorder)
        self.glu = bool(conv.glu)
        self.pointwise_conv1 = conv.pointwise_conv1
        self.depthwise_conv = conv.depthwise_conv
        self.activation = conv.activation
        self.pointwise_conv2 = conv.pointwise_conv2

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.pointwise_conv1(x, None)
        if self.glu:
            x = torch.nn.functional.glu(x, dim=-1)
        elif self.activation is not None:
            x = self.activation(x)
        x = torch.cat([cache, x], dim=1)  # (1, K-1+T, D)
        new_cache = x[:, x.size(1) - self.lorder :]
        x = self.depthwise_conv(x.transpose(1, 2).unsqueeze(-1), None)  # (1,D,T,1)
        x = x.squeeze(-1).transpose(1, 2)  # (1, T, D)
        if self.activation is not None:
            x = self.activation(x)
        return self.pointwise_conv2(x, None), new_cache


class _Block(torch.nn.Module):
    """``FusionFormerBlock`` in eval form with its caches."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        macaron = block.feed_forward_macaron
        self.feed_forward_macaron = None if macaron is None else _FeedForward(macaron)
        self.ff_scale = float(block.ff_scale)
        self.norm_ff_macaron = _norm(block.norm_ff_macaron)
        self.norm_mha = _norm(block.norm_mha)
        self.attention = _Attention(block.attention)
        self.concat_linear = block.concat_linear
        conv = block.conv_module
        self.conv_module = None if conv is None else _ConvModule(conv)
        self.norm_conv = _norm(block.norm_conv)
        self.norm_ff = _norm(block.norm_ff)
        self.feed_forward = _FeedForward(block.feed_forward)
        self.norm_final = _norm(block.norm_final)

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        macaron = self.feed_forward_macaron
        if macaron is not None:
            h = x
            if self.norm_ff_macaron is not None:
                h = self.norm_ff_macaron(x)
            y = macaron(h)
            x = x + (y if self.ff_scale == 1.0 else self.ff_scale * y)
        h = x
        if self.norm_mha is not None:
            h = self.norm_mha(x)
        a, att_cache = self.attention(h, pos_emb, att_cache, key_mask)
        if self.concat_linear is not None:
            a = self.concat_linear(torch.cat([h, a], dim=-1), None)
        x = x + a
        conv = self.conv_module
        if conv is not None:
            h = x
            if self.norm_conv is not None:
                h = self.norm_conv(x)
            h, cnn_cache = conv(h, cnn_cache)
            x = x + h
        h = x
        if self.norm_ff is not None:
            h = self.norm_ff(x)
        y = self.feed_forward(h)
        x = x + (y if self.ff_scale == 1.0 else self.ff_scale * y)
        if self.norm_final is not None:
            x = self.norm_final(x)
        return x, att_cache, cnn_cache


class _Conv2dInput(torch.nn.Module):
    """Fused ``Conv2dSubsampling``: first conv as a matmul over patches."""

    def __init__(self, embed: torch.nn.Module) -> None:
        super().__init__()
        if embed.conv_in is None:
            raise _not_fused("the subsampling")
        self.kernel, self.stride = (int(v) for v in embed.specs[0])
        self.conv_in = embed.conv_in
        self.convs = embed.convs
        self.out = embed.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel, self.stride
        patches = x.unfold(1, k, s).unfold(2, k, s)  # (1, T1, F1, k, k)
        b, t, f = patches.size(0), patches.size(1), patches.size(2)
        h = torch.relu_(self.conv_in(patches.reshape(b, t, f, k * k)))
        h = h.permute(0, 3, 1, 2)  # (1, C, T1, F1) view of channels-last memory
        for conv in self.convs:
            h = conv(h, None)
        h = h.permute(0, 2, 3, 1)  # (1, T', F', C)
        return self.out(h.reshape(b, h.size(1), -1), None)


class _LinearInput(torch.nn.Module):
    def __init__(self, embed: torch.nn.Module) -> None:
        super().__init__()
        self.out = embed.out
        self.norm: Optional[_Norm] = _norm(embed.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out(x, None)
        norm = self.norm
        if norm is not None:
            x = norm(x)
        return x


class _EmbedInput(torch.nn.Module):
    def __init__(self, embed: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embed.embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x)


class _NoInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _input_layer(embed: torch.nn.Module) -> torch.nn.Module:
    from espnet_fusionformer.subsampling import (
        Conv2dSubsampling,
        EmbedInput,
        LinearInput,
        NoInput,
    )

    for kind, build in (
        (Conv2dSubsampling, _Conv2dInput),
        (LinearInput, _LinearInput),
        (EmbedInput, _EmbedInput),
        (NoInput, lambda e: _NoInput()),
    ):
        if isinstance(embed, kind):
            return build(embed)
    raise ValueError(f"cannot script the input layer {type(embed).__name__}")


class _Positions(torch.nn.Module):
    """``RelPositions`` / ``AbsPositions`` / ``ScaledAbsPositions`` with their
    sinusoid tables as buffers."""

    def __init__(self, pos_enc: torch.nn.Module) -> None:
        super().__init__()
        from espnet_fusionformer.positions import (
            AbsPositions,
            RelPositions,
            ScaledAbsPositions,
        )

        if not isinstance(pos_enc, (RelPositions, AbsPositions)):
            raise ValueError(
                f"cannot script the positional encoding {type(pos_enc).__name__}"
            )
        self.relative = isinstance(pos_enc, RelPositions)
        self.scaled = isinstance(pos_enc, ScaledAbsPositions)
        self.xscale = float(getattr(pos_enc, "xscale", 1.0))
        self.register_buffer("pe", pos_enc.pe.detach().clone())
        if self.scaled:
            self.alpha = pos_enc.alpha
        else:
            self.register_buffer("alpha", torch.ones(()))

    def max_frames(self) -> int:
        return (self.pe.size(1) + 1) // 2 if self.relative else self.pe.size(1)

    def forward(
        self, x: torch.Tensor, offset: int, cached: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(1, T, D)`` frames after ``offset`` frames, ``cached`` of them in the
        attention cache -> frames, relative table ``(1, 2(cached+T)-1, D)`` (empty
        for absolute positions)."""
        if self.relative:
            n = cached + x.size(1)
            if n > self.max_frames():
                raise ValueError(
                    "the chunk and its attention cache need more relative positions "
                    "than the exported table holds: limit required_cache_size or "
                    "export from an encoder with a larger max_pos_emb_len"
                )
            if self.xscale != 1.0:
                x = x * self.xscale
            centre = self.pe.size(1) // 2
            return x, self.pe[:, centre - n + 1 : centre + n]
        end = offset + x.size(1)
        if end > self.max_frames():
            raise ValueError(
                "offset + chunk exceed the exported positional table: export from "
                "an encoder with a larger max_pos_emb_len"
            )
        table = self.pe[:, offset:end]
        if self.scaled:
            return x + self.alpha * table, x.new_zeros(0)
        if self.xscale != 1.0:
            x = x * self.xscale
        return x + table, x.new_zeros(0)


class ScriptableChunkEncoder(torch.nn.Module):
    """The streaming (chunk) path of a ``FusionFormerEncoder``, TorchScript-clean.

    Args:
        encoder: a ``FusionFormerEncoder`` in eval mode (fused here unless it is);
            it must be able to stream (a causal convolution module, ...).

    The module holds a fused copy of the encoder's weights, without gradients.

    Raises:
        ValueError: for an encoder that cannot stream (see
            ``FusionFormerEncoder.streaming_obstacle``) or with
            ``interctc_use_conditioning`` (it needs the CTC inside the encoder).
        RuntimeError: for an encoder in training mode.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        from espnet_fusionformer.export import fused_encoder

        fused = fused_encoder(encoder)
        if fused is encoder:  # already fused: share nothing with the caller's model
            fused = copy.deepcopy(encoder)
        obstacle = fused.streaming_obstacle()
        if obstacle is not None:
            raise ValueError(f"cannot script forward_chunk: {obstacle}")
        if fused.interctc_use_conditioning:
            raise ValueError(
                "cannot script forward_chunk: interctc_use_conditioning needs the "
                "CTC inside the encoder (export a model without it)"
            )
        embed = fused.embed
        self.input_size = int(fused.input_size)
        self.output_size = int(fused.output_size())
        self.takes_tokens = bool(embed.takes_tokens)
        self.rate = int(embed.rate())
        self.context = int(embed.min_input_length())
        self.chunk_size = int(fused.chunk_size)
        self.left_chunks = int(fused.left_chunks)
        self.num_blocks = len(fused.encoders)
        self.heads = int(fused.heads())
        self.d_k = int(fused.d_k())
        conv = fused.encoders[0].conv_module
        self.lorder = 0 if conv is None else int(conv.lorder)
        self.embed = _input_layer(embed)
        self.pos_enc = _Positions(embed.pos_enc)
        self.encoders = torch.nn.ModuleList([_Block(b) for b in fused.encoders])
        self.after_norm = _norm(fused.after_norm)
        # inference only: no autograd (the fused layers apply ReLU in place)
        self.requires_grad_(False).eval()

    @torch.jit.export
    def subsampling_rate(self) -> int:
        """Input frames per output frame."""
        return self.rate

    @torch.jit.export
    def right_context(self) -> int:
        """Input frames beyond a chunk's last output frame's first input frame
        (WeNet's ``right_context``): a chunk of ``C`` output frames reads
        ``(C - 1) * rate + right_context + 1`` input frames."""
        return self.context - 1

    def _check(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> None:
        if xs.size(0) != 1 or xs.dim() != (2 if self.takes_tokens else 3):
            raise ValueError("forward_chunk takes one utterance (1, T, F)")
        if not self.takes_tokens and xs.size(2) != self.input_size:
            raise ValueError("the feature size does not match the encoder's")
        if xs.size(1) < self.context:
            raise ValueError("the chunk is too short for the subsampling")
        cached = 0
        if att_cache.numel() > 0:
            if (
                att_cache.dim() != 4
                or att_cache.size(0) != self.num_blocks
                or att_cache.size(1) != self.heads
                or att_cache.size(3) != 2 * self.d_k
            ):
                raise ValueError("att_cache is not from this model")
            cached = att_cache.size(2)
        if cnn_cache.numel() > 0 and (
            cnn_cache.dim() != 4
            or cnn_cache.size(0) != self.num_blocks
            or cnn_cache.size(1) != 1
            or cnn_cache.size(2) != self.lorder
            or cnn_cache.size(3) != self.output_size
        ):
            raise ValueError("cnn_cache is not from this model")
        expected = offset
        if required_cache_size >= 0:
            expected = min(offset, required_cache_size)
        if offset < 0 or cached != expected:
            raise ValueError("offset does not match the attention cache")

    @torch.jit.export
    def forward_chunk(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``FusionFormerEncoder.forward_chunk`` (same arguments and results)."""
        self._check(xs, offset, required_cache_size, att_cache, cnn_cache)
        x = self.embed(xs)
        cached = att_cache.size(2) if att_cache.numel() > 0 else 0
        x, pos_emb = self.pos_enc(x, offset, cached)
        att_caches: List[torch.Tensor] = []
        cnn_caches: List[torch.Tensor] = []
        for i, block in enumerate(self.encoders):
            if att_cache.numel() > 0:
                layer_att = att_cache[i : i + 1]
            else:
                layer_att = x.new_zeros(1, self.heads, 0, 2 * self.d_k)
            if cnn_cache.numel() > 0:
                layer_cnn = cnn_cache[i]
            else:
                layer_cnn = x.new_zeros(1, self.lorder, x.size(-1))
            x, layer_att, layer_cnn = block(x, pos_emb, layer_att, layer_cnn)
            att_caches.append(layer_att)
            cnn_caches.append(layer_cnn)
        after_norm = self.after_norm
        if after_norm is not None:
            x = after_norm(x)
        new_att = torch.cat(att_caches, dim=0)  # (L, H, Tk, 2 d_k)
        if required_cache_size >= 0:
            new_att = new_att[:, :, max(new_att.size(2) - required_cache_size, 0) :]
        if self.lorder > 0:
            new_cnn = torch.stack(cnn_caches)  # (L, 1, K-1, D)
        else:
            new_cnn = x.new_zeros(0, 0, 0, 0)
        return x, new_att, new_cnn

    def forward(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_chunk(xs, offset, required_cache_size, att_cache, cnn_cache)


def script_chunk_encoder(encoder: torch.nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(ScriptableChunkEncoder(encoder))``."""
    return torch.jit.script(ScriptableChunkEncoder(encoder))


class FixedCacheChunkEncoder(torch.nn.Module):
    """The chunk path with fixed-size caches, for ONNX (WeNet's CPU ONNX export).

    Every call has the same shapes, so the graph is exported for one chunk size and
    left context::

        chunk (1, W, F), offset (1,) int64, att_cache (L, H, R, 2 d_k),
        cnn_cache (L, 1, K-1, D) -> (1, C, D), att_cache, cnn_cache (same shapes)

    with ``C`` = ``chunk_size`` output frames, ``W = (C - 1) * rate + context`` input
    frames (stride ``C * rate``), ``R = C * left_chunks``. Start with zero caches and
    offset 0 and pass the output frames so far as ``offset``: cache slots not yet
    filled (the first ``R - min(offset, R)``) are masked out of the attention, so
    each chunk equals the eager ``forward_chunk`` with ``required_cache_size = R``.

    Args:
        encoder: a ``FusionFormerEncoder`` in eval mode that can stream (see
            :class:`ScriptableChunkEncoder`).
        chunk_size: output frames per chunk (>= 1).
        left_chunks: chunks of left context (>= 1; a fixed cache cannot hold "all").

    Raises:
        ValueError: for an encoder that cannot stream, or a chunk size or left
            context a fixed-size cache cannot have.
    """

    def __init__(self, encoder: torch.nn.Module, chunk_size: int, left_chunks: int):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if left_chunks < 1:
            raise ValueError(
                f"left_chunks must be >= 1 for fixed-size caches, got {left_chunks} "
                "(-1, all left context, needs a cache that grows: use the "
                "TorchScript streaming export)"
            )
        from espnet_fusionformer.export import fused_encoder

        fused = fused_encoder(encoder)
        inner = ScriptableChunkEncoder(fused)
        if inner.lorder == 0:
            raise ValueError(
                "fixed-size caches need a convolution module (use_cnn_module: true)"
            )
        self.inner = inner
        # the fused input layer itself: under ONNX export its convolutions are the
        # MatMuls that int8 quantizes (``Conv2dSubsampling._forward_fused``)
        self.embed = copy.deepcopy(fused.embed)
        self.chunk_size, self.left_chunks = chunk_size, left_chunks
        self.cache_size = chunk_size * left_chunks
        self.window = (chunk_size - 1) * inner.rate + inner.context
        self.register_buffer("lengths", torch.tensor([self.window]), persistent=False)
        for block in inner.encoders:
            block.attention.sliced_shift = True

    def shapes(self) -> Dict[str, List[int]]:
        """Input shapes: ``chunk``, ``offset``, ``att_cache``, ``cnn_cache``."""
        inner = self.inner
        chunk = [1, self.window] + ([] if inner.takes_tokens else [inner.input_size])
        return dict(
            chunk=chunk,
            offset=[1],
            att_cache=[inner.num_blocks, inner.heads, self.cache_size, 2 * inner.d_k],
            cnn_cache=[inner.num_blocks, 1, inner.lorder, inner.output_size],
        )

    def initial_inputs(self, chunk: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The first call's inputs: ``chunk``, offset 0 and zero caches."""
        shapes = self.shapes()
        return (
            chunk,
            torch.zeros(1, dtype=torch.long),
            torch.zeros(shapes["att_cache"]),
            torch.zeros(shapes["cnn_cache"]),
        )

    def _positions(
        self, x: torch.Tensor, offset: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        pos_enc = self.inner.pos_enc
        if pos_enc.relative:  # the table depends on the (fixed) key count only
            return pos_enc(x, 0, self.cache_size)
        frames = offset + torch.arange(x.size(1), device=x.device)
        table = pos_enc.pe.index_select(1, frames)
        if pos_enc.scaled:
            return x + pos_enc.alpha * table, x.new_zeros(0)
        return x * pos_enc.xscale + table, x.new_zeros(0)

    def forward(
        self,
        chunk: torch.Tensor,
        offset: torch.Tensor,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the class docstring for shapes."""
        x, _ = self.embed.frames(chunk, self.lengths)  # (1, C, D)
        x, pos_emb = self._positions(x, offset)
        cached = torch.clamp(offset, max=self.cache_size)  # filled cache slots
        keys = torch.arange(self.cache_size + x.size(1), device=x.device)
        key_mask = (keys >= self.cache_size - cached).view(1, 1, 1, -1)
        att_caches, cnn_caches = [], []
        for i, block in enumerate(self.inner.encoders):
            x, layer_att, layer_cnn = block(
                x, pos_emb, att_cache[i : i + 1], cnn_cache[i], key_mask
            )
            att_caches.append(layer_att[:, :, x.size(1) :])  # the last R frames
            cnn_caches.append(layer_cnn)
        if self.inner.after_norm is not None:
            x = self.inner.after_norm(x)
        return x, torch.cat(att_caches, dim=0), torch.stack(cnn_caches)
