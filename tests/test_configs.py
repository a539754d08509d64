"""Every shipped config builds in ESPnet, and every twin pair differs only where it
should.

Training configs: the top-level ``conf/<corpus>/`` (sized like ESPnet's published
Conformer recipes) and the espeak recipe's ``egs2/espeak/asr1/conf/``. Each is
parsed by ``ASRTask``'s own argument parser (so a key ESPnet does not know fails)
and built with ``ASRTask.build_model`` using a tiny token list. A FusionFormer
config's twin is the file named with ``conformer`` instead of ``fusionformer``:
everything but ``encoder``/``encoder_conf`` is identical, and the fusionformer
``encoder_conf`` lists the twin's conformer keys with the same values (except
those in ``KEPT``), then FusionFormer's own keys. The
recipe's ablation configs differ from ``train_fusionformer.yaml`` only in
``encoder_conf.normalization``.
"""

import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONF = ROOT / "egs2" / "espeak" / "asr1" / "conf"
TRAIN_CONFIGS = sorted(
    [*(ROOT / "conf").rglob("train_*.yaml"), *RECIPE_CONF.glob("train_*.yaml")]
)
DECODE_CONFIGS = sorted(
    [*(ROOT / "conf").rglob("decode_*.yaml"), *RECIPE_CONF.glob("decode_*.yaml")]
)
ABLATIONS = {
    "train_fusionformer_bn_in_place.yaml": "batchnorm_in_place",
    "train_fusionformer_no_norm.yaml": "none",
}
STREAMING = "train_fusionformer_streaming.yaml"
STREAMING_KEYS = {
    "causal",
    "chunk_size",
    "left_chunks",
    "dynamic_chunk_training",
    "max_dynamic_chunk",
    "dynamic_left_chunks",
}


def conformer_keys() -> set:
    """Every option of ESPnet's ConformerEncoder."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    return set(inspect.signature(ConformerEncoder.__init__).parameters) - {"self"}


# FusionFormer's own keys; a fusionformer encoder_conf may use these and every
# ConformerEncoder key.
FUSIONFORMER_KEYS = {"normalization", "activation", *STREAMING_KEYS}
# Where a fusionformer config keeps a value its twin does not spell out: the twin
# relies on ESPnet's default, the fusionformer config keeps what it meant before.
KEPT = {"conf/aishell/train_asr_fusionformer.yaml": {"rel_pos_type": "latest"}}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def twin_pairs():
    pairs = []
    for path in TRAIN_CONFIGS:
        if "fusionformer" not in path.name or path.name in {*ABLATIONS, STREAMING}:
            continue
        pairs.append(
            (path, path.with_name(path.name.replace("fusionformer", "conformer")))
        )
    return pairs


@pytest.fixture(scope="module")
def token_list(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text("\n".join(["<blank>", "<unk>", "A", "B", "<space>", "<sos/eos>"]))
    return path


def test_configs_are_found():
    names = {rel(p) for p in TRAIN_CONFIGS}
    assert {
        "conf/aishell/train_asr_fusionformer.yaml",
        "conf/aishell/train_asr_conformer.yaml",
        "egs2/espeak/asr1/conf/train_fusionformer.yaml",
        "egs2/espeak/asr1/conf/train_conformer.yaml",
        "egs2/espeak/asr1/conf/train_fusionformer_bn_in_place.yaml",
        "egs2/espeak/asr1/conf/train_fusionformer_no_norm.yaml",
        "egs2/espeak/asr1/conf/train_smoke_fusionformer.yaml",
    } <= names
    assert any(
        n.startswith("conf/librispeech_100/train_asr_fusionformer") for n in names
    )


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=rel)
def test_config_builds(path, token_list):
    from espnet2.tasks.asr import ASRTask

    conf = load(path)
    args = ASRTask.get_parser().parse_args(
        ["--config", str(path), "--token_list", str(token_list), "--normalize", "none"]
    )
    model = ASRTask.build_model(args)
    encoder = type(model.encoder).__name__
    expected = {"fusionformer": "FusionFormerEncoder", "conformer": "ConformerEncoder"}
    assert encoder == expected[conf["encoder"]]
    assert model.encoder.output_size() == conf["encoder_conf"]["output_size"]
    n_blocks = len(model.encoder.encoders)
    assert n_blocks == conf["encoder_conf"]["num_blocks"]
    if conf["encoder"] == "fusionformer":
        assert set(conf["encoder_conf"]) <= FUSIONFORMER_KEYS | conformer_keys()


@pytest.mark.parametrize(
    "fusionformer, conformer", twin_pairs(), ids=[rel(p) for p, _ in twin_pairs()]
)
def test_twins_differ_only_in_encoder(fusionformer, conformer):
    assert conformer.exists(), f"{rel(fusionformer)} has no twin {rel(conformer)}"
    ff, cf = load(fusionformer), load(conformer)
    assert (ff.pop("encoder"), cf.pop("encoder")) == ("fusionformer", "conformer")
    ff_enc, cf_enc = ff.pop("encoder_conf"), cf.pop("encoder_conf")
    assert ff == cf  # decoder, model, frontend, optimizer, scheduler, epochs, batch
    assert {"output_size", "attention_heads", "linear_units", "num_blocks"} <= set(
        cf_enc
    )
    # the same conformer keys with the same values, then FusionFormer's own
    kept = KEPT.get(rel(fusionformer), {})
    assert {k: v for k, v in ff_enc.items() if k not in FUSIONFORMER_KEYS} == {
        **cf_enc,
        **kept,
    }
    assert ff_enc["normalization"] == "fusion"


@pytest.mark.parametrize("name, normalization", ABLATIONS.items())
def test_ablations_differ_only_in_normalization(name, normalization):
    base, ablation = (
        load(RECIPE_CONF / "train_fusionformer.yaml"),
        load(RECIPE_CONF / name),
    )
    assert ablation["encoder_conf"].pop("normalization") == normalization
    assert base["encoder_conf"].pop("normalization") == "fusion"
    assert ablation == base


def test_streaming_config_differs_only_in_streaming_keys():
    base, streaming = (
        load(RECIPE_CONF / "train_fusionformer.yaml"),
        load(RECIPE_CONF / STREAMING),
    )
    added = {k: streaming["encoder_conf"].pop(k) for k in STREAMING_KEYS}
    assert added["causal"] is True and added["dynamic_chunk_training"] is True
    assert streaming == base


@pytest.mark.parametrize("path", DECODE_CONFIGS, ids=rel)
def test_decode_config_keys_are_speech2text_options(path):
    from espnet2.bin.asr_inference import Speech2Text

    options = set(inspect.signature(Speech2Text.__init__).parameters)
    conf = load(path)
    assert conf and set(conf) <= options, set(conf) - options
