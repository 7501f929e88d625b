#!/usr/bin/env bash
# Measures how long `taskherd run` takes to start N local library instances
# (default 100): from the launch of the master until every instance has
# printed its first line (so each one was spawned, got its identity over
# the control channel and answered). Prints one figure per run, then the
# CPU time the master used while the herd sat idle for 10 s (no polling:
# it should be close to zero).
#
#   scripts/bench-start.sh [instances] [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
instances=${1:-100}
runs=${2:-5}

cargo build --release --quiet --bin taskherd --example worker
bin=$PWD/target/release/taskherd
worker=$PWD/target/release/examples/worker
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

cat >"$dir/herd.toml" <<TOML
[master]
stop_grace = "5s"
[[group]]
name = "bench"
command = "$worker"
params = { sleep = 600 }
[group.local]
instances = $instances
TOML

for run in $(seq "$runs"); do
    start=$(date +%s%N)
    "$bin" run "$dir/herd.toml" >"$dir/log" 2>&1 &
    master=$!
    # Wait (bounded: 60 s) until every instance has greeted.
    for _ in $(seq 6000); do
        n=$(grep -c '] Child ' "$dir/log" || true)
        [ "$n" -ge "$instances" ] && break
        sleep 0.01
    done
    end=$(date +%s%N)
    if [ "$run" = "$runs" ]; then
        ticks() { awk '{print $14 + $15}' "/proc/$master/stat"; }
        before=$(ticks)
        sleep 10
        after=$(ticks)
        hz=$(getconf CLK_TCK)
        idle_ms=$(( (after - before) * 1000 / hz ))
    fi
    kill -TERM "$master"
    wait "$master" || true
    echo "run $run: $instances instances up in $(( (end - start) / 1000000 )) ms"
done
echo "master CPU time while $instances instances idled for 10 s: ${idle_ms} ms"
