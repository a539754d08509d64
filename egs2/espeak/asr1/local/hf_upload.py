#!/usr/bin/env python3
"""Stage 15: make a Hugging Face model repository from the packed model; push it.

The repository directory holds the unpacked zip (meta.yaml, exp/..., data/...,
which espnet_model_zoo reads back) and a model card README.md with the
results, the training config and a usage snippet. It is pushed with
huggingface_hub when --hf_repo is given and a token is available (HF_TOKEN or
a saved `hf auth login`); otherwise this says where the directory is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile
from pathlib import Path

CARD = """---
tags:
- espnet
- audio
- automatic-speech-recognition
- fusionformer
{language}datasets:
- {corpus}
license: cc-by-4.0
library_name: espnet
pipeline_tag: automatic-speech-recognition
---

## ESPnet2 ASR model

### `{repo_name}`

This model was trained with the `egs2/{corpus}/asr1` recipe of
[espnet-fusionformer](https://pypi.org/project/espnet-fusionformer/), an ESPnet
plugin providing the FusionFormer encoder (arXiv:2210.17079: BatchNorm and ReLU
instead of LayerNorm and Swish, all fused into the weights for inference).
Encoder: `{encoder}`; sampling rate {fs}.

### Usage

```bash
pip install espnet espnet_model_zoo espnet-fusionformer soundfile
```

```python
import soundfile
from espnet2.bin.asr_inference import Speech2Text

# importing ESPnet registers the "fusionformer" encoder (the plugin's .pth hook)
speech2text = Speech2Text.from_pretrained("{repo_id}"{decode_kwargs})
speech, rate = soundfile.read("speech.wav")  # 16 kHz mono
text, tokens, token_ids, hyp = speech2text(speech)[0]
print(text)
```

To evaluate it in the recipe: `./run.sh --skip_data_prep false --skip_train true
--download_model {repo_id}`.

## Results

{results}

## ASR config

<details><summary>expand</summary>

```yaml
{config}
```

</details>
"""


def find_config(repo: Path) -> Path | None:
    for p in sorted(repo.glob("exp/**/config.yaml")):
        if "lm" not in p.parent.name.split("_")[0]:
            return p
    return None


def build_repo(args) -> Path:
    repo = Path(args.repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    for child in repo.iterdir():  # refresh everything but a git checkout
        if child.name == ".git":
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    with zipfile.ZipFile(args.packed_model) as z:
        z.extractall(repo)

    results = Path(args.asr_exp) / "RESULTS.md"
    results_txt = results.read_text() if results.exists() else "(no RESULTS.md yet)"
    config = find_config(repo)
    config_txt = config.read_text() if config else ""
    encoder = "unknown"
    for line in config_txt.splitlines():
        if line.startswith("encoder:"):
            encoder = line.split(":", 1)[1].strip()
    decode_kwargs = ""
    if args.inference_config and Path(args.inference_config).exists():
        import yaml

        opts = yaml.safe_load(Path(args.inference_config).read_text()) or {}
        shutil.copy(args.inference_config, repo / "decode.yaml")
        decode_kwargs = "".join(f", {k}={v!r}" for k, v in opts.items())
    repo_id = args.hf_repo or f"<user>/{Path(args.asr_exp).name}"
    language = "" if args.lang in ("", "noinfo") else f"language: {args.lang}\n"
    (repo / "README.md").write_text(
        CARD.format(
            language=language,
            corpus=args.corpus,
            repo_name=repo_id,
            repo_id=repo_id,
            encoder=encoder,
            fs=args.fs,
            decode_kwargs=decode_kwargs,
            results=results_txt.strip(),
            config=config_txt.strip(),
        )
    )
    return repo


def get_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token as hf_get_token

        return hf_get_token()
    except Exception:  # noqa: BLE001 - no saved login is not an error here
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--packed_model", required=True)
    p.add_argument("--asr_exp", required=True)
    p.add_argument("--repo_dir", required=True)
    p.add_argument("--hf_repo", default="")
    p.add_argument("--inference_config", default="")
    p.add_argument("--corpus", default="espeak")
    p.add_argument("--lang", default="noinfo")
    p.add_argument("--fs", default="16k")
    args = p.parse_args(argv)

    repo = build_repo(args)
    files = sum(1 for f in repo.rglob("*") if f.is_file() and ".git" not in f.parts)
    print(f"Hugging Face model repository prepared in {repo} ({files} files)")
    token = get_token()
    if not args.hf_repo or not token:
        missing = []
        if not args.hf_repo:
            missing.append("no --hf_repo <user>/<name>")
        if not token:
            missing.append("no Hugging Face token (HF_TOKEN or `hf auth login`)")
        print(
            f"Not uploaded: {' and '.join(missing)}. The repository is ready in "
            f"{repo}; to push it, run\n"
            f"    HF_TOKEN=<token> ./run.sh --stage 15 --hf_repo <user>/<name>\n"
            f"or upload {repo} with `hf upload <user>/<name> {repo}`."
        )
        return

    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(args.hf_repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            folder_path=str(repo),
            repo_id=args.hf_repo,
            repo_type="model",
            commit_message="Update model",
            ignore_patterns=[".git/*"],
        )
    except Exception as e:  # noqa: BLE001 - network or auth: say what and where
        print(
            f"Error: upload to https://huggingface.co/{args.hf_repo} failed "
            f"({type(e).__name__}: {e}).\nThe repository is ready in {repo}; "
            "retry with `./run.sh --stage 15 ...` once the network/token work.",
            file=sys.stderr,
        )
        sys.exit(1)
    print(f"Uploaded {repo} to https://huggingface.co/{args.hf_repo} ({info})")


if __name__ == "__main__":
    main()
