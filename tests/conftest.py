"""Shared fixtures: tiny encoders, warmed-up BatchNorms, a tiny ESPnet data dir."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import soundfile
import torch
import yaml

from espnet_fusionformer import FusionFormerEncoder

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(
    output_size=32,
    attention_heads=4,
    linear_units=64,
    num_blocks=2,
    cnn_module_kernel=7,
    dropout_rate=0.1,
    macaron_style=True,
    rel_pos_type="latest",
)
FEATS = 20


def make_encoder(**conf) -> FusionFormerEncoder:
    torch.manual_seed(0)
    return FusionFormerEncoder(FEATS, **{**TINY, **conf})


def warm_up(
    encoder: torch.nn.Module, steps: int = 4, dropout: bool = True
) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    ``dropout=False`` warms up without dropout, so the statistics depend on no
    global random numbers: the same on every torch version (dropout masks of one
    seed differ between torch releases).
    """
    gen = torch.Generator().manual_seed(1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
            m.momentum = 0.5
    encoder.train()
    if not dropout:
        for m in encoder.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    with torch.no_grad():
        for _ in range(steps):
            xs = 3 * torch.randn(3, 90, FEATS, generator=gen) + 1
            encoder(xs, torch.tensor([90, 70, 40]))
    return encoder.eval()


def batch(lengths: List[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(len(lengths), max(lengths), FEATS, generator=gen)
    ilens = torch.tensor(lengths)
    xs = xs.masked_fill(
        torch.arange(max(lengths))[None, :, None] >= ilens[:, None, None], 0
    )
    return xs, ilens


# -- a tiny ESPnet ASR setup ----------------------------------------------------
TEXTS = ["HELLO WORLD", "GOOD MORNING", "ONE TWO THREE", "OPEN THE DOOR", "YES", "NO"]


def asr_config(encoder: str = "fusionformer", **encoder_conf) -> Dict:
    """A complete ESPnet ASR training config, small enough for the CPU."""
    conf = dict(TINY, **encoder_conf)
    if encoder == "conformer":
        conf = dict(
            output_size=conf["output_size"],
            attention_heads=conf["attention_heads"],
            linear_units=conf["linear_units"],
            num_blocks=conf["num_blocks"],
            cnn_module_kernel=conf["cnn_module_kernel"],
            macaron_style=True,
            rel_pos_type="latest",
            pos_enc_layer_type="rel_pos",
            selfattention_layer_type="rel_selfattn",
            activation_type="swish",
            use_cnn_module=True,
        )
    return dict(
        frontend="default",
        frontend_conf=dict(n_fft=256, hop_length=128, n_mels=FEATS),
        normalize="utterance_mvn",
        encoder=encoder,
        encoder_conf=conf,
        decoder="transformer",
        decoder_conf=dict(
            attention_heads=2, linear_units=32, num_blocks=1, dropout_rate=0.0
        ),
        model_conf=dict(ctc_weight=0.5, lsm_weight=0.0),
        token_type="char",
        token_list=["<blank>", "<unk>", "<space>"]
        + sorted(set("".join(TEXTS)) - {" "})
        + ["<sos/eos>"],
        input_size=None,
        optim="adam",
        optim_conf=dict(lr=0.002),
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Kaldi-style data dir of 12 short 16 kHz wavs (tones) with ``text``."""
    import soundfile

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    wav_scp, text = [], []
    for i in range(12):
        utt = f"utt{i:02d}"
        words = TEXTS[i % len(TEXTS)]
        t = np.arange(int(16000 * (0.6 + 0.05 * i))) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * len(words)) * t)
        audio += 0.01 * rng.standard_normal(t.size)
        path = root / f"{utt}.wav"
        soundfile.write(path, audio.astype(np.float32), 16000)
        wav_scp.append(f"{utt} {path}")
        text.append(f"{utt} {words}")
    (root / "wav.scp").write_text("\n".join(wav_scp) + "\n")
    (root / "text").write_text("\n".join(text) + "\n")
    return root


def python() -> str:
    return sys.executable


def espnet(*args, cwd: Path, launcher=()) -> subprocess.CompletedProcess:
    """Run an unchanged ESPnet entry point (``-m module args``) in a fresh
    interpreter, optionally under a launcher such as ``torchrun``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    tests = str(Path(__file__).parent)  # for tests/_capture_model.py
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    command = list(launcher) if launcher else [python()]
    proc = subprocess.run(
        [*command, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def asr_train_args(exp: Path, data: Path, output_dir: Path, **config) -> List[str]:
    """``asr_train`` arguments for two epochs on the tiny data dir ``data``; the
    config (``exp/train.yaml``) takes ``config`` overrides."""
    defaults = dict(
        max_epoch=2,
        batch_type="unsorted",
        batch_size=4,
        num_workers=0,
        num_att_plot=0,
        seed=0,
        keep_nbest_models=2,
        best_model_criterion=[["valid", "loss", "min"]],
    )
    config = {**asr_config(), **defaults, **config}
    (exp / "train.yaml").write_text(yaml.safe_dump(config))
    shapes = []
    for line in (data / "wav.scp").read_text().splitlines():
        utt, path = line.split()
        shapes.append(f"{utt} {soundfile.info(path).frames}")
    (exp / "speech_shape").write_text("\n".join(shapes) + "\n")
    args = ["--config", str(exp / "train.yaml"), "--ngpu", "0"]
    args += ["--output_dir", str(output_dir), "--use_preprocessor", "true"]
    for split in ("train", "valid"):
        args += [f"--{split}_shape_file", str(exp / "speech_shape")]
        args += [
            f"--{split}_data_path_and_name_and_type",
            f"{data / 'wav.scp'},speech,sound",
        ]
        args += [f"--{split}_data_path_and_name_and_type", f"{data / 'text'},text,text"]
    return args
