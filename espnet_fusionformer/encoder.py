"""``FusionFormerEncoder``: ESPnet's ``encoder: fusionformer``."""

import itertools
import logging
from typing import Dict, List, Optional, Tuple

import torch
from espnet2.asr.encoder.abs_encoder import AbsEncoder

from espnet_fusionformer.blocks import (
    ACTIVATIONS,
    ConvModule,
    FeedForward,
    FusionFormerBlock,
    RelPositionAttention,
    exporting,
)
from espnet_fusionformer.fusable import Fusable
from espnet_fusionformer.norm import make_norm
from espnet_fusionformer.streaming import chunk_mask, sample_chunk
from espnet_fusionformer.subsampling import Conv2dSubsampling

# normalization -> structure. "fusion" is the paper's FusionFormer; the others are
# the LayerNorm Conformer and the two LayerNorm-free attempts the paper reports.
# "scale_input": ESPnet's sqrt(D) input scale, which only a final LayerNorm cancels.
NORMALIZATIONS: Dict[str, Dict] = {
    "fusion": dict(
        batch_norm=True, pre_norm=None, glu=False, activation="relu", scale_input=False
    ),
    "layernorm": dict(
        batch_norm=False,
        pre_norm="layer",
        glu=True,
        activation="swish",
        scale_input=True,
    ),
    "batchnorm_in_place": dict(
        batch_norm=False,
        pre_norm="batch",
        glu=True,
        activation="swish",
        scale_input=True,
    ),
    "none": dict(
        batch_norm=False, pre_norm=None, glu=True, activation="swish", scale_input=True
    ),
}

# Keys of ESPnet's ConformerEncoder accepted for YAML compatibility: key -> the only
# values this encoder implements.
CONFORMER_KEYS = {
    "normalize_before": (True,),
    "concat_after": (False,),
    "positionwise_layer_type": ("linear",),
    "rel_pos_type": ("latest",),
    "pos_enc_layer_type": ("rel_pos",),
    "selfattention_layer_type": ("rel_selfattn",),
    "zero_triu": (False,),
    "interctc_layer_idx": ([],),
    "interctc_use_conditioning": (False,),
    "stochastic_depth_rate": (0.0,),
    "layer_drop_rate": (0.0,),
    "qk_norm": (False,),
}


# Bumped whenever any module registers or replaces a parameter, buffer or submodule,
# so that a cached list of an encoder's tensors is refreshed (see _state_key).
_REGISTRATIONS = [0]


def _registered(*args) -> None:
    _REGISTRATIONS[0] += 1


for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_registered)


def _check_conformer_keys(values: Dict) -> None:
    for key, value in values.items():
        allowed = CONFORMER_KEYS[key]
        if value not in allowed:
            raise ValueError(
                f"fusionformer does not support {key}={value!r} "
                f"(supported: {', '.join(repr(a) for a in allowed)})"
            )


