"""ESPnet's own ConformerEncoder tests, run against ``encoder: fusionformer``.

Ported from ``test/espnet2/asr/encoder/test_conformer_encoder.py`` (espnet/espnet):
the same constructor arguments and inputs, with ``FusionFormerEncoder`` in place of
``ConformerEncoder``. Where ESPnet asserts, this encoder raises ``ValueError``.
Beyond "forward and backward run", each case checks the output frames (ESPnet's
subsampling rates, exact lengths for the padded utterance) and the interCTC
contract.
"""

import pytest
import torch
from espnet2.asr.ctc import CTC

from espnet_fusionformer import FusionFormerEncoder

INPUT_LAYERS = ["linear", "conv2d", "conv2d1", "conv2d2", "conv2d6", "conv2d8", "embed"]
POSITIONWISE = ["conv1d", "conv1d-linear"]
REL_POS = [
    ("legacy", "abs_pos", "selfattn"),
    ("latest", "rel_pos", "rel_selfattn"),
    ("legacy", "rel_pos", "rel_selfattn"),
    ("legacy", "legacy_rel_pos", "legacy_rel_selfattn"),
]
INTERCTC = [([], False), ([1], False), ([1], True)]
DEPTH = [0.0, 0.1, [0.1, 0.1]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ESPnet's matrix is the full product (504 cases, ~50 s here). Input layer x
# relative positions x interCTC runs in full (84 cases); the positionwise layer and
# the stochastic depth, which touch neither, rotate so that each of their values
# meets every input layer, every position type and every interCTC setting.
CASES = [
    (layer, POSITIONWISE[(5 * i + j) % 2], *rel_pos, *interctc, DEPTH[(4 * i + j) % 3])
    for i, layer in enumerate(INPUT_LAYERS)
    for j, rel_pos in enumerate(REL_POS)
    for interctc in INTERCTC
]

# frames out of the utterances of 32 and 28 frames: ESPnet's subsampling rates,
# exact convolution lengths ((L - kernel) // stride + 1 per convolution)
FRAMES = {
    "linear": (32, 28),
    "embed": (32, 28),
    "conv2d": (7, 6),
    "conv2d1": (28, 24),
    "conv2d2": (13, 11),
    "conv2d6": (4, 3),
    "conv2d8": (3, 2),
}


@pytest.mark.parametrize(
    "input_layer, positionwise_layer_type, rel_pos_type, pos_enc_layer_type, "
    "selfattention_layer_type, interctc_layer_idx, interctc_use_conditioning, "
    "stochastic_depth_rate",
    CASES,
)
def test_encoder_forward_backward(
    input_layer,
    positionwise_layer_type,
    rel_pos_type,
    pos_enc_layer_type,
    selfattention_layer_type,
    interctc_layer_idx,
    interctc_use_conditioning,
    stochastic_depth_rate,
):
    torch.manual_seed(0)
    encoder = FusionFormerEncoder(
        20,
        output_size=2,
        attention_heads=2,
        linear_units=4,
        num_blocks=2,
        input_layer=input_layer,
        macaron_style=False,
        rel_pos_type=rel_pos_type,
        pos_enc_layer_type=pos_enc_layer_type,
        selfattention_layer_type=selfattention_layer_type,
        activation_type="swish",
        use_cnn_module=True,
        cnn_module_kernel=3,
        positionwise_layer_type=positionwise_layer_type,
        interctc_layer_idx=interctc_layer_idx,
        interctc_use_conditioning=interctc_use_conditioning,
        stochastic_depth_rate=stochastic_depth_rate,
    )
    if input_layer == "embed":
        x = torch.randint(0, 10, [2, 32])
    else:
        x = torch.randn(2, 32, 20, requires_grad=True)
    x_lens = torch.LongTensor([32, 28])
    if len(interctc_layer_idx) > 0:
        ctc = None
        if interctc_use_conditioning:
            vocab_size = 5
            output_size = encoder.output_size()
            ctc = CTC(odim=vocab_size, encoder_output_size=output_size)
            encoder.conditioning_layer = torch.nn.Linear(vocab_size, output_size)
        y, olens, _ = encoder(x, x_lens, ctc=ctc)
        y, intermediate_outs = y
        assert [idx for idx, _ in intermediate_outs] == interctc_layer_idx
        assert intermediate_outs[0][1].shape == y.shape
    else:
        y, olens, _ = encoder(x, x_lens)
    assert y.shape == (2, FRAMES[input_layer][0], 2)
    assert olens.tolist() == list(FRAMES[input_layer])
    y.sum().backward()
    if input_layer != "embed":
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if interctc_use_conditioning:  # the conditioning is part of the output
        assert encoder.conditioning_layer.weight.grad.abs().sum() > 0


def test_the_rotation_meets_every_setting():
    layer, rel_pos, interctc = (lambda c: c[0]), (lambda c: c[2:5]), (lambda c: c[5:7])
    for rotating, values in ((lambda c: c[1], POSITIONWISE), (lambda c: c[7], DEPTH)):
        for fixed in (layer, rel_pos, interctc):
            pairs = {(str(fixed(c)), str(rotating(c))) for c in CASES}
            assert len(pairs) == len({str(fixed(c)) for c in CASES}) * len(values)


def test_encoder_invalid_layer_type():
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, rel_pos_type="dummy")
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, pos_enc_layer_type="dummy")
    with pytest.raises(ValueError):
        FusionFormerEncoder(
            20, pos_enc_layer_type="abc_pos", selfattention_layer_type="dummy"
        )


def test_encoder_invalid_rel_pos_combination():
    with pytest.raises(ValueError):
        FusionFormerEncoder(
            20,
            rel_pos_type="latest",
            pos_enc_layer_type="legacy_rel_pos",
            selfattention_layer_type="legacy_rel_sselfattn",
        )
    with pytest.raises(ValueError):
        FusionFormerEncoder(
            20,
            pos_enc_layer_type="rel_pos",
            selfattention_layer_type="legacy_rel_sselfattn",
        )
    with pytest.raises(ValueError):
        FusionFormerEncoder(
            20,
            pos_enc_layer_type="legacy_rel_pos",
            selfattention_layer_type="rel_sselfattn",
        )


def test_encoder_invalid_interctc_layer_idx():
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, num_blocks=2, interctc_layer_idx=[0, 1])
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, num_blocks=2, interctc_layer_idx=[1, 2])


def test_encoder_output_size():
    encoder = FusionFormerEncoder(20, output_size=256)
    assert encoder.output_size() == 256


def test_encoder_invalid_type():
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, input_layer="fff")


def test_encoder_invalid_stochastic_depth_rate():
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, num_blocks=2, stochastic_depth_rate=[0.1])
    with pytest.raises(ValueError):
        FusionFormerEncoder(20, num_blocks=2, stochastic_depth_rate=[0.1, 0.1, 0.1])
