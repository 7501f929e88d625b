#!/usr/bin/env python3
"""An exec consumer in Python, standard library only (see
examples/exec-python.toml): taskherd runs it once per job, the job's JSON
on stdin. Exit 0: done; 75 (EX_TEMPFAIL): try again later; 65 (EX_DATAERR):
dead; an exception (exit 1): retried until max_attempts."""
import json
import os
import sys
import time

job = json.load(sys.stdin)
attempt = int(os.environ["TASKHERD_JOB_ATTEMPT"])
deadline_ms = int(os.environ["TASKHERD_JOB_DEADLINE"])  # the lease's end

if job.get("image") == "fail":
    print(f"cannot handle {job}", file=sys.stderr)
    sys.exit(65)
if job.get("image") == "busy" and attempt < 2:
    sys.exit(75)
left = deadline_ms / 1000 - time.time()
# ... the real work, within `left` seconds ...
print(f"handled {job['image']} (job {os.environ['TASKHERD_JOB_ID']}, attempt {attempt}, {left:.0f} s left)")