class FusionFormerEncoder(AbsEncoder, Fusable):
    r"""FusionFormer encoder (Song et al., arXiv 2210.17079).

    A Conformer without LayerNorm: a BatchNorm follows every linear and convolution
    layer, ReLU replaces Swish and GLU. In eval mode every BatchNorm folds into the
    layer before it (:func:`espnet_fusionformer.fuse`), so normalization is free.

    Args:
        input_size: feature size ``F``.
        output_size: model size ``D``. (Default: ``256``)
        attention_heads: heads of the self-attention. (Default: ``4``)
        linear_units: hidden units of the feed-forward modules. (Default: ``2048``)
        num_blocks: number of blocks. (Default: ``6``)
        dropout_rate: dropout of the residual branches and FFNs. (Default: ``0.1``)
        positional_dropout_rate: dropout of the positional encoding. (Default: ``0.1``)
        attention_dropout_rate: dropout of the attention weights. (Default: ``0.0``)
        input_layer: ``conv2d`` | ``conv2d6`` | ``conv2d8``. (Default: ``"conv2d"``)
        macaron_style: a half-step FFN before the attention. (Default: ``True``)
        use_cnn_module: the convolution module. (Default: ``True``)
        cnn_module_kernel: depthwise kernel size (odd). (Default: ``31``)
        normalization: ``fusion`` (FusionFormer) | ``layernorm`` (Conformer: pre-LN,
            Swish, GLU) | ``batchnorm_in_place`` (BN where LN was) | ``none``
            (LN removed). (Default: ``"fusion"``)
        activation: ``relu`` | ``swish``; ``None`` takes the normalization's
            (ReLU for ``fusion``, Swish otherwise). (Default: ``None``)
        activation_type: ESPnet conformer key: the activation FusionFormer replaces.
            Accepted so a conformer ``encoder_conf`` works unchanged; it sets the
            activation only for the Conformer-like normalizations (not ``fusion``,
            which uses ``activation``). (Default: ``None``)
        sync_batchnorm: reduce BatchNorm statistics across ``torch.distributed``
            ranks; ``None``: whenever the world size is > 1. (Default: ``None``)
        fuse_for_inference: in eval mode, run a fused copy of the encoder (built
            once per switch to eval). (Default: ``True``)
        causal: causal convolution module (needed for streaming). (Default: ``False``)
        chunk_size: attention chunk in output frames; ``0``: full context. Used in
            training without ``dynamic_chunk_training`` and always in eval.
            (Default: ``0``)
        left_chunks: chunks of left context a chunk sees; ``-1``: all. (Default: ``-1``)
        dynamic_chunk_training: a random chunk per batch (U2), so one model decodes
            with full context and streaming. (Default: ``False``)
        max_dynamic_chunk: largest random chunk. (Default: ``25``)
        dynamic_left_chunks: a random left context too. (Default: ``False``)
        max_pos_emb_len: initial positional table length. (Default: ``5000``)
        normalize_before, concat_after, positionwise_layer_type, rel_pos_type,
        pos_enc_layer_type, selfattention_layer_type, zero_triu, interctc_layer_idx,
        interctc_use_conditioning, stochastic_depth_rate, layer_drop_rate, qk_norm:
            ESPnet conformer keys, accepted with the values this encoder implements
            (see :data:`CONFORMER_KEYS`); others raise ``ValueError``.
        use_flash_attn, padding_idx: ESPnet conformer keys without effect here.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        macaron_style: bool = True,
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 31,
        normalization: str = "fusion",
        activation: Optional[str] = None,
        activation_type: Optional[str] = None,
        sync_batchnorm: Optional[bool] = None,
        fuse_for_inference: bool = True,
        causal: bool = False,
        chunk_size: int = 0,
        left_chunks: int = -1,
        dynamic_chunk_training: bool = False,
        max_dynamic_chunk: int = 25,
        dynamic_left_chunks: bool = False,
        max_pos_emb_len: int = 5000,
        normalize_before: bool = True,
        concat_after: bool = False,
        positionwise_layer_type: str = "linear",
        rel_pos_type: str = "latest",
        pos_enc_layer_type: str = "rel_pos",
        selfattention_layer_type: str = "rel_selfattn",
        zero_triu: bool = False,
        interctc_layer_idx: Optional[List[int]] = None,
        interctc_use_conditioning: bool = False,
        stochastic_depth_rate: float = 0.0,
        layer_drop_rate: float = 0.0,
        qk_norm: bool = False,
        use_flash_attn: bool = False,
        padding_idx: int = -1,
    ) -> None:
        super().__init__()
        _check_conformer_keys(
            dict(
                normalize_before=normalize_before,
                concat_after=concat_after,
                positionwise_layer_type=positionwise_layer_type,
                rel_pos_type=rel_pos_type,
                pos_enc_layer_type=pos_enc_layer_type,
                selfattention_layer_type=selfattention_layer_type,
                zero_triu=zero_triu,
                interctc_layer_idx=list(interctc_layer_idx or []),
                interctc_use_conditioning=interctc_use_conditioning,
                stochastic_depth_rate=stochastic_depth_rate,
                layer_drop_rate=layer_drop_rate,
                qk_norm=qk_norm,
            )
        )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {normalization!r}: "
                f"choose from {list(NORMALIZATIONS)}"
            )
        structure = NORMALIZATIONS[normalization]
        if activation is None:
            if activation_type is not None and normalization != "fusion":
                activation = activation_type
            else:
                activation = structure["activation"]
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}: choose from {list(ACTIVATIONS)}"
            )
        if activation_type is not None and activation_type != activation:
            logging.info(
                "fusionformer: activation_type=%s (Conformer) is replaced by "
                "activation=%s",
                activation_type,
                activation,
            )
        if chunk_size < 0 or left_chunks < -1 or max_dynamic_chunk < 1:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be >= 0, left_chunks ({left_chunks}) "
                f">= -1 and max_dynamic_chunk ({max_dynamic_chunk}) >= 1"
            )
        self.input_size = input_size
        self._output_size = output_size
        self.causal = causal
        self.chunk_size = chunk_size
        self.left_chunks = left_chunks
        self.dynamic_chunk_training = dynamic_chunk_training
        self.max_dynamic_chunk = max_dynamic_chunk
        self.dynamic_left_chunks = dynamic_left_chunks
        self.normalization = normalization
        self.activation = activation
        self.fuse_for_inference = fuse_for_inference
        self.fused = False
        batch_norm, pre_norm = structure["batch_norm"], structure["pre_norm"]
        sync = sync_batchnorm

        self.embed = Conv2dSubsampling(
            input_size,
            output_size,
            input_layer,
            positional_dropout_rate,
            batch_norm,
            sync,
            max_pos_emb_len,
            structure["scale_input"],
        )

        def block() -> FusionFormerBlock:
            def ffn() -> FeedForward:
                return FeedForward(
                    output_size,
                    linear_units,
                    dropout_rate,
                    activation,
                    batch_norm,
                    sync,
                )

            return FusionFormerBlock(
                output_size,
                RelPositionAttention(
                    output_size,
                    attention_heads,
                    attention_dropout_rate,
                    batch_norm,
                    sync,
                ),
                ffn(),
                ffn() if macaron_style else None,
                ConvModule(
                    output_size,
                    cnn_module_kernel,
                    activation,
                    batch_norm,
                    structure["glu"],
                    sync,
                    causal,
                )
                if use_cnn_module
                else None,
                dropout_rate,
                pre_norm,
                sync,
            )

        self.encoders = torch.nn.ModuleList([block() for _ in range(num_blocks)])
        self.after_norm = make_norm(pre_norm, output_size, sync)
        self._fused_copy = None  # (state key, fused copy); a cache, see fused_copy()

    def output_size(self) -> int:
        return self._output_size

    # -- the fused copy: a cache of fuse(self) for inference ----------------------
    def _state_key(self) -> Tuple:
        """Changes whenever a parameter or buffer is replaced or changed in place.

        The list of tensors is walked again only after some module registered or
        replaced a parameter, buffer or submodule (a walk costs ~10 ms at 12 x 256).
        """
        tensors = self.__dict__.get("_tensors")
        if tensors is None or tensors[0] != _REGISTRATIONS[0]:
            walk = list(itertools.chain(self.parameters(), self.buffers()))
            tensors = self.__dict__["_tensors"] = (_REGISTRATIONS[0], walk)
        return tuple((id(t), t._version, t.data_ptr()) for t in tensors[1])

    def fused_copy(self) -> "FusionFormerEncoder":
        """``fuse(self)``, rebuilt whenever a parameter or buffer has changed since
        the last call; it follows this encoder's chunk settings. The copy is a
        cache: not a submodule, not in the state_dict, not pickled or deep-copied.
        """
        key = self._state_key()
        cached = self.__dict__.get("_fused_copy")
        if cached is None or cached[0] != key:
            from espnet_fusionformer.fusion import fuse

            with torch.no_grad():
                fused = fuse(self).requires_grad_(False)  # used only without grad
            cached = self.__dict__["_fused_copy"] = (key, fused)
        fused = cached[1]
        fused.chunk_size, fused.left_chunks = self.chunk_size, self.left_chunks
        return fused

    def _use_fused_copy(self) -> bool:
        """Eval mode, no gradient needed, and not fused already."""
        return (
            not self.training
            and self.fuse_for_inference
            and not self.fused
            and not torch.is_grad_enabled()
        )

    def train(self, mode: bool = True) -> "FusionFormerEncoder":
        self.__dict__["_fused_copy"] = None  # free the memory while training
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        _REGISTRATIONS[0] += 1  # .to(), .half(): parameters may be new tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> Dict:
        state = dict(super().__getstate__())
        state["_fused_copy"] = state["_tensors"] = None
        return state

    def fuse_(self) -> None:
        """Mark this encoder as fused (``fuse()`` fuses its layers)."""
        self.fused = True
        self.__dict__["_fused_copy"] = None

    # -- forward ---------------------------------------------------------------
    def check_input(self, xs_pad: torch.Tensor, ilens: torch.Tensor) -> None:
        """Raise ``ValueError``/``TooShortUttError`` for input the model can't take.

        In training, values are not read on the host (that would stall a GPU once
        per batch): lengths are asserted on the device, and non-finite features
        are left to ESPnet's trainer, which skips a step whose loss is not finite.
        """
        if xs_pad.dim() != 3:
            raise ValueError(
                f"expected (batch, time, {self.input_size}) features, "
                f"got shape {tuple(xs_pad.shape)}"
            )
        if xs_pad.size(2) != self.input_size:
            raise ValueError(
                f"feature size {xs_pad.size(2)} does not match the encoder's "
                f"input_size {self.input_size}"
            )
        if ilens.dim() != 1 or ilens.size(0) != xs_pad.size(0):
            raise ValueError(
                f"ilens must have shape ({xs_pad.size(0)},), got {tuple(ilens.shape)}"
            )
        if self.training:
            self.embed.check_length(xs_pad.size(1))  # as ESPnet: the padded length
            torch._assert_async(
                ((ilens > 0) & (ilens <= xs_pad.size(1))).all(),
                f"fusionformer: every length must be in 1..{xs_pad.size(1)} "
                "(the padded time axis)",
            )
            return
        shortest, longest = int(ilens.min()), int(ilens.max())
        if shortest < 1 or longest > xs_pad.size(1):
            raise ValueError(
                f"lengths must be in 1..{xs_pad.size(1)} (the padded time axis), "
                f"got {ilens.tolist()}"
            )
        if not bool(torch.isfinite(xs_pad).all()):
            raise ValueError("features contain NaN or Inf")
        self.embed.check_length(shortest)

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Encode a padded batch.

        Args:
            xs_pad: ``(B, T, F)`` features.
            ilens: ``(B,)`` valid frames per utterance.
            prev_states: unused (ESPnet interface).

        Returns:
            ``(B, T', D)`` encoded frames, ``(B,)`` output lengths, ``None``.
        """
        if self._use_fused_copy():
            return self.fused_copy().forward(xs_pad, ilens)  # checks the input itself
        self.check_input(xs_pad, ilens)
        xs, olens = self.encode(xs_pad, ilens)
        return xs, olens, None

    def encode(
        self, xs_pad: torch.Tensor, ilens: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, F), (B,) -> (B, T', D), (B,)`` without checks or dispatch."""
        xs, pos_emb, valid = self.embed(xs_pad, ilens)  # (B, T', D), (B, T')
        mask: Optional[torch.Tensor] = valid.unsqueeze(-1)  # (B, T', 1)
        att_mask: Optional[torch.Tensor] = ~valid[:, None, None, :]  # (B, 1, 1, T')
        if not self.training and not exporting() and bool(valid.all()):
            mask = att_mask = None  # nothing padded: skip the masking
        chunk_size, left_chunks = self.chunk_size, self.left_chunks
        if self.training and self.dynamic_chunk_training:
            chunk_size, left_chunks = sample_chunk(
                xs.size(1),
                self.max_dynamic_chunk,
                xs.size(1) // self.max_dynamic_chunk,
                self.dynamic_left_chunks,
            )
        if chunk_size > 0:
            future = ~chunk_mask(xs.size(1), chunk_size, left_chunks, xs.device)
            att_mask = future if att_mask is None else att_mask | future
        for block in self.encoders:
            xs = block(xs, mask, att_mask, pos_emb)[0]
        if self.after_norm is not None:
            xs = self.after_norm(xs, mask)
        return xs, valid.sum(1)

    # -- streaming ---------------------------------------------------------------
    def forward_chunk(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the next chunk of one utterance (eval mode, WeNet's interface).

        Args:
            xs: ``(1, T, F)`` features of the chunk plus the subsampling's right
                context (see ``streaming.encode_chunk_by_chunk``).
            offset: output frames encoded so far.
            required_cache_size: frames of attention cache to keep (``chunk_size *
                left_chunks``); ``< 0`` keeps all.
            att_cache: ``(L, H, Tc, 2 d_k)`` keys and values of earlier frames;
                ``torch.zeros(0, 0, 0, 0)`` at the start.
            cnn_cache: ``(L, 1, K-1, D)`` causal convolution context;
                ``torch.zeros(0, 0, 0, 0)`` at the start.

        Returns:
            ``(1, T', D)`` encoded frames, new ``att_cache`` and ``cnn_cache``.
        """
        if self.training:
            raise RuntimeError("forward_chunk is for inference: call encoder.eval()")
        if self._use_fused_copy():  # the copy checks the chunk
            return self.fused_copy().forward_chunk(
                xs, offset, required_cache_size, att_cache, cnn_cache
            )
        self._check_chunk(xs, offset, required_cache_size, att_cache, cnn_cache)
        xs, _, _ = self.embed(xs, torch.tensor([xs.size(1)], device=xs.device))
        pos_emb = self.embed.positions(att_cache.size(2) + xs.size(1), xs)
        att_caches, cnn_caches = [], []
        for i, block in enumerate(self.encoders):
            layer_att = att_cache[i : i + 1] if att_cache.size(0) > 0 else None
            if layer_att is None:
                layer_att = xs.new_zeros(1, self.heads(), 0, 2 * self.d_k())
            layer_cnn: Optional[torch.Tensor] = None
            if block.conv_module is not None:
                layer_cnn = (
                    cnn_cache[i]
                    if cnn_cache.size(0) > 0
                    else xs.new_zeros(1, block.conv_module.lorder, xs.size(-1))
                )
            xs, layer_att, layer_cnn = block(
                xs, None, None, pos_emb, layer_att, layer_cnn
            )
            att_caches.append(layer_att)
            if layer_cnn is not None:
                cnn_caches.append(layer_cnn)
        if self.after_norm is not None:
            xs = self.after_norm(xs, None)
        new_att = torch.cat(att_caches, dim=0)  # (L, H, Tk, 2 d_k)
        if required_cache_size >= 0:
            new_att = new_att[:, :, max(new_att.size(2) - required_cache_size, 0) :]
        new_cnn = (
            torch.stack(cnn_caches) if cnn_caches else xs.new_zeros(0, 0, 0, 0)
        )  # (L, 1, K-1, D)
        return xs, new_att, new_cnn

    @property
    def streamable(self) -> bool:
        """No convolution module looks ahead (``causal: true`` or no module)."""
        return all(
            b.conv_module is None or b.conv_module.lorder > 0 for b in self.encoders
        )

    def heads(self) -> int:
        return self.encoders[0].attention.heads

    def d_k(self) -> int:
        return self.encoders[0].attention.d_k

    def _check_chunk(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
    ) -> None:
        """Raise ``ValueError`` for a chunk or caches this model cannot continue."""
        if not self.streamable:
            raise ValueError(
                "streaming needs a causal convolution module: train with "
                "encoder_conf causal: true (or use_cnn_module: false)"
            )
        if xs.dim() != 3 or xs.size(0) != 1:
            raise ValueError(
                f"forward_chunk takes one utterance (1, T, {self.input_size}), "
                f"got shape {tuple(xs.shape)}"
            )
        self.check_input(xs, torch.tensor([xs.size(1)]))
        layers = len(self.encoders)
        expected = (layers, self.heads(), 2 * self.d_k())
        if (
            att_cache.numel() > 0
            and (
                att_cache.size(0),
                att_cache.size(1),
                att_cache.size(3),
            )
            != expected
        ):
            raise ValueError(
                f"att_cache of shape {tuple(att_cache.shape)} is not from this model: "
                f"expected ({layers}, {self.heads()}, frames, {2 * self.d_k()})"
            )
        if cnn_cache.numel() > 0:
            conv = self.encoders[0].conv_module
            want = (layers, 1, conv.lorder if conv else 0, self._output_size)
            if tuple(cnn_cache.shape) != want:
                raise ValueError(
                    f"cnn_cache of shape {tuple(cnn_cache.shape)} is not from this "
                    f"model: expected {want}"
                )
        cached = att_cache.size(2) if att_cache.numel() > 0 else 0
        want_cached = (
            offset if required_cache_size < 0 else min(offset, required_cache_size)
        )
        if offset < 0 or cached != want_cached:
            raise ValueError(
                f"offset {offset} does not match the attention cache of {cached} "
                f"frames (expected {want_cached} cached frames for "
                f"required_cache_size {required_cache_size})"
            )
