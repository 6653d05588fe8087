#!/usr/bin/env bash
# Load benchmark on loopback, side by side in one run. For each target: requests/s,
# p99 latency (wrk, 2 threads, 64 connections, DURATION seconds) and the server's CPU
# time per request (utime + stime from /proc, so it is less sensitive than requests/s
# to whatever else the machine is doing).
#   1. a bare axum hello world (the yardstick)
#   2. Tollgate on SQLite (the embedded default): POST /v1/usage/consume, durable
#      (answered after commit), one hot account and spread over 100 accounts; then
#      POST /v1/ratelimit/check with the in-memory limiter
#   3. Tollgate on PostgreSQL (a fresh database, dropped at the end): the same consumes
#   4. Tollgate with Redis rate limiting: POST /v1/ratelimit/check
# Step 2 also measures GET /v1/me with an account's API key (verification + user read).
# Steps 2 and 3 also spend credits (POST /v1/accounts/{id}/credits/spend, one hot
# account): one transaction per spend, not group committed.
# Steps 3 and 4 are skipped, saying so, when PostgreSQL or Redis is not reachable.
# Bounded: every process started here is stopped by pid at the end.
# Usage: scripts/bench.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
pg_url="${TOLLGATE_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
redis_url="${TOLLGATE_BENCH_REDIS_URL:-redis://127.0.0.1:6379}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

