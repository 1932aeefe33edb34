#!/bin/sh
# A/B two builds of punchd on one host's loopback, alternating, in one run:
# plain TCP, then each build's TCP tunnel, one stream and eight (iperf3).
# What it isolates is the daemon's CPU cost per byte (no delay, no NAT, no
# emulator), e.g. an allocator or a buffer size.
#
#   sudo lab/loopback-ab.sh DIR_A DIR_B [ROUNDS] [SECONDS]
#
# DIR_A and DIR_B each hold a `punchd` and a `punch-rendezvous` (e.g.
# target/release and a copy of main's). Needs root (a network namespace of
# its own, pl-ab, removed on exit), iperf3 and curl. Bounded: ROUNDS
# (default 3) × 2 builds × 2 runs of SECONDS (default 4).
set -eu
A=$(realpath "$1")
B=$(realpath "$2")
ROUNDS=${3:-3}
SECS=${4:-4}
NS=pl-ab
DIR=$(mktemp -d /tmp/punch-lab-ab.XXXXXX)
X="ip netns exec $NS"

cleanup() {
	ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
	sleep 0.3
	ip netns del "$NS" 2>/dev/null || true
	rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up

ak=$("$A/punchd" keygen --out "$DIR/alice.key")
bk=$("$A/punchd" keygen --out "$DIR/bob.key")
conf() { # me port admin peer peer_key tail
	printf 'name = "%s"\nkey_file = "%s.key"\n[rendezvous]\nurl = "http://127.0.0.1:8080"\n[punch]\nport = %s\ntransports = ["tcp"]\n[admin]\nlisten = "127.0.0.1:%s"\n[[peers]]\nname = "%s"\npublic_key = "%s"\n%s\n' \
		"$1" "$1" "$2" "$3" "$4" "$5" "$6"
}
conf alice 40000 7070 bob "$bk" '[[forward]]
listen = "127.0.0.1:10000"
peer = "bob"
service = "bench"' >"$DIR/alice.toml"
conf bob 40001 7071 alice "$ak" '[[expose]]
name = "bench"
target = "127.0.0.1:9000"
allow = ["alice"]' >"$DIR/bob.toml"
$X iperf3 -s -B 127.0.0.1 -p 9000 >/dev/null 2>&1 &

gbps() { # port streams
	$X iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -P "$2" -J 2>/dev/null |
		python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
rss() { # pid
	awk '/VmRSS/ {print $2}' "/proc/$1/status"
}

printf '%-6s %-40s %8s %8s %12s\n' round build "1 str" "8 str" "RSS KiB a/b"
i=1
while [ "$i" -le "$ROUNDS" ]; do
	printf '%-6s %-40s %8s %8s\n' "$i" "plain TCP" "$(gbps 9000 1)" "$(gbps 9000 8)"
	for bin in "$A" "$B"; do
		cd "$DIR"
		$X "$bin/punch-rendezvous" --listen 127.0.0.1:8080 >rv.log 2>&1 &
		rv=$!
		sleep 0.5
		$X "$bin/punchd" --config bob.toml >bob.log 2>&1 &
		bob=$!
		$X "$bin/punchd" --config alice.toml >alice.log 2>&1 &
		alice=$!
		n=0
		until $X curl -s 127.0.0.1:7070/v1/status 2>/dev/null | grep -q '"direct"'; do
			n=$((n + 1))
			[ "$n" -lt 100 ] || { echo "no direct tunnel with $bin; alice.log:" >&2; tail -5 alice.log >&2; exit 1; }
			sleep 0.1
		done
		sleep 1
		one=$(gbps 10000 1)
		eight=$(gbps 10000 8)
		printf '%-6s %-40s %8s %8s %12s\n' "$i" "$bin" "$one" "$eight" "$(rss $alice)/$(rss $bob)"
		kill "$alice" "$bob" "$rv"
		wait "$alice" "$bob" "$rv" 2>/dev/null || true
	done
	i=$((i + 1))
done
