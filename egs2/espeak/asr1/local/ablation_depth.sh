#!/usr/bin/env bash
# The paper's ablations at its depth: conf/train_depth_12x256.yaml trained for a
# few hundred steps at a high peak learning rate once per normalization, then
# the training losses side by side (images/ablation_depth.png, ABLATION_DEPTH.md).
#   local/ablation_depth.sh [--normalizations "fusion layernorm ..."] [run.sh options]
set -euo pipefail

normalizations="fusion layernorm batchnorm_in_place none"
config=conf/train_depth_12x256.yaml
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --normalizations) normalizations=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

./run.sh --stop_stage 10 "${args[@]}"
exps=()
start=${SECONDS}
for norm in ${normalizations}; do
    tag="depth_12x256_${norm}"
    exps+=("exp/asr_${tag}")
    echo "$(date '+%Y-%m-%dT%H:%M:%S') (ablation_depth.sh) === ${norm} -> exp/asr_${tag} [$((SECONDS - start)) s]"
    # a diverged run is a result, not an error: go on with the others
    ./run.sh --stage 11 --stop_stage 11 --asr_config "${config}" --asr_tag "${tag}" \
        --asr_args "--encoder_conf normalization=${norm}" "${args[@]}" || true
done
python3 local/plot_steps.py "${exps[@]}" --png images/ablation_depth.png \
    --md ABLATION_DEPTH.md
