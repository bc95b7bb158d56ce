#!/usr/bin/env bash
# Headless Chromium (Debian's chromium package), to look at the Prefect UI without a display.
#   infra/chromium.sh install                 apt-get install chromium when it is missing (as root)
#   infra/chromium.sh shot URL PNG [HTML]      a 1600x1000 screenshot of URL in PNG, after its scripts have run;
#                                             with HTML, the page's DOM as it stands then
set -euo pipefail

browser() {
  local b
  for b in chromium chromium-browser; do command -v "$b" >/dev/null && { command -v "$b"; return 0; }; done
  return 1
}

install() {
  browser >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "Chromium is not installed: apt-get install chromium (as root)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
  browser >/dev/null || { echo "chromium missing after apt-get install chromium" >&2; exit 1; }
}

shot() {
  local url="$1" png="$2" html="${3:-}" b profile
  b="$(browser)" || { echo "Chromium is not installed: run infra/chromium.sh install (as root)" >&2; exit 1; }
  profile="$(mktemp -d "${TMPDIR:-/tmp}/tdml-chromium.XXXXXX")"
  # the UI is a single-page app: give its scripts (virtual) time to fetch the run from the API and draw it
  local flags=(--headless --no-sandbox --disable-gpu --disable-background-networking --disable-dev-shm-usage
               --no-first-run --hide-scrollbars --user-data-dir="$profile" --window-size=1600,1000
               --virtual-time-budget=20000)
  timeout 120 "$b" "${flags[@]}" --screenshot="$png" "$url" > "$profile/shot.log" 2>&1 \
    || { tail -5 "$profile/shot.log" >&2; rm -rf "$profile"; exit 1; }
  if [ -n "$html" ]; then
    timeout 120 "$b" "${flags[@]}" --dump-dom "$url" > "$html" 2> "$profile/dom.log" \
      || { tail -5 "$profile/dom.log" >&2; rm -rf "$profile"; exit 1; }
  fi
  rm -rf "$profile"
  [ -s "$png" ] || { echo "chromium wrote no screenshot of $url" >&2; exit 1; }
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  shot) shot "${1:?url}" "${2:?png}" "${3:-}" ;;
  *) echo "usage: $0 install | shot URL PNG [HTML]" >&2; exit 2 ;;
esac
