#!/usr/bin/env bash
# Measures log throughput: N instances each print L lines as fast as they
# can; the master relays every line (tagged, timestamped) to a file. Prints
# the wall time and lines per second, and checks that no line was lost.
#
#   scripts/bench-logs.sh [instances] [lines-per-instance]
set -euo pipefail
cd "$(dirname "$0")/.."
instances=${1:-4}
lines=${2:-250000}

cargo build --release --quiet --bin taskherd --example worker
bin=$PWD/target/release/taskherd
worker=$PWD/target/release/examples/worker
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

cat >"$dir/herd.toml" <<TOML
[[group]]
name = "bench"
command = "$worker"
params = { lines = $lines }
[group.local]
instances = $instances
TOML

start=$(date +%s%N)
"$bin" run "$dir/herd.toml" >"$dir/log"
end=$(date +%s%N)
got=$(grep -c '] line [0-9]*$' "$dir/log")
want=$((instances * lines))
ms=$(( (end - start) / 1000000 ))
echo "$got of $want lines relayed in $ms ms: $(( got * 1000 / (ms > 0 ? ms : 1) )) lines/s"
[ "$got" -eq "$want" ] || { echo "lines were lost" >&2; exit 1; }
