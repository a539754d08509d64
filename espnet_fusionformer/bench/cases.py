"""What the benchmark compares: the encoders (built the same sizes) and the inputs.

Three encoders, each in the form a user would deploy:

- ``conformer``: ESPnet's ``ConformerEncoder`` (what users switch from);
- ``layernorm``: this package's code with ``normalization="layernorm"`` (pre-LN,
  Swish, GLU; same kernels, merged q/k/v, cached positions), fused;
- ``fusionformer``: ``FusionFormerEncoder`` (``normalization="fusion"``), fused;
  its training form (``unfused``) is timed too.

``fusionformer / layernorm`` is the architecture's share of the speed-up,
``layernorm / conformer`` the implementation's.
"""

import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FRAMES_PER_SECOND = 100  # 10 ms fbank hop
CONFORMER, LAYERNORM, FUSIONFORMER = "conformer", "layernorm", "fusionformer"
UNFUSED = "unfused"  # FusionFormer's training form in eval mode
MODELS = (CONFORMER, LAYERNORM, FUSIONFORMER)
NAMES = {
    CONFORMER: "ESPnet Conformer",
    LAYERNORM: "same code, LayerNorm",
    FUSIONFORMER: "FusionFormer (fused)",
    UNFUSED: "FusionFormer (unfused)",
}
CLASSES = {
    CONFORMER: "espnet2.asr.encoder.conformer_encoder.ConformerEncoder",
    LAYERNORM: "espnet_fusionformer.FusionFormerEncoder(normalization='layernorm')",
    FUSIONFORMER: "espnet_fusionformer.FusionFormerEncoder(normalization='fusion')",
}
# Streaming: FusionFormer chunks of 16 output frames (640 ms at subsampling 4),
# 4 chunks of left context; ContextualBlockConformer blocks of 40 frames, hop 16,
# look-ahead 16 (ESPnet's usual streaming setting), fed 640 ms of features a call.
STREAMING = dict(
    chunk_size=16, left_chunks=4, block_size=40, hop_size=16, look_ahead=16
)


def encoder_sizes(conf: Dict) -> Dict:
    """The sizes and options every encoder of a comparison shares (ESPnet's
    Conformer recipes: macaron, latest relative positions, Swish, pre-LN)."""
    return dict(
        output_size=conf["output_size"],
        attention_heads=conf["attention_heads"],
        linear_units=conf["linear_units"],
        num_blocks=conf["num_blocks"],
        cnn_module_kernel=conf["cnn_module_kernel"],
        input_layer=conf["input_layer"],
        macaron_style=True,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
        activation_type="swish",
        use_cnn_module=True,
        normalize_before=True,
    )


