#!/usr/bin/env bash
# espeak corpus ASR recipe: FusionFormer vs. Conformer (same recipe, same budget).
#   ./run.sh                                            # FusionFormer (default)
#   ./run.sh --asr_config conf/train_conformer.yaml     # the Conformer baseline
#   ./run.sh --asr_config conf/train_fusionformer_bn_in_place.yaml  # ablations
#   ./run.sh --smoke true                               # tiny end-to-end check
# Any option of asr.sh can follow (--stage, --stop_stage, --ngpu, --nj, ...).
set -euo pipefail

train_set=train
valid_set=dev
test_sets="dev test"

asr_config=conf/train_fusionformer.yaml
inference_config=conf/decode_asr.yaml
local_data_opts=

# --smoke true: a tiny corpus and model that run stages 1-15 in a few minutes.
args=()
smoke=false
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=$2; shift 2 ;;
        --smoke=*) smoke=${1#*=}; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ "${smoke}" = true ]; then
    asr_config=conf/train_smoke_fusionformer.yaml
    inference_config=conf/decode_smoke.yaml
    local_data_opts="--smoke true"
elif [ "${smoke}" != false ]; then
    echo "$0: --smoke takes true or false, not '${smoke}'" 1>&2
    exit 2
fi

# CPU unless a GPU is visible; override with --ngpu.
ngpu=0
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    ngpu=1
fi
nj=$(nproc 2>/dev/null || echo 2)

./asr.sh \
    --lang en \
    --ngpu "${ngpu}" \
    --nj "${nj}" \
    --inference_nj "${nj}" \
    --token_type char \
    --use_lm false \
    --max_wav_duration 20 \
    --skip_packing false \
    --skip_upload_hf false \
    --local_data_opts "${local_data_opts}" \
    --asr_config "${asr_config}" \
    --inference_config "${inference_config}" \
    --train_set "${train_set}" \
    --valid_set "${valid_set}" \
    --test_sets "${test_sets}" \
    "${args[@]}"
