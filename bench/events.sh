#!/usr/bin/env bash
# What the event log costs a push. The log is written in the transaction of each change and
# cannot be switched off, so the comparison is against a second build of the same sources with
# the benchmark-only cargo feature `bench-no-event-log` (`events::append` returns at once: no
# chain-head lock, no row, no index entries, no webhook wake-up). Both servers run at once, on
# SQLite and, with PG_URL, on PostgreSQL; CLIENTS processes push small images (a config, a
# layer, a manifest; every push distinct) for PUSH_S seconds to one server, then to the other,
# alternating which goes first, for ROUNDS rounds. Prints the median pushes/s of each, their
# ratio (target >= 0.95) and the server's CPU per push. Run by hand; never from tests.
# Knobs: BERTH_BIN, NO_EVENTS_BIN (built into target/bench-no-event-log when unset), PUSH_S,
# ROUNDS, CLIENTS, LAYER_KB, PG_URL (a superuser URL; e.g. eval "$(bash scripts/postgres.sh)"
# and PG_URL=$BERTH_TEST_POSTGRES_URL), BENCH_TMP.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
NO_EVENTS_BIN=${NO_EVENTS_BIN:-}
PUSH_S=${PUSH_S:-10}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-4}
LAYER_KB=${LAYER_KB:-4}
PG_URL=${PG_URL:-}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in curl python3 awk; do command -v "$c" >/dev/null || die "missing command: $c"; done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release)"

if [[ -z $NO_EVENTS_BIN ]]; then
  # A target directory of its own, so the default build's binary stays as it is; seeded from
  # target/release the first time, so only berth itself compiles (the feature changes no
  # dependency).
  T=$ROOT/target/bench-no-event-log
  if [[ ! -d $T/release && -d $ROOT/target/release ]]; then
    log "seeding $T from target/release"
    mkdir -p "$T" && cp -a "$ROOT/target/release" "$T/"
  fi
  log "building the comparison binary (--features bench-no-event-log)"
  (cd "$ROOT" && cargo build --release --features bench-no-event-log --target-dir "$T" >&2)
  NO_EVENTS_BIN=$T/release/berth
fi

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-events-bench.XXXXXX")
PIDS=()
DBS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in "${DBS[@]}"; do psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS $db" > /dev/null 2>&1 || true; done
  rm -rf "$W"
}
trap cleanup EXIT
# Copies, so that a rebuild during the run does not change what is measured.
cp "$BERTH_BIN" "$W/berth-with" && cp "$NO_EVENTS_BIN" "$W/berth-without"

# start NAME ARGS...: starts a server, sets URL_<NAME> and PID_<NAME>.
start() {
  local name=$1; shift
  mkdir -p "$W/$name"
  RUST_LOG=info "$W/berth-${name%%_*}" serve --listen 127.0.0.1:0 --data-dir "$W/$name/data" "$@" \
    > "$W/$name/out" 2> "$W/$name/err" &
  PIDS+=($!)
  printf -v "PID_$name" '%s' "$!"
  for _ in $(seq 300); do [[ -s $W/$name/out ]] && break; sleep 0.1; done
  local url; url=$(awk 'NR==1 {print $NF}' "$W/$name/out")
  [[ -n $url ]] || die "$name did not start: $(cat "$W/$name/err")"
  printf -v "URL_$name" '%s' "$url"
}

