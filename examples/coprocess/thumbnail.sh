#!/bin/sh
# A coprocess consumer in shell (see examples/coprocess.toml): taskherd
# starts it once per consumer instance and writes one JSON line per job on
# its stdin; it answers one JSON line per job on its stdout (its stderr is
# the log). Only printf and sed: the job line's fields come in a fixed
# order, payload last (README, "Coprocess consumers").
#   {"type":"job","id":7,"attempt":1,"deadline_ms":1767225600000,"payload":{"image":"a.png"}}
# Answers: ok; retry (the queue's backoff, or "delay_ms"); dead (never
# again, with a reason).
while IFS= read -r line; do
  case "$line" in
    '{"type":"job",'*) ;;
    *) continue ;;   # the hello, and messages of later protocol versions
  esac
  id=$(printf '%s\n' "$line" | sed 's/^{"type":"job","id":\([0-9]*\),.*/\1/')
  attempt=$(printf '%s\n' "$line" | sed 's/^{"type":"job","id":[0-9]*,"attempt":\([0-9]*\),.*/\1/')
  job=$(printf '%s\n' "$line" | sed 's/^{"type":"job","id":[0-9]*,"attempt":[0-9]*,"deadline_ms":[0-9a-z]*,"payload":\(.*\)}$/\1/')
  case "$job" in
    *'"fail"'*)
      echo "cannot handle $job" >&2
      printf '{"type":"dead","id":%s,"reason":"cannot handle fail"}\n' "$id"
      continue ;;
    *'"busy"'*)
      if [ "$attempt" -lt 2 ]; then
        printf '{"type":"retry","id":%s,"reason":"busy, later"}\n' "$id"
        continue
      fi ;;
  esac
  # ... the real work: $job is the JSON text, e.g. {"image":"a.png"} ...
  echo "handled $job (job $id, attempt $attempt)" >&2
  printf '{"type":"ok","id":%s}\n' "$id"
done
# End of input: taskherd is stopping this consumer; nothing is outstanding.
