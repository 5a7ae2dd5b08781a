#!/usr/bin/env bash
# Garbage collection at scale, side by side with CNCF Distribution's offline garbage-collect,
# and the price of GC for clients. Run by hand; never from tests.
#
# 1. The same content for both (bench/gc_seed.py writes it straight into each one's layout):
#    MANIFESTS image manifests of LAYERS blobs each, half tagged, half untagged and a day old.
#    Berth: `berth gc` with gc_untagged_manifest_secs=0, trash 0, grace 0 on SQLite + disk;
#    Distribution: `docker-registry garbage-collect --delete-untagged`. Total time, blobs
#    deleted per minute, peak RSS (GNU time).
# 2. PostgreSQL + Garage: the same content at PG_MANIFESTS, written straight into the database
#    (`berth migrate`'s schema, rows by psql \copy) and the bucket (PUTs under Berth's keys) by
#    gc_seed.py berth-pg, then `berth gc` (skipped without PG_URL / the Garage variables). The
#    seeding time goes to the log. Afterwards the database is dropped, and the objects GC left
#    are deleted by a `berth gc` over empty metadata (every object is then an orphan).
# 3. Clients while GC runs: pushes (a config and a layer, then a manifest) and manifest pulls
#    (wrk) for LOAD_S seconds with GC idle, then with GC running back to back inside serve
#    (`POST /api/v1/gc` in a loop) over a registry of LOAD_MANIFESTS images; the ratio.
# Knobs: BERTH_BIN, MANIFESTS (100000), LAYERS (10), PG_MANIFESTS (MANIFESTS), LOAD_MANIFESTS
# (20000), LOAD_S (15), ROUNDS (3, alternating GC idle and GC in a loop), GC_DUTY (gc_duty_percent of section 3, 50), PG_URL (a superuser URL,
# e.g. from scripts/postgres.sh), SEED_PROCS / SEED_THREADS (section 2's PUT workers, 2 x 16).
# SKIP_SQLITE=1, SKIP_DISTRIBUTION=1, SKIP_LOAD=1 leave out sections 1a, 1b, 3.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
DIST_BIN=${DIST_BIN:-$(command -v docker-registry || true)}
export MANIFESTS=${MANIFESTS:-100000} LAYERS=${LAYERS:-10}
PG_MANIFESTS=${PG_MANIFESTS:-$MANIFESTS}
LOAD_MANIFESTS=${LOAD_MANIFESTS:-20000}
LOAD_S=${LOAD_S:-15}
ROUNDS=${ROUNDS:-3}
PG_URL=${PG_URL:-${BERTH_TEST_POSTGRES_URL:-}}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
needs=(curl python3 /usr/bin/time)
[[ -n ${SKIP_LOAD:-} ]] || needs+=(wrk)
for c in "${needs[@]}"; do command -v "$c" >/dev/null || die "missing command: $c"; done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release)"

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-gc-bench.XXXXXX")
PIDS=()
PG_DB=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [[ -n $PG_DB ]]; then psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" > /dev/null || true; fi
  # serve's log of section 3 outlives the run, for a look at what GC did meanwhile.
  cp "$W/serve.err" "${BENCH_TMP:-/tmp}/berth-gc-bench-serve.err" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

export BERTH_GC_GRACE_SECS=0 BERTH_TRASH_RETENTION_SECS=0 BERTH_GC_UNTAGGED_MANIFEST_SECS=0 \
  BERTH_GC_INTERVAL_SECS=0 RUST_LOG=warn
# Sections 1 and 2 measure GC flat out; section 3 runs it as serve does by default.
GC_DUTY=${GC_DUTY:-50}

# timed NAME CMD...: runs CMD under GNU time; prints "seconds peak_rss_kib".
timed() {
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o "$W/time.$name" "$@" > "$W/out.$name" 2> "$W/err.$name" \
    || die "$name failed: $(tail -5 "$W/err.$name")"
  cat "$W/time.$name"
}

row() { # backend, seconds, rss_kib, deleted
  local per_min
  per_min=$(awk -v d="$4" -v s="$2" 'BEGIN { printf "%.0f", (s > 0 ? d * 60 / s : 0) }')
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$4" "$2" "$per_min" "$(( $3 / 1024 ))"
}

echo "| registry | blobs deleted | seconds | deleted per minute | peak RSS MiB |"
echo "|---|---|---|---|---|"