# cpu_ticks PID: user + system CPU of the process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# push URL SECONDS RUN: pushes from CLIENTS processes; prints the images pushed (201s).
push() {
  python3 - "$1" "$2" "$3" "$CLIENTS" "$LAYER_KB" <<'PY'
import hashlib, http.client, json, multiprocessing, os, sys, time, urllib.parse
url, secs, run, clients, layer_kb = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
host = urllib.parse.urlsplit(url).netloc
MT = "application/vnd.oci.image.manifest.v1+json"

def worker(n, out):
    c = http.client.HTTPConnection(host)
    pad = os.urandom(layer_kb * 1024)
    end, i, done = time.monotonic() + secs, 0, 0
    while time.monotonic() < end:
        blobs = [json.dumps({"run": run, "client": n, "i": i}).encode(),
                 f"{run} {n} {i}\n".encode() + pad]
        ds = []
        for b in blobs:
            d = "sha256:" + hashlib.sha256(b).hexdigest()
            c.request("POST", f"/v2/bench/c{n}/blobs/uploads/?digest={d}", body=b)
            r = c.getresponse(); r.read()
            if r.status != 201:
                sys.exit(f"blob push: {r.status}")
            ds.append((d, len(b)))
        m = json.dumps({"schemaVersion": 2, "mediaType": MT,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": ds[0][0], "size": ds[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ds[1][0], "size": ds[1][1]}]}).encode()
        c.request("PUT", f"/v2/bench/c{n}/manifests/{run}-{i}", body=m, headers={"Content-Type": MT})
        r = c.getresponse(); r.read()
        if r.status != 201:
            sys.exit(f"manifest push: {r.status}")
        done += 1
        i += 1
    out.put(done)

out = multiprocessing.Queue()
ps = [multiprocessing.Process(target=worker, args=(n, out)) for n in range(clients)]
[p.start() for p in ps]
total = sum(out.get() for _ in ps)
[p.join() for p in ps]
if any(p.exitcode for p in ps):
    sys.exit("a client failed")
print(total)
PY
}

ROWS=()
# measure BACKEND: rounds against servers with_BACKEND and without_BACKEND.
measure() {
  local backend=$1 round mode order pushed t0 t1 name url_var pid_var
  declare -A rates=() cpus=()
  for mode in with without; do
    name=${mode}_$backend; url_var=URL_$name
    push "${!url_var}" 2 "warm-$mode" > /dev/null
  done
  for round in $(seq "$ROUNDS"); do
    order="with without"; (( round % 2 == 0 )) && order="without with"
    for mode in $order; do
      name=${mode}_$backend; url_var=URL_$name; pid_var=PID_$name
      t0=$(cpu_ticks "${!pid_var}")
      pushed=$(push "${!url_var}" "$PUSH_S" "r$round-$mode")
      t1=$(cpu_ticks "${!pid_var}")
      rates[$mode]+="$(awk -v n="$pushed" -v s="$PUSH_S" 'BEGIN {printf "%.1f", n / s}') "
      cpus[$mode]+="$(awk -v n="$pushed" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.0f", t / hz * 1e6 / n}') "
    done
    log "$backend after round $round: pushes/s with: ${rates[with]}; without: ${rates[without]}"
  done
  median() { printf '%s\n' $1 | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
  local a b
  a=$(median "${rates[with]}"); b=$(median "${rates[without]}")
  ROWS+=("$(awk -v be="$backend" -v a="$a" -v b="$b" -v ca="$(median "${cpus[with]}")" \
    -v cb="$(median "${cpus[without]}")" -v ra="${rates[with]% }" -v rb="${rates[without]% }" \
    'BEGIN {printf "| %s | %s | %s | %.3fx (%s) | %s | %s | %s / %s |", be, a, b, a / b,
      (a / b >= 0.95) ? "met" : "missed", ca, cb, ra, rb}')")
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
start with_sqlite
start without_sqlite
log "sqlite: $ROUNDS rounds of ${PUSH_S}s, $CLIENTS clients"
measure sqlite

if [[ -n $PG_URL ]] && command -v psql >/dev/null; then
  base=${PG_URL%%\?*}
  for mode in with without; do
    db=berth_events_bench_${mode}_$$
    psql -q "$PG_URL" -c "CREATE DATABASE $db" > /dev/null
    DBS+=("$db")
    start "${mode}_postgres" --metadata "${base%/*}/$db"
  done
  log "postgres: $ROUNDS rounds of ${PUSH_S}s, $CLIENTS clients"
  measure postgres
fi

echo
echo "Image pushes with and without the event log, $(date '+%Y-%m-%d %H:%M'), $(nproc) cores," \
  "load average $LOAD_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end;" \
  "$CLIENTS clients, $ROUNDS rounds of ${PUSH_S}s, medians"
echo "| backend | with (pushes/s) | without | ratio (target >= 0.95) | server CPU µs/push, with | without | per round, with / without |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
