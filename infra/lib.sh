# Shared by the infra/ service scripts: free ports, waiting for a service, stopping it by PID.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_until PIDFILE WHAT CMD...: retry CMD for up to 60 s; on failure stop the service and exit 1
wait_until() {
  local pidfile="$1" what="$2"; shift 2
  for _ in $(seq 1 600); do
    if "$@"; then return 0; fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    sleep 0.1
  done
  echo "$what did not come up; see $pidfile.log" >&2
  stop_pid "$pidfile"
  exit 1
}

stop_pid() {
  local pidfile="$1"
  if [ -f "$pidfile" ]; then
    local pid; pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}
