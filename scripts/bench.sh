#!/usr/bin/env bash
# The benchmark suite of issue 7: taskherd against GNU parallel and pdsh on
# this machine, in one run, with every output checked. Prints the machine,
# each measurement as it goes, then one table:
#
#   measurement | taskherd | other tool | ratio | target | met/MISSED
#
# 1. Log relay: 4 local producers (scripts/bench/producer.sh, 250 000 lines
#    of 60 bytes each) under `taskherd run` (lines tagged with group, host
#    and instance, to a file) and under `parallel --tag --line-buffer`;
#    every line checked (present once, intact, tagged, in order) and the
#    checksum of the untagged payloads compared with the producers' own.
# 2. Remote fan-out: instances that print one line and exit, on loopback
#    sshd hosts, 2 × 4 and 8 × 8, spawn to exit, against `pdsh -R ssh` and
#    `parallel -S` (`cargo bench --bench remote_start -- --fanout`), and the
#    stop latency of 2 × 4 remote library instances.
# 3. Queue: no-op jobs, feeder -> 4 consumers with acks, and the round trip
#    at light load (`cargo bench --bench queue`).
# 4. Supervision cost: master CPU over 10 s with 100 idle local library
#    instances (examples/worker), and its peak RSS (VmHWM).
# 5. Stop latency: SIGTERM to the master's exit with those 100 instances.
#
#   scripts/bench.sh                  # about 2-3 minutes once built
#   BENCH_RUNS=5 scripts/bench.sh     # runs per measurement (default 3; the log relay: at least 5)
#   BENCH_STRICT=1 scripts/bench.sh   # exit 3 when a target is missed
#   BENCH_NO_BUILD=1 scripts/bench.sh # use the release builds as they are (no cargo)
#   BENCH_ONLY="logs local" scripts/bench.sh   # some of: logs fanout queue local
#   BENCH_TASKHERD=/path/taskherd BENCH_ONLY="logs local" scripts/bench.sh
#                                     # another build (e.g. a patched copy) for logs and local
#
# Missing tools are installed from Debian (parallel, pdsh, openssh-server,
# openssh-client, mawk; with sudo when not root), and the `taskherd-test`
# login of scripts/test is created. Exit status: 0 when every check passed
# (1 when a check failed: lines lost, a wrong exit code, a process left
# behind), 3 with BENCH_STRICT=1 and a target missed.
#
# Every process it starts carries TASKHERD_BENCH_MARK=<this run> in its
# environment (sessions of the bench's sshd hosts carry their own marker);
# on any exit, whatever still carries one is killed.
# shellcheck disable=SC2317 # cleanup and its helpers run from traps
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
runs=${BENCH_RUNS:-3}
only=${BENCH_ONLY:-logs fanout queue local}
producers=4
log_lines=${BENCH_LOG_LINES:-250000}
# The log relay is short and the most sensitive to a busy machine: more runs.
log_runs=${BENCH_LOG_RUNS:-$(( runs > 5 ? runs : 5 ))}
idle_instances=100
idle_seconds=10
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

missing=()
command -v parallel >/dev/null 2>&1 || missing+=(parallel)
command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
{ command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; } || missing+=(openssh-client)
command -v mawk >/dev/null 2>&1 || missing+=(mawk)
[ -x /usr/bin/time ] || missing+=(time)
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
fi
# The login of the remote sessions (see scripts/test): uid 0, /bin/sh.
if wants fanout && [ -z "${TASKHERD_TEST_NO_LOGIN:-}" ] && ! id taskherd-test >/dev/null 2>&1; then
    $sudo useradd --non-unique --uid 0 --gid 0 --no-create-home \
        --home-dir /var/lib/taskherd-test --shell /bin/sh taskherd-test
    $sudo usermod --password '*' taskherd-test
    $sudo mkdir -p /var/lib/taskherd-test
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

section "build (release)"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    retry_build cargo build --release --bin taskherd --examples
    retry_build cargo bench --no-run --bench remote_start --bench queue
    remote_bench=$root/$(bench_exe remote_start)
    queue_bench=$root/$(bench_exe queue)
else
    # The newest bench executables already built.
    newest() { find "$root/target/release/deps" -maxdepth 1 -type f -perm -u+x -name "$1-*" ! -name '*.d' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-; }
    remote_bench=$(newest remote_start)
    queue_bench=$(newest queue)
fi
taskherd=${BENCH_TASKHERD:-$root/target/release/taskherd}
worker=$root/target/release/examples/worker
producer=$root/scripts/bench/producer.sh
for f in "$taskherd" "$worker" "$remote_bench" "$queue_bench"; do
    [ -x "$f" ] || die "missing build output $f"
done
say "taskherd $("$taskherd" --version 2>/dev/null || echo '?'), $(git -C "$root" describe --always --dirty 2>/dev/null || echo 'no git')"

section "machine"
say "cores:    $(nproc)"
say "cpu:      $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
say "kernel:   $(uname -srm)"
say "os:       $(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release)"
say "memory:   $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
say "load:     $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min)"
say "tools:    $(parallel --version | head -1), $(pdsh -V 2>&1 | head -1), $(ssh -V 2>&1), $(mawk -W version 2>&1 | head -1)"
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
        say "run $run: taskherd $th_ms ms ($th_rate lines/s, cpu ${tu}u+${ts}s incl. producers), parallel $par_ms ms ($par_rate lines/s, cpu ${pu}u+${ps}s)"
    done
    th=$(median "${th_rates[@]}") par=$(median "${par_rates[@]}")
    ratio=$(awk -v a="$th" -v b="$par" 'BEGIN { printf "%.2f", a / b }')
    row "log relay, lines/s (4 x $log_lines, to a file; $log_runs runs)" "$th" "$par (parallel)" "${ratio}x" ">= 1.5x parallel" "$(verdict "$ratio >= 1.5")"
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
    stop_remote=$(result stop_remote_2x4)
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

check_nothing_left "the bench"

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
