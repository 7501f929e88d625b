#!/usr/bin/env python3
"""A no-op coprocess consumer for scripts/bench.sh (section exec), standard
library only: it answers {"type":"ok","id":N} to every job at once
(README, "Coprocess consumers", protocol version 1).

It reads whatever its stdin holds (os.read: no waiting for a full buffer),
answers every whole job line of it with one write, and exits at the end of
its stdin. Reading in chunks is what keeps it from deadlocking and from
paying a system call per job: taskherd sends at most `concurrency` jobs
before it waits for answers, and all of these come in one or a few reads.

Job lines come with their fields in a fixed order (`{"type":"job","id":17,
...`, no spaces), so the id is cut out of the line; any other line is
decoded as JSON (hello, or a type of a later protocol version, ignored).
Pass --json to decode every line instead (the cost of a real parser)."""

import json
import os
import sys

JOB = b'{"type":"job","id":'


def job_id(line, decode):
    """The id of a job line, or None for another message."""
    if not decode and line.startswith(JOB):
        end = line.find(b",", len(JOB))
        if end > 0:
            return int(line[len(JOB):end])
    message = json.loads(line)
    if message.get("type") == "job":
        return int(message["id"])
    return None


def main():
    decode = "--json" in sys.argv[1:]
    rest = b""
    jobs = 0
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        answers = []
        for line in lines:
            if not line:
                continue
            ident = job_id(line, decode)
            if ident is not None:
                answers.append(b'{"type":"ok","id":%d}\n' % ident)
        if answers:
            data = b"".join(answers)
            while data:
                data = data[os.write(1, data):]
            jobs += len(answers)
    if rest.strip():
        sys.stderr.write("noop coprocess: a last line without a newline: %r\n" % rest[:200])
        return 1
    # On stderr (a log line of the instance), counted by the bench: a "log"
    # message on stdout would come too late (taskherd no longer reads it
    # once the consumer has finished).
    sys.stderr.write("noop coprocess: %d jobs answered\n" % jobs)
    return 0


sys.exit(main())