cargo build --release --bin tollgate --example hello
target="${CARGO_TARGET_DIR:-target}/release"
work=$(mktemp -d)
pids=()
bench_db="tollgate_bench_$$"
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${pg_ready:-}" ]; then psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $bench_db" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run_wrk() { # name, server pid, url, [wrk script]
  local before after out total
  before=$(cpu_ticks "$2")
  out=$(wrk -t2 -c64 -d"${duration}s" --latency ${4:+-s "$4"} "$3")
  after=$(cpu_ticks "$2")
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  printf '%-48s %10s req/s  p50 %-8s p99 %-8s %6.1f us CPU/req %s\n' "$1" \
    "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$out" | awk '$1 == "50%" {print $2}')" "$(echo "$out" | awk '$1 == "99%" {print $2}')" \
    "$(echo "($after - $before) * 1000000 / $(getconf CLK_TCK) / $total" | bc -l)" \
    "$(echo "$out" | grep -E "Non-2xx|Socket errors" | tr -s ' ' | tr '\n' ' ')"
}
wait_ready() { for _ in $(seq 1 100); do curl -sf "http://$1/readyz" >/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
start_tollgate() { # name, listen, [env assignments...]; sets TG_KEY and tg_pid
  local name=$1 listen=$2; shift 2
  mkdir -p "$work/$name"
  TG_KEY=$(env TOLLGATE_DATA_DIR="$work/$name" "$@" "$target/tollgate" keys create --name bench --scopes 'admin:*' | tail -1)
  export TG_KEY
  env TOLLGATE_DATA_DIR="$work/$name" TOLLGATE_LISTEN="$listen" TOLLGATE_PLANS_FILE="$PWD/bench/plans.toml" \
    TOLLGATE_LOG=warn "$@" "$target/tollgate" serve & tg_pid=$!
  pids+=("$tg_pid")
  wait_ready "$listen"
  for i in $(seq 0 99); do
    curl -sf -o /dev/null -X POST "http://$listen/v1/accounts" -H "Authorization: Bearer $TG_KEY" \
      -H 'Content-Type: application/json' -d "{\"external_id\":\"bench-$i\"}"
  done
}

grant_credits() { # listen: a balance no run exhausts for bench-0
  curl -sf -o /dev/null -X POST "http://$1/v1/accounts/ext:bench-0/credits/grant" -H "Authorization: Bearer $TG_KEY" \
    -H 'Content-Type: application/json' -d '{"amount":1000000000}'
}

api_key() { # listen, data dir name: an admin user (set up through its one-time link) and its API key, in TG_API_KEY
  local link token access
  link=$(env TOLLGATE_DATA_DIR="$work/$2" "$target/tollgate" admin create --email bench@example.com | grep -o 'token=[^ ]*' | head -1)
  token=${link#token=}
  curl -sf -o /dev/null -X POST "http://$1/v1/auth/password/reset" -H 'Content-Type: application/json' \
    -d "{\"token\":\"$token\",\"password\":\"bench-password-41\"}"
  access=$(curl -sf -X POST "http://$1/v1/auth/login" -H 'Content-Type: application/json' \
    -d '{"email":"bench@example.com","password":"bench-password-41"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  TG_API_KEY=$(curl -sf -X POST "http://$1/v1/me/api-keys" -H "Authorization: Bearer $access" -H 'Content-Type: application/json' \
    -d '{"name":"bench","scopes":["read"]}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  export TG_API_KEY
}

echo "== $(date -u +%F), $(nproc) cores, wrk -t2 -c64 -d${duration}s"
"$target/examples/hello" 127.0.0.1:18181 & hello_pid=$!
pids+=("$hello_pid")
sleep 0.3
run_wrk "hello world (bare axum)" "$hello_pid" http://127.0.0.1:18181/

start_tollgate sqlite 127.0.0.1:18182
run_wrk "SQLite: consume, one hot account" "$tg_pid" http://127.0.0.1:18182/v1/usage/consume bench/consume.lua
TG_ACCOUNTS=100 run_wrk "SQLite: consume, spread over 100 accounts" "$tg_pid" http://127.0.0.1:18182/v1/usage/consume bench/consume.lua
run_wrk "rate-limit check (in memory)" "$tg_pid" http://127.0.0.1:18182/v1/ratelimit/check bench/ratelimit.lua
if api_key 127.0.0.1:18182 sqlite && [ -n "$TG_API_KEY" ]; then
  run_wrk "SQLite: GET /v1/me with an API key" "$tg_pid" http://127.0.0.1:18182/v1/me bench/api_key.lua
else
  echo "-- could not set up an API key: GET /v1/me skipped"
fi
grant_credits 127.0.0.1:18182
run_wrk "SQLite: credits spend, one hot account" "$tg_pid" http://127.0.0.1:18182/ bench/spend.lua
run_wrk "hello world again (drift check)" "$hello_pid" http://127.0.0.1:18181/
echo "   SQLite server resident: $(ps -o rss= -p "$tg_pid") KiB"
kill "$tg_pid"

if command -v psql >/dev/null && psql -q "$pg_url/postgres" -c "CREATE DATABASE $bench_db" >/dev/null 2>&1; then
  pg_ready=1
  # Loopback: no TLS (sqlx would negotiate it, and it cost a third of the CPU here).
  start_tollgate postgres 127.0.0.1:18183 TOLLGATE_DATABASE_URL="$pg_url/$bench_db?sslmode=disable"
  run_wrk "PostgreSQL: consume, one hot account" "$tg_pid" http://127.0.0.1:18183/v1/usage/consume bench/consume.lua
  TG_ACCOUNTS=100 run_wrk "PostgreSQL: consume, spread over 100 accounts" "$tg_pid" http://127.0.0.1:18183/v1/usage/consume bench/consume.lua
  grant_credits 127.0.0.1:18183
  run_wrk "PostgreSQL: credits spend, one hot account" "$tg_pid" http://127.0.0.1:18183/ bench/spend.lua
  kill "$tg_pid"
else
  echo "-- PostgreSQL not reachable at $pg_url: skipped"
fi

if command -v redis-cli >/dev/null && redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
  start_tollgate redis 127.0.0.1:18184 TOLLGATE_REDIS_URL="$redis_url" TOLLGATE_REDIS_KEY_PREFIX="tollgate-bench-$$:"
  run_wrk "rate-limit check (Redis)" "$tg_pid" http://127.0.0.1:18184/v1/ratelimit/check bench/ratelimit.lua
  kill "$tg_pid"
  redis-cli -u "$redis_url" --scan --pattern "tollgate-bench-$$:*" | xargs -r redis-cli -u "$redis_url" del >/dev/null
else
  echo "-- Redis not reachable at $redis_url: skipped"
fi
