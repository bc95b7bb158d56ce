#!/usr/bin/env bash
# Every real service TDML can use, on free loopback ports, and one file with their addresses.
#   infra/services.sh up [DIR]     anvil, an IPFS node, SeaweedFS (S3, credentials required), PostgreSQL and a
#                                  Prefect server on it with its work pools, deployments and a worker; each
#                                  health-checked; writes DIR/services.json (mode 600), which `tdml run`, the
#                                  workers and the deployments read (a spec then says `chain: rpc`,
#                                  `store: s3` or `store: ipfs`); DIR defaults to .services in the checkout
#   infra/services.sh down [DIR]   stop them all by PID and remove services.json
# make services-up / make services-down run these.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
. "$HERE/lib.sh"

up() {
  local dir; dir="$(mkdir -p "$1" && cd "$1" && pwd)"
  if [ -f "$dir/services.json" ]; then
    echo "services are already up ($dir/services.json); make services-down first" >&2; exit 1
  fi
  trap 'echo "a service did not start; stopping the others" >&2; down "$dir" >/dev/null 2>&1' ERR
  local t0 chain ipfs s3 db prefect
  declare -A took
  t0=$(date +%s.%N); chain="$("$HERE/anvil.sh" start "$dir/anvil.pid")"; took[chain]=$(elapsed "$t0")
  t0=$(date +%s.%N); ipfs="$("$HERE/ipfs.sh" start "$dir/ipfs.pid")"; took[ipfs]=$(elapsed "$t0")
  t0=$(date +%s.%N); s3="$("$HERE/seaweedfs.sh" start "$dir/s3.pid")"; took[s3]=$(elapsed "$t0")
  t0=$(date +%s.%N); db="$("$HERE/postgres.sh" start "$dir/postgres")"; took[postgres]=$(elapsed "$t0")
  t0=$(date +%s.%N)
  prefect="$(TDML_SERVICES="$dir/services.json" "$HERE/prefect.sh" start "$dir/prefect" "$db")"
  took[prefect]=$(elapsed "$t0")
  trap - ERR
  (umask 077; python3 - "$dir/services.json" "$chain" "$ipfs" "$s3" "$dir/s3.pid.env" "$prefect" "$db" \
      "${took[chain]}" "${took[ipfs]}" "${took[s3]}" "${took[postgres]}" "${took[prefect]}" <<'PY'
import json, sys
path, chain, ipfs, s3, s3env, prefect, db, *took = sys.argv[1:]
creds = dict(line.strip().split("=", 1) for line in open(s3env) if "=" in line)
doc = {
    "chain": chain,
    "ipfs": ipfs,
    "s3": {"endpoint": s3, "bucket": "tdml", "access_key_id": creds["AWS_ACCESS_KEY_ID"],
           "secret_access_key": creds["AWS_SECRET_ACCESS_KEY"]},
    "prefect_api": prefect,
    "prefect_database": "postgresql://" + db.split("@", 1)[-1],  # where, without the password
    "start_s": dict(zip(["chain", "ipfs", "s3", "postgres", "prefect"], map(float, took))),
}
tmp = path + ".tmp"
json.dump(doc, open(tmp, "w"), indent=2)
import os; os.replace(tmp, path)
PY
  )
  echo "chain (anvil)      $chain   ${took[chain]} s"
  echo "IPFS RPC API       $ipfs   ${took[ipfs]} s"
  echo "S3 (SeaweedFS)     $s3   ${took[s3]} s  (credentials in services.json)"
  echo "PostgreSQL         ${db##*@}   ${took[postgres]} s"
  echo "Prefect API        $prefect   ${took[prefect]} s  (UI: ${prefect%/api})"
  echo "addresses: $dir/services.json   stop all: make services-down"
}

elapsed() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }

down() {
  local dir="$1"
  [ -d "$dir" ] || { echo "no services in $dir"; return 0; }
  "$HERE/prefect.sh" stop "$dir/prefect" || true
  "$HERE/postgres.sh" stop "$dir/postgres" || true
  "$HERE/seaweedfs.sh" stop "$dir/s3.pid" || true
  "$HERE/ipfs.sh" stop "$dir/ipfs.pid" || true
  "$HERE/anvil.sh" stop "$dir/anvil.pid" || true
  rm -f "$dir/services.json"
  echo "services in $dir stopped"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  up) up "${1:-$ROOT/.services}" ;;
  down) down "${1:-$ROOT/.services}" ;;
  *) echo "usage: $0 up [DIR] | down [DIR]" >&2; exit 2 ;;
esac
