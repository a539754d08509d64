#!/usr/bin/env bash
# Train and evaluate systems with the same data, budget and decoding, each with
# several seeds, then write RESULTS.md (mean ± spread over seeds) and
# images/training_curves.png:
#   local/compare.sh                                  # FusionFormer and Conformer, seeds 1 2 3
#   local/compare.sh --seeds "1" --configs "conf/train_fusionformer_bn_in_place.yaml"
#   local/compare.sh --smoke true --seeds 1 --asr_args "--max_epoch 1"   # pipeline check
# Other options go to run.sh. A run that exists already (exp/asr_<tag>/valid.acc.ave.pth)
# is decoded and reported, not trained again; a run whose training fails (e.g.
# diverges) is reported as such and the others go on.
set -euo pipefail

seeds="1 2 3"
configs="conf/train_fusionformer.yaml conf/train_conformer.yaml"
asr_args=
smoke=false
exps=()

log() {
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (compare.sh) $*"
}

args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --configs) configs=$2; shift 2 ;;
        --asr_args) asr_args=$2; shift 2 ;;
        --smoke) smoke=$2; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ "${smoke}" = true ] && [ "${configs}" = "conf/train_fusionformer.yaml conf/train_conformer.yaml" ]; then
    configs="conf/train_smoke_fusionformer.yaml conf/train_smoke_conformer.yaml"
fi

# Data, token list and statistics are shared by all systems: stages 1-10 once.
./run.sh --stop_stage 10 "${args[@]}"

start=${SECONDS}
for seed in ${seeds}; do
    for config in ${configs}; do
        tag="$(basename "${config}" .yaml)_seed${seed}_raw_en_char"
        exps+=("exp/asr_${tag}")
        stage=11
        [ -e "exp/asr_${tag}/valid.acc.ave.pth" ] && stage=12
        log "=== ${config}, seed ${seed} -> exp/asr_${tag} (from stage ${stage}) [$((SECONDS - start)) s]"
        if ./run.sh --stage "${stage}" --stop_stage 13 --asr_config "${config}" \
            --asr_tag "${tag}" --asr_args "--seed ${seed} ${asr_args}" "${args[@]}"; then
            log "${config}, seed ${seed}: done"
        else
            log "${config}, seed ${seed}: FAILED (see exp/asr_${tag}/train.log); going on"
        fi
    done
done

python3 local/collect_results.py "${exps[@]}" --out RESULTS.md \
    --png images/training_curves.png
log "wrote RESULTS.md and images/training_curves.png [$((SECONDS - start)) s]"
