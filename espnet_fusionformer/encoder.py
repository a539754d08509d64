"""``FusionFormerEncoder``: ESPnet's ``encoder: fusionformer``."""

import itertools
import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
from espnet2.asr.encoder.abs_encoder import AbsEncoder

from espnet_fusionformer.blocks import (
    ACTIVATIONS,
    ATTENTIONS,
    POSITIONWISE,
    ConvModule,
    FeedForward,
    FusionFormerBlock,
    SelfAttention,
    exporting,
)
from espnet_fusionformer.fusable import Fusable, scale_bn_inputs_
from espnet_fusionformer.norm import make_norm
from espnet_fusionformer.positions import POSITIONAL, make_positions
from espnet_fusionformer.streaming import chunk_mask, sample_chunk
from espnet_fusionformer.subsampling import make_input_layer, valid_mask

# normalization -> structure. "fusion" is the paper's FusionFormer; the others are
# the LayerNorm Conformer and the two LayerNorm-free attempts the paper reports.
# "scale_input": ESPnet's sqrt(D) input scale, which only a final LayerNorm cancels.
# "bn_init_scale": the default of the option (see FusionFormerEncoder).
NORMALIZATIONS: Dict[str, Dict] = {
    "fusion": dict(
        batch_norm=True,
        pre_norm=None,
        glu=False,
        activation="relu",
        scale_input=False,
        bn_init_scale=0.5,
    ),
    "layernorm": dict(
        batch_norm=False,
        pre_norm="layer",
        glu=True,
        activation="swish",
        scale_input=True,
        bn_init_scale=1.0,
    ),
    "batchnorm_in_place": dict(
        batch_norm=False,
        pre_norm="batch",
        glu=True,
        activation="swish",
        scale_input=True,
        bn_init_scale=1.0,
    ),
    "none": dict(
        batch_norm=False,
        pre_norm=None,
        glu=True,
        activation="swish",
        scale_input=True,
        bn_init_scale=1.0,
    ),
}

