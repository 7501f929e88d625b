#!/usr/bin/env bash
# The benchmark suite of issue 7: taskherd against GNU parallel and pdsh on
# this machine, in one run, with every output checked. Prints the machine,
# each measurement as it goes, then one table:
#
#   measurement | taskherd | other tool | ratio | target | met/MISSED
#
# 1. Log relay: 4, then 32 local producers (scripts/bench/producer.sh,
#    1 000 000 lines of 60 bytes in all: 250 000 each, then 31 250) under
#    `taskherd run` (lines tagged with group, host and instance, to a file)
#    and under `parallel --tag --line-buffer` (its default -j: one job per
#    core at a time);
#    every line checked (present once, intact, tagged, in order) and the
#    checksum of the untagged payloads compared with the producers' own.
# 2. Remote fan-out: instances that print one line and exit, on loopback
#    sshd hosts, 2 × 4 and 8 × 8, spawn to exit, against `pdsh -R ssh` and
#    `parallel -S` (`cargo bench --bench remote_start -- --fanout`), and the
#    stop latency of 2 × 4 remote library instances; then the output of an
#    ad hoc command: `taskherd exec -w h1,h2 -- seq 1 500000` against
#    `pdsh -R ssh -w h1,h2 'seq 1 500000'`, both read through a pipe, every
#    line checked (`host: n`, each once, in order per host).
# 3. Queue: no-op jobs, feeder -> 4 consumers with acks, and the round trip
#    at light load (`cargo bench --bench queue`).
# 4. Supervision cost: master CPU over 10 s with 100 idle local library
#    instances (examples/worker), and its peak RSS (VmHWM).
# 5. Stop latency: SIGTERM to the master's exit with those 100 instances.
# 6. Durable queue (`durable`): no-op jobs through a durable file feeder
#    (FileFeeder journal on the disk) -> 4 consumers x 8 -> acks, next to
#    `beanstalkd -b DIR` (1 producer + 4 consumers, put/reserve/delete) on
#    the same machine in the same run (`cargo bench --bench durable_queue`);
#    then with the release binary and a queue of BENCH_DURABLE_START_JOBS
#    jobs (`seq 1 N | taskherd queue add Q -`): `taskherd queue list Q`
#    timed just added and once the jobs are in the journal (after `taskherd
#    queue compact Q`, which also gives the bytes per pending job), and the
#    time from `taskherd run` (a queue group of examples/queue_worker on Q,
#    4 local consumers x 8) to the first job done, then SIGTERM; the queue
#    is checked afterwards (nothing lost, nothing dead).
# 7. Exec and coprocess consumers (`exec`), with the release binary:
#    BENCH_EXEC_JOBS no-op jobs (`true`) through exec consumers, 4 local
#    consumers x 8, next to `parallel -j32 true ::: $(seq N)` and `seq N |
#    xargs -P32 -n1 true` in the same run: first fed by the command feeder
#    (`seq 1 N`), timed as those tools are (`taskherd run` until it ends by
#    itself, every job done); then from a durable file queue, as below; then
#    BENCH_COPROC_JOBS no-op jobs through a Python coprocess consumer
#    (scripts/bench/noop_coprocess.py), 4 consumers x each concurrency of
#    BENCH_COPROC_CONCURRENCY. The jobs are added first (`taskherd queue add
#    Q -`, not timed); the time runs from `taskherd run` until `taskherd
#    queue list --json Q` (polled every 10 ms) shows nothing left in the
#    journal or the inbox, then SIGTERM. Checked: exit 0, nothing left, the
#    feeder's count (all done, none failed, retried or dead), the queue
#    empty; for the tools their exit status (and, dry, that each runs
#    `true N` N times); the coprocesses' own counts of jobs answered.
# 8. Scale (`scale`, only when asked for: BENCH_ONLY=scale; about 10-15
#    minutes with 3 runs on 2 cores): `cargo bench --bench remote_start --
#    --scale` on 64 loopback sshd hosts. First, without ssh, the CPU of
#    one host's side: `taskherd agent` given 4 instances, against `sh`
#    starting the same 4 programs and `sh` with 4 echo builtins (what
#    pdsh's commands run). The cost of the rc file of the
#    `taskherd-rc` login (bash, a .bashrc that sleeps 0.2 s, as
#    scripts/test makes it; made here when missing): `ssh host true` as
#    taskherd-rc minus as taskherd-test (/bin/sh). Fan-out to completion of
#    2, 16 and 64 hosts x 4 instances (`echo done $TASKHERD_ID`, exit) with
#    each login, next to `pdsh -R ssh -f 64` running ONE remote command per
#    host that prints the 4 lines (its best case: one handshake and one rc
#    file per host, as taskherd; the rc file's log is checked for exactly
#    one run per host and tool; taskherd, as pdsh, starts each ssh in a
#    session of its own). 64 hosts x 8
#    long-running instances, /bin/sh login: spawn to all 512 running, then
#    SIGTERM to exit; the same with
#    KexAlgorithms curve25519-sha256 in the ssh_config (OpenSSH's default,
#    sntrup761x25519, costs the client several times the CPU). The master's CPU, VmHWM and file descriptors (and its
#    ssh processes': one per host) at 8,
#    16, 32 and 64 hosts x 8, all running and over 10 s idle, with the
#    slope per host; its CPU per relayed line, 8 hosts x 4 instances
#    printing 20 000 lines each at once, and 1 000 each 5 ms apart (a frame
#    per line).
# 9. HTTP (`http`, only when asked for: BENCH_ONLY=http; about 1-2
#    minutes with 3 runs): `cargo bench --bench http` with the release
#    binary: jobs posted to the webhook of a running master (its queue
#    group suspended, so the HTTP side and the durable inbox are what is
#    measured), 1000 jobs a request on 4 connections and 1 job a request
#    on 32, next to `taskherd queue add` run once per job; every job
#    checked in the queue afterwards. Then `/metrics` of a master running
#    1000 `sleep` instances: time, master CPU and size per scrape.
# 10. NATS JetStream (`nats`, only when asked for: BENCH_ONLY=nats): no-op jobs with acks through a real
#    `nats-server -js` on loopback (file storage), 4 consumers x 8 (the
#    real JetStream consumer, `cargo bench --bench nats_queue`): one node
#    (R1) and a 3-node cluster (R3); next to the durable queue's embedded
#    feeder and beanstalkd rows when `durable` runs in the same run
#    (BENCH_ONLY="durable nats").
#
#   scripts/bench.sh                  # about 2-3 minutes once built, plus 3-5 for durable
#   BENCH_RUNS=5 scripts/bench.sh     # runs per measurement (default 3; the log relay: at least 5)
#   BENCH_LOG_PRODUCERS="4 32"        # producers of the log relay rows, one row each (default "4 32")
#   BENCH_LOG_LINES=250000            # lines of each of 4 producers; N producers print 4/N of that each
#   BENCH_STRICT=1 scripts/bench.sh   # exit 3 when a target is missed
#   BENCH_NO_BUILD=1 scripts/bench.sh # use the release builds as they are (no cargo)
#   CARGO_TARGET_DIR=DIR scripts/bench.sh     # builds there and runs those builds (absolute, or
#                                             # relative to the current directory, as cargo has it)
#   BENCH_ONLY="logs local" scripts/bench.sh   # some of: logs fanout queue local durable exec http nats scale
#   BENCH_NATS_JOBS=100000            # jobs of the JetStream rows (default 100 000)
#   BENCH_ONLY=scale scripts/bench.sh # the scale rows (8. below; not in the default set)
#   BENCH_ONLY=scale BENCH_SCALE_PARTS="fanout-rc start" scripts/bench.sh
#                                     # only those parts of them (of: ssh fanout-sh fanout-rc start costs lines)
#   BENCH_SCALE_TOOLS="taskherd pdsh" BENCH_SCALE_FANOUT="64" ...
#                                     # the fan-out rows' tools (of: taskherd pdsh pdsh_programs) and
#                                     # host counts (of: 2 16 64), to profile one of them
#   BENCH_ONLY=http scripts/bench.sh  # the HTTP rows (9. below; not in the default set)
#   BENCH_DURABLE_JOBS=200000         # jobs of the durable queue bench (default 200 000)
#   BENCH_DURABLE_START_JOBS=1000000  # jobs of the queue list / start-time rows (default 1 000 000)
#   BENCH_DURABLE_TIMEOUT=600         # bound on each durable step, in seconds (default 600)
#   BENCH_EXEC_JOBS=10000             # jobs of the exec rows (default 10 000)
#   BENCH_EXEC_CREDITS=32             # [group.queue] credits of the exec consumers (default 32)
#   BENCH_COPROC_JOBS=100000          # jobs of the coprocess rows (default 100 000)
#   BENCH_COPROC_CONCURRENCY="32 8"   # concurrency of each coprocess consumer, one row each (the first
#                                     # is the target's row; default "8 32")
#   BENCH_EXEC_TIMEOUT=300            # bound on each exec step (a herd, a tool's run), in seconds (default 300)
#   BENCH_TASKHERD=/path/taskherd BENCH_ONLY="logs local" scripts/bench.sh
#                                     # another build (e.g. a patched copy) for logs and local
#
# Missing tools are installed from Debian (parallel, pdsh, openssh-server,
# openssh-client, mawk, beanstalkd, python3; with sudo when not root), and the `taskherd-test`
# login of scripts/test is created. Exit status: 0 when every check passed
# (1 when a check failed: lines lost, a wrong exit code, a process left
# behind), 3 with BENCH_STRICT=1 and a target missed.
#
# Every process it starts carries TASKHERD_BENCH_MARK=<this run> in its
# environment (sessions of the bench's sshd hosts carry their own marker);
# on any exit, whatever still carries one is killed.
# shellcheck disable=SC2317 # cleanup and its helpers run from traps
set -euo pipefail
# Cargo's build directory: CARGO_TARGET_DIR (or CARGO_BUILD_TARGET_DIR) as
# the caller gave it, absolute or relative to the caller's directory, else
# target/ of the repository. Made absolute before the cd below and exported,
# so that cargo builds where this script looks.
target_dir=${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-}}
if [ -n "$target_dir" ]; then
    [[ "$target_dir" == /* ]] || target_dir=$PWD/$target_dir
    export CARGO_TARGET_DIR=$target_dir
fi
cd "$(dirname "$0")/.."
root=$PWD
target_dir=${target_dir:-$root/target}
# A path cargo printed: relative ones are relative to $root (where cargo ran).
from_root() {
    case $1 in
    '') ;;
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$root/$1" ;;
    esac
}
runs=${BENCH_RUNS:-3}
only=${BENCH_ONLY:-logs fanout queue local durable exec}
log_producers=${BENCH_LOG_PRODUCERS:-4 32}
log_lines_of_4=${BENCH_LOG_LINES:-250000}
# The log relay is short and the most sensitive to a busy machine: more runs.
log_runs=${BENCH_LOG_RUNS:-$(( runs > 5 ? runs : 5 ))}
idle_instances=100
idle_seconds=10
durable_jobs=${BENCH_DURABLE_JOBS:-200000}
durable_start_jobs=${BENCH_DURABLE_START_JOBS:-1000000}
durable_timeout=${BENCH_DURABLE_TIMEOUT:-600}
exec_jobs=${BENCH_EXEC_JOBS:-10000}
exec_credits=${BENCH_EXEC_CREDITS:-32}
coproc_jobs=${BENCH_COPROC_JOBS:-100000}
coproc_concurrency=${BENCH_COPROC_CONCURRENCY:-32 8}
exec_timeout=${BENCH_EXEC_TIMEOUT:-300}
sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
export LC_ALL=C

say() { printf '%s\n' "$*"; }
# Other work on the machine skews every figure (taskherd uses both cores,
# parallel and pdsh mostly one): each section shows the load it started at.
section() { printf '\n== %s (load %s)\n' "$*" "$(cut -d' ' -f1 /proc/loadavg)"; }
die() {
    printf 'bench: FAILED: %s\n' "$*" >&2
    exit 1
}
wants() { [[ " $only " == *" $1 "* ]]; }

# ---------------------------------------------------------------- cleanup

mark="taskherd-bench-$$-${RANDOM}${RANDOM}"
# Pids of the Rust bench binaries: each leads its own process group (its
# sshd listeners, which overwrite their environment with their title, are
# in it) and is the prefix of its sshd sessions' marker.
bench_pids=()
work=$(mktemp -d "${TMPDIR:-/tmp}/taskherd-bench.XXXXXX")
mkdir "$work/tmp" # TMPDIR of the benches: their temp dirs go with $work

# Pids of live processes that carry this run's mark (or an sshd marker of
# one of our bench binaries), this shell and its parents aside.
marked_pids() {
    local patterns=(-e "TASKHERD_BENCH_MARK=$mark")
    local pid
    for pid in "${bench_pids[@]}"; do
        patterns+=(-e "TASKHERD_TEST_SSHD=$pid-")
    done
    grep -l -a -F "${patterns[@]}" /proc/[0-9]*/environ 2>/dev/null \
        | sed -n 's|^/proc/\([0-9]*\)/environ$|\1|p' \
        | grep -v -x -e "$$" -e "$PPID" || true
}

kill_marked() {
    local pids pid
    for pid in "${bench_pids[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        pids=$(marked_pids)
        [ -z "$pids" ] && return 0
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    say "bench: processes would not die: $(marked_pids | tr '\n' ' ')" >&2
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    kill_marked
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'say "bench: interrupted" >&2; exit 130' INT TERM

# Prefix of every command we start: marks it (and what it starts) as ours.
# Not a function, so that `"${marked[@]}" cmd &` leaves cmd's pid in $!.
marked=(env "TASKHERD_BENCH_MARK=$mark")

# Fails when something we started is still alive (after a bounded wait).
check_nothing_left() {
    local what=$1 pids pid
    for _ in $(seq 100); do
        pids=$(marked_pids)
        [ -z "$pids" ] && return 0
        sleep 0.05
    done
    for pid in $pids; do
        ps -o pid=,ppid=,args= -p "$pid" >&2 || true
    done
    die "$what: processes left behind: $(echo "$pids" | tr '\n' ' ')"
}

now() { echo "$EPOCHREALTIME"; }
# Milliseconds between two $EPOCHREALTIME values, one decimal.
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }
# Median of numbers given as arguments.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        s = sprintf("%.1f", m); sub(/\.0$/, "", s); print s }'
}

