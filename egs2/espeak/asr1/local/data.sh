#!/usr/bin/env bash
# Synthesize the espeak corpus: data/{train,dev,test} (Kaldi style, 16 kHz).
# Test speakers (voice variant/accent combinations) never occur in training;
# dev uses the training speakers. The corpus is a pure function of the options:
# re-running with the same options keeps the existing data.
set -euo pipefail

log() {
    local fname=${BASH_SOURCE[1]##*/}
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

smoke=false        # Tiny corpus for CI: overrides the sizes below.
seed=1             # Random seed: same seed, same corpus.
nj=$(nproc 2>/dev/null || echo 1)  # Parallel synthesis jobs.
num_train=2400     # Training utterances.
num_dev=200        # Dev utterances (training speakers).
num_test=200       # Test utterances (unseen speakers).
num_train_spk=48   # Training speakers.
num_test_spk=8     # Test speakers.
wavdir=downloads/espeak  # Where the audio goes.
train_set=train
dev_set=dev
test_set=test

help_message="Usage: $0 [--smoke true] [--seed N] [--nj N] [--num_train N] ...
Options:
  --smoke          Tiny corpus for CI (default=${smoke}).
  --seed           Random seed (default=${seed}).
  --nj             Parallel synthesis jobs (default=${nj}).
  --num_train      Training utterances (default=${num_train}).
  --num_dev        Dev utterances, seen speakers (default=${num_dev}).
  --num_test       Test utterances, unseen speakers (default=${num_test}).
  --num_train_spk  Training speakers (default=${num_train_spk}).
  --num_test_spk   Test speakers (default=${num_test_spk}).
  --wavdir         Audio directory (default=${wavdir})."

log "$0 $*"
. local/parse_options.sh

if [ $# -ne 0 ]; then
    echo "${help_message}" 1>&2
    exit 2
fi

if ${smoke}; then
    num_train=160
    num_dev=24
    num_test=24
    num_train_spk=12
    num_test_spk=4
fi

for tool in espeak-ng sox; do
    if ! command -v "${tool}" > /dev/null; then
        log "Error: ${tool} is not installed; this recipe synthesizes its corpus with espeak-ng and sox."
        log "Install them with: sudo apt-get install espeak-ng sox   (macOS: brew install espeak-ng sox)"
        exit 1
    fi
done

python=${python:-python3}
opts="--seed ${seed} --num_train ${num_train} --num_dev ${num_dev} --num_test ${num_test}"
opts+=" --num_train_spk ${num_train_spk} --num_test_spk ${num_test_spk} --wavdir ${wavdir}"
opts+=" --train_set ${train_set} --dev_set ${dev_set} --test_set ${test_set}"
stamp=data/.espeak_corpus

complete=true
for dset in "${train_set}" "${dev_set}" "${test_set}"; do
    for f in wav.scp text utt2spk spk2utt; do
        [ -s "data/${dset}/${f}" ] || complete=false
    done
done
if ${complete} && [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${opts} $(espeak-ng --version)" ]; then
    log "data/{${train_set},${dev_set},${test_set}} already synthesized with these options: skip"
    exit 0
fi

rm -rf "data/${train_set}" "data/${dev_set}" "data/${test_set}" "${wavdir}" "${stamp}"
mkdir -p data
# shellcheck disable=SC2086
${python} local/synthesize.py --outdir data --nj "${nj}" ${opts}
echo "${opts} $(espeak-ng --version)" > "${stamp}"

for dset in "${train_set}" "${dev_set}" "${test_set}"; do
    log "data/${dset}: $(wc -l < "data/${dset}/wav.scp") utterances, $(wc -l < "data/${dset}/spk2utt") speakers"
done
log "Successfully finished."
