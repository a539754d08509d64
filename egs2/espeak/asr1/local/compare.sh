#!/usr/bin/env bash
# Train and evaluate the four systems with the same data and budget, then write
# RESULTS.md and images/training_curves.png:
#   FusionFormer, Conformer, and the two ablations the paper reports as unstable.
#   local/compare.sh [run.sh options, e.g. --nj 2]
# (quick check of the pipeline: local/compare.sh --smoke true --asr_args "--max_epoch 1")
# A system whose training fails (e.g. diverges) is reported as such; the others
# go on.
set -euo pipefail

configs="conf/train_fusionformer.yaml conf/train_conformer.yaml
conf/train_fusionformer_bn_in_place.yaml conf/train_fusionformer_no_norm.yaml"

log() {
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (compare.sh) $*"
}

# Data, token list and statistics are shared by all systems: stages 1-10 once.
./run.sh --stop_stage 10 --asr_config conf/train_fusionformer.yaml "$@"

exps=()
for config in ${configs}; do
    tag="$(basename "${config}" .yaml)_raw_en_char"
    log "=== ${config} -> exp/asr_${tag}"
    if ./run.sh --stage 11 --stop_stage 15 --asr_config "${config}" --asr_tag "${tag}" "$@"; then
        log "${config}: done"
    else
        log "${config}: FAILED (see exp/asr_${tag}/train.log); going on"
    fi
    exps+=("exp/asr_${tag}")
done

python3 local/collect_results.py "${exps[@]}" --out RESULTS.md \
    --png images/training_curves.png
log "wrote RESULTS.md and images/training_curves.png"
