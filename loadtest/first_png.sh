#!/usr/bin/env bash
# Time from nothing to the first PNG: a fresh virtualenv, `make serve`, then one /flux request.
#   loadtest/first_png.sh [venv-dir]     (default: a new temporary folder, removed afterwards)
# Prints the seconds to a served PNG; the server is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-$(mktemp -d)/venv}
port=8000
log=$(mktemp)
start=$(date +%s.%N)
setsid make serve VENV="$venv" >"$log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true; "$venv/bin/serve" shutdown -y >/dev/null 2>&1 || true; "$venv/bin/ray" stop --force >/dev/null 2>&1 || true' EXIT
out=$(mktemp --suffix=.png)
until curl -sf -o "$out" -X POST "http://127.0.0.1:$port/flux" \
    -H 'Content-Type: application/json' -d '{"prompt": "a lighthouse at dusk", "seed": 1}'; do
  kill -0 "$server" 2>/dev/null || { echo "make serve exited:"; tail -20 "$log"; exit 1; }
  sleep 1
done
end=$(date +%s.%N)
file "$out"
echo "fresh venv to first 1024x1024 PNG: $(echo "$end - $start" | bc) s"
