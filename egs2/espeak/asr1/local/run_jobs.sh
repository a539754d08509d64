#!/usr/bin/env bash
# Kaldi-free stand-in for utils/run.pl (local machine only).
#   local/run_jobs.sh [--gpu N] [--mem M] [--num_threads N] [--max_jobs_run N] \
#       [JOB=1:N] LOGFILE COMMAND...
# "JOB" in LOGFILE and COMMAND is replaced by the job index; the jobs run in
# parallel (at most --max_jobs_run at once, default: all), each writing its
# output to its own log. Exits non-zero if any job failed, naming its log.
set -euo pipefail

max_jobs_run=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --max-jobs-run | --max_jobs_run) max_jobs_run=$2 ;;
        --gpu | --mem | --num-threads | --num_threads | --num_nodes | --num-nodes | --name | --config) ;;
        *) echo "$0: unknown option $1" 1>&2; exit 1 ;;
    esac
    shift 2
done

first=1
last=1
jobvar=
if [[ $# -gt 0 && "$1" =~ ^([A-Za-z_]+)=([0-9]+):([0-9]+)$ ]]; then
    jobvar=${BASH_REMATCH[1]}
    first=${BASH_REMATCH[2]}
    last=${BASH_REMATCH[3]}
    shift
fi
if [ $# -lt 2 ]; then
    echo "Usage: $0 [options] [JOB=1:N] <log> <command>..." 1>&2
    exit 1
fi
logtpl=$1
shift
cmd=$(printf '%q ' "$@")

run_one() {
    local i=$1 log c
    if [ -n "${jobvar}" ]; then
        log=${logtpl//${jobvar}/${i}}
        c=${cmd//${jobvar}/${i}}
    else
        log=${logtpl}
        c=${cmd}
    fi
    mkdir -p "$(dirname "${log}")"
    local start=${SECONDS} rc=0
    {
        echo "# ${c}"
        echo "# Started at $(date)"
    } > "${log}"
    bash -c "${c}" >> "${log}" 2>&1 || rc=$?
    {
        echo "# Accounting: time=$((SECONDS - start)) threads=1"
        echo "# Ended (code ${rc}) at $(date)"
    } >> "${log}"
    return "${rc}"
}

pids=()
logs=()
for ((i = first; i <= last; i++)); do
    if [ "${max_jobs_run}" -gt 0 ]; then
        while [ "$(jobs -rp | wc -l)" -ge "${max_jobs_run}" ]; do
            wait -n || true
        done
    fi
    run_one "${i}" &
    pids+=($!)
    if [ -n "${jobvar}" ]; then logs+=("${logtpl//${jobvar}/${i}}"); else logs+=("${logtpl}"); fi
done
failed=0
for k in "${!pids[@]}"; do
    if ! wait "${pids[${k}]}"; then
        echo "$0: job failed, log is in ${logs[${k}]}" 1>&2
        failed=$((failed + 1))
    fi
done
[ "${failed}" -eq 0 ] || { echo "$0: ${failed} / $((last - first + 1)) jobs failed" 1>&2; exit 1; }
