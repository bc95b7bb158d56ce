#!/usr/bin/env bash
# A real IPFS node for integration tests: Kubo (`ipfs`) when it is on PATH, else js-ipfs from npm.
#   infra/ipfs.sh install            install js-ipfs under infra/node_modules (when no Kubo)
#   infra/ipfs.sh start PIDFILE      start an offline node on a free loopback port; prints HOST:PORT
#   infra/ipfs.sh stop PIDFILE       stop it by its PID
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
JS_VERSION=0.66.1
JSIPFS="$HERE/node_modules/.bin/jsipfs"

install() {
  command -v ipfs >/dev/null && return 0
  if [ ! -x "$JSIPFS" ]; then
    npm install --prefix "$HERE" --no-audit --no-fund --silent "ipfs@$JS_VERSION" >&2
  fi
  [ -x "$JSIPFS" ] || { echo "jsipfs missing after npm install" >&2; exit 1; }
}

configure() {  # loopback only, no swarm, no bootstrap peers: nothing leaves this machine
  python3 - "$1/config" "$2" "$3" "$4" <<'PY'
import json, sys
path, api, gw, rpc = sys.argv[1:]
c = json.load(open(path))
a = c.setdefault("Addresses", {})
a["API"], a["Gateway"] = f"/ip4/127.0.0.1/tcp/{api}", f"/ip4/127.0.0.1/tcp/{gw}"
if "RPC" in a:
    a["RPC"] = f"/ip4/127.0.0.1/tcp/{rpc}"
a["Swarm"] = []
c["Bootstrap"] = []
json.dump(c, open(path, "w"), indent=2)
PY
}

start() {
  local pidfile="$1"
  install
  export IPFS_PATH="$pidfile.repo"
  rm -rf "$IPFS_PATH"
  local api gw rpc; api="$(free_port)"; gw="$(free_port)"; rpc="$(free_port)"
  if command -v ipfs >/dev/null; then
    ipfs init --profile test >/dev/null 2>&1
    configure "$IPFS_PATH" "$api" "$gw" "$rpc"
    ipfs daemon --offline > "$pidfile.log" 2>&1 &
  else
    # js-ipfs's newest transitive dependencies call Promise.withResolvers (Node 22); add it on older Node
    NODE_OPTIONS="--require=$HERE/withresolvers.cjs" "$JSIPFS" init --profile test >/dev/null 2>&1 || true
    configure "$IPFS_PATH" "$api" "$gw" "$rpc"
    NODE_OPTIONS="--require=$HERE/withresolvers.cjs" "$JSIPFS" daemon --offline > "$pidfile.log" 2>&1 &
  fi
  echo $! > "$pidfile"
  wait_until "$pidfile" "the IPFS node on port $api" answers "$api"
  echo "127.0.0.1:$api"
}

answers() {
  curl -s -X POST "http://127.0.0.1:$1/api/v0/id" | grep -q '"ID"'
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  start) start "${1:?pidfile}" ;;
  stop) stop_pid "${1:?pidfile}" ;;
  *) echo "usage: $0 install | start PIDFILE | stop PIDFILE" >&2; exit 2 ;;
esac