# --- 1a. Berth, SQLite + disk -----------------------------------------------------------------
if [[ -z ${SKIP_SQLITE:-} ]]; then
  log "seeding Berth (SQLite + disk): $MANIFESTS manifests, $(( MANIFESTS * LAYERS )) blobs"
  "$BERTH_BIN" migrate --data-dir "$W/berth" > /dev/null 2>&1
  python3 "$HERE/gc_seed.py" berth-fs "$W/berth"
  sync
  read -r secs rss < <(timed berth "$BERTH_BIN" gc --json --gc-duty-percent 100 --data-dir "$W/berth")
  log "gc: $(cat "$W/out.berth")"
  deleted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blobs_deleted"])' "$W/out.berth")
  row "Berth, SQLite + disk (online)" "$secs" "$rss" "$deleted"
  rm -rf "$W/berth"
fi

# --- 1b. Distribution, filesystem driver --------------------------------------------------------
if [[ -n $DIST_BIN && -z ${SKIP_DISTRIBUTION:-} ]]; then
  log "seeding Distribution: the same content"
  python3 "$HERE/gc_seed.py" distribution "$W/dist"
  cat > "$W/dist.yml" <<EOF
version: 0.1
storage:
  filesystem:
    rootdirectory: $W/dist
  delete:
    enabled: true
http:
  addr: 127.0.0.1:0
EOF
  sync
  read -r secs rss < <(timed dist "$DIST_BIN" garbage-collect --delete-untagged "$W/dist.yml")
  deleted=$(grep -c 'blob eligible for deletion' "$W/out.dist" "$W/err.dist" | awk -F: '{s+=$2} END {print s}')
  row "Distribution $("$DIST_BIN" --version 2>/dev/null | awk '{print $NF}'), offline" "$secs" "$rss" "$deleted"
  rm -rf "$W/dist"
fi

# --- 2. Berth, PostgreSQL + Garage ----------------------------------------------------------------
if [[ -n $PG_URL && -n ${BERTH_TEST_S3_ENDPOINT:-} ]]; then
  command -v psql > /dev/null || die "missing command: psql"
  PG_DB="berth_gc_bench_$$"
  storage="s3://$BERTH_TEST_S3_BUCKET/gc-bench-$$"
  log "seeding Berth (PostgreSQL + Garage): $PG_MANIFESTS manifests, $(( PG_MANIFESTS * LAYERS )) blobs; database $PG_DB, $storage"
  psql -q "$PG_URL" -c "CREATE DATABASE $PG_DB" > /dev/null
  pg=$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/"+sys.argv[2])))' "$PG_URL" "$PG_DB")
  printf 'data_dir = "%s"\nmetadata = "%s"\nstorage = "%s"\ns3_endpoint = "%s"\n' \
    "$W/pgdata" "$pg" "$storage" "$BERTH_TEST_S3_ENDPOINT" > "$W/to.toml"
  "$BERTH_BIN" migrate --config "$W/to.toml" > /dev/null 2> "$W/migrate.err" \
    || die "berth migrate: $(tail -5 "$W/migrate.err")"
  seed_start=$(date +%s)
  MANIFESTS=$PG_MANIFESTS python3 "$HERE/gc_seed.py" berth-pg "$pg" "$storage"
  log "seeded in $(( $(date +%s) - seed_start )) s"
  read -r secs rss < <(timed pg "$BERTH_BIN" gc --json --gc-duty-percent 100 --config "$W/to.toml")
  log "gc: $(cat "$W/out.pg")"
  deleted=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["blobs_deleted"])' "$W/out.pg")
  label="Berth, PostgreSQL + Garage (online)"
  [[ $PG_MANIFESTS == "$MANIFESTS" ]] || label="Berth, PostgreSQL + Garage (online, $PG_MANIFESTS manifests)"
  row "$label" "$secs" "$rss" "$deleted"
  psql -q "$PG_URL" -c "DROP DATABASE $PG_DB WITH (FORCE)" > /dev/null || true
  PG_DB=""
  # What GC kept: over empty metadata every object under the prefix is an orphan past the grace.
  log "deleting the objects left under $storage"
  "$BERTH_BIN" gc --gc-duty-percent 100 --data-dir "$W/empty" --storage "$storage" \
    --s3-endpoint "$BERTH_TEST_S3_ENDPOINT" > /dev/null 2> "$W/empty.err" \
    || log "warning: could not empty $storage: $(tail -3 "$W/empty.err")"
  rm -rf "$W/pgdata" "$W/empty"
fi

