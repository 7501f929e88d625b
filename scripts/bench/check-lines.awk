# Checks the log of one log-relay run of scripts/bench.sh: every line the
# producers printed (scripts/bench/producer.sh) is there once, intact, with
# the right tag, and in each producer's order. Writes the untagged payloads
# of producer <id> to <out>.<id> (for a checksum), and prints one summary
# line; exits 1 on any problem.
#
#   awk -v tool=taskherd|parallel -v producers=4 -v lines=250000 -v out=DIR/payload \
#       -f check-lines.awk LOG
#
# taskherd lines: "<time> info      [logs] [localhost] [producer.sh/<id>/<id>] <payload>"
#   (its own events about the instances, "... [producer.sh/1/1] started (pid
#   ...)", are counted apart; any other line is an error).
# parallel --tag lines: "<id>\t<payload>".
BEGIN {
    body = "the-quick-brown-fox-jumps-over-the-lazy-dog-0123"
    bad = 0; data = 0; events = 0
}

function problem(why) {
    bad++
    if (bad <= 5)
        printf "check-lines: %s: line %d: %s: %s\n", tool, NR, why, substr($0, 1, 200) > "/dev/stderr"
}

{
    if (tool == "parallel") {
        tab = index($0, "\t")
        if (tab == 0) { problem("no tag"); next }
        tag = substr($0, 1, tab - 1)
        payload = substr($0, tab + 1)
        level = "info"
    } else {
        at = index($0, "] [producer.sh/")
        if (at == 0) {
            if (index($0, " [master] ") > 0) { events++; next }
            problem("no instance label"); next
        }
        if (substr($0, 1, at) !~ /^[0-9T:.Z-]+ [a-z]+ +\[logs\] \[localhost\]$/) {
            problem("bad prefix"); next
        }
        level = substr($0, 1, at); sub(/^[^ ]+ /, "", level); sub(/ .*/, "", level)
        rest = substr($0, at + 15)          # "<id>/<group id>] <payload>"
        close_at = index(rest, "] ")
        if (close_at == 0) { problem("bad label"); next }
        split(substr(rest, 1, close_at - 1), ids, "/")
        if (ids[1] != ids[2]) { problem("id and group id differ"); next }
        tag = ids[1]
        payload = substr(rest, close_at + 2)
        if (payload !~ /^P[0-9]+ [0-9]+ /) { events++; next }
    }
    # tag + 0: a number, not the string (which "4" > "32" would compare)
    if (tag !~ /^[0-9]+$/ || tag + 0 < 1 || tag + 0 > producers + 0) { problem("bad tag " tag); next }
    if (level != "info") { problem("level " level); next }
    want = sprintf("P%d %07d %s", tag, seen[tag] + 1, body)
    if (payload != want) { problem("expected \"" want "\""); next }
    seen[tag]++
    data++
    print payload > (out "." tag)
}

END {
    for (p = 1; p <= producers; p++) {
        if (seen[p] + 0 != lines + 0) {
            bad++
            printf "check-lines: %s: producer %d: %d of %d lines\n", tool, p, seen[p], lines > "/dev/stderr"
        }
        close(out "." p)
    }
    printf "%s: %d data lines (%d expected), %d event lines, %d problems\n", tool, data, producers * lines, events, bad
    exit bad > 0 ? 1 : 0
}
