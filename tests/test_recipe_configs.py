"""Conformer configs modelled on ESPnet's published egs2 recipes switch to
FusionFormer by changing only ``encoder:``: ``ASRTask.build_model`` builds them,
they train a step through the unchanged ``ESPnetASRModel``, and interCTC and
self-conditioned CTC models decode through the unchanged ``Speech2Text``.

Each ``encoder_conf`` keeps the recipe's keys and values except the sizes (tiny,
for the CPU). Each config also builds with ``encoder: conformer``, so it is one
ESPnet itself accepts.
"""

import copy

import pytest
import soundfile
import torch
import yaml
from conftest import TINY, asr_config
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask

from espnet_fusionformer import FusionFormerEncoder

SIZES = dict(
    output_size=TINY["output_size"],
    attention_heads=TINY["attention_heads"],
    linear_units=TINY["linear_units"],
    num_blocks=3,
    cnn_module_kernel=TINY["cnn_module_kernel"],
)
DROPOUTS = dict(dropout_rate=0.1, positional_dropout_rate=0.1)
LATEST = dict(
    normalize_before=True,
    macaron_style=True,
    rel_pos_type="latest",
    pos_enc_layer_type="rel_pos",
    selfattention_layer_type="rel_selfattn",
    activation_type="swish",
    use_cnn_module=True,
)
# librispeech_100/asr1/conf/tuning/train_conformer_{interctc,scctc}.yaml: CTC only,
# intermediate CTC after blocks 6 and 12 of 18 (here 1 and 2 of 3)
CTC_MODEL = dict(
    ctc_weight=1.0, interctc_weight=0.66, lsm_weight=0.1, length_normalized_loss=False
)
HUBERT_DIM = 1024  # s3prl HuBERT/WavLM large features (frontend: s3prl)

RECIPES = {
    "librispeech_100-interctc": dict(
        encoder_conf=dict(
            **DROPOUTS,
            attention_dropout_rate=0.1,
            input_layer="conv2d",
            **LATEST,
            interctc_layer_idx=[1, 2],
        ),
        model_conf=CTC_MODEL,
    ),
    "librispeech_100-self-conditioned-ctc": dict(
        encoder_conf=dict(
            **DROPOUTS,
            attention_dropout_rate=0.1,
            input_layer="conv2d",
            **LATEST,
            interctc_layer_idx=[1, 2],
            interctc_use_conditioning=True,
        ),
        model_conf=CTC_MODEL,
    ),
    # s3prl recipes (e.g. librispeech/asr1 hubert_large_ll60k): features of 1024
    # dims at 20 ms, conv2d2; here fed directly (frontend: null, no download)
    "s3prl-hubert-conv2d2": dict(
        encoder_conf=dict(
            **DROPOUTS,
            attention_dropout_rate=0.0,
            input_layer="conv2d2",
            normalize_before=True,
            rel_pos_type="latest",
            pos_enc_layer_type="rel_pos",
            selfattention_layer_type="rel_selfattn",
            activation_type="swish",
        ),
        frontend=None,
        frontend_conf={},
        input_size=HUBERT_DIM,
    ),
    # aishell/asr1/conf/tuning/train_asr_conformer.yaml: no rel_pos_type key, so
    # ESPnet's default (legacy) relative positions
    "aishell-no-rel_pos_type": dict(
        encoder_conf=dict(
            **DROPOUTS,
            attention_dropout_rate=0.0,
            input_layer="conv2d",
            normalize_before=True,
            pos_enc_layer_type="rel_pos",
            selfattention_layer_type="rel_selfattn",
            activation_type="swish",
            macaron_style=True,
            use_cnn_module=True,
        ),
    ),
    # older conformer configs name the legacy layers themselves
    "legacy-rel-pos-names": dict(
        encoder_conf=dict(
            **DROPOUTS,
            input_layer="conv2d",
            normalize_before=True,
            macaron_style=True,
            pos_enc_layer_type="legacy_rel_pos",
            selfattention_layer_type="legacy_rel_selfattn",
            activation_type="swish",
            use_cnn_module=True,
        ),
    ),
    "conv2d6": dict(
        encoder_conf=dict(**DROPOUTS, input_layer="conv2d6", **LATEST),
    ),
    "layer-drop-stochastic-depth": dict(
        encoder_conf=dict(
            **DROPOUTS,
            input_layer="conv2d",
            **LATEST,
            layer_drop_rate=0.1,
            stochastic_depth_rate=[0.0, 0.05, 0.1],
        ),
    ),
}