# rel_pos_type -> how it renames ESPnet's relative layer types (ESPnet's rule)
REL_POS_TYPES: Dict[str, Dict[str, str]] = {
    "latest": {},
    "legacy": {"rel_pos": "legacy_rel_pos", "rel_selfattn": "legacy_rel_selfattn"},
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


def relative_position_types(
    rel_pos_type: str, pos_enc_layer_type: str, selfattention_layer_type: str
) -> Tuple[str, str]:
    """ESPnet's ``rel_pos_type`` rule and pairing of positional encoding and
    attention: ``(pos_enc_layer_type, selfattention_layer_type)`` as built."""
    if rel_pos_type not in REL_POS_TYPES:
        raise ValueError(
            f"unknown rel_pos_type {rel_pos_type!r}: choose from {list(REL_POS_TYPES)}"
        )
    rename = REL_POS_TYPES[rel_pos_type]
    pos = rename.get(pos_enc_layer_type, pos_enc_layer_type)
    att = rename.get(selfattention_layer_type, selfattention_layer_type)
    if pos not in POSITIONAL:
        raise ValueError(
            f"unknown pos_enc_layer_type {pos!r}: choose from {list(POSITIONAL)}"
        )
    if att not in ATTENTIONS:
        raise ValueError(
            f"unknown selfattention_layer_type {att!r}: choose from {list(ATTENTIONS)}"
        )
    if rel_pos_type == "latest" and "legacy" in pos + att:
        raise ValueError(
            f"rel_pos_type 'latest' does not go with pos_enc_layer_type {pos!r} / "
            f"selfattention_layer_type {att!r}: use rel_pos_type: legacy"
        )
    if POSITIONAL[pos][1] != ATTENTIONS[att]:
        raise ValueError(
            f"pos_enc_layer_type {pos!r} does not go with selfattention_layer_type "
            f"{att!r}: rel_pos goes with rel_selfattn, legacy_rel_pos with "
            "legacy_rel_selfattn, and abs_pos, scaled_abs_pos and conv with selfattn"
        )
    return pos, att


def ctc_trim_lengths(
    probs: torch.Tensor,
    lengths: torch.Tensor,
    tolerance: int = 5,
    confidence: float = 0.95,
) -> torch.Tensor:
    """Lengths after ESPnet's ``ctc_trim`` (``trim_by_ctc_posterior``): the trailing
    frames that CTC calls blank (id 0) with probability > ``confidence`` go, except
    ``tolerance`` of them.

    Args:
        probs: ``(B, T, V)`` CTC posteriors.
        lengths: ``(B,)`` valid frames.

    Returns:
        ``(B,)`` trimmed lengths (never longer than ``lengths``).
    """
    top, token = probs.max(dim=-1)  # (B, T)
    frames = torch.arange(probs.size(1), device=probs.device)
    kept = ~((top > confidence) & (token == 0)) & (frames < lengths[:, None])
    last = torch.where(kept, frames, torch.full_like(frames, -1)).max(dim=-1).values
    return torch.minimum(last + tolerance + 1, lengths)


class FusionFormerEncoder(AbsEncoder, Fusable):
    r"""FusionFormer encoder (Song et al., arXiv 2210.17079).

    A Conformer without LayerNorm: a BatchNorm follows every linear and convolution
    layer, ReLU replaces Swish and GLU. In eval mode every BatchNorm folds into the
    layer before it (:func:`espnet_fusionformer.fuse`), so normalization is free.

    Every option of ESPnet's ``ConformerEncoder`` (espnet 202511) is accepted, with
    ESPnet's default and meaning (the README's table lists each); FusionFormer's own
    options follow them.

    Args:
        input_size: feature size ``F`` (vocabulary size for ``input_layer: embed``).
        output_size: model size ``D``. (Default: ``256``)
        attention_heads: heads of the self-attention. (Default: ``4``)
        linear_units: hidden units of the feed-forward modules. (Default: ``2048``)
        num_blocks: number of blocks. (Default: ``6``)
        dropout_rate: dropout of the residual branches and FFNs. (Default: ``0.1``)
        positional_dropout_rate: dropout of the positional encoding. (Default: ``0.1``)
        attention_dropout_rate: dropout of the attention weights. (Default: ``0.0``)
        input_layer: ``conv2d`` (T/4) | ``conv2d1`` (T-4) | ``conv2d2`` (T/2) |
            ``conv2d6`` | ``conv2d8`` | ``linear`` | ``embed`` | ``None``.
            (Default: ``"conv2d"``)
        normalize_before: ESPnet: LayerNorm before (True) or after each module.
            Without LayerNorms it has no meaning: ``False`` is logged, and the
            ablations keep their pre-norms. (Default: ``True``)
        concat_after: ``x + Linear(concat(x, attention(x)))`` instead of
            ``x + attention(x)``. (Default: ``False``)
        positionwise_layer_type: ``linear`` | ``conv1d`` | ``conv1d-linear``.
            (Default: ``"linear"``)
        positionwise_conv_kernel_size: kernel of the ``conv1d`` FFNs. (Default: ``3``)
        macaron_style: a half-step FFN before the attention. (Default: ``False``)
        rel_pos_type: ``legacy`` | ``latest``; ``legacy`` turns ``rel_pos`` and
            ``rel_selfattn`` into ``legacy_rel_pos``/``legacy_rel_selfattn``, whose
            positional term covers only keys at or before the query.
            (Default: ``"legacy"``)
        pos_enc_layer_type: ``rel_pos`` | ``legacy_rel_pos`` | ``abs_pos`` |
            ``scaled_abs_pos`` | ``conv``. (Default: ``"rel_pos"``)
        selfattention_layer_type: ``rel_selfattn`` | ``legacy_rel_selfattn`` |
            ``selfattn``. (Default: ``"rel_selfattn"``)
        activation_type: the Conformer's activation (``swish``, ``relu``, ``tanh``,
            ``hardtanh``, ``selu``); FusionFormer replaces it by ``activation``, so
            it only applies to the Conformer-like ``normalization`` values.
            (Default: ``"swish"``)
        use_cnn_module: the convolution module. (Default: ``True``)
        zero_triu: no positional term for keys after the query (relative
            attention). (Default: ``False``)
        cnn_module_kernel: depthwise kernel size (odd). (Default: ``31``)
        padding_idx: padding id of ``input_layer: embed``. (Default: ``-1``)
        interctc_layer_idx: blocks (1-based) whose output also goes to an
            intermediate CTC: ``forward`` then returns ``((xs, [(idx, out), ...]),
            olens, None)``. (Default: ``[]``)
        interctc_use_conditioning: self-conditioned CTC: add
            ``conditioning_layer(ctc.softmax(out))`` after each such block
            (``ESPnetASRModel`` sets ``conditioning_layer`` and passes ``ctc=``).
            (Default: ``False``)
        ctc_trim: after each intermediate CTC, drop the trailing frames it calls
            blank (ESPnet's ``trim_by_ctc_posterior``). (Default: ``False``)
        stochastic_depth_rate: per-block probability (a float for all) of skipping
            the block in training. (Default: ``0.0``)
        layer_drop_rate: probability of skipping each block in training (ESPnet's
            ``MultiSequential``). (Default: ``0.0``)
        max_pos_emb_len: initial positional table length. (Default: ``5000``)
        qk_norm: LayerNorm on each head's queries and keys (``selfattn`` only, as
            ESPnet). (Default: ``False``)
        use_flash_attn: ESPnet's flash-attention switch (``selfattn``); not used
            here (logged). (Default: ``True``)
        normalization: ``fusion`` (FusionFormer) | ``layernorm`` (Conformer: pre-LN,
            Swish, GLU) | ``batchnorm_in_place`` (BN where LN was) | ``none``
            (LN removed). (Default: ``"fusion"``)
        activation: ``relu`` | ``swish`` | ...; ``None`` takes ReLU for ``fusion``,
            ``activation_type`` otherwise. (Default: ``None``)
        bn_init_scale: factor on the initial weights of every layer a BatchNorm
            follows. Such a weight is scale-invariant, so under Adam its effective
            step is ``lr / |w|``: 0.5 doubles it, with the model's function at
            initialization unchanged (up to BatchNorm's eps). ``None``: 0.5 for
            ``fusion`` (measured in RESULTS.md), 1 otherwise. (Default: ``None``)
        sync_batchnorm: reduce BatchNorm statistics across ``torch.distributed``
            ranks (2 ranks then equal one process on both batches); off, each rank
            normalizes its own batch, as torch's BatchNorm under DDP, which
            broadcasts rank 0's running statistics. ``None``: on whenever the
            world size is > 1. Off by default: +20 % time per DDP step measured
            (README). (Default: ``False``)
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
        input_layer: Optional[str] = "conv2d",
        normalize_before: bool = True,
        concat_after: bool = False,
        positionwise_layer_type: str = "linear",
        positionwise_conv_kernel_size: int = 3,
        macaron_style: bool = False,
        rel_pos_type: str = "legacy",
        pos_enc_layer_type: str = "rel_pos",
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        zero_triu: bool = False,
        cnn_module_kernel: int = 31,
        padding_idx: int = -1,
        interctc_layer_idx: Optional[List[int]] = None,
        interctc_use_conditioning: bool = False,
        ctc_trim: bool = False,
        stochastic_depth_rate: Union[float, List[float]] = 0.0,
        layer_drop_rate: float = 0.0,
        max_pos_emb_len: int = 5000,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        normalization: str = "fusion",
        activation: Optional[str] = None,
        bn_init_scale: Optional[float] = None,
        sync_batchnorm: Optional[bool] = False,
        fuse_for_inference: bool = True,
        causal: bool = False,
        chunk_size: int = 0,
        left_chunks: int = -1,
        dynamic_chunk_training: bool = False,
        max_dynamic_chunk: int = 25,
        dynamic_left_chunks: bool = False,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {normalization!r}: "
                f"choose from {list(NORMALIZATIONS)}"
            )
        structure = NORMALIZATIONS[normalization]
        if activation_type not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation_type {activation_type!r}: "
                f"choose from {list(ACTIVATIONS)}"
            )
        if activation is None:
            fusion = normalization == "fusion"
            activation = structure["activation"] if fusion else activation_type
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}: choose from {list(ACTIVATIONS)}"
            )
        pos_enc_layer_type, selfattention_layer_type = relative_position_types(
            rel_pos_type, pos_enc_layer_type, selfattention_layer_type
        )
        if positionwise_layer_type not in POSITIONWISE:
            raise ValueError(
                f"unknown positionwise_layer_type {positionwise_layer_type!r}: "
                f"choose from {list(POSITIONWISE)}"
            )
        depth_rates = stochastic_depth_rate
        if not isinstance(depth_rates, (list, tuple)):
            depth_rates = [float(depth_rates)] * num_blocks
        if len(depth_rates) != num_blocks:
            raise ValueError(
                f"stochastic_depth_rate has {len(depth_rates)} values for "
                f"{num_blocks} blocks (num_blocks)"
            )
        interctc_layer_idx = list(interctc_layer_idx or [])
        if interctc_layer_idx and not (
            0 < min(interctc_layer_idx) and max(interctc_layer_idx) < num_blocks
        ):
            raise ValueError(
                f"interctc_layer_idx {interctc_layer_idx} must lie in "
                f"1..{num_blocks - 1} (blocks before the last, 1-based)"
            )
        if chunk_size < 0 or left_chunks < -1 or max_dynamic_chunk < 1:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be >= 0, left_chunks ({left_chunks}) "
                f">= -1 and max_dynamic_chunk ({max_dynamic_chunk}) >= 1"
            )
        self._log_replaced_options(
            normalization,
            activation,
            activation_type,
            normalize_before,
            use_flash_attn and selfattention_layer_type == "selfattn",
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
        self.positionwise_layer_type = positionwise_layer_type
        self.pos_enc_layer_type = pos_enc_layer_type
        self.selfattention_layer_type = selfattention_layer_type
        self.interctc_layer_idx = interctc_layer_idx
        self.interctc_use_conditioning = interctc_use_conditioning
        self.conditioning_layer: Optional[torch.nn.Module] = None  # ESPnetASRModel's
        self.ctc_trim = ctc_trim
        self.layer_drop_rate = layer_drop_rate
        self.fuse_for_inference = fuse_for_inference
        self.fused = False
        batch_norm, pre_norm = structure["batch_norm"], structure["pre_norm"]
        sync = sync_batchnorm

        self.embed = make_input_layer(
            input_layer,
            input_size,
            output_size,
            make_positions(
                pos_enc_layer_type,
                output_size,
                positional_dropout_rate,
                max_pos_emb_len,
                structure["scale_input"],
                batch_norm,
                sync,
            ),
            batch_norm,
            pre_norm,
            dropout_rate,
            sync,
            padding_idx,
        )

        def ffn() -> FeedForward:
            return FeedForward(
                output_size,
                linear_units,
                dropout_rate,
                # ESPnet's convolutional FFNs use ReLU whatever activation_type
                activation if positionwise_layer_type == "linear" else "relu",
                batch_norm,
                sync,
                positionwise_layer_type,
                positionwise_conv_kernel_size,
            )

        def block(depth_rate: float) -> FusionFormerBlock:
            return FusionFormerBlock(
                output_size,
                SelfAttention(
                    output_size,
                    attention_heads,
                    attention_dropout_rate,
                    batch_norm,
                    sync,
                    ATTENTIONS[selfattention_layer_type],
                    zero_triu,
                    # as ESPnet: the relative attentions have no qk_norm
                    qk_norm and selfattention_layer_type == "selfattn",
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
                concat_after,
                batch_norm,
                float(depth_rate),
            )

        self.encoders = torch.nn.ModuleList([block(p) for p in depth_rates])
        self.after_norm = make_norm(pre_norm, output_size, sync)
        if bn_init_scale is None:
            bn_init_scale = structure["bn_init_scale"]
        scale_bn_inputs_(self, bn_init_scale)
        self._fused_copy = None  # (state key, fused copy); a cache, see fused_copy()

    @staticmethod
    def _log_replaced_options(
        normalization: str,
        activation: str,
        activation_type: str,
        normalize_before: bool,
        flash_attn: bool,
    ) -> None:
        """Log, once per encoder, the Conformer options this encoder replaces."""
        if activation_type != activation:
            logging.info(
                "fusionformer: activation_type=%s (Conformer) is replaced by "
                "activation=%s",
                activation_type,
                activation,
            )
        if not normalize_before:
            logging.warning(
                "fusionformer: normalize_before=False (a LayerNorm after each "
                "module) is not used: normalization=%s %s",
                normalization,
                "has no LayerNorm (a BatchNorm after every layer)"
                if normalization == "fusion"
                else "keeps its norms before each module",
            )
        if flash_attn:
            logging.info(
                "fusionformer: use_flash_attn is not used: the attention runs as "
                "plain matmuls (as ESPnet's without the flash_attn package)"
            )

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
    def _check_features(self, xs_pad: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``xs_pad`` is ``(B, T, F)`` features (``(B,
        T)`` token ids for ``input_layer: embed``)."""
        if self.embed.takes_tokens:
            if xs_pad.dim() != 2 or xs_pad.is_floating_point():
                raise ValueError(
                    "input_layer embed takes (batch, time) integer token ids, got "
                    f"{xs_pad.dtype} of shape {tuple(xs_pad.shape)}"
                )
            return
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

    def check_input(self, xs_pad: torch.Tensor, ilens: torch.Tensor) -> None:
        """Raise ``ValueError``/``TooShortUttError`` for input the model can't take.

        In training, values are not read on the host (that would stall a GPU once
        per batch): lengths are asserted on the device, and non-finite features
        are left to ESPnet's trainer, which skips a step whose loss is not finite.
        """
        self._check_features(xs_pad)
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
        ctc: Optional[torch.nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Encode a padded batch (ESPnet's encoder interface).

        Args:
            xs_pad: ``(B, T, F)`` features (``(B, T)`` token ids for ``embed``).
            ilens: ``(B,)`` valid frames per utterance.
            prev_states: unused (ESPnet interface).
            ctc: ESPnet's ``CTC``, for ``interctc_use_conditioning`` and
                ``ctc_trim``.

        Returns:
            ``(B, T', D)`` encoded frames, ``(B,)`` output lengths, ``None``; with
            ``interctc_layer_idx``, the first item is ``(xs, intermediate_outs)``
            with ``intermediate_outs`` a list of ``(block_idx, (B, T', D))``.
        """
        if self._use_fused_copy():
            return self.fused_copy().forward(xs_pad, ilens, ctc=ctc)  # checks input
        self.check_input(xs_pad, ilens)
        xs, olens, intermediate_outs = self._encode(xs_pad, ilens, ctc)
        if intermediate_outs:
            return (xs, intermediate_outs), olens, None
        return xs, olens, None

    def encode(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        ctc: Optional[torch.nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, F), (B,) -> (B, T', D), (B,)`` without checks or dispatch, and
        without the intermediate CTC outputs."""
        xs, olens, _ = self._encode(xs_pad, ilens, ctc)
        return xs, olens

    def _encode(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        ctc: Optional[torch.nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, torch.Tensor]]]:
        """``encode`` plus the intermediate outputs ``[(block_idx, (B, T', D))]``."""
        xs, pos_emb, valid = self.embed(xs_pad, ilens)  # (B, T', D), (B, T')
        chunk = (self.chunk_size, self.left_chunks)
        if self.training and self.dynamic_chunk_training:
            chunk = sample_chunk(
                xs.size(1),
                self.max_dynamic_chunk,
                xs.size(1) // self.max_dynamic_chunk,
                self.dynamic_left_chunks,
            )
        mask, att_mask = self._masks(valid, *chunk)
        run = [True] * len(self.encoders)
        if self.training and self.layer_drop_rate > 0:  # as ESPnet's MultiSequential
            draws = torch.empty(len(self.encoders)).uniform_()
            run = (draws >= self.layer_drop_rate).tolist()
        intermediate_outs = []
        for i, block in enumerate(self.encoders):
            if run[i]:
                xs = block(xs, mask, att_mask, pos_emb)[0]
            if i + 1 not in self.interctc_layer_idx:
                continue
            out = xs if self.after_norm is None else self.after_norm(xs, mask)
            intermediate_outs.append((i + 1, out))
            trim = self.ctc_trim and ctc is not None
            if not (self.interctc_use_conditioning or trim):
                continue
            probs = self._ctc(ctc).softmax(out)  # (B, T', V)
            if self.interctc_use_conditioning:
                xs = xs + self.conditioning_layer(probs)
            if trim:  # ESPnet's ctc_trim: drop trailing blank frames
                lengths = ctc_trim_lengths(probs, valid.sum(1))
                t = lengths.max()  # a tensor: the slice stays dynamic when traced
                xs = xs[:, :t]
                if pos_emb is not None and self.embed.pos_enc.relative:
                    centre = pos_emb.size(1) // 2
                    pos_emb = pos_emb[:, centre - t + 1 : centre + t]
                valid = valid_mask(lengths, xs.size(1))
                mask, att_mask = self._masks(valid, *chunk)
        if self.after_norm is not None:
            xs = self.after_norm(xs, mask)
        return xs, valid.sum(1), intermediate_outs

    def _masks(
        self, valid: torch.Tensor, chunk_size: int, left_chunks: int
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(B, T')`` valid frames -> BatchNorm mask ``(B, T', 1)`` and attention
        mask ``(B, 1, 1|T', T')`` (True: do not attend); ``None`` for no masking."""
        mask: Optional[torch.Tensor] = valid.unsqueeze(-1)  # (B, T', 1)
        att_mask: Optional[torch.Tensor] = ~valid[:, None, None, :]  # (B, 1, 1, T')
        if not self.training and not exporting() and bool(valid.all()):
            mask = att_mask = None  # nothing padded: skip the masking
        if chunk_size > 0:
            future = ~chunk_mask(valid.size(1), chunk_size, left_chunks, valid.device)
            att_mask = future if att_mask is None else att_mask | future
        return mask, att_mask

    def _ctc(self, ctc: Optional[torch.nn.Module]) -> torch.nn.Module:
        if ctc is None:
            raise ValueError(
                "interctc_use_conditioning needs the CTC module: call the encoder "
                "with ctc=model.ctc (ESPnetASRModel does)"
            )
        if self.interctc_use_conditioning and self.conditioning_layer is None:
            raise ValueError(
                "interctc_use_conditioning needs encoder.conditioning_layer (a "
                "Linear(vocabulary, output_size); ESPnetASRModel sets it)"
            )
        return ctc

    # -- streaming ---------------------------------------------------------------
    def forward_chunk(
        self,
        xs: torch.Tensor,
        offset: int,
        required_cache_size: int,
        att_cache: torch.Tensor,
        cnn_cache: torch.Tensor,
        ctc: Optional[torch.nn.Module] = None,
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
            ctc: ESPnet's ``CTC``, needed with ``interctc_use_conditioning``.

        Returns:
            ``(1, T', D)`` encoded frames, new ``att_cache`` and ``cnn_cache``.
        """
        if self.training:
            raise RuntimeError("forward_chunk is for inference: call encoder.eval()")
        if self._use_fused_copy():  # the copy checks the chunk
            return self.fused_copy().forward_chunk(
                xs, offset, required_cache_size, att_cache, cnn_cache, ctc
            )
        self._check_chunk(xs, offset, required_cache_size, att_cache, cnn_cache)
        if self.interctc_use_conditioning:
            self._ctc(ctc)
        lengths = torch.tensor([xs.size(1)], device=xs.device)
        xs, pos_emb, _ = self.embed(xs, lengths, offset)
        if pos_emb is not None:  # relative positions over the cached frames too
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
            if self.interctc_use_conditioning and i + 1 in self.interctc_layer_idx:
                out = xs if self.after_norm is None else self.after_norm(xs, None)
                xs = xs + self.conditioning_layer(ctc.softmax(out))
        if self.after_norm is not None:
            xs = self.after_norm(xs, None)
        new_att = torch.cat(att_caches, dim=0)  # (L, H, Tk, 2 d_k)
        if required_cache_size >= 0:
            new_att = new_att[:, :, max(new_att.size(2) - required_cache_size, 0) :]
        new_cnn = (
            torch.stack(cnn_caches) if cnn_caches else xs.new_zeros(0, 0, 0, 0)
        )  # (L, 1, K-1, D)
        return xs, new_att, new_cnn

    def streaming_obstacle(self) -> Optional[str]:
        """Why this encoder cannot encode chunk by chunk; ``None`` if it can."""
        if not all(
            b.conv_module is None or b.conv_module.lorder > 0 for b in self.encoders
        ):
            return (
                "the convolution module is not causal (streaming needs a causal "
                "convolution module): train with encoder_conf causal: true (or "
                "use_cnn_module: false)"
            )
        if self.positionwise_layer_type != "linear":
            return (
                f"positionwise_layer_type {self.positionwise_layer_type!r} "
                "convolves over future frames: it cannot stream (use linear)"
            )
        if not self.embed.pos_enc.streamable:
            return (
                f"pos_enc_layer_type {self.pos_enc_layer_type!r} convolves over "
                "future frames: it cannot stream"
            )
        if self.ctc_trim:
            return "ctc_trim trims the end of the utterance: it cannot stream"
        return None

    @property
    def streamable(self) -> bool:
        """Nothing looks ahead (see ``streaming_obstacle``)."""
        return self.streaming_obstacle() is None

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
        obstacle = self.streaming_obstacle()
        if obstacle is not None:
            raise ValueError(obstacle)
        if xs.dim() != (2 if self.embed.takes_tokens else 3) or xs.size(0) != 1:
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