# --- 3. Clients while GC runs ---------------------------------------------------------------------
if [[ -z ${SKIP_LOAD:-} ]]; then
  log "push and pull rates with GC idle and with GC in a loop ($LOAD_MANIFESTS images)"
  MANIFESTS=$LOAD_MANIFESTS "$BERTH_BIN" migrate --data-dir "$W/load" > /dev/null 2>&1
  MANIFESTS=$LOAD_MANIFESTS python3 "$HERE/gc_seed.py" berth-fs "$W/load"
  RUST_LOG=info,berth::access=warn "$BERTH_BIN" serve --listen 127.0.0.1:0 --data-dir "$W/load" --gc-duty-percent "$GC_DUTY" > "$W/serve.out" 2> "$W/serve.err" &
  PIDS+=($!)
  for _ in $(seq 300); do [[ -s $W/serve.out ]] && break; sleep 0.1; done
  URL=$(awk '{print $NF}' "$W/serve.out")
  [[ -n $URL ]] || die "berth did not start: $(cat "$W/serve.err")"
  # Pulls of a tagged manifest; pushes from a small Python client (keep-alive, 4 threads).
  pull_rate() {
    wrk -t1 -c8 -d"${LOAD_S}s" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "$URL/v2/bench/app0/manifests/t0" | awk '/Requests\/sec/ {print $2}'
  }
  push_rate() {
    python3 - "$URL" "$LOAD_S" "$1" <<'PY'
import hashlib, http.client, json, sys, threading, time, urllib.parse
url, secs, run = sys.argv[1], float(sys.argv[2]), sys.argv[3]
host = urllib.parse.urlsplit(url).netloc
done = [0]
def worker(n):
    c = http.client.HTTPConnection(host)
    end, i = time.time() + secs, 0
    while time.time() < end:
        blobs = [f"{run} {n} {i} config".encode(), f"{run} {n} {i} layer".encode()]
        ds = []
        for b in blobs:
            d = "sha256:" + hashlib.sha256(b).hexdigest()
            c.request("POST", f"/v2/load/push/blobs/uploads/?digest={d}", body=b)
            r = c.getresponse(); r.read()
            ds.append((d, len(b)))
        m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": ds[0][0], "size": ds[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ds[1][0], "size": ds[1][1]}]}).encode()
        c.request("PUT", f"/v2/load/push/manifests/{run}-{n}-{i}", body=m,
                  headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        r = c.getresponse(); r.read()
        if r.status == 201:
            done[0] += 1
        i += 1
ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"{done[0] / secs:.1f}")
PY
  }
  # Rounds alternate GC idle and GC in a loop, so drift on a shared machine hits both; the
  # table gives each one's median.
  gc_runs() { curl -sf "$URL/metrics" | awk '/^berth_gc_runs_total / {print $2}'; }
  # The seeded garbage goes first, so the rounds measure GC looping over a registry it keeps
  # clean (a run then reads every page and deletes what pushes left behind).
  log "first collection: $(curl -sf -X POST "$URL/api/v1/gc")"
  idle_pulls=(); idle_pushes=(); busy_pulls=(); busy_pushes=()
  runs_before=$(gc_runs)
  for r in $(seq "$ROUNDS"); do
    idle_pulls+=("$(pull_rate)"); idle_pushes+=("$(push_rate "idle$r")")
    # The collector inside serve (as the scheduled one runs), back to back through the API.
    ( while true; do curl -sf -X POST "$URL/api/v1/gc" > /dev/null || sleep 0.1; done ) &
    GC_LOOP=$!; PIDS+=($GC_LOOP)
    sleep 1
    busy_pulls+=("$(pull_rate)"); busy_pushes+=("$(push_rate "busy$r")")
    kill "$GC_LOOP" 2>/dev/null || true
    wait "$GC_LOOP" 2>/dev/null || true
    # A run goes on when its caller hangs up: the next idle window starts once the run in
    # progress has ended (runs_total moves; the loop kept one going, so one is in progress).
    stopped_at=$(gc_runs)
    for _ in $(seq 1500); do
      [[ $(gc_runs) != "$stopped_at" ]] && break
      sleep 0.2
    done
    log "round $r: pulls ${idle_pulls[-1]} / ${busy_pulls[-1]}, pushes ${idle_pushes[-1]} / ${busy_pushes[-1]}"
  done
  runs=$(awk -v a="$runs_before" -v b="$(gc_runs)" 'BEGIN { print b - a }')
  median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
  echo
  echo "| clients ($LOAD_MANIFESTS images, SQLite + disk, median of $ROUNDS rounds, $runs GC runs) | GC idle | GC in a loop | ratio |"
  echo "|---|---|---|---|"
  awk -v a="$(median "${idle_pulls[@]}")" -v b="$(median "${busy_pulls[@]}")" 'BEGIN { printf "| manifest GET per second | %s | %s | %.2fx |\n", a, b, b / a }'
  awk -v a="$(median "${idle_pushes[@]}")" -v b="$(median "${busy_pushes[@]}")" 'BEGIN { printf "| image pushes per second | %s | %s | %.2fx |\n", a, b, b / a }'
fi
