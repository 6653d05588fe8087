#!/usr/bin/env bash
# Load benchmark on loopback, side by side in one run: a bare axum hello world, then
# Tollgate's POST /v1/usage/consume (durable: answered after commit) on one hot
# account and spread over 100 accounts, then POST /v1/ratelimit/check.
# wrk, 2 threads, 64 connections, DURATION seconds each (default 10). Bounded: every
# process started here is stopped by pid at the end. Usage: scripts/bench.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

cargo build --release --bin tollgate --example hello
target="${CARGO_TARGET_DIR:-target}/release"
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

run_wrk() { # name, url, [script]
  echo "== $1"
  if [ -n "${3:-}" ]; then
    wrk -t2 -c64 -d"${duration}s" --latency -s "$3" "$2" | grep -E "Requests/sec|Latency  |  50%|  99%|Non-2xx|Socket errors"
  else
    wrk -t2 -c64 -d"${duration}s" --latency "$2" | grep -E "Requests/sec|Latency  |  50%|  99%|Non-2xx|Socket errors"
  fi
}

"$target/examples/hello" 127.0.0.1:18181 & pids+=($!)
sleep 0.5
run_wrk "hello world (bare axum)" http://127.0.0.1:18181/
kill "${pids[0]}"

export TOLLGATE_DATA_DIR="$work" TOLLGATE_LISTEN=127.0.0.1:18182 TOLLGATE_PLANS_FILE="$PWD/bench/plans.toml" TOLLGATE_LOG=warn
TG_KEY=$("$target/tollgate" keys create --name bench --scopes 'admin:*' | tail -1)
export TG_KEY
"$target/tollgate" serve & pids+=($!)
for _ in $(seq 1 50); do curl -sf http://127.0.0.1:18182/readyz >/dev/null && break; sleep 0.1; done
for i in $(seq 0 99); do
  curl -sf -o /dev/null -X POST http://127.0.0.1:18182/v1/accounts -H "Authorization: Bearer $TG_KEY" \
    -H 'Content-Type: application/json' -d "{\"external_id\":\"bench-$i\"}"
done
TG_ACCOUNTS=1 run_wrk "consume, one hot account (SQLite, durable)" http://127.0.0.1:18182/v1/usage/consume bench/consume.lua
TG_ACCOUNTS=100 run_wrk "consume, spread over 100 accounts (SQLite, durable)" http://127.0.0.1:18182/v1/usage/consume bench/consume.lua
run_wrk "rate-limit check (in memory)" http://127.0.0.1:18182/v1/ratelimit/check bench/ratelimit.lua
echo "== server: $(ps -o rss= -p "${pids[1]}") KiB resident after the run"
