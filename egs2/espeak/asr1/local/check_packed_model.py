#!/usr/bin/env python3
"""Load a packed model zip through espnet_model_zoo and decode one wav.

Speech2Text.from_pretrained(<zip>) unpacks the zip with espnet_model_zoo's
ModelDownloader (as it does for a model-zoo name) and builds the model; the
decoding options come from the recipe's inference config.
"""

from __future__ import annotations

import argparse
import time

import soundfile
import yaml


def decode(zip_path: str, wav: str, inference_config: str | None = None) -> str:
    from espnet2.bin.asr_inference import Speech2Text

    opts = {}
    if inference_config:
        with open(inference_config) as f:
            opts = yaml.safe_load(f) or {}
    speech2text = Speech2Text.from_pretrained(zip_path, device="cpu", **opts)
    speech, _ = soundfile.read(wav, dtype="float32")
    nbests = speech2text(speech)
    return nbests[0][0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zip")
    p.add_argument("wav")
    p.add_argument("--inference_config", default=None)
    args = p.parse_args(argv)
    start = time.time()
    text = decode(args.zip, args.wav, args.inference_config)
    print(
        f"{args.zip} loads with Speech2Text.from_pretrained and decodes {args.wav} "
        f"as {text!r} ({time.time() - start:.1f}s)"
    )


if __name__ == "__main__":
    main()