# ------------------------------------------------------------ dependencies

# What the sections asked for need (logs: parallel, mawk, time; fanout:
# parallel, pdsh, ssh; durable: beanstalkd; exec: parallel, python3).
missing=()
if wants logs || wants fanout || wants scale; then
    command -v parallel >/dev/null 2>&1 || missing+=(parallel)
    command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    { command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; } || missing+=(openssh-client)
    command -v mawk >/dev/null 2>&1 || missing+=(mawk)
    [ -x /usr/bin/time ] || missing+=(time)
fi
if wants durable && ! command -v beanstalkd >/dev/null 2>&1; then missing+=(beanstalkd); fi
if wants nats && [ ! -x /usr/sbin/nats-server ]; then missing+=(nats-server); fi
if wants exec; then
    if ! command -v parallel >/dev/null 2>&1 && [[ " ${missing[*]} " != *" parallel "* ]]; then missing+=(parallel); fi
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
fi
if [ ${#missing[@]} -gt 0 ]; then
    section "installing ${missing[*]}"
    # The sshd package's service must not start (it would listen on every
    # address): a policy-rc.d for the time of the install, as scripts/test.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        made_policy=1
    fi
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; then
        $sudo apt-get update
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi
    [ -n "$made_policy" ] && $sudo rm -f "$policy"
    # The bench starts beanstalkd servers of its own, on loopback: the
    # package's service (on every address, port 11300) must not run. The
    # policy-rc.d kept it from starting; should it run all the same (an
    # existing policy-rc.d that allows it), stop it.
    if [[ " ${missing[*]} " == *" beanstalkd "* ]]; then
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet beanstalkd 2>/dev/null; then
            $sudo systemctl stop beanstalkd
            $sudo systemctl disable --quiet beanstalkd || true
        elif [ -x /etc/init.d/beanstalkd ] && $sudo /etc/init.d/beanstalkd status >/dev/null 2>&1; then
            $sudo /etc/init.d/beanstalkd stop
        fi
    fi
fi
# The login of the remote sessions (see scripts/test): uid 0, /bin/sh.
if { wants fanout || wants scale; } && [ -z "${TASKHERD_TEST_NO_LOGIN:-}" ] && ! id taskherd-test >/dev/null 2>&1; then
    $sudo useradd --non-unique --uid 0 --gid 0 --no-create-home \
        --home-dir /var/lib/taskherd-test --shell /bin/sh taskherd-test
    $sudo usermod --password '*' taskherd-test
    $sudo mkdir -p /var/lib/taskherd-test
fi
# The login with a 0.2 s rc file (as scripts/test makes it with
# TASKHERD_TEST_LOGIN=1, the same file): uid 0, bash, a .bashrc that notes
# each command.
if wants scale && [ -z "${TASKHERD_TEST_NO_LOGIN:-}" ] && ! id taskherd-rc >/dev/null 2>&1; then
    $sudo useradd --non-unique --uid 0 --gid 0 --no-create-home \
        --home-dir /var/lib/taskherd-rc --shell /bin/bash taskherd-rc
    $sudo usermod --password '*' taskherd-rc
    $sudo mkdir -p /var/lib/taskherd-rc
    # shellcheck disable=SC2016 # the rc file expands it, not us
    printf '%s\n' \
        '# taskherd tests: an rc file that costs time and notes each command' \
        'printf "%s\n" "${TASKHERD_TEST_SSHD:-none}" >> /var/lib/taskherd-rc/commands.log' \
        'sleep 0.2' \
        '# (a test holds the logins of one test sshd here while this file exists)' \
        'while [ -e "/tmp/taskherd-rc-gate-${TASKHERD_TEST_SSHD:-none}" ]; do sleep 0.02; done' \
        | $sudo tee /var/lib/taskherd-rc/.bashrc >/dev/null
fi

# ------------------------------------------------------------------ build

# Others may be editing the tree: a failed build is retried after a pause.
retry_build() {
    local attempt
    for attempt in 1 2 3; do
        if "$@" >"$work/build.log" 2>&1; then
            return 0
        fi
        say "bench: build attempt $attempt failed; retrying in 30 s ($(grep -m1 '^error' "$work/build.log" || tail -1 "$work/build.log"))" >&2
        sleep 30
    done
    cat "$work/build.log" >&2
    die "cannot build: $*"
}

bench_exe() { sed -n "s|^ *Executable benches/$1.rs (\(.*\))\$|\1|p" "$work/build.log" | tail -1; }

# The sections other than exec use the examples and the bench binaries;
# exec needs the taskherd binary only.
wants_more=
for other in logs fanout queue local durable nats scale; do
    if wants "$other"; then wants_more=1; fi
done
section "build (release)"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    if [ -n "$wants_more" ]; then
        retry_build cargo build --release --bins --examples
        benches=(--bench remote_start --bench queue)
        if wants durable; then benches+=(--bench durable_queue); fi
        if wants http; then benches+=(--bench http); fi
        if wants nats; then benches+=(--bench nats_queue); fi
        retry_build cargo bench --no-run "${benches[@]}"
        remote_bench=$(from_root "$(bench_exe remote_start)")
        queue_bench=$(from_root "$(bench_exe queue)")
        durable_bench=
        if wants durable; then durable_bench=$(from_root "$(bench_exe durable_queue)"); fi
        http_bench=
        if wants http; then http_bench=$(from_root "$(bench_exe http)"); fi
        nats_bench=
        if wants nats; then nats_bench=$(from_root "$(bench_exe nats_queue)"); fi
    else
        retry_build cargo build --release --bins
        if wants http; then
            retry_build cargo bench --no-run --bench http
            http_bench=$(from_root "$(bench_exe http)")
        fi
    fi
else
    # The newest bench executables already built.
    newest() { find "$target_dir/release/deps" -maxdepth 1 -type f -perm -u+x -name "$1-*" ! -name '*.d' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-; }
    remote_bench=$(newest remote_start)
    queue_bench=$(newest queue)
    durable_bench=$(newest durable_queue)
    http_bench=$(newest http)
    nats_bench=$(newest nats_queue)
fi
taskherd=${BENCH_TASKHERD:-$target_dir/release/taskherd}
worker=$target_dir/release/examples/worker
producer=$root/scripts/bench/producer.sh
queue_worker=$target_dir/release/examples/queue_worker
[ -x "$taskherd" ] || die "missing build output $taskherd"
if [ -n "$wants_more" ]; then
    [ -x "$worker" ] || die "missing build output $worker"
fi
if wants fanout || wants scale; then
    [ -x "$remote_bench" ] || die "missing build output ${remote_bench:-benches/remote_start.rs}"
fi
if wants queue; then
    [ -x "$queue_bench" ] || die "missing build output ${queue_bench:-benches/queue.rs}"
fi
if wants durable; then
    for f in "$durable_bench" "$queue_worker"; do
        [ -x "$f" ] || die "missing build output $f"
    done
fi
if wants nats; then
    [ -x "$nats_bench" ] || die "missing build output ${nats_bench:-benches/nats_queue.rs}"
fi
say "taskherd $("$taskherd" --version 2>/dev/null || echo '?'), $(git -C "$root" describe --always --dirty 2>/dev/null || echo 'no git')"

section "machine"
say "cores:    $(nproc)"
say "cpu:      $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
say "kernel:   $(uname -srm)"
say "os:       $(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release)"
say "memory:   $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
say "load:     $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
if wants logs || wants fanout || wants scale; then
    say "tools:    $(parallel --version | head -1), $(pdsh -V 2>&1 | head -1), $(ssh -V 2>&1), $(mawk -W version 2>&1 | head -1)"
fi
if wants durable; then
    say "disk:     $work on $(df -PT "$work" | awk 'NR == 2 { print $1 " (" $2 ") mounted on " $7 }') (the durable queues and binlogs)"
    say "beanstalkd: $(command -v beanstalkd) ($(beanstalkd -v 2>&1 | head -1))"
fi
if wants exec; then
    say "exec:     $(parallel --version | head -1), $(xargs --version | head -1), $(python3 --version 2>&1)"
fi
say "runs:     $runs per measurement (median reported)"

# Results: one line per row, tab-separated:
#   measurement, taskherd, other, ratio, target, met|MISSED|-
results=$work/results.tsv
: >"$results"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; }
# yes/no from an awk condition on numbers
holds() { awk "BEGIN { exit !($1) }"; }
verdict() { if holds "$1"; then echo met; else echo MISSED; fi; }

# -------------------------------------------------------------- 1. logs

if wants logs; then
    # Checks one log; fails loudly.
    check_log() {
        local tool=$1 log=$2
        awk -v tool="$tool" -v producers="$producers" -v lines="$log_lines" -v out="$work/payload" \
            -f "$root/scripts/bench/check-lines.awk" "$log" || die "log relay: $tool lost or damaged lines (log: $log)"
        local got
        got=$(for id in $(seq "$producers"); do cat "$work/payload.$id"; done | md5sum | cut -d' ' -f1)
        [ "$got" = "$(cat "$work/want.md5")" ] || die "log relay: $tool: checksum of the payloads $got, producers printed $(cat "$work/want.md5")"
        rm -f "$work"/payload.*
    }
    for producers in $log_producers; do
        # The same lines in all, whatever the number of producers.
        log_lines=$((log_lines_of_4 * 4 / producers))
        section "1. log relay: $producers producers × $log_lines lines of 60 bytes"
        cat >"$work/logs.toml" <<TOML
[[group]]
name = "logs"
command = "$producer"
args = ["$log_lines"]
restart = { policy = "never" }
[group.local]
instances = $producers
TOML
        total=$((producers * log_lines))
        for id in $(seq "$producers"); do "$producer" "$log_lines" "$id"; done | md5sum | cut -d' ' -f1 >"$work/want.md5"
        th_rates=() par_rates=()
        for run in $(seq "$log_runs"); do
            t0=$(now)
            "${marked[@]}" /usr/bin/time -f '%U %S' -o "$work/th.time" "$taskherd" run "$work/logs.toml" >"$work/th.log" \
                || die "log relay: taskherd run exited with $?"
            t1=$(now)
            check_nothing_left "log relay (taskherd)"
            "${marked[@]}" /usr/bin/time -f '%U %S' -o "$work/par.time" parallel --will-cite --tag --line-buffer \
                "$producer" "$log_lines" {} ::: $(seq "$producers") >"$work/par.log" \
                || die "log relay: parallel exited with $?"
            t2=$(now)
            check_nothing_left "log relay (parallel)"
            th_ms=$(ms_between "$t0" "$t1") par_ms=$(ms_between "$t1" "$t2")
            check_log taskherd "$work/th.log"
            check_log parallel "$work/par.log"
            th_rate=$(awk -v n="$total" -v ms="$th_ms" 'BEGIN { printf "%.0f", n / ms * 1000 }')
            par_rate=$(awk -v n="$total" -v ms="$par_ms" 'BEGIN { printf "%.0f", n / ms * 1000 }')
            th_rates+=("$th_rate") par_rates+=("$par_rate")
            read -r tu ts <"$work/th.time"
            read -r pu ps <"$work/par.time"
            say "run $run: taskherd $th_ms ms ($th_rate lines/s, cpu ${tu}u+${ts}s incl. producers), parallel $par_ms ms ($par_rate lines/s, cpu ${pu}u+${ps}s) (load $(cut -d' ' -f1 /proc/loadavg))"
        done
        th=$(median "${th_rates[@]}") par=$(median "${par_rates[@]}")
        ratio=$(awk -v a="$th" -v b="$par" 'BEGIN { printf "%.2f", a / b }')
        row "log relay, lines/s ($producers x $log_lines, to a file; $log_runs runs)" "$th" "$par (parallel)" "${ratio}x" ">= 2x parallel" "$(verdict "$ratio >= 2")"
    done
fi

# ------------------------------------------------------------ 2. fan-out

if wants fanout; then
    section "2. remote fan-out on loopback sshd hosts (and remote stop)"
    "${marked[@]}" BENCH_RUNS="$runs" TMPDIR="$work/tmp" setsid "$remote_bench" --fanout --bench >"$work/fanout.out" 2>&1 &
    bench_pids+=("$!")
    # setsid forks only when called by a process group leader (not the
    # case here, without job control): then $! would not be the bench.
    [ "$(ps -o pgid= -p "$!" | tr -d ' ')" = "$!" ] || die "remote fan-out bench: not in a process group of its own"
    tail -f --pid="$!" "$work/fanout.out" | grep -v '^RESULT' &
    wait "${bench_pids[-1]}" || { sleep 0.2; die "remote fan-out bench failed (above)"; }
    wait $! 2>/dev/null || true
    result() { awk -v k="$1" '$1 == "RESULT" && $2 == k { print $3; found = 1 } END { exit !found }' "$work/fanout.out" \
        || die "remote fan-out bench printed no $1"; }
    for shape in 2x4 8x8; do
        th=$(result "fanout_${shape}_taskherd")
        pd=$(result "fanout_${shape}_pdsh")
        pa=$(result "fanout_${shape}_parallel")
        hosts=${shape%x*} per=${shape#*x}
        label="fan-out $hosts hosts x $per, echo + exit, ms"
        ratio_pd=$(awk -v a="$pd" -v b="$th" 'BEGIN { printf "%.2f", a / b }')
        ratio_pa=$(awk -v a="$pa" -v b="$th" 'BEGIN { printf "%.2f", a / b }')
        if [ "$shape" = 2x4 ]; then
            row "$label" "$th" "$pd (pdsh)" "${ratio_pd}x faster" "faster than pdsh" "$(verdict "$th < $pd")"
        else
            row "$label" "$th" "$pd (pdsh)" "${ratio_pd}x faster" "< 1000 ms" "$(verdict "$th < 1000")"
        fi
        row "  same vs parallel -S" "$th" "$pa (parallel)" "${ratio_pa}x faster" "-" "-"
    done
    row "  floor: pdsh, 8 hosts x 1 (one ssh each), ms" "-" "$(result fanout_8x1_pdsh) (pdsh)" "-" "-" "-"
    th=$(result exec_output_taskherd)
    pd=$(result exec_output_pdsh)
    row "exec output: 2 hosts x 500 000 lines (seq), tagged host: line, to a pipe, ms" "$th" "$pd (pdsh)" \
        "$(awk -v a="$pd" -v b="$th" 'BEGIN { printf "%.2f", a / b }')x faster" "<= pdsh" "$(verdict "$th <= $pd")"
    stop_remote=$(result stop_remote_2x4)
fi

# -------------------------------------------------------------- 8. scale

if wants scale; then
    section "8. scale: 2 to 64 loopback sshd hosts, /bin/sh and rc logins, the master's cost per host (remote_start --scale)"
    "${marked[@]}" BENCH_RUNS="$runs" TMPDIR="$work/tmp" setsid "$remote_bench" --scale --bench >"$work/scale.out" 2>&1 &
    bench_pids+=("$!")
    [ "$(ps -o pgid= -p "$!" | tr -d ' ')" = "$!" ] || die "scale bench: not in a process group of its own"
    tail -f --pid="$!" "$work/scale.out" | grep -v -e '^RESULT' -e '^FIGURE' &
    wait "${bench_pids[-1]}" || { sleep 0.2; die "scale bench failed (above)"; }
    wait $! 2>/dev/null || true
    check_nothing_left "scale bench"
    # The median of a RESULT line (ms), or a FIGURE's value, rounded to $2
    # decimals (default 0); `-` when the bench skipped it.
    sresult() { awk -v k="$1" -v d="${2:-0}" '$1 == "RESULT" && $2 == k { printf "%.*f\n", d, $3; found = 1 } END { if (!found) print "-" }' "$work/scale.out"; }
    sfigure() { awk -v k="$1" -v d="${2:-0}" '$1 == "FIGURE" && $2 == k { printf "%.*f\n", d, $3; found = 1 } END { if (!found) print "-" }' "$work/scale.out"; }
    ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
    plain_true=$(sresult scale_ssh_true_sh) rc_true=$(sresult scale_ssh_true_rc)
    if [ "$rc_true" != - ]; then
        rc_cost=$(awk -v a="$rc_true" -v b="$plain_true" 'BEGIN { printf "%.0f", a - b }')
        row "scale: the rc file's cost, ssh host true as taskherd-rc ($rc_true ms) minus as taskherd-test ($plain_true ms), ms" "$rc_cost" "-" "-" "-" "-"
    else
        say "scale: no taskherd-rc login: no rc rows"
    fi
    for login in rc sh; do
        for n in 2 16 64; do
            key=scale_fanout_${login}_${n}x4
            th=$(sresult "${key}_taskherd") pd=$(sresult "${key}_pdsh")
            [ "$th" = - ] && continue
            if [ "$login" = rc ]; then
                label="scale: fan-out $n hosts x 4 (echo, exit), rc login (0.2 s rc file), spawn to exit, ms"
                row "$label" "$th" "$pd (pdsh, 1 command per host)" "$(ratio_of "$pd" "$th")x" "<= pdsh" "$(verdict "$th <= $pd")"
            else
                label="scale: fan-out $n hosts x 4, /bin/sh login, ms"
                row "$label" "$th" "$pd (pdsh, 1 command per host)" "$(ratio_of "$pd" "$th")x" "-" "-"
            fi
            # pdsh again, its one command per host starting the 4 programs
            # taskherd's instances are (`sh -c 'echo done $TASKHERD_ID'`,
            # all at once): the same work, where the row above runs echo
            # builtins.
            pp=$(sresult "${key}_pdsh_programs")
            row "  same, pdsh's command starting the same 4 programs (sh -c) as taskherd's instances, ms" \
                "$th" "$pp (pdsh, 1 command per host)" "$(ratio_of "$pp" "$th")x" "-" "-"
            row "  CPU of the tool's processes here / on the hosts, ms" \
                "$(sfigure "${key}_taskherd_client_cpu_ms") / $(sfigure "${key}_taskherd_hosts_cpu_ms")" \
                "$(sfigure "${key}_pdsh_client_cpu_ms") / $(sfigure "${key}_pdsh_hosts_cpu_ms") (pdsh), $(sfigure "${key}_pdsh_programs_client_cpu_ms") / $(sfigure "${key}_pdsh_programs_hosts_cpu_ms") (pdsh, same programs)" "-" "-" "-"
            # The whole machine during the run: also what leaves the
            # tool's process tree (the agents' watchdogs).
            row "  CPU of the whole machine during the run, ms" \
                "$(sfigure "${key}_taskherd_machine_cpu_ms")" \
                "$(sfigure "${key}_pdsh_machine_cpu_ms") (pdsh), $(sfigure "${key}_pdsh_programs_machine_cpu_ms") (pdsh, same programs)" "-" "-" "-"
        done
    done
    # One host's side without ssh: what the agent and its instances cost
    # against the shell starting the same programs (pdsh's command).
    row "scale: one host's side without ssh: taskherd agent + 4 instances, CPU per run, ms" \
        "$(sfigure agent_cost_taskherd_agent_cpu_ms 2)" \
        "$(sfigure agent_cost_sh_programs_cpu_ms 2) (sh starting the same 4 programs), $(sfigure agent_cost_sh_builtins_cpu_ms 2) (sh, 4 echo builtins)" "-" "-" "-"
    row "scale: ssh host true, the client's CPU: default key exchange (sntrup761x25519) / curve25519-sha256, ms" \
        "$(sfigure scale_ssh_true_sh_client_cpu_ms 1) / $(sfigure scale_ssh_true_sh_curve25519_client_cpu_ms 1)" "-" "-" "-" "-"
    ready=$(sresult scale_start_64x8_ready)
    row "scale: 64 hosts x 8 long-running, /bin/sh login, spawn to all 512 running, ms" "$ready" "-" "-" "< 5000" "$(verdict "$ready < 5000")"
    row "  of which all 64 agents connected, ms" "$(sresult scale_start_64x8_connected)" "-" "-" "-" "-"
    row "  CPU until all ran: the master / its ssh (handshakes) / the hosts, ms" \
        "$(sfigure scale_start_64x8_master_cpu_ms) / $(sfigure scale_start_64x8_ssh_cpu_ms) / $(sfigure scale_start_64x8_hosts_cpu_ms)" "-" "-" "-" "-"
    row "  same, KexAlgorithms curve25519-sha256 in the ssh_config, ms" "$(sresult scale_start_64x8_ready_curve25519)" "-" "-" "-" "-"
    row "    CPU until all ran: the master / its ssh / the hosts, ms" \
        "$(sfigure scale_start_64x8_master_cpu_ms_curve25519) / $(sfigure scale_start_64x8_ssh_cpu_ms_curve25519) / $(sfigure scale_start_64x8_hosts_cpu_ms_curve25519)" "-" "-" "-" "-"
    row "  stop: SIGTERM to exit, 512 remote instances, ms" "$(sresult scale_start_64x8_stop)" "-" "-" "-" "-"
    for n in 8 16 32 64; do
        c=scale_cost_$n
        row "scale: master at $n hosts x 8: CPU to start ms / idle % of a core / VmHWM KiB / fds" \
            "$(sfigure "${c}_master_cpu_ms") / $(sfigure "${c}_master_idle_cpu_pct" 2) / $(sfigure "${c}_master_hwm_kib") / $(sfigure "${c}_master_fds")" \
            "ssh: $(sfigure "${c}_ssh_processes") processes, CPU $(sfigure "${c}_reaped_cpu_ms") ms reaped + $(sfigure "${c}_ssh_cpu_ms") ms live, PSS $(sfigure "${c}_ssh_pss_kib") KiB" \
            "-" "-" "-"
    done
    p=scale_cost_per_host
    row "scale: per connected host (slope over 8-64): master CPU to start ms / idle % / VmHWM KiB / fds" \
        "$(sfigure "${p}_master_cpu_ms" 2) / $(sfigure "${p}_master_idle_cpu_pct" 3) / $(sfigure "${p}_master_hwm_kib") / $(sfigure "${p}_master_fds" 1)" \
        "ssh: $(sfigure "${p}_ssh_processes" 1) processes, CPU $(sfigure "${p}_reaped_cpu_ms") ms, PSS $(sfigure "${p}_ssh_pss_kib") KiB, $(sfigure "${p}_ssh_fds" 1) fds" \
        "-" "-" "-"
    row "scale: master CPU per relayed line, 8 x 4 x 20 000 at once, us" "$(sfigure scale_line_burst_master_cpu_us 2)" "ssh: $(sfigure scale_line_burst_ssh_cpu_us 2) us" "-" "-" "-"
    row "  same, 8 x 4 x 1 000 lines 5 ms apart (a frame per line), us" "$(sfigure scale_line_trickle_master_cpu_us 2)" "ssh: $(sfigure scale_line_trickle_ssh_cpu_us 2) us" "-" "-" "-"
fi

# -------------------------------------------------------------- 3. queue

if wants queue; then
    section "3. queue: no-op jobs, feeder -> 4 consumers with acks (benches/queue.rs)"
    "${marked[@]}" BENCH_RUNS="$runs" TMPDIR="$work/tmp" "$queue_bench" --bench >"$work/queue.out" 2>&1 \
        || { cat "$work/queue.out" >&2; die "queue bench failed"; }
    grep -E '^  credits|^\| (jobs|feeder)' "$work/queue.out" || true
    # "| jobs/s, 4 consumers x 8, <credits> credits | min | median | max |": best median
    jobs=$(awk -F'|' '/^\| jobs\/s, / { gsub(/ /, "", $4); if ($4 + 0 > best) { best = $4 + 0; label = $2; sub(/ *jobs\/s, /, "", label) } }
        END { if (!best) exit 1; sub(/^ /, "", label); sub(/ $/, "", label); print best "\t" label }' "$work/queue.out") \
        || die "queue bench printed no throughput"
    jobs_rate=${jobs%%$'\t'*} jobs_label=${jobs#*$'\t'}
    # "| feeder next -> feeder success | min | p50 | p90 | p99 | max |"
    read -r p50 p99 < <(awk -F'|' '/^\| feeder next -> feeder success/ { gsub(/ /, ""); print $4, $6 }' "$work/queue.out")
    [ -n "${p99:-}" ] || die "queue bench printed no round trip"
    row "queue jobs/s ($jobs_label)" "$jobs_rate" "-" "-" ">= 100000" "$(verdict "$jobs_rate >= 100000")"
    row "queue round trip p50, us (1 job in flight)" "$p50" "-" "-" "< 200" "$(verdict "$p50 < 200")"
    row "queue round trip p99, us" "$p99" "-" "-" "-" "-"
fi

# -------------------------------------------------------- 4. + 5. local

if wants local; then
    section "4./5. $idle_instances idle local library instances: master CPU and RSS, stop latency"
    cat >"$work/idle.toml" <<TOML
[master]
stop_grace = "5s"
[[group]]
name = "idle"
command = "$worker"
params = { sleep = 600 }
[group.local]
instances = $idle_instances
TOML
    master=
    # Starts the herd and waits (bounded: 60 s) until every instance greeted.
    start_idle() {
        "${marked[@]}" "$taskherd" run "$work/idle.toml" >"$work/idle.log" 2>&1 &
        master=$!
        local n=0
        for _ in $(seq 6000); do
            n=$(grep -c '\] Child ' "$work/idle.log" 2>/dev/null || true)
            n=${n:-0}
            [ "$n" -ge "$idle_instances" ] && return 0
            kill -0 "$master" 2>/dev/null || die "idle herd: master exited early: $(tail -5 "$work/idle.log")"
            sleep 0.01
        done
        die "idle herd: $n of $idle_instances instances up within 60 s"
    }
    # SIGTERM -> exit, in ms; checks exit 0 and that nothing is left.
    stop_idle() {
        local t0 t1 status=0
        t0=$(now)
        kill -TERM "$master"
        wait "$master" || status=$?
        t1=$(now)
        [ "$status" = 0 ] || die "idle herd: master exited with $status after SIGTERM: $(tail -5 "$work/idle.log")"
        check_nothing_left "idle herd stop"
        if grep -q 'SIGKILL' "$work/idle.log"; then
            die "idle herd: instances had to be killed: $(grep -m3 'SIGKILL' "$work/idle.log")"
        fi
        stop_ms=$(ms_between "$t0" "$t1")
    }
    # CPU time of the master so far, in ms: clock ticks (utime + stime,
    # all threads, even ended ones) and, finer, the scheduler's ns of its
    # live threads; the larger of the two differences counts.
    ticks() { awk '{ print $14 + $15 }' "/proc/$master/stat"; }
    sched_ns() { cat /proc/"$master"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'; }
    hz=$(getconf CLK_TCK)
    stops=()
    for run in $(seq "$runs"); do
        start_idle
        if [ "$run" = 1 ]; then
            sleep 1 # the start-up is not idling
            before=$(ticks) before_ns=$(sched_ns)
            sleep "$idle_seconds"
            after=$(ticks) after_ns=$(sched_ns)
            cpu_ms=$(awk -v t="$(( (after - before) * 1000 / hz ))" -v ns="$((after_ns - before_ns))" \
                'BEGIN { ms = ns / 1e6; if (t > ms) ms = t; printf "%.1f", ms }')
            cpu_pct=$(awk -v ms="$cpu_ms" -v s="$idle_seconds" 'BEGIN { printf "%.2f", ms / (s * 10) }')
            hwm_kib=$(awk '/^VmHWM/ { print $2 }' "/proc/$master/status")
            hwm=$(awk -v k="$hwm_kib" 'BEGIN { printf "%.1f", k / 1024 }')
            threads=$(awk '/^Threads/ { print $2 }' "/proc/$master/status")
            say "master CPU over ${idle_seconds} s idle: $cpu_ms ms ($cpu_pct % of a core); VmHWM $hwm MiB; $threads threads"
        fi
        stop_idle
        stops+=("$stop_ms")
        say "run $run: SIGTERM to exit with $idle_instances instances: $stop_ms ms"
    done
    stop_local=$(median "${stops[@]}")
    row "master CPU, $idle_instances idle instances, % of a core" "$cpu_pct" "-" "-" "< 1 %" "$(verdict "$cpu_pct < 1")"
    row "master peak RSS (VmHWM), MiB" "$hwm" "-" "-" "< 30 MiB" "$(verdict "$hwm < 30")"
    row "stop: SIGTERM to exit, $idle_instances local instances, ms" "$stop_local" "-" "-" "< 200 ms" "$(verdict "$stop_local < 200")"
fi
if wants fanout; then
    row "stop: SIGTERM to exit, 2 x 4 remote instances, ms" "$stop_remote" "-" "-" "< 500 ms" "$(verdict "$stop_remote < 500")"
fi

# ------------------------------------------------------------ 6. durable

if wants durable; then
    section "6. durable queue: FileFeeder journal -> 4 consumers x 8 -> acks, next to beanstalkd -b ($durable_jobs jobs; benches/durable_queue.rs)"
    # Each step of the bench is bounded by $durable_timeout; this bounds
    # the whole (about a dozen steps per run).
    "${marked[@]}" BENCH_RUNS="$runs" BENCH_DURABLE_JOBS="$durable_jobs" BENCH_DURABLE_TIMEOUT="$durable_timeout" \
        TMPDIR="$work/tmp" timeout -k 10 $((durable_timeout * 12 * runs)) "$durable_bench" --bench \
        >"$work/durable.out" 2>&1 &
    durable_pid=$!
    tail -f --pid="$durable_pid" "$work/durable.out" | grep -v '^RESULT' &
    wait "$durable_pid" || { sleep 0.2; die "durable queue bench failed or timed out (above)"; }
    wait $! 2>/dev/null || true
    check_nothing_left "durable queue bench"
    # The median of a `RESULT <key> <median> <min> <max> <runs>` line, rounded.
    durable_result() {
        awk -v k="$1" '$1 == "RESULT" && $2 == k { printf "%.0f\n", $3; found = 1 } END { exit !found }' "$work/durable.out" \
            || die "durable queue bench printed no $1"
    }
    th=$(durable_result durable_taskherd)
    bs=$(durable_result durable_beanstalkd)
    bs_both=$(durable_result durable_beanstalkd_concurrent)
    ratio=$(awk -v a="$th" -v b="$bs" 'BEGIN { printf "%.2f", a / b }')
    ratio_both=$(awk -v a="$th" -v b="$bs_both" 'BEGIN { printf "%.2f", a / b }')
    row "durable queue jobs/s (file feeder -> 4 x 8 -> acks, $durable_jobs jobs)" "$th" "$bs (beanstalkd -b, 4 consumers)" "${ratio}x" ">= 3x beanstalkd -b" "$(verdict "$ratio >= 3")"
    row "  same, absolute" "$th" "-" "-" ">= 50000" "$(verdict "$th >= 50000")"
    row "  vs beanstalkd -b, 1 producer + 4 consumers at once" "$th" "$bs_both (beanstalkd)" "${ratio_both}x" "-" "-"

    section "6. durable queue with the release binary: $durable_start_jobs jobs"
    qdir=$work/durable-queue
    q=$qdir/jobs.queue
    mkdir "$qdir"
    # Runs a command under the step bound, its output to $work/step.out;
    # sets step_ms. Returns 124 when it timed out; any other failure fails.
    timed_step() {
        local what=$1 t0 t1 status=0
        shift
        t0=$(now)
        "${marked[@]}" timeout -k 5 "$durable_timeout" "$@" >"$work/step.out" 2>&1 || status=$?
        t1=$(now)
        step_ms=$(ms_between "$t0" "$t1")
        if [ "$status" = 124 ] || [ "$status" = 137 ]; then
            say "$what: not done within $durable_timeout s"
            return 124
        fi
        [ "$status" = 0 ] || die "$what exited with $status: $(tail -5 "$work/step.out")"
        say "$what: $step_ms ms: $(tail -1 "$work/step.out")"
    }
    # Bytes of the queue's files (journal, inbox, dead letters, whatever
    # else the store keeps next to them).
    queue_bytes() { find "$qdir" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'; }
    # The counts of the summary line of `queue list` ("Q: 5 pending, 0 in
    # flight, 0 dead"; an inbox count if it shows one), as "pending
    # in-flight dead inbox"; fails if there is none.
    list_counts() {
        awk '/ pending/ && !seen {
            seen = 1
            if (match($0, /[0-9]+ pending/)) p = substr($0, RSTART, RLENGTH) + 0
            if (match($0, /[0-9]+ in flight/)) f = substr($0, RSTART, RLENGTH) + 0
            if (match($0, /[0-9]+ dead/)) d = substr($0, RSTART, RLENGTH) + 0
            if (match($0, /[0-9]+ (jobs )?in (the )?inbox/)) i = substr($0, RSTART, RLENGTH) + 0
        } END { if (!seen) exit 1; print p + 0, f + 0, d + 0, i + 0 }' "$work/step.out" \
            || die "queue list printed no counts: $(cat "$work/step.out")"
    }
    # Fails unless `queue list` said: $1 jobs waiting (in the journal or the
    # inbox; with $2 = journal, all in the journal), none in flight or dead.
    check_listed() {
        local pending in_flight dead inbox
        read -r pending in_flight dead inbox <<<"$(list_counts)"
        if ! { [ $((pending + inbox)) = "$1" ] && [ "$in_flight" = 0 ] && [ "$dead" = 0 ]; }; then
            die "queue list: expected $1 jobs waiting, none in flight or dead: $(cat "$work/step.out")"
        fi
        if [ "${2:-}" = journal ] && [ "$inbox" != 0 ]; then
            die "queue list: expected the $1 jobs in the journal, $inbox are in the inbox: $(cat "$work/step.out")"
        fi
    }
    timeout_row() { row "$1" "timeout (> $durable_timeout s)" "-" "-" "$2" MISSED; }
    # A function, so that a step that timed out can end the section early
    # (what follows it would measure a half-done queue).
    durable_cli() {
        local n=$durable_start_jobs label
        label="queue add, $n jobs (seq | taskherd queue add Q -), ms"
        # shellcheck disable=SC2016 # expanded by that sh
        if ! timed_step "queue add" sh -c 'seq 1 "$1" | "$2" queue add "$3" -' sh "$n" "$taskherd" "$q"; then
            timeout_row "$label" "-"
            return 0
        fi
        row "$label" "$step_ms" "-" "-" "-" "-"
        # Just added, the jobs are in the inbox (taskherd 0.1's `queue list`
        # takes them into the journal: its first list includes that).
        label="queue list, $n jobs just added, ms"
        if ! timed_step "queue list (just added)" "$taskherd" queue list "$q"; then
            timeout_row "$label" "< 1000 ms"
            return 0
        fi
        check_listed "$n"
        row "$label" "$step_ms" "-" "-" "< 1000 ms" "$(verdict "$step_ms < 1000")"

        # `queue compact` takes the inbox in and rewrites the journal as a
        # snapshot. Without that command (taskherd 0.1), the sizes are the
        # queue's files as the first `queue list` left them, not compacted.
        local compacted="not compacted: no queue compact"
        if "$taskherd" queue compact --help >/dev/null 2>&1; then
            label="queue compact, $n jobs (takes the inbox in), ms"
            if ! timed_step "queue compact" "$taskherd" queue compact "$q"; then
                timeout_row "$label" "-"
                return 0
            fi
            row "$label" "$step_ms" "-" "-" "-" "-"
            compacted="after queue compact"
        fi
        local bytes per_job
        bytes=$(queue_bytes)
        per_job=$(awk -v b="$bytes" -v n="$n" 'BEGIN { printf "%.1f", b / n }')
        say "queue files: $bytes bytes for $n pending jobs ($per_job bytes/job; $compacted):" \
            "$(find "$qdir" -type f -printf '%f %s bytes, ' | sed 's/, $//')"
        row "queue bytes per pending job ($n pending; $compacted)" "$per_job" "-" "-" "-" "-"

        label="queue list, $n jobs in the journal, ms"
        if ! timed_step "queue list (in the journal)" "$taskherd" queue list "$q"; then
            timeout_row "$label" "< 1000 ms"
            return 0
        fi
        check_listed "$n" journal
        row "$label" "$step_ms" "-" "-" "< 1000 ms" "$(verdict "$step_ms < 1000")"

        # The start: `taskherd run` to the first job done.
        cat >"$work/durable.toml" <<TOML
[master]
stop_grace = "10s"
[[group]]
name = "durable"
command = "$queue_worker"
params = { file = "$q" }
[group.feeder]
host = "local"
bind = "127.0.0.1:0"
[group.local]
instances = 4
concurrency = 8
TOML
        local log=$work/durable-run.log master t0 t1 first_ms='' status=0 done_lines
        t0=$(now)
        "${marked[@]}" "$taskherd" run "$work/durable.toml" >"$log" 2>&1 &
        master=$!
        local deadline=$((SECONDS + durable_timeout))
        while [ "$SECONDS" -lt "$deadline" ]; do
            if grep -q -m1 -E '\] done [0-9]+$' "$log"; then
                t1=$(now)
                first_ms=$(ms_between "$t0" "$t1")
                break
            fi
            kill -0 "$master" 2>/dev/null || die "durable herd: the master exited early: $(tail -5 "$log")"
            sleep 0.005
        done
        label="start: taskherd run to the first job done, $n pending, ms"
        if [ -n "$first_ms" ]; then
            say "taskherd run -> first job done: $first_ms ms ($(grep -m1 -E '\] done [0-9]+$' "$log"))"
            row "$label" "$first_ms" "-" "-" "< 2000 ms" "$(verdict "$first_ms < 2000")"
        else
            say "taskherd run: no job done within $durable_timeout s"
            timeout_row "$label" "< 2000 ms"
        fi
        kill -TERM "$master"
        for _ in $(seq 600); do
            kill -0 "$master" 2>/dev/null || break
            sleep 0.05
        done
        kill -0 "$master" 2>/dev/null && die "durable herd: the master still runs 30 s after SIGTERM: $(tail -5 "$log")"
        wait "$master" || status=$?
        [ "$status" = 0 ] || die "durable herd: the master exited with $status after SIGTERM: $(tail -5 "$log")"
        check_nothing_left "durable herd stop"
        # At least once, none lost: every job acked was printed done first,
        # so what is left pending is at least n minus the done lines.
        done_lines=$(grep -c -E '\] done [0-9]+$' "$log" || true)
        if timed_step "queue list (after the run)" "$taskherd" queue list "$q"; then
            local pending in_flight dead inbox
            read -r pending in_flight dead inbox <<<"$(list_counts)"
            pending=$((pending + inbox))
            if ! { [ "$dead" = 0 ] && [ "$in_flight" = 0 ] \
                && [ "$pending" -le "$n" ] && [ $((pending + done_lines)) -ge "$n" ]; }; then
                die "durable herd: after $done_lines jobs done of $n, the queue says: $(cat "$work/step.out")"
            fi
            say "after the stop: $done_lines jobs done, $pending waiting"
        fi
    }
    durable_cli
fi

# --------------------------------------------------------------- 7. exec

if wants exec; then
    section "7. exec consumers: $exec_jobs no-op jobs (true), 4 consumers x 8, next to parallel -j32 and xargs -P32; then a Python coprocess, $coproc_jobs jobs"
    python=$(python3 -c 'import sys; print(sys.executable)') || die "exec: no python3"
    say "true: $(type -P true); python: $python ($("$python" --version 2>&1)); parallel -j32, xargs -P32 -n1; step bound $exec_timeout s"
    # Counts of `taskherd queue list --json Q` (read-only, also while a
    # feeder serves Q) as "pending inbox dead"; fails when it does.
    queue_counts() {
        local out
        out=$("$taskherd" queue list --json "$1" 2>/dev/null) || return 1
        awk '
            /"pending":/ { gsub(/[^0-9]/, ""); p = $0; np = 1 }
            /"inbox":/ { gsub(/[^0-9]/, ""); i = $0; ni = 1 }
            /"dead": *\[\]/ { d = 0; nd = 1 }
            /"dead": *\[$/ { d = 1; nd = 1 }
            END { if (!(np && ni && nd)) exit 1; print p + 0, i + 0, d }' <<<"$out"
    }
    # Adds $2 jobs (the numbers 1 to $2) to a new queue $1, untimed.
    fill_queue() {
        # shellcheck disable=SC2016 # expanded by that sh
        "${marked[@]}" timeout -k 5 "$exec_timeout" sh -c 'seq 1 "$1" | "$2" queue add "$3" -' sh "$2" "$taskherd" "$1" \
            >"$work/add.out" 2>&1 || die "exec: queue add exited with $?: $(tail -3 "$work/add.out")"
        [ "$(queue_counts "$1")" = "0 $2 0" ] || die "exec: $1 does not hold the $2 jobs just added: $(queue_counts "$1" || true)"
    }
    # Runs `taskherd run $2` (a queue group on the queue $3 of $4 jobs, the
    # feeder's counts every 100 ms) until the queue is empty: no job left
    # in the journal or the inbox, polled with `queue list` every 10 ms.
    # Sets herd_ms (taskherd run to all done, ms). Then SIGTERM; checks: all
    # done within $exec_timeout s, the feeder's last count ($4 done, none
    # failed, retried or dead), exit 0, nothing left, the queue empty.
    herd_until_done() {
        local what=$1 toml=$2 q=$3 n=$4 log=$5
        local master t0 t1='' status=0 counts='' pending inbox dead last='' deadline
        t0=$(now)
        "${marked[@]}" "$taskherd" run "$toml" >"$log" 2>&1 &
        master=$!
        deadline=$((SECONDS + exec_timeout))
        while [ "$SECONDS" -lt "$deadline" ]; do
            if counts=$(queue_counts "$q"); then
                read -r pending inbox dead <<<"$counts"
                if [ "$pending" = 0 ] && [ "$inbox" = 0 ]; then
                    t1=$(now)
                    break
                fi
                [ "$dead" = 0 ] || die "$what: jobs went dead: $("$taskherd" queue list "$q" | head -5)"
            fi
            kill -0 "$master" 2>/dev/null || die "$what: the master exited early: $(tail -5 "$log")"
            sleep 0.01
        done
        [ -n "$t1" ] || die "$what: not all $n jobs done within $exec_timeout s (pending, inbox, dead: ${counts:-?}): $(grep 'queue: ' "$log" | tail -1)"
        herd_ms=$(ms_between "$t0" "$t1")
        # The feeder's count: its next progress line (bounded: 5 s).
        for _ in $(seq 100); do
            last=$(grep -E '\] queue: [0-9]+ done' "$log" | tail -1)
            [[ "$last" == *"] queue: $n done"* ]] && break
            sleep 0.05
        done
        kill -TERM "$master"
        for _ in $(seq 600); do
            kill -0 "$master" 2>/dev/null || break
            sleep 0.05
        done
        kill -0 "$master" 2>/dev/null && die "$what: the master still runs 30 s after SIGTERM: $(tail -5 "$log")"
        wait "$master" || status=$?
        [ "$status" = 0 ] || die "$what: the master exited with $status after SIGTERM: $(tail -5 "$log")"
        check_nothing_left "$what"
        [[ "$last" == *"] queue: $n done, 0 failed, 0 retried, 0 dead, "* ]] \
            || die "$what: the feeder's last count is not $n done, none failed, retried or dead: ${last:-no progress line}"
        [ "$(queue_counts "$q")" = "0 0 0" ] || die "$what: the queue is not empty after the run: $("$taskherd" queue list "$q" | head -5)"
    }
    # The herd of the exec rows: `true` once per job, 4 consumers x 8, the
    # `[group.feeder]` source line $2: a file queue, or the command feeder
    # (`seq 1 N`; the run then ends by itself once every job is done, as
    # parallel and xargs do).
    exec_herd() {
        cat >"$1" <<TOML
[master]
stop_grace = "10s"
[[group]]
name = "exec"
command = "true"
[group.feeder]
$2
bind = "127.0.0.1:0"
[group.consumer]
run = "exec"
[group.queue]
credits = $exec_credits
progress_every = "100ms"
[group.local]
instances = 4
concurrency = 8
TOML
    }
    # The herd of the coprocess rows: scripts/bench/noop_coprocess.py, one
    # per consumer, concurrency $3 (credits: twice that, the default).
    coproc_herd() {
        cat >"$1" <<TOML
[master]
stop_grace = "10s"
[[group]]
name = "coproc"
command = "$python"
args = ["$root/scripts/bench/noop_coprocess.py"]
[group.feeder]
file = "$2"
bind = "127.0.0.1:0"
[group.consumer]
run = "coprocess"
[group.queue]
progress_every = "100ms"
[group.local]
instances = 4
concurrency = $3
TOML
    }
    # Milliseconds of one command (its output to $work/step.out), bounded;
    # fails unless it exits 0 and leaves nothing behind.
    timed_tool() {
        local what=$1 t0 t1 status=0
        shift
        t0=$(now)
        "$@" >"$work/step.out" 2>&1 || status=$?
        t1=$(now)
        [ "$status" = 0 ] || die "$what exited with $status (124: not done within $exec_timeout s): $(tail -3 "$work/step.out")"
        check_nothing_left "$what"
        tool_ms=$(ms_between "$t0" "$t1")
    }
    # Both tools run `true N` for N in 1..jobs: checked once, dry.
    n=$(parallel --will-cite --dry-run -j32 true ::: $(seq "$exec_jobs") | grep -c -x 'true [0-9]*' || true)
    [ "$n" = "$exec_jobs" ] || die "exec: parallel --dry-run lists $n commands 'true N', not $exec_jobs"
    n=$(seq "$exec_jobs" | xargs -n1 echo true | grep -c -x 'true [0-9]*' || true)
    [ "$n" = "$exec_jobs" ] || die "exec: xargs -n1 echo true gives $n commands 'true N', not $exec_jobs"
    # Jobs/s of $1 jobs in $2 ms.
    rate() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n / ms * 1000 }'; }
    th_times=() par_times=() xargs_times=() cmd_times=()
    for run in $(seq "$runs"); do
        q=$work/exec-$run/jobs.queue
        mkdir "$work/exec-$run"
        exec_herd "$work/exec-$run/command.toml" "command = \"seq\"
args = [\"1\", \"$exec_jobs\"]"
        timed_tool "taskherd run (command feeder seq 1 $exec_jobs)" \
            "${marked[@]}" timeout -k 5 "$exec_timeout" "$taskherd" run "$work/exec-$run/command.toml"
        cmd_ms=$tool_ms
        grep -q "feeder server stopped finished=true done=$exec_jobs dead=0 unfinished=0" "$work/step.out" \
            || die "exec (command feeder): not every one of the $exec_jobs jobs done: $(grep 'feeder server stopped' "$work/step.out" || tail -3 "$work/step.out")"
        exec_herd "$work/exec-$run/herd.toml" "file = \"$q\""
        fill_queue "$q" "$exec_jobs"
        herd_until_done "exec herd" "$work/exec-$run/herd.toml" "$q" "$exec_jobs" "$work/exec-$run/run.log"
        th_ms=$herd_ms
        timed_tool "parallel -j32 true ::: \$(seq $exec_jobs)" \
            "${marked[@]}" timeout -k 5 "$exec_timeout" parallel --will-cite -j32 true ::: $(seq "$exec_jobs")
        par_ms=$tool_ms
        # shellcheck disable=SC2016 # expanded by that sh
        timed_tool "seq $exec_jobs | xargs -P32 -n1 true" \
            "${marked[@]}" timeout -k 5 "$exec_timeout" sh -c 'seq "$1" | xargs -P32 -n1 true' sh "$exec_jobs"
        xargs_ms=$tool_ms
        rm -rf "$work/exec-$run"
        th_times+=("$th_ms") par_times+=("$par_ms") xargs_times+=("$xargs_ms") cmd_times+=("$cmd_ms")
        say "run $run: taskherd (command feeder, end to end) $cmd_ms ms ($(rate "$exec_jobs" "$cmd_ms") jobs/s), taskherd (file queue) $th_ms ms ($(rate "$exec_jobs" "$th_ms") jobs/s), parallel $par_ms ms ($(rate "$exec_jobs" "$par_ms") jobs/s), xargs $xargs_ms ms ($(rate "$exec_jobs" "$xargs_ms") jobs/s) (load $(cut -d' ' -f1 /proc/loadavg))"
    done
    th=$(median "${th_times[@]}") par=$(median "${par_times[@]}") xa=$(median "${xargs_times[@]}") cmd=$(median "${cmd_times[@]}")
    ratio_par=$(awk -v a="$par" -v b="$cmd" 'BEGIN { printf "%.2f", a / b }')
    ratio_xa=$(awk -v a="$xa" -v b="$cmd" 'BEGIN { printf "%.2f", a / b }')
    row "exec: $exec_jobs no-op jobs (true), 4 consumers x 8, credits $exec_credits, command feeder (seq), taskherd run end to end, ms" "$cmd ($(rate "$exec_jobs" "$cmd") jobs/s)" \
        "$par (parallel -j32, $(rate "$exec_jobs" "$par") jobs/s)" "${ratio_par}x faster" ">= 4x parallel" "$(verdict "$ratio_par >= 4")"
    row "  same vs xargs -P32 -n1 true" "$cmd" "$xa (xargs, $(rate "$exec_jobs" "$xa") jobs/s)" "${ratio_xa}x" ">= 1.0x xargs" "$(verdict "$ratio_xa >= 1")"
    ratio_th=$(awk -v a="$xa" -v b="$th" 'BEGIN { printf "%.2f", a / b }')
    row "  same from a durable file queue (filled before, polled with queue list every 10 ms), ms" "$th ($(rate "$exec_jobs" "$th") jobs/s)" \
        "$xa (xargs)" "${ratio_th}x" "-" "-"

    first=1
    for conc in $coproc_concurrency; do
        rates=()
        for run in $(seq "$runs"); do
            q=$work/coproc-$run/jobs.queue
            mkdir "$work/coproc-$run"
            coproc_herd "$work/coproc-$run/herd.toml" "$q" "$conc"
            fill_queue "$q" "$coproc_jobs"
            herd_until_done "coprocess herd" "$work/coproc-$run/herd.toml" "$q" "$coproc_jobs" "$work/coproc-$run/run.log"
            # Every job went through a coprocess: their own counts.
            n=$(sed -n 's/.*noop coprocess: \([0-9]*\) jobs answered.*/\1/p' "$work/coproc-$run/run.log" | awk '{ s += $1 } END { print s + 0 }')
            [ "$n" = "$coproc_jobs" ] || die "coprocess herd: the coprocesses answered $n jobs, not $coproc_jobs: $(grep 'noop coprocess' "$work/coproc-$run/run.log")"
            rm -rf "$work/coproc-$run"
            rates+=("$(rate "$coproc_jobs" "$herd_ms")")
            say "run $run: python coprocess, 4 consumers x $conc: $herd_ms ms (${rates[-1]} jobs/s) (load $(cut -d' ' -f1 /proc/loadavg))"
        done
        cop=$(median "${rates[@]}")
        if [ -n "$first" ]; then
            row "coprocess (python3 no-op): $coproc_jobs jobs, 4 consumers x $conc, jobs/s" "$cop" "-" "-" ">= 20000" "$(verdict "$cop >= 20000")"
            first=
        else
            row "  same, 4 consumers x $conc" "$cop" "-" "-" "-" "-"
        fi
    done
fi

# --------------------------------------------------------------- 9. nats

if wants nats; then
    nats_jobs=${BENCH_NATS_JOBS:-100000}
    section "10. NATS JetStream: $nats_jobs no-op jobs -> 4 consumers x 8 -> acks, file storage, 1 node and 3 nodes R3 (benches/nats_queue.rs)"
    "${marked[@]}" BENCH_RUNS="$runs" BENCH_NATS_JOBS="$nats_jobs" TMPDIR="$work/tmp" \
        timeout -k 10 $((600 * 2 * runs)) "$nats_bench" --bench >"$work/nats.out" 2>&1 &
    nats_pid=$!
    tail -f --pid="$nats_pid" "$work/nats.out" | grep -v '^RESULT' &
    wait "$nats_pid" || { sleep 0.2; die "nats queue bench failed or timed out (above)"; }
    wait $! 2>/dev/null || true
    check_nothing_left "nats queue bench"
    nats_result() {
        awk -v k="$1" '$1 == "RESULT" && $2 == k { printf "%.0f\n", $3; found = 1 } END { exit !found }' "$work/nats.out" \
            || die "nats queue bench printed no $1"
    }
    r1=$(nats_result nats_r1)
    r3=$(nats_result nats_r3)
    row "JetStream queue jobs/s (1 node, file, 4 x 8 -> acks, $nats_jobs jobs)" "$r1" "-" "-" ">= 20000" "$(verdict "$r1 >= 20000")"
    if [ -n "${th:-}" ] && [ -n "${bs:-}" ]; then
        row "  vs the embedded durable feeder, same run" "$r1" "$th (taskherd durable feeder)" "$(awk -v a="$r1" -v b="$th" 'BEGIN { printf "%.2f", a / b }')x" "-" "-"
        row "  vs beanstalkd -b, same run" "$r1" "$bs (beanstalkd -b)" "$(awk -v a="$r1" -v b="$bs" 'BEGIN { printf "%.2f", a / b }')x" "-" "-"
    fi
    row "JetStream queue jobs/s, 3-node cluster R3 on loopback" "$r3" "-" "-" "-" "-"
fi

check_nothing_left "the bench"

# ---------------------------------------------------------------- 9. http

if wants http; then
    [ -x "$http_bench" ] || die "missing build output ${http_bench:-benches/http.rs}"
    section "9. HTTP: jobs through the webhook into the durable queue, next to taskherd queue add; /metrics at 1000 instances (benches/http.rs)"
    "${marked[@]}" BENCH_RUNS="$runs" BENCH_TASKHERD="$taskherd" TMPDIR="$work/tmp" \
        timeout -k 10 $((600 * runs)) "$http_bench" --bench >"$work/http.out" 2>&1 \
        || { cat "$work/http.out" >&2; die "http bench failed"; }
    grep -v '^RESULT' "$work/http.out" || true
    check_nothing_left "http bench"
    http_result() {
        awk -v k="$1" -v d="${2:-0}" '$1 == "RESULT" && $2 == k { printf "%.*f\n", d, $3; found = 1 } END { exit !found }' "$work/http.out" \
            || die "http bench printed no $1"
    }
    batched=$(http_result http_batched)
    single=$(http_result http_single)
    cli=$(http_result http_cli)
    ratio=$(awk -v a="$single" -v b="$cli" 'BEGIN { printf "%.0f", a / b }')
    row "http enqueue jobs/s, 1000 jobs a request, 4 connections" "$batched" "-" "-" ">= 20000" "$(verdict "$batched >= 20000")"
    row "http enqueue jobs/s, 1 job a request, 32 connections" "$single" "$cli (taskherd queue add per job)" "${ratio}x" "-" "-"
    row "/metrics at 1000 instances, ms per scrape" "$(http_result http_metrics_ms 2)" "-" "-" "-" "-"
    row "  master CPU per scrape, ms; size, KiB" "$(http_result http_metrics_cpu_ms 2)" "$(http_result http_metrics_kb) KiB" "-" "-" "-"
fi

# -------------------------------------------------------------- table

section "results (medians of $runs runs; $(nproc) cores, $(uname -r))"
{
    printf 'measurement\ttaskherd\tother tool\tratio\ttarget\tresult\n'
    cat "$results"
} | awk -F'\t' '
    { for (i = 1; i <= NF; i++) { cell[NR, i] = $i; n = length($i); if (n > w[i]) w[i] = n } rows = NR }
    END {
        for (r = 1; r <= rows; r++) {
            line = ""
            for (i = 1; i <= 6; i++) line = line sprintf(i == 1 ? "%-" w[i] "s" : "  %-" w[i] "s", cell[r, i])
            print line
            if (r == 1) { gsub(/./, "-", line); print line }
        }
    }'
missed=$(awk -F'\t' '$6 == "MISSED"' "$results" | wc -l)
say ""
if [ "$missed" -gt 0 ]; then
    say "$missed target(s) missed; every check passed."
    [ -n "${BENCH_STRICT:-}" ] && exit 3
else
    say "every target met; every check passed."
fi
exit 0
