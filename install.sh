#!/usr/bin/env bash
# Install everything espnet-fusionformer needs on a fresh Debian machine:
# espeak-ng + sox (offline speech synthesis for the recipe) and the Python package,
# editable, with the test and export extras, at the newest tested set of versions
# (constraints/newest.txt: espnet 202511, torch 2.11.0, torchaudio 2.11.0, ...).
# Into an existing ESPnet environment, without touching its espnet/torch, use
# `pip install .` instead (see the README).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq espeak-ng sox >/dev/null
fi

python3 -m pip install --progress-bar off -q -c constraints/newest.txt -e ".[test,export]"
python3 -c "import espnet2.tasks.asr as a; a.encoder_choices.get_class('fusionformer')" \
  2>/dev/null && echo "espnet-fusionformer installed: encoder 'fusionformer' registered"
