"""Every ESPnet ConformerEncoder option on FusionFormer: accepted with ESPnet's
default, and for each option fuse() stays exact, an utterance gives the same output
alone and in a padded batch, streaming works where the option allows it (a
``ValueError`` naming the key where it cannot) and the fused encoder exports."""

import inspect
import logging

import pytest
import torch
from conftest import FEATS, TINY
from espnet.nets.pytorch_backend.nets_utils import trim_by_ctc_posterior
from espnet2.asr.ctc import CTC
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_fusionformer import FusionFormerEncoder, fuse
from espnet_fusionformer.encoder import ctc_trim_lengths
from espnet_fusionformer.export import export_onnx, export_torchscript
from espnet_fusionformer.streaming import encode_chunk_by_chunk

VOCAB = 7
SELFATTN = dict(selfattention_layer_type="selfattn")
# option -> encoder_conf on top of conftest.TINY (macaron, rel_pos_type latest)
OPTIONS = {
    "conv2d1": dict(input_layer="conv2d1"),
    "conv2d2": dict(input_layer="conv2d2"),
    "linear": dict(input_layer="linear"),
    "embed": dict(input_layer="embed", padding_idx=0),
    "input_layer_none": dict(input_layer=None),
    "rel_pos_type_legacy": dict(rel_pos_type="legacy"),
    "legacy_rel_pos": dict(
        rel_pos_type="legacy",
        pos_enc_layer_type="legacy_rel_pos",
        selfattention_layer_type="legacy_rel_selfattn",
    ),
    "zero_triu": dict(zero_triu=True),
    "abs_pos": dict(pos_enc_layer_type="abs_pos", **SELFATTN),
    "scaled_abs_pos": dict(pos_enc_layer_type="scaled_abs_pos", **SELFATTN),
    "conv_pos": dict(pos_enc_layer_type="conv", **SELFATTN),
    "qk_norm": dict(pos_enc_layer_type="abs_pos", qk_norm=True, **SELFATTN),
    "conv1d": dict(positionwise_layer_type="conv1d"),
    "conv1d_linear": dict(
        positionwise_layer_type="conv1d-linear", positionwise_conv_kernel_size=4
    ),
    "no_macaron": dict(macaron_style=False),
    "no_cnn_module": dict(use_cnn_module=False),
    "concat_after": dict(concat_after=True),
    "interctc": dict(interctc_layer_idx=[1]),
    "self_conditioning": dict(interctc_layer_idx=[1], interctc_use_conditioning=True),
    "ctc_trim": dict(interctc_layer_idx=[1], ctc_trim=True),
    "stochastic_depth_layer_drop": dict(
        stochastic_depth_rate=[0.2, 0.1], layer_drop_rate=0.1
    ),
    "normalize_before_false": dict(normalize_before=False),
    "layernorm_tanh": dict(
        normalization="layernorm", activation_type="tanh", input_layer="linear"
    ),
}
NOT_STREAMABLE = {
    "conv_pos": "pos_enc_layer_type 'conv'",
    "conv1d": "positionwise_layer_type 'conv1d'",
    "conv1d_linear": "positionwise_layer_type 'conv1d-linear'",
    "ctc_trim": "ctc_trim",
}
# LayerNorms that stay in the fused form: they normalize per frame (or head)
KEEPS_LAYER_NORM = {"qk_norm", "layernorm_tanh"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(**conf):
    """A tiny encoder and the CTC its options need (``None`` if none)."""
    conf = {**TINY, **conf}
    size = conf["output_size"] if conf.get("input_layer", "") is None else FEATS
    torch.manual_seed(0)
    encoder = FusionFormerEncoder(size, **conf)
    ctc = None
    if encoder.interctc_layer_idx:
        ctc = CTC(odim=VOCAB, encoder_output_size=encoder.output_size())
        if encoder.interctc_use_conditioning:  # as ESPnetASRModel does
            encoder.conditioning_layer = torch.nn.Linear(VOCAB, encoder.output_size())
        if encoder.ctc_trim:  # confidently blank: trims to 5 frames
            with torch.no_grad():
                ctc.ctc_lo.bias[0] += 8.0
    return encoder, ctc


def inputs(encoder, lengths, seed=0):
    """Zero-padded features (token ids for ``embed``) and lengths."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lengths), max(lengths))
    if encoder.embed.takes_tokens:
        xs = torch.randint(1, FEATS, shape, generator=gen)
    else:
        xs = 2 * torch.randn(*shape, encoder.input_size, generator=gen) + 0.5
    ilens = torch.tensor(lengths)
    pad = torch.arange(max(lengths))[None, :] >= ilens[:, None]
    return xs.masked_fill(pad if xs.dim() == 2 else pad[..., None], 0), ilens


def warm_up(encoder, ctc):
    """Non-trivial BatchNorm parameters and running statistics; eval mode."""
    gen = torch.Generator().manual_seed(1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
            m.momentum = 0.5
    encoder.train()
    with torch.no_grad():
        for seed in range(2):
            encoder(*inputs(encoder, [70, 52, 40], seed=10 + seed), ctc=ctc)
    return encoder.eval(), ctc


def run(encoder, xs, ilens, ctc):
    """``[final, intermediate...]`` outputs and output lengths, eval mode."""
    with torch.no_grad():
        ys, olens, _ = encoder(xs, ilens, ctc=ctc)
    if isinstance(ys, tuple):
        ys = [ys[0], *[out for _, out in ys[1]]]
    else:
        ys = [ys]
    return ys, olens


def test_every_conformer_option_is_accepted_with_espnets_default():
    ours = inspect.signature(FusionFormerEncoder.__init__).parameters
    for name, param in inspect.signature(ConformerEncoder.__init__).parameters.items():
        assert name in ours, name
        default = ours[name].default
        assert default == param.default or (name, default) == (
            "interctc_layer_idx",
            None,  # ESPnet's [] (a mutable default)
        ), name


@pytest.mark.parametrize("option", OPTIONS)
def test_fuse_is_exact_and_padding_changes_nothing(option):
    encoder, ctc = warm_up(*build(**OPTIONS[option]))
    encoder.fuse_for_inference = False
    fused = fuse(encoder)
    norms = torch.nn.modules.batchnorm._BatchNorm
    if option not in KEEPS_LAYER_NORM:
        norms = (norms, torch.nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in fused.modules())

    xs, ilens = inputs(encoder, [61, 44, 29], seed=3)
    ref, ref_lens = run(encoder, xs, ilens, ctc)
    out, out_lens = run(fused, xs, ilens, ctc)
    assert torch.equal(ref_lens, out_lens)
    for a, b in zip(ref, out):  # (intermediate outputs: before any ctc_trim)
        valid = torch.arange(a.size(1))[None, :] < ref_lens[:, None]
        assert (a - b)[valid].abs().max() < 1e-4
        assert a[valid].abs().max() > 1e-2  # not trivially equal

    for model in (encoder, fused):  # the middle utterance alone
        together, lens = run(model, xs, ilens, ctc)
        alone, alone_lens = run(model, xs[1:2, :44], ilens[1:2], ctc)
        n = int(lens[1])
        assert n == int(alone_lens[0]) == alone[0].size(1)
        assert (together[0][1, :n] - alone[0][0]).abs().max() < 1e-4
    if option == "ctc_trim":
        assert ref_lens.max() < encoder.embed.output_lengths(ilens).max()


STREAMABLE = [option for option in OPTIONS if option not in NOT_STREAMABLE]


@pytest.mark.parametrize("option", STREAMABLE)
def test_chunk_by_chunk_equals_the_chunk_masked_forward(option):
    encoder, ctc = warm_up(*build(causal=True, **OPTIONS[option]))
    encoder.chunk_size, encoder.left_chunks = 4, 2  # eval: the fused copy
    xs, ilens = inputs(encoder, [110], seed=5)
    with torch.no_grad():
        full = run(encoder, xs, ilens, ctc)[0][0]
        streamed = encode_chunk_by_chunk(encoder, xs, 4, 2, ctc)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() < 1e-4


@pytest.mark.parametrize("option", NOT_STREAMABLE)
def test_options_that_cannot_stream_say_so(option):
    encoder, ctc = warm_up(*build(causal=True, **OPTIONS[option]))
    assert not encoder.streamable
    xs, _ = inputs(encoder, [40])
    empty = torch.zeros(0, 0, 0, 0)
    with pytest.raises(ValueError, match=NOT_STREAMABLE[option]):
        encoder.forward_chunk(xs, 0, -1, empty, empty, ctc)


def test_self_conditioning_needs_the_ctc():
    encoder, ctc = warm_up(*build(**OPTIONS["self_conditioning"], causal=True))
    xs, ilens = inputs(encoder, [40])
    with pytest.raises(ValueError, match="needs the CTC module"):
        encoder(xs, ilens)
    with pytest.raises(ValueError, match="needs the CTC module"):
        encoder.forward_chunk(xs, 0, -1, *[torch.zeros(0, 0, 0, 0)] * 2)
    encoder.conditioning_layer = None
    with pytest.raises(ValueError, match="conditioning_layer"):
        encoder.train()(xs, ilens, ctc=ctc)


# a few encoders that together carry every option that changes the exported graph
EXPORTS = {
    "linear-legacy-conv1d-concat-selfcond": dict(
        input_layer="linear",
        rel_pos_type="legacy",
        positionwise_layer_type="conv1d",
        concat_after=True,
        interctc_layer_idx=[1],
        interctc_use_conditioning=True,
    ),
    "embed-abs_pos-qk_norm-conv1d_linear-ctc_trim": dict(
        input_layer="embed",
        pos_enc_layer_type="abs_pos",
        qk_norm=True,
        positionwise_layer_type="conv1d-linear",
        macaron_style=False,
        interctc_layer_idx=[1],
        ctc_trim=True,
        **SELFATTN,
    ),
    "none-scaled_abs_pos-no_cnn": dict(
        input_layer=None, pos_enc_layer_type="scaled_abs_pos", use_cnn_module=False
    )
    | SELFATTN,
    "conv2d2-conv_pos": dict(input_layer="conv2d2", pos_enc_layer_type="conv")
    | SELFATTN,
}


@pytest.mark.parametrize("conf", EXPORTS.values(), ids=EXPORTS)
def test_export_matches_pytorch(conf, tmp_path):
    """Both exports check themselves against PyTorch on other lengths (1e-3)."""
    encoder, ctc = warm_up(*build(**conf))
    export_onnx(encoder, tmp_path / "encoder.onnx", ctc=ctc)
    export_torchscript(encoder, tmp_path / "encoder.pt", ctc=ctc)


def test_legacy_relative_positions_stop_at_the_query():
    """rel_pos_type legacy == latest with zero_triu (same weights): the positional
    term covers the keys at or before the query; latest alone differs."""
    legacy, _ = build(rel_pos_type="legacy")
    latest, _ = build(rel_pos_type="latest")
    zero_triu, _ = build(rel_pos_type="latest", zero_triu=True)
    warm_up(legacy, None)
    for model in (latest, zero_triu):
        model.load_state_dict(legacy.state_dict())
        model.eval()
    xs, ilens = inputs(legacy, [60, 45])
    ref = run(legacy, xs, ilens, None)[0][0]
    assert (run(zero_triu, xs, ilens, None)[0][0] - ref).abs().max() < 1e-5
    assert (run(latest, xs, ilens, None)[0][0] - ref).abs().max() > 1e-3


def test_stochastic_depth_and_layer_drop_skip_blocks_in_training_only():
    xs, ilens = inputs(build()[0], [50, 40])
    quiet = dict(dropout_rate=0.0, positional_dropout_rate=0.0)

    def train_out(encoder):
        encoder.train()
        with torch.no_grad():
            return encoder(xs, ilens)[0], encoder.embed(xs, ilens)[0]

    for conf in (dict(stochastic_depth_rate=1.0), dict(layer_drop_rate=1.0)):
        encoder, _ = build(**quiet, **conf)
        ys, embedded = train_out(encoder)
        assert torch.equal(ys, embedded)  # every block skipped
        plain, _ = build(**quiet)
        plain.load_state_dict(encoder.state_dict())
        for model in (encoder, plain):
            model.eval()
        assert torch.equal(
            run(encoder, xs, ilens, None)[0][0], run(plain, xs, ilens, None)[0][0]
        )
    encoder, _ = build(**quiet, stochastic_depth_rate=[0.0, 1.0])  # per block
    ys, embedded = train_out(encoder)
    with torch.no_grad():
        _, pos_emb, valid = encoder.embed(xs, ilens)
        first = encoder.encoders[0](
            embedded, valid[..., None], ~valid[:, None, None], pos_emb
        )[0]
    assert torch.allclose(ys, first)


def test_ctc_trim_lengths_are_espnets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, VOCAB, generator=gen)
    logits[:, :, 0] += torch.linspace(-4, 12, 30)  # blank takes over at the end
    probs = logits.softmax(-1)
    lengths = torch.tensor([30, 26, 12, 3])
    mask = (torch.arange(30)[None, :] < lengths[:, None])[:, None, :]
    _, trimmed, _ = trim_by_ctc_posterior(torch.zeros(4, 30, 2), probs, mask)
    expected = trimmed.squeeze(1).sum(1)
    assert torch.equal(ctc_trim_lengths(probs, lengths), expected)
    assert (expected < lengths).any()  # trimmed somewhere


def test_options_without_meaning_here_are_logged(caplog):
    with caplog.at_level(logging.INFO):
        build(normalize_before=False)
    assert "normalize_before=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build(**OPTIONS["abs_pos"])
    assert "use_flash_attn is not used" in caplog.text
    assert "activation_type=swish (Conformer) is replaced by activation=relu" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build(use_flash_attn=False, activation_type="relu")  # nothing to say
    assert caplog.text == ""