def make_batch(
    lengths: Sequence[int], feats: int, gen: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded random features ``(B, max(lengths), feats)`` and lengths ``(B,)``."""
    xs = torch.randn(len(lengths), max(lengths), feats, generator=gen)
    ilens = torch.tensor(list(lengths), dtype=torch.long)
    pad = torch.arange(max(lengths))[None, :, None] >= ilens[:, None, None]
    return xs.masked_fill(pad, 0.0), ilens


def calibrate(encoder: torch.nn.Module, conf: Dict) -> None:
    """A few training-mode passes so the BatchNorms have real running statistics."""
    gen = torch.Generator().manual_seed(conf["seed"] + 1)
    encoder.train()
    with torch.no_grad():
        for _ in range(2):
            xs, ilens = make_batch([200, 150], conf["input_size"], gen)
            encoder(xs, ilens)
    encoder.eval()


def espnet_conformer(conf: Dict, **extra) -> torch.nn.Module:
    """ESPnet's ``ConformerEncoder`` (rel_pos, Swish, macaron, pre-LN), eval mode."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    if "use_flash_attn" in inspect.signature(ConformerEncoder.__init__).parameters:
        extra["use_flash_attn"] = False  # no effect on CPU; explicit
    torch.manual_seed(conf["seed"])
    return ConformerEncoder(
        conf["input_size"],
        **encoder_sizes(conf),
        **extra,
    ).eval()


def same_code(conf: Dict, normalization: str, **extra) -> torch.nn.Module:
    """``FusionFormerEncoder`` of the shared sizes, calibrated, eval mode."""
    from espnet_fusionformer import FusionFormerEncoder

    torch.manual_seed(conf["seed"])
    encoder = FusionFormerEncoder(
        conf["input_size"],
        normalization=normalization,
        **encoder_sizes(conf),
        **extra,
    )
    calibrate(encoder, conf)
    return encoder


def build_models(conf: Dict) -> Dict[str, torch.nn.Module]:
    """``conformer``, ``layernorm`` (fused), ``fusionformer`` (fused) and
    ``unfused`` (FusionFormer's training form, timed as is), all in eval mode."""
    from espnet_fusionformer import fuse

    layernorm = same_code(conf, "layernorm")
    fusionformer = same_code(conf, "fusion")
    fusionformer.fuse_for_inference = False  # the unfused model, timed as is
    return {
        CONFORMER: espnet_conformer(conf),
        LAYERNORM: fuse(layernorm),
        FUSIONFORMER: fuse(fusionformer),
        UNFUSED: fusionformer,
    }


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(models: Dict[str, torch.nn.Module], conf: Dict) -> Dict:
    """Sizes of the comparison and the parameter count of every built module."""
    return dict(
        d_model=conf["output_size"],
        heads=conf["attention_heads"],
        blocks=conf["num_blocks"],
        units=conf["linear_units"],
        kernel=conf["cnn_module_kernel"],
        input_size=conf["input_size"],
        input_layer=conf["input_layer"],
        classes=dict(CLASSES),
        params={name: parameters(m) for name, m in models.items()},
    )


def seconds_label(frames: int) -> str:
    sec = frames / FRAMES_PER_SECOND
    return f"{sec:g} s" if frames != 67 else f"{sec:g} s chunk"


def latency_inputs(
    conf: Dict,
) -> Tuple[Dict[int, Tuple[torch.Tensor, torch.Tensor]], Tuple]:
    """Batch-1 inputs per length, and the padded batch of mixed lengths."""
    gen = torch.Generator().manual_seed(conf["seed"] + 2)
    feats = conf["input_size"]
    single = {frames: make_batch([frames], feats, gen) for frames in conf["lengths"]}
    return single, make_batch(conf["batch_lengths"], feats, gen)


def streaming_models(conf: Dict) -> Dict[str, torch.nn.Module]:
    """ESPnet's ``ContextualBlockConformerEncoder`` and the causal FusionFormer and
    LayerNorm twins (fused, ``forward_chunk``), the shared sizes."""
    from espnet2.asr.encoder.contextual_block_conformer_encoder import (
        ContextualBlockConformerEncoder,
    )

    from espnet_fusionformer import fuse

    torch.manual_seed(conf["seed"])
    # its own absolute block positions: only the sizes and shared options it takes
    accepted = inspect.signature(ContextualBlockConformerEncoder.__init__).parameters
    shared = {
        k: v
        for k, v in encoder_sizes(conf).items()
        if k in accepted and k != "selfattention_layer_type"
    }
    cbc = ContextualBlockConformerEncoder(
        conf["input_size"],
        block_size=STREAMING["block_size"],
        hop_size=STREAMING["hop_size"],
        look_ahead=STREAMING["look_ahead"],
        **shared,
    ).eval()
    chunks = dict(
        causal=True,
        chunk_size=STREAMING["chunk_size"],
        left_chunks=STREAMING["left_chunks"],
    )
    return {
        CONFORMER: cbc,
        LAYERNORM: fuse(same_code(conf, "layernorm", **chunks)),
        FUSIONFORMER: fuse(same_code(conf, "fusion", **chunks)),
    }


def batch_label(lengths: List[int]) -> str:
    return f"batch {len(lengths)} mixed ({sum(lengths) / FRAMES_PER_SECOND:g} s audio)"
