#!/usr/bin/env bash
# ESPnet2 ASR recipe driver: the stages, numbers, option names and output layout
# of ESPnet's egs2/TEMPLATE/asr1/asr.sh.
#
#  * With an ESPnet checkout (ESPNET_ROOT=/path/to/espnet), ESPnet's own
#    egs2/TEMPLATE/asr1/asr.sh runs (utils/, steps/, scripts/, pyscripts/ are
#    linked into this directory as ESPnet's recipes have them).
#  * Without one, the pip-only, Kaldi-free implementation below runs the same
#    stages through ESPnet's Python entry points (espnet2.bin.*), with small
#    Python stand-ins under local/ for Kaldi's utils and for sclite.
#
# Stages: 1 data prep (local/data.sh), 2 speed perturbation, 3 format wav.scp,
# 4 remove long/short data, 5 token list, 6-8 LM (collect stats, train,
# perplexity), 9 n-gram LM, 10 ASR collect stats, 11 ASR training,
# 12 decoding, 13 scoring, 14 packing, 15 upload to Hugging Face.
set -euo pipefail

log() {
    local fname=${BASH_SOURCE[1]##*/}
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}
min() {
    local a b
    a=$1
    for b in "$@"; do
        if [ "${b}" -le "${a}" ]; then
            a="${b}"
        fi
    done
    echo "${a}"
}
SECONDS=0

# ------------------------------------------------------------------------------
# ESPnet checkout given: run ESPnet's own asr.sh.
# ------------------------------------------------------------------------------
if [ -n "${ESPNET_ROOT:-}" ]; then
    template="${ESPNET_ROOT}/egs2/TEMPLATE/asr1"
    if [ ! -f "${template}/asr.sh" ]; then
        log "Error: ESPNET_ROOT=${ESPNET_ROOT} has no egs2/TEMPLATE/asr1/asr.sh"
        exit 2
    fi
    for d in utils steps scripts pyscripts; do
        [ -e "${d}" ] || ln -s "${template}/${d}" "${d}"
    done
    # Keep the options ESPnet's asr.sh knows; older versions call the packing
    # switch --skip_upload. Options only the pip-only driver has are dropped.
    args=()
    while [ $# -gt 0 ]; do
        name="${1#--}"
        name="${name%%=*}"
        if [[ "$1" == --*=* ]]; then value="${1#*=}"; shift; else value="${2:-}"; shift 2 || shift; fi
        name="${name//-/_}"
        if grep -q "^${name}=" "${template}/asr.sh"; then
            args+=("--${name}" "${value}")
        elif [ "${name}" = skip_packing ] && grep -q "^skip_upload=" "${template}/asr.sh"; then
            args+=("--skip_upload" "${value}")
        else
            log "Warning: ${template}/asr.sh has no --${name}; dropped"
        fi
    done
    log "Running ESPnet's ${template}/asr.sh"
    exec "${template}/asr.sh" "${args[@]}"
fi

# ------------------------------------------------------------------------------
# pip-only implementation
# ------------------------------------------------------------------------------
# General configuration
stage=1              # Processes starts from the specified stage.
stop_stage=10000     # Processes is stopped at the specified stage.
skip_data_prep=false # Skip data preparation stages.
skip_train=false     # Skip training stages.
skip_eval=false      # Skip decoding and evaluation stages.
skip_packing=true    # Skip the packing stage.
skip_upload=         # Older name of --skip_packing (ESPnet < 2024).
skip_upload_hf=true  # Skip uploading to hugging face stages.
ngpu=1               # The number of gpus ("0" uses cpu, otherwise use gpu).
num_nodes=1          # The number of nodes.
nj=32                # The number of parallel jobs.
inference_nj=32      # The number of parallel jobs in decoding.
gpu_inference=false  # Whether to perform gpu decoding.
dumpdir=dump         # Directory to dump features.
expdir=exp           # Directory to save experiments.
python=python3       # Specify python to execute espnet commands.
train_nthreads=2     # [pip-only] CPU threads of the training job (OMP_NUM_THREADS).

# Data preparation related
local_data_opts= # The options given to local/data.sh.

# Speed perturbation related
speed_perturb_factors=  # perturbation factors, e.g. "0.9 1.0 1.1" (separated by space).

# Feature extraction related
feats_type=raw       # Feature type (raw only in the pip-only driver).
audio_format=flac    # Audio format: wav, flac (wav.ark, flac.ark need Kaldi).
fs=16k               # Sampling rate.
min_wav_duration=0.1 # Minimum duration in second.
max_wav_duration=20  # Maximum duration in second.

# Tokenization related
token_type=bpe      # Tokenization type (char, word or bpe).
nbpe=30             # The number of BPE vocabulary.
bpemode=unigram     # Mode of BPE (unigram or bpe).
oov="<unk>"         # Out of vocabulary symbol.
blank="<blank>"     # CTC blank symbol
sos_eos="<sos/eos>" # sos and eos symbole
bpe_input_sentence_size=100000000 # Size of input sentence for BPE.
bpe_nlsyms=         # non-linguistic symbols list, separated by a comma, for BPE
bpe_char_cover=1.0  # character coverage when modeling BPE

# Ngram model related
use_ngram=false
ngram_exp=
ngram_num=3

# Language model related
use_lm=true       # Use language model for ASR decoding.
lm_tag=           # Suffix to the result dir for language model training.
lm_exp=           # Specify the directory path for LM experiment.
lm_stats_dir=     # Specify the directory path for LM statistics.
lm_config=        # Config for language model training.
lm_args=          # Arguments for language model training, e.g., "--max_epoch 10".
use_word_lm=false # Whether to use word language model.
num_splits_lm=1   # Number of splitting for lm corpus.
# shellcheck disable=SC2034
word_vocab_size=10000 # Size of word vocabulary.

# ASR model related
asr_task=asr   # ASR task mode. Either 'asr' or 'asr_transducer'.
asr_tag=       # Suffix to the result dir for asr model training.
asr_exp=       # Specify the directory path for ASR experiment.
asr_stats_dir= # Specify the directory path for ASR statistics.
asr_config=    # Config for asr model training.
asr_args=      # Arguments for asr model training, e.g., "--max_epoch 10".
pretrained_model=          # Pretrained model to load
ignore_init_mismatch=false # Ignore initial mismatch
feats_normalize=global_mvn # Normalizaton layer type.
num_splits_asr=1           # Number of splitting for lm corpus.

# Upload model related
hf_repo=

# Decoding related
use_k2=false        # Whether to use k2 based decoder (not in the pip-only driver)
use_streaming=false # Whether to use streaming decoding
use_maskctc=false   # Whether to use maskctc decoding
batch_size=1
inference_tag=    # Suffix to the result dir for decoding.
inference_config= # Config for decoding.
inference_args=   # Arguments for decoding, e.g., "--lm_weight 0.1".
inference_lm=valid.loss.ave.pth       # Language model path for decoding.
inference_ngram=${ngram_num}gram.bin
inference_asr_model=valid.acc.ave.pth # ASR model path for decoding.
download_model= # Download a model from Model Zoo and use it for decoding.

# [Task dependent] Set the datadir name created by local/data.sh
train_set=       # Name of training set.
valid_set=       # Name of validation set used for monitoring/tuning network training.
test_sets=       # Names of test sets.
bpe_train_text=  # Text file path of bpe training set.
lm_train_text=   # Text file path of language model training set.
lm_dev_text=     # Text file path of language model development set.
lm_test_text=    # Text file path of language model evaluation set.
nlsyms_txt=none  # Non-linguistic symbol list if existing.
cleaner=none     # Text cleaner.
g2p=none         # g2p method (needed if token_type=phn).
lang=noinfo      # The language type of corpus.
score_opts=                # The options given to sclite scoring (ignored by local/score.py)
local_score_opts=          # The options given to local/score.sh.
asr_speech_fold_length=800 # fold_length for speech data during ASR training.
asr_text_fold_length=150   # fold_length for text data during ASR training.
lm_fold_length=150         # fold_length for LM training.

help_message=$(cat << EOF
Usage: $0 --train_set "<train_set_name>" --valid_set "<valid_set_name>" --test_sets "<test_set_names>"

Pip-only, Kaldi-free driver with the stages and options of ESPnet's
egs2/TEMPLATE/asr1/asr.sh (set ESPNET_ROOT to run ESPnet's own asr.sh instead).

Stages:
    1  Data preparation (local/data.sh)      9  N-gram LM (needs KenLM's lmplz)
    2  Speed perturbation (sox)             10  ASR collect stats
    3  Format wav.scp -> ${dumpdir}/raw     11  ASR training
    4  Remove long/short data               12  Decoding
    5  Token list                           13  Scoring (CER/WER[/TER])
    6  LM collect stats                     14  Pack model (--skip_packing false)
    7  LM training                          15  Upload to Hugging Face
    8  LM perplexity                            (--skip_upload_hf false)

Options (defaults in parentheses):
    # General configuration
    --stage          # Processes starts from the specified stage (${stage}).
    --stop_stage     # Processes is stopped at the specified stage (${stop_stage}).
    --skip_data_prep # Skip data preparation stages (${skip_data_prep}).
    --skip_train     # Skip training stages (${skip_train}).
    --skip_eval      # Skip decoding and evaluation stages (${skip_eval}).
    --skip_packing   # Skip the packing stage (${skip_packing}).
    --skip_upload_hf # Skip uploading to hugging face stage (${skip_upload_hf}).
    --ngpu           # The number of gpus ("0" uses cpu, otherwise use gpu, ${ngpu}).
    --num_nodes      # The number of nodes (${num_nodes}; only 1 without ESPnet's utils).
    --nj             # The number of parallel jobs (${nj}).
    --inference_nj   # The number of parallel jobs in decoding (${inference_nj}).
    --gpu_inference  # Whether to perform gpu decoding (${gpu_inference}).
    --dumpdir        # Directory to dump features (${dumpdir}).
    --expdir         # Directory to save experiments (${expdir}).
    --python         # Specify python to execute espnet commands (${python}).
    --train_nthreads # [pip-only] CPU threads for training (${train_nthreads}).

    # Data preparation / features
    --local_data_opts        # The options given to local/data.sh (${local_data_opts}).
    --speed_perturb_factors  # speed perturbation factors, e.g. "0.9 1.0 1.1" (${speed_perturb_factors}).
    --feats_type       # Feature type (raw only here, ${feats_type}).
    --audio_format     # Audio format: wav or flac (${audio_format}).
    --fs               # Sampling rate (${fs}).
    --min_wav_duration # Minimum duration in second (${min_wav_duration}).
    --max_wav_duration # Maximum duration in second (${max_wav_duration}).

    # Tokenization related
    --token_type   # Tokenization type (char, word or bpe, ${token_type}).
    --nbpe         # The number of BPE vocabulary (${nbpe}).
    --bpemode      # Mode of BPE (unigram or bpe, ${bpemode}).
    --oov, --blank, --sos_eos, --bpe_input_sentence_size, --bpe_nlsyms, --bpe_char_cover

    # Language model related
    --use_lm --lm_tag --lm_exp --lm_stats_dir --lm_config --lm_args --num_splits_lm
    --use_ngram --ngram_exp --ngram_num

    # ASR model related
    --asr_task         # asr or asr_transducer (${asr_task}).
    --asr_tag          # Suffix to the result dir for asr model training (${asr_tag}).
    --asr_exp          # Specify the directory path for ASR experiment (${asr_exp}).
    --asr_stats_dir    # Specify the directory path for ASR statistics (${asr_stats_dir}).
    --asr_config       # Config for asr model training (${asr_config}).
    --asr_args         # Arguments for asr model training, e.g. "--max_epoch 10" (${asr_args}).
    --pretrained_model --ignore_init_mismatch --feats_normalize --num_splits_asr

    # Decoding related
    --inference_tag       # Suffix to the result dir for decoding (${inference_tag}).
    --inference_config    # Config for decoding (${inference_config}).
    --inference_args      # Arguments for decoding, e.g. "--beam_size 5" (${inference_args}).
    --inference_lm        # Language model path for decoding (${inference_lm}).
    --inference_asr_model # ASR model path for decoding (${inference_asr_model}).
    --download_model      # Download a model from Model Zoo and use it for decoding (${download_model}).
    --use_streaming --use_maskctc --batch_size

    # [Task dependent] data directories made by local/data.sh
    --train_set --valid_set --test_sets --bpe_train_text --lm_train_text
    --lm_dev_text --lm_test_text --nlsyms_txt --cleaner --g2p --lang
    --asr_speech_fold_length --asr_text_fold_length --lm_fold_length
    --hf_repo        # Hugging Face repository (user/name) for stage 15 (${hf_repo}).
EOF
)

log "$0 $*"
# Save command line args for logging (they will be lost after parse_options.sh)
run_args=$(printf '%q ' "$0" "$@")
. local/parse_options.sh

if [ $# -ne 0 ]; then
    log "${help_message}"
    log "Error: No positional arguments are required."
    exit 2
fi

. ./path.sh
. ./cmd.sh

# Stage banners: every stage starts and ends with its number and the times.
max_stage=15
stage_start=0
current_stage=
banner() {
    local n=$1
    shift
    current_stage=${n}
    stage_start=${SECONDS}
    echo "================================================================================"
    log "Stage ${n}: $* [elapsed ${SECONDS}s]"
    echo "================================================================================"
}
banner_end() {
    [ -n "${current_stage}" ] || return 0
    log "Stage ${current_stage} done in $((SECONDS - stage_start))s [elapsed ${SECONDS}s]"
    current_stage=
}
run_stage() {
    # run_stage N: true when stage N is within --stage/--stop_stage
    [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]
}
die() {
    log "Error: $*"
    exit 2
}
unsupported() {
    die "$* is not supported by this pip-only asr.sh; run ESPnet's own asr.sh with ESPNET_ROOT=/path/to/espnet (an ESPnet git checkout with Kaldi tools)."
}

# ---------------------------- Check arguments ---------------------------------
[[ "${stage}" =~ ^[0-9]+$ ]] || die "--stage must be a non-negative integer, not '${stage}'"
[[ "${stop_stage}" =~ ^[0-9]+$ ]] || die "--stop_stage must be a non-negative integer, not '${stop_stage}'"
if [ "${stage}" -gt "${stop_stage}" ]; then
    die "invalid stage range: --stage ${stage} is after --stop_stage ${stop_stage}"
fi
if [ "${stage}" -lt 1 ] || [ "${stage}" -gt "${max_stage}" ]; then
    die "invalid stage range: --stage ${stage}; the stages are 1-${max_stage}"
fi
[ -n "${skip_upload}" ] && skip_packing=${skip_upload}

[ -z "${train_set}" ] && { log "${help_message}"; die "--train_set is required"; }
[ -z "${valid_set}" ] && { log "${help_message}"; die "--valid_set is required"; }
[ -z "${test_sets}" ] && { log "${help_message}"; die "--test_sets is required"; }

# Check feature type
if [ "${feats_type}" = raw ]; then
    data_feats=${dumpdir}/raw
else
    unsupported "--feats_type ${feats_type} (Kaldi feature extraction)"
fi
case "${audio_format}" in
    wav | flac) ;;
    *) unsupported "--audio_format ${audio_format}" ;;
esac
[ "${num_nodes}" -le 1 ] || unsupported "--num_nodes ${num_nodes}"
"${use_k2}" && unsupported "--use_k2 true (k2 decoding)"
case "${asr_task}" in
    asr | asr_transducer) ;;
    *) die "--asr_task must be asr or asr_transducer, not '${asr_task}'" ;;
esac

# With speed perturbation, the training set is "${train_set}_sp" (made in stage 2).
orig_train_set="${train_set}"
if [ -n "${speed_perturb_factors}" ]; then
    train_set="${train_set}_sp"
fi

# Use the same text as ASR for bpe training if not specified.
[ -z "${bpe_train_text}" ] && bpe_train_text="${data_feats}/${train_set}/text"
# Use the same text as ASR for lm training if not specified.
[ -z "${lm_train_text}" ] && lm_train_text="${data_feats}/${train_set}/text"
# Use the same text as ASR for lm training if not specified.
[ -z "${lm_dev_text}" ] && lm_dev_text="${data_feats}/${valid_set}/text"
# Use the text of the 1st evaldir if lm_test is not specified
[ -z "${lm_test_text}" ] && lm_test_text="${data_feats}/${test_sets%% *}/text"

# Check tokenization type
if [ "${lang}" != noinfo ]; then
    token_listdir=data/${lang}_token_list
else
    token_listdir=data/token_list
fi
bpedir="${token_listdir}/bpe_${bpemode}${nbpe}"
bpeprefix="${bpedir}"/bpe
bpemodel="${bpeprefix}".model
bpetoken_list="${bpedir}"/tokens.txt
chartoken_list="${token_listdir}"/char/tokens.txt
wordtoken_list="${token_listdir}"/word/tokens.txt

if [ "${token_type}" = bpe ]; then
    token_list="${bpetoken_list}"
elif [ "${token_type}" = char ]; then
    token_list="${chartoken_list}"
    bpemodel=none
elif [ "${token_type}" = word ]; then
    token_list="${wordtoken_list}"
    bpemodel=none
else
    die "not supported --token_type '${token_type}' (char, word or bpe)"
fi
if ${use_word_lm}; then
    die "Word LM is not supported yet"
fi
lm_token_list="${token_list}"
lm_token_type="${token_type}"

# Set tag for naming of model directory
if [ -z "${asr_tag}" ]; then
    if [ -n "${asr_config}" ]; then
        asr_tag="$(basename "${asr_config}" .yaml)_${feats_type}"
    else
        asr_tag="train_${feats_type}"
    fi
    if [ "${lang}" != noinfo ]; then
        asr_tag+="_${lang}_${token_type}"
    else
        asr_tag+="_${token_type}"
    fi
    if [ "${token_type}" = bpe ]; then
        asr_tag+="${nbpe}"
    fi
    # Add overwritten arg's info
    if [ -n "${asr_args}" ]; then
        asr_tag+="$(echo "${asr_args}" | sed -e "s/--/\_/g" -e "s/[ |=/]//g")"
    fi
    if [ -n "${speed_perturb_factors}" ]; then
        asr_tag+="_sp"
    fi
fi
if [ -z "${lm_tag}" ]; then
    if [ -n "${lm_config}" ]; then
        lm_tag="$(basename "${lm_config}" .yaml)"
    else
        lm_tag="train"
    fi
    if [ "${lang}" != noinfo ]; then
        lm_tag+="_${lang}_${lm_token_type}"
    else
        lm_tag+="_${lm_token_type}"
    fi
    if [ "${lm_token_type}" = bpe ]; then
        lm_tag+="${nbpe}"
    fi
    if [ -n "${lm_args}" ]; then
        lm_tag+="$(echo "${lm_args}" | sed -e "s/--/\_/g" -e "s/[ |=/]//g")"
    fi
fi

# The directory used for collect-stats mode
if [ -z "${asr_stats_dir}" ]; then
    if [ "${lang}" != noinfo ]; then
        asr_stats_dir="${expdir}/asr_stats_${feats_type}_${lang}_${token_type}"
    else
        asr_stats_dir="${expdir}/asr_stats_${feats_type}_${token_type}"
    fi
    if [ "${token_type}" = bpe ]; then
        asr_stats_dir+="${nbpe}"
    fi
    if [ -n "${speed_perturb_factors}" ]; then
        asr_stats_dir+="_sp"
    fi
fi
if [ -z "${lm_stats_dir}" ]; then
    if [ "${lang}" != noinfo ]; then
        lm_stats_dir="${expdir}/lm_stats_${lang}_${lm_token_type}"
    else
        lm_stats_dir="${expdir}/lm_stats_${lm_token_type}"
    fi
    if [ "${lm_token_type}" = bpe ]; then
        lm_stats_dir+="${nbpe}"
    fi
fi
# The directory used for training commands
if [ -z "${asr_exp}" ]; then
    asr_exp="${expdir}/asr_${asr_tag}"
fi
if [ -z "${lm_exp}" ]; then
    lm_exp="${expdir}/lm_${lm_tag}"
fi
if [ -z "${ngram_exp}" ]; then
    ngram_exp="${expdir}/ngram"
fi

if [ -z "${inference_tag}" ]; then
    if [ -n "${inference_config}" ]; then
        inference_tag="$(basename "${inference_config}" .yaml)"
    else
        inference_tag=inference
    fi
    # Add overwritten arg's info
    if [ -n "${inference_args}" ]; then
        inference_tag+="$(echo "${inference_args}" | sed -e "s/--/\_/g" -e "s/[ |=]//g")"
    fi
    if "${use_lm}"; then
        inference_tag+="_lm_$(basename "${lm_exp}")_$(echo "${inference_lm}" | sed -e "s/\//_/g" -e "s/\.[^.]*$//g")"
    fi
    if "${use_ngram}"; then
        inference_tag+="_ngram_$(basename "${ngram_exp}")_$(echo "${inference_ngram}" | sed -e "s/\//_/g" -e "s/\.[^.]*$//g")"
    fi
    inference_tag+="_asr_model_$(echo "${inference_asr_model}" | sed -e "s/\//_/g" -e "s/\.[^.]*$//g")"
fi

# ----------------- Fail early: configs, encoder, tools ------------------------
will_train=false
if ! "${skip_train}" && [ "${stage}" -le 11 ] && [ "${stop_stage}" -ge 10 ]; then
    will_train=true
fi
will_train_lm=false
if ! "${skip_train}" && "${use_lm}" && [ "${stage}" -le 8 ] && [ "${stop_stage}" -ge 6 ]; then
    will_train_lm=true
fi
if [ -n "${asr_config}" ] && [ ! -f "${asr_config}" ]; then
    die "--asr_config ${asr_config}: no such file"
fi
if [ -n "${inference_config}" ] && [ ! -f "${inference_config}" ]; then
    die "--inference_config ${inference_config}: no such file"
fi
if "${will_train_lm}" && [ -n "${lm_config}" ] && [ ! -f "${lm_config}" ]; then
    die "--lm_config ${lm_config}: no such file"
fi
if "${use_ngram}" && ! "${skip_train}" && run_stage 9 && ! command -v lmplz > /dev/null; then
    die "--use_ngram true needs KenLM's lmplz and build_binary on PATH (stage 9)"
fi
if ! "${skip_data_prep}" && run_stage 2 && [ -n "${speed_perturb_factors}" ] && ! command -v sox > /dev/null; then
    die "speed perturbation needs sox: sudo apt-get install sox"
fi
if "${will_train}" && [ -n "${asr_config}" ]; then
    # The encoder (and every other class choice) must be known to ESPnet, and
    # the model must build: fail now rather than after data preparation.
    log "Checking ${asr_config} (encoder registered, model builds)"
    ${python} local/check_config.py --task "${asr_task}" "${asr_config}" 2> >(grep -v '^\[nltk_data\]' >&2) \
        || die "--asr_config ${asr_config} is not usable (see above)"
fi

# ========================== Main stages start from here. ==========================

if ! "${skip_data_prep}"; then
    if run_stage 1; then
        banner 1 "Data preparation for data/${train_set}, data/${valid_set}, etc."
        # [Task dependent] Need to create data.sh for new corpus
        # shellcheck disable=SC2086
        local/data.sh ${local_data_opts}
        banner_end
    fi

    if run_stage 2; then
        if [ -n "${speed_perturb_factors}" ]; then
            banner 2 "Speed perturbation: data/${orig_train_set} -> data/${train_set}"
            _dirs=""
            for factor in ${speed_perturb_factors}; do
                if python3 -c "import sys; sys.exit(float('${factor}') == 1.0)"; then
                    ${python} local/datadir.py perturb_speed "${factor}" "data/${orig_train_set}" "data/${orig_train_set}_sp${factor}"
                    _dirs+="data/${orig_train_set}_sp${factor} "
                else
                    # If speed factor is 1, same as the original
                    _dirs+="data/${orig_train_set} "
                fi
            done
            rm -rf "data/${train_set}"
            # shellcheck disable=SC2086
            ${python} local/datadir.py combine_data "data/${train_set}" ${_dirs}
            banner_end
        else
            log "Skip stage 2: Speed perturbation"
        fi
    fi

    if run_stage 3; then
        banner 3 "Format wav.scp: data/ -> ${data_feats}"
        _done=" "
        for dset in "${train_set}" "${valid_set}" ${test_sets}; do
            if [ "${dset}" = "${train_set}" ] || [ "${dset}" = "${valid_set}" ]; then
                _suf="/org"
            else
                _suf=""
            fi
            # A test set that is also the valid set is formatted once (-> /org).
            [[ "${_done}" == *" ${dset} "* ]] && continue
            _done+="${dset} "
            [ -f "data/${dset}/wav.scp" ] || die "data/${dset}/wav.scp not found: run stage 1 first"
            [ -e "data/${dset}/segments" ] && unsupported "data/${dset}/segments"
            rm -rf "${data_feats}${_suf}/${dset}"
            ${python} local/datadir.py copy_data_dir "data/${dset}" "${data_feats}${_suf}/${dset}"
            ${python} local/format_wav_scp.py --nj "${nj}" --audio_format "${audio_format}" --fs "${fs}" \
                "data/${dset}/wav.scp" "${data_feats}${_suf}/${dset}"
            echo "${feats_type}" > "${data_feats}${_suf}/${dset}/feats_type"
        done
        banner_end
    fi

    if run_stage 4; then
        banner 4 "Remove long/short data: ${data_feats}/org -> ${data_feats}"
        # NOTE(kamo): Not applying to test_sets to keep original data
        _fs=$(${python} -c "import sys; sys.path.insert(0, 'local'); from format_wav_scp import parse_fs; print(parse_fs('${fs}'))")
        _min_length=$(${python} -c "print(int(${min_wav_duration} * ${_fs}))")
        _max_length=$(${python} -c "print(int(${max_wav_duration} * ${_fs}))")
        for dset in "${train_set}" "${valid_set}"; do
            rm -rf "${data_feats}/${dset}"
            ${python} local/datadir.py copy_data_dir "${data_feats}/org/${dset}" "${data_feats}/${dset}"
            cp "${data_feats}/org/${dset}/feats_type" "${data_feats}/${dset}/feats_type"
            ${python} local/datadir.py filter_length "${data_feats}/org/${dset}" "${data_feats}/${dset}" \
                "${_min_length}" "${_max_length}"
        done
        # shellcheck disable=SC2002,SC2086
        cat ${lm_train_text} | awk ' { if( NF != 1 ) print $0; } ' > "${data_feats}/lm_train.txt"
        banner_end
    fi

    if run_stage 5; then
        if [ "${token_type}" = bpe ]; then
            banner 5 "Generate token_list from ${bpe_train_text} using BPE"
            mkdir -p "${bpedir}"
            # shellcheck disable=SC2002,SC2086
            cat ${bpe_train_text} | cut -f 2- -d" " > "${bpedir}"/train.txt
            if [ -n "${bpe_nlsyms}" ]; then
                _opts_spm="--user_defined_symbols=${bpe_nlsyms}"
            else
                _opts_spm=""
            fi
            # spm_train's command line, run through the sentencepiece package
            # shellcheck disable=SC2086
            ${python} local/datadir.py spm_train \
                --input="${bpedir}"/train.txt \
                --vocab_size="${nbpe}" \
                --model_type="${bpemode}" \
                --model_prefix="${bpeprefix}" \
                --character_coverage=${bpe_char_cover} \
                --input_sentence_size="${bpe_input_sentence_size}" \
                --minloglevel=1 \
                ${_opts_spm}
            {
                echo "${blank}"
                echo "${oov}"
                # Remove <unk>, <s>, </s> from the vocabulary
                <"${bpeprefix}".vocab awk '{ if( NR != 1 && NR != 2 && NR != 3 ){ print $1; } }'
                echo "${sos_eos}"
            } > "${token_list}"
        else
            banner 5 "Generate ${token_type} level token_list from ${data_feats}/lm_train.txt"
            mkdir -p "$(dirname "${token_list}")"
            # The first symbol in token_list must be "<blank>" and the last must be also sos/eos:
            # 0 is reserved for CTC-blank for ASR and also used as ignore-index in the other task
            ${python} -m espnet2.bin.tokenize_text \
                --token_type "${token_type}" \
                --input "${data_feats}/lm_train.txt" --output "${token_list}" \
                --non_linguistic_symbols "${nlsyms_txt}" \
                --field 2- \
                --cleaner "${cleaner}" \
                --g2p "${g2p}" \
                --write_vocabulary true \
                --add_symbol "${blank}:0" \
                --add_symbol "${oov}:1" \
                --add_symbol "${sos_eos}:-1" 2> >(grep -v '^\[nltk_data\]' >&2)
        fi
        log "${token_list}: $(wc -l < "${token_list}") tokens"
        banner_end
    fi
else
    log "Skip the stages for data preparation"
fi

# ========================== Data preparation is done here. ==========================

# collect_stats TASK STATS_DIR TRAIN_KEYS VALID_KEYS CONFIG_OPTS ARGS...
# Shared by stages 6 and 10: split the keys, run <task>_train --collect_stats
# in nj jobs, aggregate, and append the vocabulary size to text_shape.
split_keys() {
    # split_keys KEYFILE PREFIX N -> PREFIX.{1..N}.scp
    local key_file=$1 prefix=$2 n=$3 outs="" i
    for i in $(seq "${n}"); do
        outs+=" ${prefix}.${i}.scp"
    done
    # shellcheck disable=SC2086
    ${python} local/datadir.py split_scp "${key_file}" ${outs}
}

if ! "${skip_train}"; then
    if "${use_lm}"; then
        if run_stage 6; then
            banner 6 "LM collect stats: train_set=${data_feats}/lm_train.txt, dev_set=${lm_dev_text}"
            _opts=
            if [ -n "${lm_config}" ]; then
                _opts+="--config ${lm_config} "
            fi
            _logdir="${lm_stats_dir}/logdir"
            rm -rf "${_logdir}"
            mkdir -p "${_logdir}"
            _nj=$(min "${nj}" "$(<"${data_feats}/lm_train.txt" wc -l)" "$(<"${lm_dev_text}" wc -l)")
            split_keys "${data_feats}/lm_train.txt" "${_logdir}/train" "${_nj}"
            split_keys "${lm_dev_text}" "${_logdir}/dev" "${_nj}"
            log "Generate '${lm_stats_dir}/run.sh'. You can resume the process from stage 6 using this script"
            mkdir -p "${lm_stats_dir}"; echo "${run_args} --stage 6 \"\$@\"; exit \$?" > "${lm_stats_dir}/run.sh"; chmod +x "${lm_stats_dir}/run.sh"
            log "LM collect-stats started... log: '${_logdir}/stats.*.log'"
            # shellcheck disable=SC2086
            ${train_cmd} JOB=1:"${_nj}" "${_logdir}"/stats.JOB.log \
                ${python} -m espnet2.bin.lm_train \
                    --collect_stats true \
                    --use_preprocessor true \
                    --bpemodel "${bpemodel}" \
                    --token_type "${lm_token_type}" \
                    --token_list "${lm_token_list}" \
                    --non_linguistic_symbols "${nlsyms_txt}" \
                    --cleaner "${cleaner}" \
                    --g2p "${g2p}" \
                    --train_data_path_and_name_and_type "${data_feats}/lm_train.txt,text,text" \
                    --valid_data_path_and_name_and_type "${lm_dev_text},text,text" \
                    --train_shape_file "${_logdir}/train.JOB.scp" \
                    --valid_shape_file "${_logdir}/dev.JOB.scp" \
                    --output_dir "${_logdir}/stats.JOB" \
                    ${_opts} ${lm_args} || { cat "${_logdir}"/stats.1.log; exit 1; }
            _opts=
            for i in $(seq "${_nj}"); do
                _opts+="--input_dir ${_logdir}/stats.${i} "
            done
            # shellcheck disable=SC2086
            ${python} -m espnet2.bin.aggregate_stats_dirs ${_opts} --output_dir "${lm_stats_dir}" 2> >(grep -v '^\[nltk_data\]' >&2)
            # Append the num-tokens at the last dimensions. This is used for batch-bins count
            for _s in train valid; do
                <"${lm_stats_dir}/${_s}/text_shape" \
                    awk -v N="$(<"${lm_token_list}" wc -l)" '{ print $0 "," N }' \
                    >"${lm_stats_dir}/${_s}/text_shape.${lm_token_type}"
            done
            banner_end
        fi

        if run_stage 7; then
            banner 7 "LM Training: train_set=${data_feats}/lm_train.txt, dev_set=${lm_dev_text}"
            _opts=
            if [ -n "${lm_config}" ]; then
                _opts+="--config ${lm_config} "
            fi
            if [ "${num_splits_lm}" -gt 1 ]; then
                _split_dir="${lm_stats_dir}/splits${num_splits_lm}"
                if [ ! -f "${_split_dir}/.done" ]; then
                    ${python} -m espnet2.bin.split_scps \
                        --scps "${data_feats}/lm_train.txt" "${lm_stats_dir}/train/text_shape.${lm_token_type}" \
                        --num_splits "${num_splits_lm}" \
                        --output_dir "${_split_dir}"
                    touch "${_split_dir}/.done"
                else
                    log "${_split_dir}/.done exists. Spliting is skipped"
                fi
                _opts+="--train_data_path_and_name_and_type ${_split_dir}/lm_train.txt,text,text "
                _opts+="--train_shape_file ${_split_dir}/text_shape.${lm_token_type} "
                _opts+="--multiple_iterator true "
            else
                _opts+="--train_data_path_and_name_and_type ${data_feats}/lm_train.txt,text,text "
                _opts+="--train_shape_file ${lm_stats_dir}/train/text_shape.${lm_token_type} "
            fi
            log "Generate '${lm_exp}/run.sh'. You can resume the process from stage 7 using this script"
            mkdir -p "${lm_exp}"; echo "${run_args} --stage 7 \"\$@\"; exit \$?" > "${lm_exp}/run.sh"; chmod +x "${lm_exp}/run.sh"
            log "LM training started... log: '${lm_exp}/train.log'"
            _dist_opts=
            [ "${ngpu}" -gt 1 ] && _dist_opts="--multiprocessing_distributed true"
            # shellcheck disable=SC2086
            OMP_NUM_THREADS=${train_nthreads} ${cuda_cmd} --gpu "${ngpu}" "${lm_exp}"/train.log \
                ${python} -m espnet2.bin.lm_train \
                    --ngpu "${ngpu}" \
                    --use_preprocessor true \
                    --bpemodel "${bpemodel}" \
                    --token_type "${lm_token_type}" \
                    --token_list "${lm_token_list}" \
                    --non_linguistic_symbols "${nlsyms_txt}" \
                    --cleaner "${cleaner}" \
                    --g2p "${g2p}" \
                    --valid_data_path_and_name_and_type "${lm_dev_text},text,text" \
                    --valid_shape_file "${lm_stats_dir}/valid/text_shape.${lm_token_type}" \
                    --fold_length "${lm_fold_length}" \
                    --resume true \
                    --output_dir "${lm_exp}" \
                    ${_dist_opts} ${_opts} ${lm_args} || { tail -n 40 "${lm_exp}"/train.log; exit 1; }
            banner_end
        fi

        if run_stage 8; then
            banner 8 "Calc perplexity: ${lm_test_text}"
            log "Perplexity calculation started... log: '${lm_exp}/perplexity_test/lm_calc_perplexity.log'"
            # shellcheck disable=SC2086
            ${cuda_cmd} --gpu "${ngpu}" "${lm_exp}"/perplexity_test/lm_calc_perplexity.log \
                ${python} -m espnet2.bin.lm_calc_perplexity \
                    --ngpu "${ngpu}" \
                    --data_path_and_name_and_type "${lm_test_text},text,text" \
                    --train_config "${lm_exp}"/config.yaml \
                    --model_file "${lm_exp}/${inference_lm}" \
                    --output_dir "${lm_exp}/perplexity_test"
            log "PPL: ${lm_test_text}: $(cat "${lm_exp}"/perplexity_test/ppl)"
            banner_end
        fi
    else
        log "Stage 6-8: Skip lm-related stages: use_lm=${use_lm}"
    fi

    if run_stage 9; then
        if "${use_ngram}"; then
            banner 9 "Ngram Training: train_set=${data_feats}/lm_train.txt"
            mkdir -p "${ngram_exp}"
            cut -f 2- -d " " "${data_feats}"/lm_train.txt | lmplz -S "20%" --discount_fallback -o "${ngram_num}" - > "${ngram_exp}/${ngram_num}gram.arpa"
            build_binary -s "${ngram_exp}/${ngram_num}gram.arpa" "${ngram_exp}/${ngram_num}gram.bin"
            banner_end
        else
            log "Stage 9: Skip ngram stages: use_ngram=${use_ngram}"
        fi
    fi

    if run_stage 10; then
        _asr_train_dir="${data_feats}/${train_set}"
        _asr_valid_dir="${data_feats}/${valid_set}"
        banner 10 "ASR collect stats: train_set=${_asr_train_dir}, valid_set=${_asr_valid_dir}"
        [ -f "${token_list}" ] || die "${token_list} not found: run stage 5 first"
        _opts=
        if [ -n "${asr_config}" ]; then
            _opts+="--config ${asr_config} "
        fi
        _scp=wav.scp
        _type=sound
        _opts+="--frontend_conf fs=${fs} "

        # 1. Split the key file
        _logdir="${asr_stats_dir}/logdir"
        rm -rf "${_logdir}"
        mkdir -p "${_logdir}"
        # Get the minimum number among ${nj} and the number lines of input files
        _nj=$(min "${nj}" "$(<"${_asr_train_dir}/${_scp}" wc -l)" "$(<"${_asr_valid_dir}/${_scp}" wc -l)")
        split_keys "${_asr_train_dir}/${_scp}" "${_logdir}/train" "${_nj}"
        split_keys "${_asr_valid_dir}/${_scp}" "${_logdir}/valid" "${_nj}"

        # 2. Generate run.sh
        log "Generate '${asr_stats_dir}/run.sh'. You can resume the process from stage 10 using this script"
        mkdir -p "${asr_stats_dir}"; echo "${run_args} --stage 10 \"\$@\"; exit \$?" > "${asr_stats_dir}/run.sh"; chmod +x "${asr_stats_dir}/run.sh"

        # 3. Submit jobs
        log "ASR collect-stats started... log: '${_logdir}/stats.*.log'"
        # shellcheck disable=SC2086
        ${train_cmd} JOB=1:"${_nj}" "${_logdir}"/stats.JOB.log \
            ${python} -m espnet2.bin.${asr_task}_train \
                --collect_stats true \
                --use_preprocessor true \
                --bpemodel "${bpemodel}" \
                --token_type "${token_type}" \
                --token_list "${token_list}" \
                --non_linguistic_symbols "${nlsyms_txt}" \
                --cleaner "${cleaner}" \
                --g2p "${g2p}" \
                --normalize none \
                --train_data_path_and_name_and_type "${_asr_train_dir}/${_scp},speech,${_type}" \
                --train_data_path_and_name_and_type "${_asr_train_dir}/text,text,text" \
                --valid_data_path_and_name_and_type "${_asr_valid_dir}/${_scp},speech,${_type}" \
                --valid_data_path_and_name_and_type "${_asr_valid_dir}/text,text,text" \
                --train_shape_file "${_logdir}/train.JOB.scp" \
                --valid_shape_file "${_logdir}/valid.JOB.scp" \
                --output_dir "${_logdir}/stats.JOB" \
                ${_opts} ${asr_args} || { tail -n 40 "${_logdir}"/stats.1.log; exit 1; }

        # 4. Aggregate shape files
        _opts=
        for i in $(seq "${_nj}"); do
            _opts+="--input_dir ${_logdir}/stats.${i} "
        done
        # shellcheck disable=SC2086
        ${python} -m espnet2.bin.aggregate_stats_dirs ${_opts} --output_dir "${asr_stats_dir}" 2> >(grep -v '^\[nltk_data\]' >&2)

        # Append the num-tokens at the last dimensions. This is used for batch-bins count
        for _s in train valid; do
            <"${asr_stats_dir}/${_s}/text_shape" \
                awk -v N="$(<"${token_list}" wc -l)" '{ print $0 "," N }' \
                >"${asr_stats_dir}/${_s}/text_shape.${token_type}"
        done
        banner_end
    fi

    if run_stage 11; then
        _asr_train_dir="${data_feats}/${train_set}"
        _asr_valid_dir="${data_feats}/${valid_set}"
        banner 11 "ASR Training: train_set=${_asr_train_dir}, valid_set=${_asr_valid_dir}"
        [ -f "${asr_stats_dir}/train/speech_shape" ] || die "${asr_stats_dir} not found: run stage 10 first"
        _opts=
        if [ -n "${asr_config}" ]; then
            _opts+="--config ${asr_config} "
        fi
        _scp=wav.scp
        _type=sound
        _fold_length="$((asr_speech_fold_length * 100))"
        _opts+="--frontend_conf fs=${fs} "
        if [ "${feats_normalize}" = global_mvn ]; then
            # Default normalization is utterance_mvn and changes to global_mvn
            _opts+="--normalize=global_mvn --normalize_conf stats_file=${asr_stats_dir}/train/feats_stats.npz "
        fi

        if [ "${num_splits_asr}" -gt 1 ]; then
            _split_dir="${asr_stats_dir}/splits${num_splits_asr}"
            if [ ! -f "${_split_dir}/.done" ]; then
                ${python} -m espnet2.bin.split_scps \
                    --scps \
                        "${_asr_train_dir}/${_scp}" \
                        "${_asr_train_dir}/text" \
                        "${asr_stats_dir}/train/speech_shape" \
                        "${asr_stats_dir}/train/text_shape.${token_type}" \
                    --num_splits "${num_splits_asr}" \
                    --output_dir "${_split_dir}"
                touch "${_split_dir}/.done"
            else
                log "${_split_dir}/.done exists. Spliting is skipped"
            fi
            _opts+="--train_data_path_and_name_and_type ${_split_dir}/${_scp},speech,${_type} "
            _opts+="--train_data_path_and_name_and_type ${_split_dir}/text,text,text "
            _opts+="--train_shape_file ${_split_dir}/speech_shape "
            _opts+="--train_shape_file ${_split_dir}/text_shape.${token_type} "
            _opts+="--multiple_iterator true "
        else
            _opts+="--train_data_path_and_name_and_type ${_asr_train_dir}/${_scp},speech,${_type} "
            _opts+="--train_data_path_and_name_and_type ${_asr_train_dir}/text,text,text "
            _opts+="--train_shape_file ${asr_stats_dir}/train/speech_shape "
            _opts+="--train_shape_file ${asr_stats_dir}/train/text_shape.${token_type} "
        fi
        if [ -n "${pretrained_model}" ]; then
            _opts+="--init_param ${pretrained_model} "
        fi
        if [ "${ngpu}" -gt 1 ]; then
            _opts+="--multiprocessing_distributed true "
        fi

        log "Generate '${asr_exp}/run.sh'. You can resume the process from stage 11 using this script"
        mkdir -p "${asr_exp}"; echo "${run_args} --stage 11 \"\$@\"; exit \$?" > "${asr_exp}/run.sh"; chmod +x "${asr_exp}/run.sh"

        # Keep the logs of earlier runs (as espnet2.bin.launch does).
        for i in 4 3 2 1; do
            [ -f "${asr_exp}/train.$((i - 1)).log" ] && mv "${asr_exp}/train.$((i - 1)).log" "${asr_exp}/train.${i}.log"
        done
        [ -f "${asr_exp}/train.log" ] && mv "${asr_exp}/train.log" "${asr_exp}/train.0.log"

        # NOTE(kamo): --fold_length is used only if --batch_type=folded and it's ignored in the other case
        log "ASR training started (${train_nthreads} threads)... log: '${asr_exp}/train.log'"
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=${train_nthreads} ${cuda_cmd} --gpu "${ngpu}" "${asr_exp}"/train.log \
            ${python} -m espnet2.bin.${asr_task}_train \
                --ngpu "${ngpu}" \
                --use_preprocessor true \
                --bpemodel "${bpemodel}" \
                --token_type "${token_type}" \
                --token_list "${token_list}" \
                --non_linguistic_symbols "${nlsyms_txt}" \
                --cleaner "${cleaner}" \
                --g2p "${g2p}" \
                --valid_data_path_and_name_and_type "${_asr_valid_dir}/${_scp},speech,${_type}" \
                --valid_data_path_and_name_and_type "${_asr_valid_dir}/text,text,text" \
                --valid_shape_file "${asr_stats_dir}/valid/speech_shape" \
                --valid_shape_file "${asr_stats_dir}/valid/text_shape.${token_type}" \
                --resume true \
                --ignore_init_mismatch ${ignore_init_mismatch} \
                --fold_length "${_fold_length}" \
                --fold_length "${asr_text_fold_length}" \
                --output_dir "${asr_exp}" \
                ${_opts} ${asr_args} &
        _pid=$!
        # Show the per-epoch summaries while training runs.
        tail -n +1 --pid="${_pid}" -F "${asr_exp}/train.log" 2> /dev/null \
            | grep --line-buffered -v "^\[nltk_data\]" | grep --line-buffered -E "epoch results:|The training has already|Averaging|Traceback|Error" || true &
        _tail=$!
        if ! wait "${_pid}"; then
            wait "${_tail}" 2> /dev/null || true
            log "Error: training failed; the end of ${asr_exp}/train.log:"
            tail -n 40 "${asr_exp}/train.log"
            exit 1
        fi
        wait "${_tail}" 2> /dev/null || true
        [ -e "${asr_exp}/${inference_asr_model}" ] || log "Warning: ${asr_exp}/${inference_asr_model} was not written"
        banner_end
    fi
else
    log "Skip the training stages"
fi

if [ -n "${download_model}" ]; then
    log "Use ${download_model} for decoding and evaluation"
    asr_exp="${expdir}/${download_model}"
    mkdir -p "${asr_exp}"

    # If the model already exists, you can skip downloading
    espnet_model_zoo_download --unpack true "${download_model}" > "${asr_exp}/config.txt"

    # Get the path of each file
    _asr_model_file=$(<"${asr_exp}/config.txt" sed -e "s/.*'asr_model_file': '\([^']*\)'.*$/\1/")
    _asr_train_config=$(<"${asr_exp}/config.txt" sed -e "s/.*'asr_train_config': '\([^']*\)'.*$/\1/")

    # Create symbolic links
    ln -sf "${_asr_model_file}" "${asr_exp}"
    ln -sf "${_asr_train_config}" "${asr_exp}"
    inference_asr_model=$(basename "${_asr_model_file}")

    if [ "$(<"${asr_exp}/config.txt" grep -c lm_file)" -gt 0 ]; then
        _lm_file=$(<"${asr_exp}/config.txt" sed -e "s/.*'lm_file': '\([^']*\)'.*$/\1/")
        _lm_train_config=$(<"${asr_exp}/config.txt" sed -e "s/.*'lm_train_config': '\([^']*\)'.*$/\1/")
        lm_exp="${expdir}/${download_model}/lm"
        mkdir -p "${lm_exp}"
        ln -sf "${_lm_file}" "${lm_exp}"
        ln -sf "${_lm_train_config}" "${lm_exp}"
        inference_lm=$(basename "${_lm_file}")
    fi
fi

if ! "${skip_eval}"; then
    if run_stage 12; then
        banner 12 "Decoding: training_dir=${asr_exp}"
        [ -f "${asr_exp}/${inference_asr_model}" ] || die "${asr_exp}/${inference_asr_model} not found: run stage 11 first"
        if ${gpu_inference}; then
            _cmd="${cuda_cmd}"
            _ngpu=1
        else
            _cmd="${decode_cmd}"
            _ngpu=0
        fi

        _opts=
        if [ -n "${inference_config}" ]; then
            _opts+="--config ${inference_config} "
        fi
        if "${use_lm}"; then
            _opts+="--lm_train_config ${lm_exp}/config.yaml "
            _opts+="--lm_file ${lm_exp}/${inference_lm} "
        fi
        if "${use_ngram}"; then
            _opts+="--ngram_file ${ngram_exp}/${inference_ngram} "
        fi

        # 2. Generate run.sh
        log "Generate '${asr_exp}/${inference_tag}/run.sh'. You can resume the process from stage 12 using this script"
        mkdir -p "${asr_exp}/${inference_tag}"; echo "${run_args} --stage 12 \"\$@\"; exit \$?" > "${asr_exp}/${inference_tag}/run.sh"; chmod +x "${asr_exp}/${inference_tag}/run.sh"

        inference_bin_tag=""
        if [ "${asr_task}" = asr ]; then
            if "${use_streaming}"; then
                inference_bin_tag="_streaming"
            elif "${use_maskctc}"; then
                inference_bin_tag="_maskctc"
            fi
        fi

        for dset in ${test_sets}; do
            _data="${data_feats}/${dset}"
            _dir="${asr_exp}/${inference_tag}/${dset}"
            _logdir="${_dir}/logdir"
            rm -rf "${_logdir}"
            mkdir -p "${_logdir}"
            _scp=wav.scp
            _type=sound

            # 1. Split the key file
            key_file=${_data}/${_scp}
            _nj=$(min "${inference_nj}" "$(<"${key_file}" wc -l)")
            split_keys "${key_file}" "${_logdir}/keys" "${_nj}"

            # 2. Submit decoding jobs
            log "Decoding started... log: '${_logdir}/asr_inference.*.log'"
            # shellcheck disable=SC2086
            ${_cmd} --gpu "${_ngpu}" JOB=1:"${_nj}" "${_logdir}"/asr_inference.JOB.log \
                ${python} -m espnet2.bin.${asr_task}_inference${inference_bin_tag} \
                    --batch_size ${batch_size} \
                    --ngpu "${_ngpu}" \
                    --data_path_and_name_and_type "${_data}/${_scp},speech,${_type}" \
                    --key_file "${_logdir}"/keys.JOB.scp \
                    --asr_train_config "${asr_exp}"/config.yaml \
                    --asr_model_file "${asr_exp}"/"${inference_asr_model}" \
                    --output_dir "${_logdir}"/output.JOB \
                    ${_opts} ${inference_args} || { tail -n 40 "${_logdir}"/asr_inference.1.log; exit 1; }

            # 3. Concatenates the output files from each jobs
            for f in token token_int score text; do
                if [ -f "${_logdir}/output.1/1best_recog/${f}" ]; then
                    for i in $(seq "${_nj}"); do
                        cat "${_logdir}/output.${i}/1best_recog/${f}"
                    done | sort -k1 > "${_dir}/${f}"
                fi
            done
            log "${_dir}/text: $(wc -l < "${_dir}/text") hypotheses"
        done
        banner_end
    fi

    if run_stage 13; then
        banner 13 "Scoring"
        for dset in ${test_sets}; do
            _data="${data_feats}/${dset}"
            _dir="${asr_exp}/${inference_tag}/${dset}"
            [ -f "${_dir}/text" ] || die "${_dir}/text not found: run stage 12 first"
            for _tok_type in char word bpe; do
                [ "${_tok_type}" = bpe ] && [ ! -f "${bpemodel}" ] && continue
                if [ "${_tok_type}" = bpe ]; then _type=ter; else _type="${_tok_type:0:1}er"; fi
                _scoredir="${_dir}/score_${_type}"
                rm -rf "${_scoredir}"
                # sclite-like scoring in Python (local/score.py); ${score_opts} is for sclite only
                ${python} local/score.py \
                    --ref "${_data}/text" --hyp "${_dir}/text" --utt2spk "${_data}/utt2spk" \
                    --token_type "${_tok_type}" --bpemodel "${bpemodel}" \
                    --non_linguistic_symbols "${nlsyms_txt}" \
                    --outdir "${_scoredir}" > /dev/null
                log "Write ${_type} result in ${_scoredir}/result.txt"
                grep -e Avg -e SPKR -m 2 "${_scoredir}/result.txt"
            done
        done

        # shellcheck disable=SC2086
        [ -f local/score.sh ] && local/score.sh ${local_score_opts} "${asr_exp}"

        # Show results in Markdown syntax
        ${python} local/show_asr_result.py "${asr_exp}" > "${asr_exp}"/RESULTS.md
        cat "${asr_exp}"/RESULTS.md
        banner_end
    fi
else
    log "Skip the evaluation stages"
fi

packed_model="${asr_exp}/${asr_exp##*/}_${inference_asr_model%.*}.zip"
if ! "${skip_packing}" && [ -z "${download_model}" ]; then
    # Skip pack preparation if using a downloaded model or skip_packing is true
    if run_stage 14; then
        banner 14 "Pack model: ${packed_model}"
        [ -f "${asr_exp}/${inference_asr_model}" ] || die "${asr_exp}/${inference_asr_model} not found: run stage 11 first"
        _opts=
        if "${use_lm}"; then
            _opts+="--lm_train_config ${lm_exp}/config.yaml "
            _opts+="--lm_file ${lm_exp}/${inference_lm} "
            _opts+="--option ${lm_exp}/perplexity_test/ppl "
            _opts+="--option ${lm_exp}/images "
        fi
        if [ "${feats_normalize}" = global_mvn ]; then
            _opts+="--option ${asr_stats_dir}/train/feats_stats.npz "
        fi
        if [ "${token_type}" = bpe ]; then
            _opts+="--option ${bpemodel} "
        fi
        if [ "${nlsyms_txt}" != none ]; then
            _opts+="--option ${nlsyms_txt} "
        fi
        [ -f "${asr_exp}"/RESULTS.md ] && _opts+="--option ${asr_exp}/RESULTS.md "
        [ -d "${asr_exp}"/images ] && _opts+="--option ${asr_exp}/images "
        rm -f "${packed_model}"
        # shellcheck disable=SC2086
        ${python} -m espnet2.bin.pack ${asr_task} \
            --${asr_task}_train_config "${asr_exp}"/config.yaml \
            --${asr_task}_model_file "${asr_exp}"/"${inference_asr_model}" \
            ${_opts} \
            --outpath "${packed_model}" 2> >(grep -v '^\[nltk_data\]' >&2)
        if [ "${asr_task}" = asr ]; then
            # The zip must load through espnet_model_zoo and decode.
            _wav=$(head -n 1 "${data_feats}/${test_sets%% *}/wav.scp" | cut -d' ' -f2-)
            log "Checking ${packed_model}: Speech2Text.from_pretrained + decoding ${_wav}"
            ${python} local/check_packed_model.py "${packed_model}" "${_wav}" \
                ${inference_config:+--inference_config "${inference_config}"} 2> >(grep -v '^\[nltk_data\]' >&2)
        fi
        banner_end
    fi
else
    log "Skip the packing stage"
fi

if ! "${skip_upload_hf}"; then
    if run_stage 15; then
        banner 15 "Upload model to HuggingFace: ${hf_repo:-<no --hf_repo>}"
        if [ ! -f "${packed_model}" ]; then
            die "${packed_model} does not exist. Please run stage 14 first."
        fi
        if [ -n "${hf_repo}" ]; then
            dir_repo=${expdir}/hf_${hf_repo//"/"/"_"}
        else
            dir_repo=${expdir}/hf_${asr_exp##*/}
        fi
        ${python} local/hf_upload.py \
            --packed_model "${packed_model}" \
            --asr_exp "${asr_exp}" \
            --repo_dir "${dir_repo}" \
            --hf_repo "${hf_repo}" \
            --inference_config "${inference_config}" \
            --corpus "$(basename "$(dirname "${PWD}")")" \
            --lang "${lang}" \
            --fs "${fs}"
        banner_end
    fi
else
    log "Skip the uploading to HuggingFace stage"
fi

log "Successfully finished. [elapsed=${SECONDS}s]"
