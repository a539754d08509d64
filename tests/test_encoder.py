"""FusionFormerEncoder: structure, fold exactness, padding invariance, bad input."""

import pytest
import torch
from conftest import FEATS, batch, make_encoder, warm_up
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError

from espnet_fusionformer import FusionFormerEncoder, fuse
from espnet_fusionformer.blocks import ConvModule

NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)


def count(module, types):
    return sum(isinstance(m, types) for m in module.modules())


def outputs(encoder, lengths, seed=0):
    xs, ilens = batch(lengths, seed)
    with torch.no_grad():
        ys, olens, _ = encoder(xs, ilens)
    return ys, olens


@pytest.mark.parametrize(
    "conf",
    [
        {},
        {"input_layer": "conv2d6"},
        {"input_layer": "conv2d8", "macaron_style": False},
        {"use_cnn_module": False, "activation": "swish"},
    ],
    ids=["conv2d", "conv2d6", "conv2d8-no-macaron", "no-cnn-swish"],
)
def test_fuse_is_exact_and_removes_every_norm(conf):
    encoder = warm_up(make_encoder(**conf))
    encoder.fuse_for_inference = False
    fused = fuse(encoder)

    assert count(encoder, NORMS) > 0
    assert count(fused, NORMS) == 0
    assert fused.fused and not encoder.fused  # the original is untouched
    ref, ref_lens = outputs(encoder, [83, 60, 41])
    out, out_lens = outputs(fused, [83, 60, 41])
    assert torch.equal(ref_lens, out_lens)
    valid = torch.arange(ref.size(1))[None, :] < ref_lens[:, None]
    assert (ref - out)[valid].abs().max() < 1e-4
    assert ref[valid].abs().max() > 1e-2  # not trivially equal


def test_fuse_merges_qkv_and_is_idempotent():
    encoder = warm_up(make_encoder())
    fused = fuse(encoder)
    attention = fused.encoders[0].attention
    assert attention.linear_q is None and attention.linear_qkv.out_features == 3 * 32
    again = fuse(fused)
    assert torch.equal(outputs(fused, [50])[0], outputs(again, [50])[0])


def test_fuse_refuses_training_mode():
    encoder = make_encoder().train()
    with pytest.raises(RuntimeError, match="eval mode"):
        fuse(encoder)


def test_eval_forward_uses_folded_copy_and_refreshes_it():
    encoder = warm_up(make_encoder())
    encoder.fuse_for_inference = True
    first = outputs(encoder, [60])[0]
    fused = encoder.fused_copy()
    assert count(fused, NORMS) == 0
    assert encoder.fused_copy() is fused  # built once per eval phase
    encoder.fuse_for_inference = False
    assert (outputs(encoder, [60])[0] - first).abs().max() < 1e-4
    # a training step, then eval again: the fused copy must follow the new weights
    encoder.fuse_for_inference = True
    encoder.train()
    with torch.no_grad():
        encoder.encoders[0].feed_forward.w_2.layer.weight.mul_(3)
    encoder.eval()
    assert encoder.fused_copy() is not fused
    assert (outputs(encoder, [60])[0] - first).abs().max() > 1e-3
    # load_state_dict in eval mode drops the copy as well
    state = {k: v.clone() for k, v in make_encoder().state_dict().items()}
    stale = encoder.fused_copy()
    encoder.load_state_dict(state)
    assert encoder.fused_copy() is not stale


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("input_layer", ["conv2d", "conv2d6", "conv2d8"])
def test_padding_invariance(fused, input_layer):
    encoder = warm_up(make_encoder(input_layer=input_layer))
    encoder.fuse_for_inference = False
    if fused:
        encoder = fuse(encoder)
    xs, ilens = batch([137, 66], seed=3)
    with torch.no_grad():
        together, olens, _ = encoder(xs, ilens)
        alone, alone_lens, _ = encoder(xs[1:, :66], ilens[1:])
    assert int(olens[1]) == int(alone_lens[0]) == alone.size(1)
    assert (together[1, : alone.size(1)] - alone[0]).abs().max() < 1e-4


def test_training_statistics_ignore_padding():
    """Garbage in padded frames changes neither valid outputs nor running stats."""
    xs, ilens = batch([80, 50], seed=4)
    noisy = xs.clone()
    noisy[1, 50:] = 1e3 * torch.randn(30, FEATS)
    results = []
    for inputs in (xs, noisy):
        encoder = make_encoder(dropout_rate=0.0, positional_dropout_rate=0.0).train()
        ys, olens, _ = encoder(inputs, ilens)
        stats = [m.running_var.clone() for m in encoder.modules() if hasattr(m, "sync")]
        results.append((ys, olens, stats))
    (a, lens, sa), (b, _, sb) = results
    valid = torch.arange(a.size(1))[None, :] < lens[:, None]
    assert (a - b)[valid].abs().max() < 1e-4
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(sa, sb))


def test_state_dict_is_plain_and_loads_into_a_fresh_model():
    encoder = warm_up(make_encoder())
    keys = encoder.state_dict().keys()
    assert "encoders.0.feed_forward.w_1.bn.running_mean" in keys
    assert "encoders.0.attention.linear_q.layer.weight" in keys
    clone = make_encoder()
    clone.load_state_dict(encoder.state_dict())
    clone.eval()
    assert torch.equal(outputs(encoder, [40])[0], outputs(clone, [40])[0])


