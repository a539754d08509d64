#!/usr/bin/env bash
# Small, dependency-free equivalent of Kaldi's utils/parse_options.sh.
#
# Source it after the option variables are defined:
#     stage=1
#     use_lm=false
#     . local/parse_options.sh
# "--stage 3", "--stage=3" and "--use-lm true" set the variables. An option
# whose variable is not defined is an error, and so is a boolean (a variable
# whose default is true or false) given anything but true/false.
# "--config FILE" sources FILE first (lines like "stage=3").
# Parsing stops at the first non-option argument or at "--"; what is left stays
# in "$@".

while true; do
    [ -z "${1:-}" ] && break
    case "$1" in
        --help | -h)
            if [ -n "${help_message:-}" ]; then
                printf '%s\n' "${help_message}" 1>&2
            else
                echo "No help found." 1>&2
            fi
            exit 0
            ;;
        --)
            shift
            break
            ;;
        --*=*)
            __name="${1%%=*}"
            __value="${1#*=}"
            shift
            ;;
        --*)
            if [ $# -lt 2 ]; then
                echo "$0: option '$1' needs a value" 1>&2
                exit 1
            fi
            __name="$1"
            __value="$2"
            shift 2
            ;;
        *)
            break
            ;;
    esac
    __name="${__name#--}"
    __name="${__name//-/_}"
    if [ "${__name}" = config ]; then
        if [ ! -f "${__value}" ]; then
            echo "$0: --config: no such file: ${__value}" 1>&2
            exit 1
        fi
        # shellcheck disable=SC1090
        . "${__value}"
        continue
    fi
    if ! [[ "${__name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!__name+set}" ]; then
        echo "$0: invalid option: --${__name}" 1>&2
        exit 1
    fi
    __old="${!__name}"
    if [ "${__old}" = true ] || [ "${__old}" = false ]; then
        if [ "${__value}" != true ] && [ "${__value}" != false ]; then
            echo "$0: --${__name} takes true or false, not '${__value}'" 1>&2
            exit 1
        fi
    fi
    printf -v "${__name}" '%s' "${__value}"
done
unset __name __value __old
true
