# Job runners, as in ESPnet's cmd.sh ("local" backend only). With an ESPnet
# checkout, Kaldi's utils/run.pl; otherwise local/run_jobs.sh, which has the
# same interface: ${train_cmd} JOB=1:N log/x.JOB.log command ...
if [ -x utils/run.pl ]; then
    export train_cmd="run.pl"
    export cuda_cmd="run.pl"
    export decode_cmd="run.pl"
else
    export train_cmd="local/run_jobs.sh"
    export cuda_cmd="local/run_jobs.sh"
    export decode_cmd="local/run_jobs.sh"
fi
