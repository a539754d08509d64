# Environment for the recipe (sourced by asr.sh).
# With an ESPnet checkout (ESPNET_ROOT), its Kaldi-style utils/ go on PATH;
# the pip-only asr.sh needs nothing but python3 with espnet installed.
if [ -n "${ESPNET_ROOT:-}" ] && [ -d "${ESPNET_ROOT}/egs2/TEMPLATE/asr1" ]; then
    export PATH="${PWD}/utils:${ESPNET_ROOT}/tools/sctk/bin:${ESPNET_ROOT}/tools/kenlm/build/bin:${PATH}"
    if [ -f "${ESPNET_ROOT}/tools/activate_python.sh" ]; then
        # shellcheck disable=SC1091
        . "${ESPNET_ROOT}/tools/activate_python.sh"
    fi
fi
export LC_ALL=C
export PYTHONIOENCODING=UTF-8
# One thread per job, as in ESPnet's path.sh; asr.sh's --train_nthreads sets
# the threads of the training job itself.
export OMP_NUM_THREADS=1
