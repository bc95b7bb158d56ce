#!/usr/bin/env bash
# A Prefect server with TDML's work pools, deployments and a worker, for runs started from the UI or CLI.
#   infra/prefect.sh start DIR [DB_URL]
#                                 server on a free port (its database: DB_URL, a SQLAlchemy URL such as
#                                 infra/postgres.sh prints, or SQLite in DIR), pools tdml-local and tdml-gpu
#                                 (process), `prefect deploy --all`, a worker on tdml-local; prints the API URL
#   infra/prefect.sh stop DIR     stop the worker and the server
# Then: PREFECT_API_URL=<printed URL> prefect deployment run tdml-train/local
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
. "$HERE/lib.sh"
PREFECT="${PREFECT:-$ROOT/.venv/bin/prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

start() {
  local dir; dir="$(mkdir -p "$1" && cd "$1" && pwd)"
  local port; port="$(free_port)"
  export PREFECT_HOME="$dir/home" PREFECT_API_URL="http://127.0.0.1:$port/api" TDML_HOME="$ROOT"
  export PREFECT_UI_API_URL="$PREFECT_API_URL"  # the UI's pages call this server's API, not the default port
  if [ -n "${2:-}" ]; then export PREFECT_API_DATABASE_CONNECTION_URL="$2"; fi
  "$PREFECT" server start --host 127.0.0.1 --port "$port" > "$dir/server.pid.log" 2>&1 &
  echo $! > "$dir/server.pid"
  wait_until "$dir/server.pid" "prefect server on port $port" curl -sf "$PREFECT_API_URL/health" -o /dev/null
  for pool in tdml-local tdml-gpu; do
    "$PREFECT" work-pool inspect "$pool" > /dev/null 2>&1 || "$PREFECT" work-pool create "$pool" --type process > /dev/null
  done
  (cd "$ROOT" && "$PREFECT" --no-prompt deploy --all) > "$dir/deploy.log" 2>&1 \
    || { echo "prefect deploy failed; see $dir/deploy.log" >&2; stop "$dir"; exit 1; }
  (cd "$ROOT" && exec "$PREFECT" worker start --pool tdml-local --type process) > "$dir/worker.pid.log" 2>&1 &
  echo $! > "$dir/worker.pid"
  echo "$PREFECT_API_URL"
}

stop() {
  stop_pid "$1/worker.pid"
  stop_pid "$1/server.pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "${1:?folder}" "${2:-}" ;;
  stop) stop "${1:?folder}" ;;
  *) echo "usage: $0 start DIR [DB_URL] | stop DIR" >&2; exit 2 ;;
esac
