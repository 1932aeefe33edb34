#!/usr/bin/env bash
# Every punchd benchmark in one go, printing figures (no thresholds; a
# measured failure, e.g. a checksum mismatch, exits non-zero):
#   1. tunnel throughput (iperf3, 1 and 8 streams) and request/response
#      latency in the NAT lab: plain TCP, punchd direct, ssh -L, rathole
#      (Noise), punchd over QUIC, punchd relayed and a bare relay (plain TCP
#      copied by two blocking threads at each end: the floor for any
#      port-relaying tunnel), side by side in one run;
#      1,000 streams x 1 MiB through one tunnel with daemon RSS; single-core
#      AEAD rates;
#   2. punch timing: 200 punches at 40 ms RTT (first-attempt rate, skew,
#      order -> tunnel ready);
#   3. rendezvous scale: 10,000 signed WebSocket clients (RSS per client)
#      and punch coordinations per second with p50/p99.
# Needs root (network namespaces), iperf3, openssh (client and server);
# installs rathole with cargo if it is missing. Takes ~8-12 minutes on a
# 2-core machine, most of it the release build and the 200 punches.
#   sudo lab/bench.sh            # or: ROUNDS=50 SECONDS_PER_RUN=3 lab/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "lab/bench.sh needs root (network namespaces)" >&2; exit 2; }
rounds=${ROUNDS:-200}
seconds=${SECONDS_PER_RUN:-5}

echo "== build (release)"
cargo build --release --workspace
bin=target/release

if ! command -v rathole >/dev/null; then
  # Not --locked: rathole 0.5.0's locked `time 0.3.29` no longer builds.
  cargo install rathole || echo "rathole could not be installed: the bench skips it"
fi

echo; echo "== 1. tunnel throughput and latency (lab, both NATs)"
"$bin/punch-lab-tool" bench --seconds "$seconds"

echo; echo "== 2. punch timing ($rounds punches, 40 ms RTT)"
"$bin/punch-lab-tool" punches --rounds "$rounds" --b-ms 15

echo; echo "== 3. rendezvous scale (loopback)"
# One fd per client in each process: 10,000 clients need > 10,000.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt 10500 ]; then
  echo "open-file limit $(ulimit -n) is below the 10,500 this needs; skipping the rendezvous scale run" >&2
  exit 0
fi
cfg=$(mktemp)
trap 'rm -f "$cfg"; kill "${rv:-}" 2>/dev/null || true' EXIT
cat > "$cfg" <<'TOML'
listen = "127.0.0.1:18080"
[limits]
max_clients = 20000
messages_per_second = 2000
message_burst = 2000
# Every load client connects from 127.0.0.1: lift the per-IP bound on
# connections still in the HTTP phase (default 256).
max_http_per_ip = 20000
TOML
"$bin/punch-rendezvous" --config "$cfg" >/dev/null 2>&1 &
rv=$!
sleep 0.5
rss() { awk '/VmRSS/ {print $2}' "/proc/$rv/status"; }
before=$(rss)
"$bin/punch-lab-tool" loadgen --addr 127.0.0.1:18080 --clients 10000 --seconds 6 > /tmp/punch-bench-hold.json &
hold=$!
# Sample while all clients are registered (registration takes ~3 s).
sleep 5
held=$(rss)
wait "$hold"
echo "RSS before: ${before} KiB, holding 10,000 clients: ${held} KiB, per client: $(( (held - before) * 1024 / 10000 )) bytes"
cat /tmp/punch-bench-hold.json; echo
for pairs in 50 200; do
  echo "coordinations with 10,000 clients registered, $pairs pairs asking back to back:"
  "$bin/punch-lab-tool" loadgen --addr 127.0.0.1:18080 --clients 10000 --pairs "$pairs" --seconds 5
  echo
done
