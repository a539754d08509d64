#!/usr/bin/env python3
"""Fail early on a bad ASR training config (asr.sh runs this before stage 1).

Checks that the YAML exists and parses, that its encoder (and the other
class choices: frontend, specaug, normalize, preencoder, decoder, ...) are
registered in espnet2.tasks.asr, and that ASRTask can build the model from it
with a tiny token list, which catches unknown or invalid encoder_conf keys.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

PLUGIN_HINT = (
    "The 'fusionformer' encoder comes from the espnet-fusionformer plugin: "
    "install it with `pip install -e <repository root>` (it registers itself "
    "into ESPnet on import)."
)


def fail(msg: str) -> None:
    print(f"Error: {msg}", file=sys.stderr)
    sys.exit(1)


def check(config: str, task: str = "asr", build: bool = True) -> str:
    path = Path(config)
    if not path.is_file():
        fail(f"config file not found: {config}")
    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        fail(f"{config} is not valid YAML: {e}")
    if not isinstance(conf, dict):
        fail(f"{config} must be a YAML mapping")

    if task == "asr":
        from espnet2.tasks.asr import ASRTask as Task
    else:
        from espnet2.tasks.asr_transducer import ASRTransducerTask as Task

    for choices in Task.class_choices_list:
        name = conf.get(choices.name)
        if name is None:
            continue
        if name not in choices.choices():
            known = ", ".join(str(c) for c in choices.choices() if c is not None)
            hint = f" {PLUGIN_HINT}" if name == "fusionformer" else ""
            fail(
                f"{config}: unknown {choices.name} '{name}' "
                f"(espnet2.tasks.{task} knows: {known}).{hint}"
            )
    if not build:
        return str(conf.get("encoder"))

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.txt"
        tokens.write_text("\n".join(["<blank>", "<unk>", "a", "b", "<sos/eos>"]))
        parser = Task.get_parser()
        try:
            args = parser.parse_args(
                ["--config", config, "--token_list", str(tokens), "--normalize", "none"]
            )
        except SystemExit:
            fail(f"{config}: ESPnet's {task}_train rejects this config (see above)")
        try:
            model = Task.build_model(args)
        except Exception as e:  # noqa: BLE001 - report any build error clearly
            fail(
                f"{config}: cannot build the model: {type(e).__name__}: {e}"
                f" (encoder={conf.get('encoder')}, encoder_conf="
                f"{conf.get('encoder_conf')})"
            )
    nparams = sum(p.numel() for p in model.parameters())
    return f"{conf.get('encoder')} ({nparams / 1e6:.2f} M parameters)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--task", default="asr", choices=["asr", "asr_transducer"])
    p.add_argument("--build", default="true", choices=["true", "false"])
    args = p.parse_args(argv)
    what = check(args.config, args.task, args.build == "true")
    print(f"{args.config}: OK, encoder {what}")


if __name__ == "__main__":
    main()