@pytest.mark.parametrize(
    "normalization,layer_norms,batch_norms",
    # per block: fusion BN on 4 FFN linears, q/k/v/out, 3 conv layers = 11;
    # subsampling: 2 convs + projection. Conformer-like: 1 BN in the conv module.
    [
        ("fusion", 0, 2 * 11 + 3),
        ("layernorm", 2 * 5 + 1, 2),
        ("batchnorm_in_place", 0, 2 * 6 + 1),
        ("none", 0, 2),
    ],
)
def test_normalization_ablations(normalization, layer_norms, batch_norms):
    encoder = make_encoder(normalization=normalization)
    assert count(encoder, torch.nn.LayerNorm) == layer_norms
    assert count(encoder, torch.nn.modules.batchnorm._BatchNorm) == batch_norms
    conv = encoder.encoders[0].conv_module
    assert conv.glu == (normalization != "fusion")
    if normalization == "fusion":  # ReLU, fused into the BatchNorms before it
        assert conv.activation is None and conv.depthwise_conv.relu
    else:
        assert isinstance(conv.activation, torch.nn.SiLU)
    ys, olens, _ = encoder.train()(*batch([64, 40]))
    ys.sum().backward()
    assert torch.isfinite(ys).all() and ys.shape == (2, 15, 32)


def test_glu_removal_halves_the_first_pointwise_conv():
    fusion = ConvModule(32, 7, "relu", batch_norm=True, glu=False)
    conformer = ConvModule(32, 7, "swish", batch_norm=False, glu=True)
    assert fusion.pointwise_conv1.layer.out_features == 32
    assert conformer.pointwise_conv1.layer.out_features == 64


def test_conformer_encoder_conf_is_accepted():
    """An ESPnet conformer encoder_conf works after changing only ``encoder:``."""
    encoder = make_encoder(
        normalize_before=True,
        macaron_style=True,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
        activation_type="swish",
        use_cnn_module=True,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        input_layer="conv2d",
    )
    assert encoder.activation == "relu"  # FusionFormer replaces Swish
    reference = make_encoder(normalization="layernorm", activation_type="tanh")
    assert reference.activation == "tanh"
    assert isinstance(reference.encoders[0].conv_module.activation, torch.nn.Tanh)


@pytest.mark.parametrize(
    "conf,message",
    [
        ({"normalization": "groupnorm"}, "unknown normalization 'groupnorm'"),
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"activation_type": "gelu"}, "unknown activation_type 'gelu'"),
        ({"input_layer": "fff"}, "unknown input_layer 'fff'"),
        ({"input_layer": None}, "input_layer None needs input_size"),
        ({"cnn_module_kernel": 8}, "must be odd"),
        ({"attention_heads": 5}, "not divisible"),
        ({"rel_pos_type": "dummy"}, "unknown rel_pos_type 'dummy'"),
        ({"pos_enc_layer_type": "dummy"}, "unknown pos_enc_layer_type 'dummy'"),
        (
            {"pos_enc_layer_type": "abc_pos", "selfattention_layer_type": "dummy"},
            "unknown pos_enc_layer_type",
        ),
        ({"selfattention_layer_type": "dummy"}, "unknown selfattention_layer_type"),
        ({"selfattention_layer_type": "selfattn"}, "does not go with"),
        ({"pos_enc_layer_type": "abs_pos"}, "does not go with"),
        (
            {
                "pos_enc_layer_type": "legacy_rel_pos",
                "selfattention_layer_type": "legacy_rel_selfattn",
            },
            "rel_pos_type 'latest' does not go with",
        ),
        ({"positionwise_layer_type": "conv2d"}, "unknown positionwise_layer_type"),
        ({"stochastic_depth_rate": [0.1]}, "stochastic_depth_rate has 1 values"),
        ({"stochastic_depth_rate": [0.1] * 3}, "stochastic_depth_rate has 3"),
        ({"interctc_layer_idx": [0, 1]}, r"interctc_layer_idx \[0, 1\] must lie"),
        ({"interctc_layer_idx": [1, 2]}, "interctc_layer_idx"),
        (
            {
                "pos_enc_layer_type": "conv",
                "output_size": 24,
                "rel_pos_type": "legacy",
                "selfattention_layer_type": "selfattn",
            },
            "do not split into 16 groups",
        ),
    ],
)
def test_bad_options_are_rejected(conf, message):
    with pytest.raises(ValueError, match=message):
        make_encoder(**conf)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="no_such_option"):
        FusionFormerEncoder(FEATS, no_such_option=1)


@pytest.mark.parametrize("training", [True, False])
def test_bad_input_is_rejected(training):
    encoder = make_encoder().train(training)
    xs, ilens = batch([40, 30])
    with pytest.raises(ValueError, match="feature size 21 does not match"):
        encoder(torch.randn(2, 40, FEATS + 1), ilens)
    with pytest.raises(ValueError, match="exceeds the padded time axis"):
        encoder(xs, torch.tensor([41, 30]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder(xs.index_put((torch.tensor([0]),), torch.tensor(float("nan"))), ilens)
    with pytest.raises(ValueError, match=r"expected \(batch, time, 20\)"):
        encoder(xs[0], ilens)
    with pytest.raises(TooShortUttError, match="too short for the subsampling"):
        encoder(xs, torch.tensor([40, 6]))
    ys, olens, _ = encoder(xs[:, :7], torch.tensor([7, 7]))  # the shortest that works
    assert olens.tolist() == [1, 1]
