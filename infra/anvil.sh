#!/usr/bin/env bash
# A real EVM node for integration tests: anvil from npm (@foundry-rs/anvil, a linux binary).
#   infra/anvil.sh install            install it under infra/node_modules (once)
#   infra/anvil.sh start PIDFILE [ARG...]  start it on a free loopback port (ARGs go to anvil); prints its URL
#   infra/anvil.sh stop PIDFILE       stop it by its PID
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
VERSION=1.7.1
BIN="$HERE/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"

install() {
  if [ ! -x "$BIN" ]; then
    npm install --prefix "$HERE" --no-audit --no-fund --silent "@foundry-rs/anvil@$VERSION" >&2
  fi
  [ -x "$BIN" ] || { echo "anvil binary missing after npm install: $BIN" >&2; exit 1; }
}

start() {
  local pidfile="$1"; shift
  install
  local port; port="$(free_port)"
  local keep=(--max-persisted-states 0)  # anvil refuses it beside --prune-history, which keeps no state on disk
  case " $* " in *" --prune-history"*) keep=() ;; esac
  "$BIN" --host 127.0.0.1 --port "$port" --silent --block-base-fee-per-gas 1000000000 "${keep[@]}" "$@" \
    > "$pidfile.log" 2>&1 &
  echo $! > "$pidfile"
  wait_until "$pidfile" "anvil on port $port" answers "$port"
  echo "http://127.0.0.1:$port"
}

answers() {
  curl -s -X POST -H 'content-type: application/json' \
    --data '{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}' "http://127.0.0.1:$1" | grep -q result
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  start) start "${1:?pidfile}" "${@:2}" ;;
  stop) stop_pid "${1:?pidfile}" ;;
  *) echo "usage: $0 install | start PIDFILE [ANVIL ARG...] | stop PIDFILE" >&2; exit 2 ;;
esac