def config(name: str, encoder: str) -> dict:
    """The recipe's config with ``encoder: <encoder>`` (nothing else changes)."""
    recipe = copy.deepcopy(RECIPES[name])
    conf = asr_config("conformer")
    conf["encoder_conf"] = {**SIZES, **recipe.pop("encoder_conf")}
    conf["model_conf"] = {**conf["model_conf"], **recipe.pop("model_conf", {})}
    conf.update(recipe)
    conf["encoder"] = encoder
    return conf


def build(tmp_path, conf: dict):
    path = tmp_path / f"{conf['encoder']}.yaml"
    path.write_text(yaml.safe_dump(conf))
    args = ASRTask.get_parser().parse_args(["--config", str(path)])
    torch.manual_seed(0)
    return ASRTask.build_model(args), args


def batch(conf: dict):
    """Two utterances: 1 s and 0.75 s of audio, or 50 and 38 feature frames."""
    gen = torch.Generator().manual_seed(0)
    if conf["frontend"] is None:
        lengths = torch.tensor([50, 38])
        speech = torch.randn(2, 50, conf["input_size"], generator=gen)
    else:
        lengths = torch.tensor([16000, 12000])
        speech = torch.randn(2, 16000, generator=gen)
    text = torch.tensor([[4, 5, 6], [7, 8, -1]])
    return speech, lengths, text, torch.tensor([3, 2])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_switches_to_fusionformer_and_trains(name, tmp_path):
    conformer, _ = build(tmp_path, config(name, "conformer"))
    assert type(conformer.encoder).__name__ == "ConformerEncoder"
    conf = config(name, "fusionformer")
    model, _ = build(tmp_path, conf)
    encoder = model.encoder
    assert isinstance(encoder, FusionFormerEncoder)
    assert encoder.embed.input_layer == conf["encoder_conf"]["input_layer"]
    if conf["encoder_conf"].get("interctc_use_conditioning"):
        assert isinstance(encoder.conditioning_layer, torch.nn.Linear)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):  # a step, then the loss it changed
        loss, stats, _ = model(*batch(conf))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] != losses[0]
    for idx in conf["encoder_conf"].get("interctc_layer_idx", []):
        assert torch.isfinite(stats[f"loss_interctc_layer{idx}"])


@pytest.mark.parametrize(
    "name", ["librispeech_100-interctc", "librispeech_100-self-conditioned-ctc"]
)
def test_interctc_models_decode_with_speech2text(name, tmp_path, tiny_data):
    model, args = build(tmp_path, config(name, "fusionformer"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    speech2text = Speech2Text(
        asr_train_config=tmp_path / "config.yaml",
        asr_model_file=tmp_path / "model.pth",
        ctc_weight=1.0,
        lm_weight=0.0,
        beam_size=2,
    )
    speech = torch.tensor(soundfile.read(tiny_data / "utt00.wav")[0])
    results, interctc_results = speech2text(speech)  # as ESPnet's inference
    assert isinstance(results[0][0], str)
    assert sorted(interctc_results) == [1, 2]  # the intermediate CTC hypotheses

    asr_model = speech2text.asr_model  # eval: the fused copy, with the CTC
    lengths = torch.tensor([speech.numel()])
    with torch.no_grad():
        encoded, _ = asr_model.encode(speech[None].float(), lengths)
        if asr_model.encoder.interctc_use_conditioning:  # the conditioning is used
            asr_model.encoder.conditioning_layer.weight.mul_(0)
            asr_model.encoder.train().eval()  # rebuild the fused copy
            unconditioned, _ = asr_model.encode(speech[None].float(), lengths)
            assert (encoded[0] - unconditioned[0]).abs().max() > 1e-3
    assert isinstance(encoded, tuple) and len(encoded[1]) == 2  # intermediate outs
