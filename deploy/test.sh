#!/usr/bin/env bash
# Tests deploy/ for real on this machine (CI runs it as root):
#   1. builds both images from deploy/Containerfile with podman, from a
#      local base (no registry needed: deploy/build-image.sh);
#   2. checks the image: non-root user, HEALTHCHECK, port 8080 (tcp and udp);
#   3. runs the rendezvous container with the Kubernetes example's
#      rendezvous.toml mounted, waits for its health check, stops it with
#      SIGTERM (exit 0);
#   4. runs the container inside the NAT lab and two punchd daemons behind
#      two NATs against it: direct path, 64 MiB checksummed transfer
#      (`punch-lab-tool check masquerade --rendezvous-image …`);
#   5. `systemd-analyze verify` on the units; parses compose.yaml and the
#      k8s manifests and checks what they promise;
#   6. the three-instance cluster (compose.cluster.yaml's configs): three
#      rendezvous containers and Debian's redis-server beside them, on
#      loopback; every /healthz "ok", redis SIGKILLed → "degraded",
#      restarted → "ok" again without restarting an instance; the cluster
#      compose file and k8s example parsed and checked.
# Without root or a needed tool it says why and exits 0, unless
# PUNCH_LAB_REQUIRE=1 (CI), where that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
  if [ "${PUNCH_LAB_REQUIRE:-}" = 1 ]; then
    echo "deploy test: FAILED: $1 (PUNCH_LAB_REQUIRE=1)" >&2
    exit 1
  fi
  echo "deploy test: skipped: $1"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root (network namespaces, podman)"
for tool in podman runc ip nft iptables conntrack systemd-analyze strip redis-server; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done
python=/usr/bin/python3
"$python" -c 'import yaml' 2>/dev/null || skip "python3-yaml is not installed"

