#!/usr/bin/env bash
# The audit query at scale: an event log of N entries (default 10,000,000), on SQLite and on
# PostgreSQL, queried through `GET /api/v1/audit` by repository, by namespace, by kind and by
# time range; wrk reports the latency distribution (p50/p99) of each. The log is filled with
# SQL (a recursive CTE / generate_series) rather than through the API, so its hash chain is
# not valid: this measures the query, not `audit verify`. Run by hand; never from tests.
# Knobs: BERTH_BIN, N, WRK_S, PG_URL (a superuser URL; the PostgreSQL half is skipped without
# it, e.g. eval "$(bash scripts/postgres.sh)" and PG_URL=$BERTH_TEST_POSTGRES_URL).
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
N=${N:-10000000}
WRK_S=${WRK_S:-5}
PG_URL=${PG_URL:-${BERTH_TEST_POSTGRES_URL:-}}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in curl wrk sqlite3; do command -v "$c" >/dev/null || die "missing command: $c"; done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release)"

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-audit-bench.XXXXXX")
PID=
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# The fill, the same rows in both dialects: 1,000 repositories in 50 namespaces, 100 actors,
# 6 kinds, one entry per 10 ms of time.
ROWS="seq, 1700000000000 + seq * 10, \
  CASE seq % 6 WHEN 0 THEN 'manifest.pushed' WHEN 1 THEN 'manifest.pulled' WHEN 2 THEN 'tag.deleted' \
    WHEN 3 THEN 'login.succeeded' WHEN 4 THEN 'token.issued' ELSE 'blob.mounted' END, \
  'user:u' || (seq % 100), '10.0.0.1', 'bench', NULL, \
  'ns' || (seq % 50) || '/app' || (seq % 1000), 'sha256:' || seq, '[]', 1024, 'ok', NULL, 'x', 'x'"
COLS="seq, at_ms, kind, actor, client_addr, user_agent, request_id, repository, digest, tags, size, result, detail, prev_hash, hash"

# serve ARGS...: starts berth, sets URL.
serve() {
  "$BERTH_BIN" serve --listen 127.0.0.1:0 --auth token "$@" > "$W/out" 2> "$W/err" &
  PID=$!
  for _ in $(seq 600); do [[ -s $W/out ]] && break; sleep 0.1; done
  URL=$(awk '{print $NF}' "$W/out")
  [[ -n $URL ]] || die "berth did not start: $(cat "$W/err")"
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; : > "$W/out"; }

BASIC=$(printf 'bench:bench-pw' | base64)
# query NAME PATH: p50, p99 and rate of wrk on PATH.
query() {
  local name=$1 path=$2 out
  curl -sf -o /dev/null -H "Authorization: Basic $BASIC" "$URL$path" || die "$name: $URL$path failed"
  out=$(wrk -t1 -c4 -d"${WRK_S}s" --latency -H "Authorization: Basic $BASIC" "$URL$path")
  printf '| %s | %s | %s | %s | %s |\n' "$BACKEND" "$name" \
    "$(awk '$1=="50%" {print $2}' <<< "$out")" "$(awk '$1=="99%" {print $2}' <<< "$out")" \
    "$(awk '/Requests\/sec/ {print $2}' <<< "$out")"
}
measure() {
  query "by repository" "/api/v1/audit?repository=ns7/app407&limit=100"
  query "by repository, 2nd page" "/api/v1/audit?repository=ns7/app407&limit=100&before=$((N / 2))"
  query "by namespace" "/api/v1/audit?namespace=ns7&limit=100"
  query "by actor and kind" "/api/v1/audit?actor=user:u6&kind=manifest.pushed&limit=100"
  query "by actor, kind never theirs" "/api/v1/audit?actor=user:u7&kind=manifest.pushed&limit=100"
  query "by time range" "/api/v1/audit?since=$(( (1700000000000 + N * 5) / 1000 ))&until=$(( (1700000000000 + N * 5) / 1000 + 60 ))&limit=100"
}

RESULTS=()
# SQLite
BACKEND=sqlite
DATA=$W/sqlite
"$BERTH_BIN" user add bench --admin --password-stdin --data-dir "$DATA" <<< "bench-pw" > /dev/null
log "sqlite: filling $N events"
start=$(date +%s)
sqlite3 "$DATA/metadata.db" <<SQL
PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
DELETE FROM events;
WITH RECURSIVE s(seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM s WHERE seq < $N)
INSERT INTO events ($COLS) SELECT $ROWS FROM s;
UPDATE event_chain SET seq = $N, hash = 'x' WHERE id = 1;
SQL
log "sqlite: filled in $(( $(date +%s) - start )) s"
serve --data-dir "$DATA"
RESULTS+=("$(measure)")
stop

if [[ -n $PG_URL ]] && command -v psql >/dev/null; then
  BACKEND=postgres
  DB=berth_audit_bench_$$
  psql -q "$PG_URL" -c "CREATE DATABASE $DB" > /dev/null
  base=${PG_URL%%\?*}; PGDB="${base%/*}/$DB"
  "$BERTH_BIN" user add bench --admin --password-stdin --metadata "$PGDB" <<< "bench-pw" > /dev/null
  log "postgres: filling $N events"
  start=$(date +%s)
  psql -q "$PGDB" <<SQL
DELETE FROM events;
INSERT INTO events ($COLS) SELECT $ROWS FROM generate_series(1, $N) AS s(seq);
UPDATE event_chain SET seq = $N, hash = 'x' WHERE id = 1;
VACUUM ANALYZE events;
SQL
  log "postgres: filled in $(( $(date +%s) - start )) s"
  serve --data-dir "$W/pg-data" --metadata "$PGDB"
  RESULTS+=("$(measure)")
  stop
  psql -q "$PG_URL" -c "DROP DATABASE $DB" > /dev/null
fi

echo
echo "Audit query over $N events, $(date '+%Y-%m-%d %H:%M'), $(nproc) cores; wrk -c4, ${WRK_S}s each"
echo "| backend | query | p50 | p99 | req/s |"
echo "|---|---|---|---|---|"
printf '%s\n' "${RESULTS[@]}"
