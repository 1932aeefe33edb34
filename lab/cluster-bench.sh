#!/usr/bin/env bash
# One rendezvous instance vs three sharing one Redis, side by side in one
# run, printing figures (no thresholds):
#   - registered daemons: 10,000 on one instance, then 30,000 spread over
#     three (10,000 each), with each instance's RSS per daemon and the Redis
#     server's own memory per daemon (INFO memory, used_memory);
#   - punch coordinations/s with p50/p99 (connect -> both orders received,
#     at the client), on one instance, and across instances (every pair has
#     its two sides on two different instances, so each order to the far
#     side goes through Redis pub/sub).
# Needs redis-server (Debian: redis-server); no root. Loopback only. The
# three-instance part holds its daemons in one load process per instance
# (no process needs more than ~CLIENTS sockets: the hard fd limit here is
# 20,000 per process), so CLIENTS=10000 gives the 30,000 of issue 22.
#   lab/cluster-bench.sh            # or: CLIENTS=3000 PAIRS="50" lab/cluster-bench.sh
# Takes ~2 minutes plus the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${CLIENTS:-10000}       # per instance
pairs_list=${PAIRS:-"50 200"}
seconds=${SECONDS_PER_RUN:-5}
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }

if [ -z "${BIN:-}" ]; then
  echo "== build (release)"
  cargo build --release -p punch-rendezvous -p punch-lab --bin punch-rendezvous --bin punch-lab-tool
fi
bin=${BIN:-target/release}   # BIN=target/debug: a quick check of the script
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

redis_port=${REDIS_PORT:-16379}
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --protected-mode no --dir "$work" >/dev/null 2>&1 &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
redis_mem() { redis-cli -p "$redis_port" info memory | awk -F: '/^used_memory:/ {print $2+0}'; }

# start_rv VAR PORT [redis]: a release instance on 127.0.0.1:PORT, its pid
# in VAR (not a subshell, so the exit trap knows it).
start_rv() {
  local var=$1 port=$2 cfg="$work/rv-$2.toml"
  {
    echo "listen = \"127.0.0.1:$port\""
    if [ "${3:-}" = redis ]; then
      echo "redis = \"redis://127.0.0.1:$redis_port\""
      echo "public_url = \"http://127.0.0.1:$port\""
    fi
    cat <<'TOML'
[limits]
max_clients = 40000
messages_per_second = 2000
message_burst = 2000
# Every load client connects from 127.0.0.1.
max_http_per_ip = 40000
TOML
  } > "$cfg"
  "$bin/punch-rendezvous" --config "$cfg" >"$work/rv-$port.log" 2>&1 &
  pids+=($!)
  printf -v "$var" '%s' "$!"
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

echo "== one instance, in-memory registry"
start_rv one 18180
sleep 0.5
before=$(rss "$one")
"$bin/punch-lab-tool" loadgen --addr 127.0.0.1:18180 --clients "$clients" --seconds 8 > "$work/hold1.json" &
hold=$!
sleep 7
held=$(rss "$one")
wait "$hold"
echo "one instance: RSS ${before} -> ${held} KiB holding $clients: $(( (held - before) * 1024 / clients )) bytes per daemon"
cat "$work/hold1.json"; echo
for pairs in $pairs_list; do
  echo "one instance, $clients registered, $pairs pairs back to back:"
  "$bin/punch-lab-tool" loadgen --addr 127.0.0.1:18180 --clients "$clients" --pairs "$pairs" --seconds "$seconds"
  echo
done
kill "$one"

echo "== three instances sharing redis (127.0.0.1:$redis_port)"
start_rv a 18181 redis; start_rv b 18182 redis; start_rv c 18183 redis
for port in 18181 18182 18183; do
  until "$bin/punch-lab-tool" get --addr "127.0.0.1:$port" --path /healthz 2>/dev/null | grep -q '"ok"'; do sleep 0.2; done
done
total=$(( clients * 3 ))
# Each process holds at most 10,000-odd sockets (the hard fd limit here is
# 20,000 per process and cannot be raised): one holder per instance with
# clients - PAIR_CLIENTS/3 daemons, and the pair runs' own PAIR_CLIENTS
# daemons (spread over the three) on top, so 3 x clients are registered
# throughout. The holders outlive the pair runs, then stop by themselves.
pair_clients=${PAIR_CLIENTS:-3000}
per_holder=$(( clients - pair_clients / 3 ))
runs=$(wc -w <<<"$pairs_list")
hold_secs=$(( 16 + runs * (seconds + 25) ))
before_a=$(rss "$a"); before_b=$(rss "$b"); before_c=$(rss "$c"); before_r=$(redis_mem)
addrs="--addr 127.0.0.1:18181 --addr 127.0.0.1:18182 --addr 127.0.0.1:18183"
holders=()
first=$pair_clients   # the pair runs use load-0 … load-(pair_clients - 1)
for port in 18181 18182 18183; do
  "$bin/punch-lab-tool" loadgen --addr "127.0.0.1:$port" --clients "$per_holder" --first "$first" --seconds "$hold_secs" > "$work/hold3-$port.json" &
  holders+=($!); pids+=($!)
  first=$(( first + per_holder ))
done
sleep 13
held_a=$(rss "$a"); held_b=$(rss "$b"); held_c=$(rss "$c"); held_r=$(redis_mem)
keys=$(redis-cli -p "$redis_port" dbsize)
held=$(( per_holder * 3 ))
for x in a b c; do
  bv=before_$x; hv=held_$x
  echo "instance $x: RSS ${!bv} -> ${!hv} KiB holding $per_holder: $(( (${!hv} - ${!bv}) * 1024 / per_holder )) bytes per daemon"
done
echo "redis: used_memory ${before_r} -> ${held_r} bytes for $keys keys: $(( (held_r - before_r) / held )) bytes per daemon"
for pairs in $pairs_list; do
  echo "three instances, $held held + $pair_clients registered = $(( held + pair_clients )), $pairs pairs back to back, every pair across two instances:"
  # shellcheck disable=SC2086
  "$bin/punch-lab-tool" loadgen $addrs --clients "$pair_clients" --pairs "$pairs" --seconds "$seconds"
  echo
done
for port in 18181 18182 18183; do
  echo "instance :$port connected daemons:"
  "$bin/punch-lab-tool" get --addr "127.0.0.1:$port" --path /metrics | grep -E '^punch_rendezvous_connected_daemons' | sed 's/^/  /'
done
for h in "${holders[@]}"; do wait "$h" || true; done
for port in 18181 18182 18183; do echo "holder :$port: $(cat "$work/hold3-$port.json")"; done
for port in 18181 18182 18183; do
  echo "instance :$port cluster metrics:"
  "$bin/punch-lab-tool" get --addr "127.0.0.1:$port" --path /metrics | grep -E '^punch_rendezvous_(redis|cluster)_' | sed 's/^/  /'
done
