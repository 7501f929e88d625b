#!/usr/bin/env python3
"""A coprocess consumer in Python, standard library only (see
examples/coprocess-python.toml): taskherd starts it once per consumer
instance and speaks JSON lines with it (README, "Coprocess consumers").
Jobs come on stdin, answers go on stdout, logs on stderr. Each job runs
on a thread of its own: up to the group's concurrency at once."""

import json
import sys
import threading

out = threading.Lock()


def send(message):
    with out:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def log(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def work(job):
    image = job["payload"].get("image")
    if image == "fail":
        log("cannot handle %s" % json.dumps(job["payload"]))
        send({"type": "dead", "id": job["id"], "reason": "cannot handle fail"})
        return
    if image == "busy" and job["attempt"] < 2:
        send({"type": "retry", "id": job["id"], "reason": "busy, later"})
        return
    # ... the real work; a long one says {"type": "progress", "id": ...}
    # now and then so that its lease does not run out ...
    log("handled %s (job %d, attempt %d)" % (json.dumps(job["payload"]), job["id"], job["attempt"]))
    send({"type": "ok", "id": job["id"]})


def main():
    workers = []
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("type") == "hello":
            log("coprocess protocol %d, %d at once" % (message["protocol"], message["concurrency"]))
        elif message.get("type") == "job":
            worker = threading.Thread(target=work, args=(message,))
            worker.start()
            workers.append(worker)
        # Other types: messages of later protocol versions, ignored.
    # End of input: taskherd is stopping this consumer.
    for worker in workers:
        worker.join()


main()
