#!/bin/sh
# An exec consumer in shell (see examples/exec.toml): taskherd runs it once
# per job, the job's JSON on stdin. Exit 0: done; 75: try again later (the
# queue's backoff); 65: the job can never succeed (dead, with this status
# as its reason); anything else: retried until max_attempts.
set -eu
job=$(cat)
case "$job" in
  *'"fail"'*) echo "cannot handle $job" >&2; exit 65 ;;
  *'"busy"'*) [ "$TASKHERD_JOB_ATTEMPT" -ge 2 ] || exit 75 ;;
esac
# ... the real work: $job is the JSON text, e.g. {"image": "a.png"} ...
echo "handled $job (job $TASKHERD_JOB_ID, attempt $TASKHERD_JOB_ATTEMPT)"
