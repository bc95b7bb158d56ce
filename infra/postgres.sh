#!/usr/bin/env bash
# A PostgreSQL server for the Prefect server's database (Debian's postgresql package).
#   infra/postgres.sh install         apt-get install postgresql when pg_ctl is missing (as root)
#   infra/postgres.sh start DIR       a fresh cluster in DIR on a free loopback port, a database `prefect`;
#                                     prints its SQLAlchemy URL (postgresql+asyncpg://...)
#   infra/postgres.sh stop DIR        stop it (pg_ctl stop, then by PID)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"

bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }; done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

install() {
  bindir >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "PostgreSQL is not installed: apt-get install postgresql (as root)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  bindir >/dev/null || { echo "pg_ctl missing after apt-get install postgresql" >&2; exit 1; }
}

# the server refuses to run as root: as root, it runs as the package's `postgres` user
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  install
  local dir bin port; dir="$(mkdir -p "$1" && cd "$1" && pwd)"; bin="$(bindir)"; port="$(free_port)"
  local pass; pass="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  # the cluster lives where its owner can reach it: as root, a folder of the postgres user's under /tmp
  # (DIR's parents may be closed to it); DIR/cluster names it
  local cl; cl="$(mktemp -d "${TMPDIR:-/tmp}/tdml-postgres.XXXXXX")"; chmod 755 "$cl"
  echo "$cl" > "$dir/cluster"
  [ "$(id -u)" = 0 ] && chown postgres: "$cl"
  printf '%s\n' "$pass" > "$cl/pwfile"; chmod 600 "$cl/pwfile"
  [ "$(id -u)" = 0 ] && chown postgres: "$cl/pwfile"
  as_owner "$bin/initdb" -D "$cl/data" -U prefect --pwfile="$cl/pwfile" -A scram-sha-256 > "$dir/initdb.log" 2>&1 \
    || { echo "initdb failed; see $dir/initdb.log" >&2; exit 1; }
  rm -f "$cl/pwfile"
  # loopback only; the socket in the cluster's folder (no system folder needed); enough connections for a
  # server and its workers; no fsync: a test or development database, thrown away at stop
  as_owner "$bin/pg_ctl" -D "$cl/data" -l "$cl/server.log" -w -t 60 start \
    -o "-h 127.0.0.1 -p $port -k $cl -c max_connections=200 -c fsync=off -c synchronous_commit=off" \
    > "$dir/pg_ctl.log" 2>&1 || { cp "$cl/server.log" "$dir/server.log" 2>/dev/null || true
                                   echo "PostgreSQL did not start; see $dir/server.log" >&2; exit 1; }
  head -1 "$cl/data/postmaster.pid" > "$dir/postgres.pid"
  PGPASSWORD="$pass" "$bin/psql" -h 127.0.0.1 -p "$port" -U prefect -d postgres -qc "CREATE DATABASE prefect" \
    > /dev/null || { echo "could not create the database prefect" >&2; stop "$dir"; exit 1; }
  echo "postgresql+asyncpg://prefect:$pass@127.0.0.1:$port/prefect"
}

stop() {
  local dir="$1" bin cl
  cl="$(cat "$dir/cluster" 2>/dev/null || true)"
  if [ -n "$cl" ] && [ -d "$cl/data" ] && bin="$(bindir)"; then
    as_owner "$bin/pg_ctl" -D "$cl/data" -m fast -w -t 30 stop > /dev/null 2>&1 || true
  fi
  stop_pid "$dir/postgres.pid"
  if [ -n "$cl" ]; then cp "$cl/server.log" "$dir/server.log" 2>/dev/null || true; rm -rf "$cl" "$dir/cluster"; fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  start) start "${1:?folder}" ;;
  stop) stop "${1:?folder}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
