"""Through ESPnet's own objects and CLIs: registration, ASRTask, asr_train,
Speech2Text, pack and espnet_model_zoo."""

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from conftest import asr_config, asr_train_args, espnet
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask

import espnet_fusionformer
from espnet_fusionformer import FusionFormerEncoder, fuse

NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)


def build(tmp_path: Path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ASRTask.get_parser().parse_args(["--config", str(path)])
    return ASRTask.build_model(args)


def test_fresh_interpreter_offers_the_encoder(tmp_path):
    """The .pth hook registers the encoder without anyone importing the plugin."""
    proc = espnet("espnet2.bin.asr_train", "--help", cwd=tmp_path)
    choices = [line for line in proc.stdout.splitlines() if "--encoder {" in line]
    assert choices and "fusionformer" in choices[0]


def test_register_is_idempotent_and_covers_speech_tasks():
    import espnet2.tasks.asr as asr
    import espnet2.tasks.slu as slu
    import espnet2.tasks.st as st

    espnet_fusionformer.register()
    espnet_fusionformer.register(["espnet2.tasks.asr"])
    for task in (asr, st, slu):
        assert task.encoder_choices.get_class("fusionformer") is FusionFormerEncoder


@pytest.mark.parametrize(
    "normalization", ["fusion", "layernorm", "batchnorm_in_place", "none"]
)
def test_asrtask_builds_and_trains_a_step(tmp_path, normalization):
    model = build(tmp_path, asr_config(normalization=normalization))
    assert isinstance(model.encoder, FusionFormerEncoder)
    assert model.encoder.normalization == normalization
    speech = torch.randn(2, 16000)
    text = torch.tensor([[4, 5, 6], [7, 8, -1]])
    loss, stats, _ = model(
        speech, torch.tensor([16000, 12000]), text, torch.tensor([3, 2])
    )
    loss.backward()
    assert torch.isfinite(loss) and stats["loss_ctc"] is not None


def test_fuse_a_whole_asr_model(tmp_path):
    model = build(tmp_path, asr_config()).eval()
    fused = fuse(model)
    assert sum(isinstance(m, NORMS) for m in fused.encoder.modules()) == 0
    speech, lengths = torch.randn(2, 16000), torch.tensor([16000, 9000])
    model.encoder.fuse_for_inference = False
    with torch.no_grad():
        ref, ref_lens = model.encode(speech, lengths)
        out, out_lens = fused.encode(speech, lengths)
    assert torch.equal(ref_lens, out_lens)
    assert (ref - out).abs().max() < 1e-4


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Two epochs of ``python -m espnet2.bin.asr_train`` on the tiny data dir."""
    exp = tmp_path_factory.mktemp("exp")
    args = asr_train_args(exp, tiny_data, exp / "asr")
    proc = espnet("espnet2.bin.asr_train", *args, cwd=exp)
    (exp / "asr" / "train.log").write_text(proc.stderr)  # as asr.sh keeps it
    return exp / "asr"


def test_asr_train_writes_a_checkpoint_and_learns(trained):
    assert (trained / "valid.loss.best.pth").exists()
    log = (trained / "train.log").read_text()
    valid_loss = [
        float(re.search(r"\[valid\].* loss=([0-9.]+)", line).group(1))
        for line in log.splitlines()
        if "epoch results" in line
    ]
    assert len(valid_loss) == 2 and valid_loss[1] < valid_loss[0]
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["encoder"] == "fusionformer"
    state = torch.load(trained / "valid.loss.best.pth", map_location="cpu")
    assert any(k.endswith("bn.running_var") for k in state)  # plain training form


def _decode(speech2text, wavs):
    """Best hypothesis per wav: (token ids, score)."""
    best = [speech2text(soundfile.read(w)[0])[0] for w in wavs]
    return [(token_int, float(hyp.score)) for _, _, token_int, hyp in best]


def test_speech2text_decodes_fused_and_unfused_identically(trained, tiny_data):
    speech2text = Speech2Text(
        asr_train_config=trained / "config.yaml",
        asr_model_file=trained / "valid.loss.best.pth",
        beam_size=2,
        ctc_weight=0.5,
        maxlenratio=0.3,
    )
    encoder = speech2text.asr_model.encoder
    assert isinstance(encoder, FusionFormerEncoder) and encoder.fuse_for_inference
    wavs = sorted(tiny_data.glob("*.wav"))[:4]
    fused = _decode(speech2text, wavs)
    assert sum(isinstance(m, NORMS) for m in encoder.fused_copy().modules()) == 0
    encoder.fuse_for_inference = False
    unfused = _decode(speech2text, wavs)
    # same tokens and the same scores (the scores differ between utterances, so
    # they are not trivially equal even where a hypothesis is short)
    assert [t for t, _ in fused] == [t for t, _ in unfused]
    assert np.allclose([s for _, s in fused], [s for _, s in unfused], atol=1e-3)
    assert len({round(s, 3) for _, s in fused}) == len(wavs)


def test_pack_and_load_from_the_model_zoo(trained, tiny_data, tmp_path):
    from espnet_model_zoo.downloader import ModelDownloader

    zip_path = tmp_path / "fusionformer_model.zip"
    espnet(
        "espnet2.bin.pack",
        "asr",
        "--asr_train_config",
        str(trained / "config.yaml"),
        "--asr_model_file",
        str(trained / "valid.loss.best.pth"),
        "--outpath",
        str(zip_path),
        cwd=trained,
    )
    unpacked = ModelDownloader(cachedir=tmp_path / "cache").download_and_unpack(
        str(zip_path)
    )
    assert Path(unpacked["asr_model_file"]).exists()
    speech2text = Speech2Text.from_pretrained(str(zip_path), beam_size=2)
    assert isinstance(speech2text.asr_model.encoder, FusionFormerEncoder)
    text = speech2text(np.asarray(soundfile.read(tiny_data / "utt00.wav")[0]))[0][0]
    assert isinstance(text, str)
