#!/bin/bash
# Single-stream TCP throughput LAN to LAN (iperf3) through plain veth, our tunnel (shortcut,
# via the hub, clear GRE) and strongSwan kernel-libipsec, measured in one run.
# Usage: sudo e2e/bench/throughput.sh [--json FILE] [dmvpn-lab bench options...]
#   (e.g. --reps 3 --secs 5 --omit 1 --only routed,ipsec-shortcut)
# Builds the release binaries (CARGO_TARGET_DIR is honoured), prints the markdown table on
# stdout, progress on stderr, and writes the JSON results to FILE
# (default: bench-throughput-<UTC time>.json in the current directory).
# Needs root, iperf3, and for the strongSwan path charon + swanctl + kernel-libipsec
# (Debian: strongswan-charon strongswan-swanctl libcharon-extra-plugins).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
json="bench-throughput-$(date -u +%Y%m%dT%H%M%SZ).json"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=$2; shift 2;;
    -h|--help) sed -n '2,10p' "$0"; exit 0;;
    *) args+=("$1"); shift;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "throughput.sh: must run as root (network namespaces)" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "throughput.sh: iperf3 missing (apt-get install iperf3)" >&2; exit 2; }
target=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && cargo build --release -p dmvpn-agent -p dmvpn-e2e) >&2
echo "throughput.sh: uptime at start: $(uptime)" >&2
rc=0
"$target/release/dmvpn-lab" bench --agent "$target/release/dmvpn-agent" --json "$json" ${args[@]+"${args[@]}"} || rc=$?
echo "throughput.sh: uptime at end: $(uptime); JSON in $json" >&2
exit $rc