podman=(podman --runtime runc --cgroup-manager cgroupfs)
# rlimits must be explicit for runc here (the defaults are refused).
run=("${podman[@]}" run --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
tag=test
image=localhost/punch-rendezvous:$tag
container=punch-deploy-test
work=$(mktemp -d)
redis_pid=
cleanup() {
  "${podman[@]}" rm --force --time 0 "$container" >/dev/null 2>&1 || true
  for i in 1 2 3; do "${podman[@]}" rm --force --time 0 "$container-rv$i" >/dev/null 2>&1 || true; done
  [ -z "$redis_pid" ] || kill -9 "$redis_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo; echo "== $*"; }

step "1. build the images"
TAG=$tag deploy/build-image.sh

step "2. image metadata"
user=$("${podman[@]}" inspect --format '{{.Config.User}}' "$image")
health=$("${podman[@]}" inspect --format '{{json .HealthCheck.Test}}' "$image")
ports=$("${podman[@]}" inspect --format '{{json .Config.ExposedPorts}}' "$image")
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
echo "user=$user healthcheck=$health ports=$ports size=$((size / 1024)) KiB"
[ "$user" = 65532:65532 ] || { echo "image user is '$user', want 65532:65532" >&2; exit 1; }
[[ $health == *healthcheck* ]] || { echo "image has no HEALTHCHECK" >&2; exit 1; }
[[ $ports == *8080/tcp* ]] || { echo "image does not expose 8080" >&2; exit 1; }
[[ $ports == *8080/udp* ]] || { echo "image does not expose 8080/udp (QUIC observation)" >&2; exit 1; }
version=$("${run[@]}" --rm --network none localhost/punchd:$tag --version)
echo "punchd image: $version"
[[ $version == punchd* ]] || { echo "punchd image does not run punchd" >&2; exit 1; }

step "3. mounted rendezvous.toml (from deploy/k8s), health check, SIGTERM"
"$python" - "$work/rendezvous.toml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open("deploy/k8s/rendezvous.yaml")))
cm = next(d for d in docs if d["kind"] == "ConfigMap")
open(sys.argv[1], "w").write(cm["data"]["rendezvous.toml"])
PY
chmod 0644 "$work/rendezvous.toml"
# Loopback only, on a port the test picks; the image's listen variable is
# overridden like any other setting.
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${run[@]}" -d --name "$container" --network host --health-interval disable \
  -v "$work/rendezvous.toml:/etc/punch-rendezvous/rendezvous.toml:ro" \
  -e PUNCH_RENDEZVOUS_CONFIG=/etc/punch-rendezvous/rendezvous.toml \
  -e PUNCH_RENDEZVOUS_LISTEN="127.0.0.1:$port" \
  "$image" >/dev/null
start=$(date +%s%N)
until "${podman[@]}" healthcheck run "$container" >/dev/null 2>&1; do
  if [ $(( ($(date +%s%N) - start) / 1000000 )) -gt 30000 ]; then
    "${podman[@]}" logs "$container" >&2 || true
    echo "container not healthy after 30 s" >&2; exit 1
  fi
  sleep 0.2
done
echo "healthy after $(( ($(date +%s%N) - start) / 1000000 )) ms: $("${podman[@]}" inspect --format '{{.State.Health.Status}}' "$container")"
probe_ok=$("${run[@]}" --rm --no-healthcheck --network host --entrypoint /usr/local/bin/punch-rendezvous "$image" healthcheck --addr "127.0.0.1:$port" && echo yes)
[ "$probe_ok" = yes ] || { echo "the image's probe from a second container failed" >&2; exit 1; }
# Read the logs whole before searching them: under pipefail, `logs | grep
# -q` fails whenever grep stops at the match before podman has written the
# rest (SIGPIPE), which CI saw once.
logs=$("${podman[@]}" logs "$container" 2>&1)
grep -q "127.0.0.1:$port" <<<"$logs" \
  || { echo "the server did not report listening on 127.0.0.1:$port" >&2; exit 1; }
"${podman[@]}" stop --time 10 "$container" >/dev/null
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$container")
echo "exit code on SIGTERM: $code"
[ "$code" = 0 ] || { "${podman[@]}" logs "$container" >&2; exit 1; }
"${podman[@]}" rm "$container" >/dev/null

step "4. the container in the NAT lab, two daemons behind two NATs"
cargo build -q -p punch-lab -p punchd -p punch-rendezvous
target_dir=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/punch-lab-tool" check masquerade --rendezvous-image "$image"

step "5. systemd units, compose and Kubernetes files"
# verify insists that ExecStart exists: check copies that point at the
# binaries just built. It exits 0 on unknown keys, so any output fails.
for unit in deploy/systemd/*.service; do
  sed "s|/usr/local/bin/|$PWD/deploy/prebuilt/|g" "$unit" > "$work/$(basename "$unit")"
done
cp "$work/punchd@.service" "$work/punchd@alice.service"
out=$(systemd-analyze verify "$work/punch-rendezvous.service" "$work/punchd@alice.service" 2>&1)
if [ -n "$out" ]; then echo "$out" >&2; exit 1; fi
echo "systemd-analyze verify: clean"
for unit in deploy/systemd/*.service; do
  for key in Type=notify DynamicUser=yes NoNewPrivileges=yes ProtectSystem=strict CapabilityBoundingSet= Restart=on-failure 'ExecReload=/bin/kill -HUP $MAINPID'; do
    grep -qx "$key" "$unit" || { echo "$unit lacks $key" >&2; exit 1; }
  done
done
"$python" - <<'PY'
import yaml
compose = yaml.safe_load(open("deploy/compose.yaml"))
rv = compose["services"]["rendezvous"]
assert rv["restart"] in ("always", "unless-stopped", "on-failure"), rv["restart"]
assert "punch-rendezvous" in " ".join(rv["healthcheck"]["test"])
assert any(v.endswith(":/etc/punch-rendezvous/rendezvous.toml:ro") for v in rv["volumes"])
assert rv["environment"]["PUNCH_RENDEZVOUS_CONFIG"] == "/etc/punch-rendezvous/rendezvous.toml"
assert "8080:8080" in rv["ports"] and "8080:8080/udp" in rv["ports"]
assert rv["build"]["dockerfile"] == "deploy/Containerfile"
print("compose.yaml: service rendezvous, restart", rv["restart"], "healthcheck, config volume")

docs = list(yaml.safe_load_all(open("deploy/k8s/rendezvous.yaml")))
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["ConfigMap", "Deployment", "Service"], kinds
dep = next(d for d in docs if d["kind"] == "Deployment")
svc = next(d for d in docs if d["kind"] == "Service")
c = dep["spec"]["template"]["spec"]["containers"][0]
for probe in ("livenessProbe", "readinessProbe"):
    assert c[probe]["httpGet"]["path"] == "/healthz", probe
assert c["ports"][0]["containerPort"] == 8080
assert {(p["containerPort"], p["protocol"]) for p in c["ports"]} == {(8080, "TCP"), (8080, "UDP")}
assert {p["protocol"] for p in svc["spec"]["ports"]} == {"TCP", "UDP"}
assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
mount = c["volumeMounts"][0]["mountPath"]
env = {e["name"]: e for e in c["env"]}
assert env["PUNCH_RENDEZVOUS_CONFIG"]["value"].startswith(mount + "/")
print("k8s: ConfigMap + Deployment (liveness/readiness on /healthz, non-root) + Service, selectors match")
PY

step "6. three instances sharing redis-server (compose.cluster.yaml's configs)"
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port)
start_redis() {
  redis-server --bind 127.0.0.1 --port "$rport" --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
  redis_pid=$!
  until "$python" -c "import socket; socket.create_connection(('127.0.0.1', $rport), 0.2)" 2>/dev/null; do sleep 0.05; done
}
start_redis
ports=()
for i in 1 2 3; do
  p=$(free_port); ports+=("$p")
  sed -e "s|redis://redis:6379|redis://127.0.0.1:$rport|" -e "s|http://HOST:808$i|http://127.0.0.1:$p|" \
    "deploy/cluster/rv$i.toml" > "$work/rv$i.toml"
  chmod 0644 "$work/rv$i.toml"
  "${run[@]}" -d --name "$container-rv$i" --network host --health-interval disable \
    -v "$work/rv$i.toml:/etc/punch-rendezvous/rendezvous.toml:ro" \
    -e PUNCH_RENDEZVOUS_CONFIG=/etc/punch-rendezvous/rendezvous.toml \
    -e PUNCH_RENDEZVOUS_LISTEN="127.0.0.1:$p" \
    "$image" >/dev/null
done
# Polls every instance's /healthz until all say $1 (at most 20 s); prints the time.
health_all() {
  "$python" - "$1" "${ports[@]}" <<'PY'
import json, sys, time, urllib.request
want, ports = sys.argv[1], sys.argv[2:]
start = time.monotonic()
while True:
    seen = []
    for p in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/healthz", timeout=2) as r:
                seen.append(json.load(r).get("status"))
        except Exception as e:
            seen.append(f"error: {e}")
    if all(s == want for s in seen):
        print(f"all {len(ports)} instances {want} after {time.monotonic() - start:.2f} s")
        break
    if time.monotonic() - start > 20:
        sys.exit(f"not all {want} after 20 s: {seen}")
    time.sleep(0.1)
PY
}
health_all ok || { for i in 1 2 3; do "${podman[@]}" logs "$container-rv$i" >&2 || true; done; exit 1; }
kill -9 "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=
health_all degraded
start_redis
health_all ok
for i in 1 2 3; do
  state=$("${podman[@]}" inspect --format '{{.State.Running}} {{.RestartCount}}' "$container-rv$i")
  [ "$state" = "true 0" ] || { echo "rv$i: running/restarts '$state' after the redis outage" >&2; exit 1; }
done
"$python" - <<'PY'
import yaml
compose = yaml.safe_load(open("deploy/compose.cluster.yaml"))
svcs = compose["services"]
assert set(svcs) == {"redis", "rv1", "rv2", "rv3"}, set(svcs)
for i in (1, 2, 3):
    rv = svcs[f"rv{i}"]
    assert "redis" in rv["depends_on"]
    assert f"./cluster/rv{i}.toml:/etc/punch-rendezvous/rendezvous.toml:ro" in rv["volumes"]
    assert "punch-rendezvous" in " ".join(rv["healthcheck"]["test"])
    cfg = open(f"deploy/cluster/rv{i}.toml").read()
    assert 'redis = "redis://redis:6379"' in cfg and f":808{i}" in cfg
    assert f"808{i}:8080" in rv["ports"] and f"808{i}:8080/udp" in rv["ports"]
docs = list(yaml.safe_load_all(open("deploy/k8s/rendezvous-cluster.yaml")))
deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
svcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
cm = next(d for d in docs if d["kind"] == "ConfigMap")
assert "punch-redis" in deps and "punch-redis" in svcs
for i in range(3):
    name = f"punch-rendezvous-{i}"
    dep, svc = deps[name], svcs[name]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), name
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    key = dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"][0]["key"]
    assert "redis://punch-redis:6379" in cm["data"][key], key
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
# Every instance has its own public_url.
urls = [l for k in cm["data"] for l in cm["data"][k].splitlines() if "public_url" in l]
assert len(set(urls)) == 3, urls
print("compose.cluster.yaml: redis + rv1..rv3, one config each; k8s: redis + 3 Deployments/Services, own public_url each")
PY

echo
echo "deploy test: passed"
