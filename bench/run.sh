#!/usr/bin/env bash
# Side-by-side benchmark, in one run on one machine: CNCF Distribution (Debian `docker-registry`,
# filesystem driver), nginx serving the same bytes as static files (the pull-side limit), and
# Berth. All servers run at once and every measurement alternates between them, so they share
# the machine's noise. Prints a table with ratio columns and the project's targets marked
# met/missed; raw outputs go under bench/results/<timestamp>/. Run by hand; never from tests.
# See bench/README.md for what each number means and every knob.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
REGISTRIES=${REGISTRIES:-distribution nginx berth}
BIG_MB=${BIG_MB:-512}          # monolithic push and single-stream pull
CHUNKED_MB=${CHUNKED_MB:-256}  # chunked push
CHUNK_MB=${CHUNK_MB:-8}        # bytes per PATCH
SMALL_MB=${SMALL_MB:-16}       # the layer the concurrent clients pull
PUSH_RUNS=${PUSH_RUNS:-3}      # pushes: best of N, each of a distinct blob
PULL_RUNS=${PULL_RUNS:-5}      # single-stream pull: best of N
WRK_S=${WRK_S:-10}
WRK_WARMUP_S=${WRK_WARMUP_S:-2}
WRK_T=${WRK_T:-2}
WRK_C=${WRK_C:-64}
CONC=${CONC:-32}               # concurrent pull clients
CONC_PULLS=${CONC_PULLS:-4}    # pulls per client
BIG_RSS_GB=${BIG_RSS_GB:-4}    # RSS-flatness blob; 0 skips the step
RSS_FLAT_TOL_MIB=${RSS_FLAT_TOL_MIB:-8}
RESULTS_ROOT=${RESULTS_DIR:-$HERE/results}
REPO=bench/app
MT=application/vnd.oci.image.manifest.v1+json

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------- preflight
for r in $REGISTRIES; do
  case $r in distribution|nginx|berth) ;; *) die "unknown registry '$r' in REGISTRIES";; esac
done
has() { [[ " $REGISTRIES " == *" $1 "* ]]; }
need=(curl wrk split awk stat df mkfifo tee head pgrep python3)
has distribution && need+=(docker-registry)
has nginx && need+=(nginx)
for c in "${need[@]}"; do command -v "$c" >/dev/null || die "missing command: $c"; done
if has berth; then
  [[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release, or set BERTH_BIN)"
  if [[ -d $ROOT/crates ]] && newer=$(find "$ROOT/crates" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" \
      -newer "$BERTH_BIN" -type f -print -quit 2>/dev/null) && [[ -n $newer ]]; then
    log "warning: $BERTH_BIN is older than $newer; benchmarking it anyway"
  fi
fi
# openssl uses the CPU's SHA extensions; coreutils' sha256sum is several times slower.
if command -v openssl >/dev/null; then sha256_hex() { openssl dgst -sha256 -r "$@" | cut -d' ' -f1; }
else sha256_hex() { sha256sum "$@" | cut -d' ' -f1; }; fi
dg() { echo "sha256:$(sha256_hex "$1")"; }
CLK_TCK=$(getconf CLK_TCK)

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-bench.XXXXXX")
chmod 755 "$W"  # nginx workers may run as an unprivileged user and must reach the files
RES=$RESULTS_ROOT/$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES"
ln -sfn "$(basename "$RES")" "$RESULTS_ROOT/latest"

# ---------------------------------------------------------------------------- process hygiene
PIDS=()  # servers this script started; the trap stops exactly these
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
STEP_PID=  # the measurement subshell running now, if any
kill_tree() { local c; for c in $(pgrep -P "$1" || true); do kill_tree "$c"; done; kill -TERM "$1" 2>/dev/null || true; }
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  if [[ -n $STEP_PID ]]; then kill_tree "$STEP_PID"; wait "$STEP_PID" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  if [[ -n ${KEEP_TMP:-} ]]; then log "kept $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

avail_mib() { df -Pm "$W" | awk 'NR==2{print $4}'; }
nums() { awk "BEGIN{ $1 }"; }  # floating point in awk: nums 'printf "%.1f", 3/2'

# --------------------------------------------------------------------------------------- data
n_push=0; for r in $REGISTRIES; do [[ $r == nginx ]] || n_push=$((n_push + 1)); done
inputs_mib=$(( (BIG_MB + 2 * CHUNKED_MB) * PUSH_RUNS + SMALL_MB ))
need_mib=$(( inputs_mib + n_push * ((BIG_MB + CHUNKED_MB) * PUSH_RUNS + SMALL_MB) + 1024 ))
(( $(avail_mib) >= need_mib )) || die "need ~${need_mib} MiB free under $W, have $(avail_mib) MiB"

IN=$W/in; mkdir -p "$IN"
log "generating test data under $IN (${inputs_mib} MiB)"
BIG_F=(); BIG_D=(); CH_DIR=(); CH_D=()
for ((i = 1; i <= PUSH_RUNS; i++)); do
  f=$IN/big_$i.bin; head -c "${BIG_MB}M" /dev/urandom > "$f"; BIG_F+=("$f"); BIG_D+=("$(dg "$f")")
  f=$IN/chunked_$i.bin; head -c "${CHUNKED_MB}M" /dev/urandom > "$f"; CH_D+=("$(dg "$f")")
  mkdir -p "$IN/chunks_$i"; split -b "${CHUNK_MB}M" -d -a 4 "$f" "$IN/chunks_$i/c."; rm -f "$f"
  CH_DIR+=("$IN/chunks_$i")
done
SMALL_F=$IN/small.bin; head -c "${SMALL_MB}M" /dev/urandom > "$SMALL_F"; SMALL_D=$(dg "$SMALL_F")
CFG_F=$IN/config.json
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > "$CFG_F"
CFG_D=$(dg "$CFG_F")
layers=""
layer() { layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$1\",\"size\":$2}"; }
for ((i = 0; i < PUSH_RUNS; i++)); do layer "${BIG_D[i]}" $((BIG_MB << 20)); layer "${CH_D[i]}" $((CHUNKED_MB << 20)); done
layer "$SMALL_D" $((SMALL_MB << 20))
MAN_F=$IN/manifest.json
printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
  "$MT" "$CFG_D" "$(stat -c %s "$CFG_F")" "$layers" > "$MAN_F"
MAN_D=$(dg "$MAN_F")
chmod -R a+rX "$IN"

# ------------------------------------------------------------------------------ HTTP helpers
# call WANT_STATUS CURL_ARGS...: one request; fails unless the status is WANT_STATUS.
# Response headers land in $H (per process: steps run in subshells, one at a time).
H=$W/headers
call() {
  local want=$1 got; shift
  got=$(curl -sS -D "$H" -o "$W/body" -w '%{http_code}' "$@") || { log "curl failed: $*"; return 1; }
  [[ $got == "$want" ]] || { log "want $want, got $got: $* :: $(head -c 300 "$W/body")"; return 1; }
}
hdr() { tr -d '\r' < "$H" | awk -v h="$1" 'tolower($1) == h ":" { v = $2 } END { print v }'; }
abs() { case $2 in http*) echo "$2";; *) echo "$1$2";; esac; }  # BASE, Location
sep() { case $1 in *\?*) echo '&';; *) echo '?';; esac; }
# No "Expect: 100-continue": curl would wait for the interim response before sending a body.
OCTET=(-H 'Content-Type: application/octet-stream' -H 'Expect:')
start_upload() { # BASE -> absolute Location
  call 202 -X POST "$1/v2/$REPO/blobs/uploads/" || return 1
  abs "$1" "$(hdr location)"
}
push_mono() { # BASE FILE DIGEST: POST, then PUT with the whole body (streamed from the file)
  local L; L=$(start_upload "$1") || return 1
  call 201 -X PUT "${OCTET[@]}" -T "$2" "$L$(sep "$L")digest=$3"
}
now() { echo "$EPOCHREALTIME"; }
mibps() { nums "printf \"%.1f\", $1 / 1048576 / ($3 - $2)"; }  # BYTES T0 T1

# ---------------------------------------------------------------------------------- servers
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { # below the usual ephemeral range, so client sockets do not take it
  local p i
  for ((i = 0; i < 100; i++)); do p=$((20000 + RANDOM % 12000)); port_free "$p" && { echo "$p"; return; }; done
  die "no free port found"
}
# wait_ready: poll BASE/v2/ until 200 while SRV_PID lives; then check SRV_PID owns the port.
wait_ready() {
  local i code port=${BASE##*:} owners p
  for ((i = 0; i < 300; i++)); do
    kill -0 "$SRV_PID" 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$BASE/v2/" || true)
    if [[ $code == 200 ]]; then
      sleep 0.2; kill -0 "$SRV_PID" 2>/dev/null || return 1
      owners=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 || true)
      [[ -z $owners ]] && return 0  # no ss, or no permission to see pids: liveness must do
      for p in $owners; do  # nginx listens in its master and in the workers it forked
        [[ $p == "$SRV_PID" || $(ps -o ppid= -p "$p" | tr -d ' ') == "$SRV_PID" ]] && return 0
      done
      log "port $port answers, but not from pid $SRV_PID"; return 1
    fi
    sleep 0.1
  done
  return 1
}
start_distribution() { # DIR
  local try port
  for try in 1 2 3; do
    port=$(pick_port) || return 1; BASE=http://127.0.0.1:$port
    # Debian's packaged config (inmemory blob descriptor cache, delete, health check), minus
    # auth, with request logging off as for the others.
    cat > "$1/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  cache: {blobdescriptor: inmemory}
  filesystem: {rootdirectory: $1/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port, headers: {X-Content-Type-Options: [nosniff]}}
health: {storagedriver: {enabled: true, interval: 10s, threshold: 3}}
EOF
    docker-registry serve "$1/config.yml" >> "$1/server.log" 2>&1 &
    SRV_PID=$!; PIDS+=("$SRV_PID")
    wait_ready && return 0
    log "distribution: attempt $try on port $port failed"; stop_pid "$SRV_PID"
  done
  return 1
}
start_nginx() { # DIR: the same bytes laid out at the API's paths
  local try port root=$1/root/v2/$REPO
  mkdir -p "$root/blobs" "$root/manifests" "$root/tags" "$1/tmp"
  echo '{}' > "$1/root/v2/index.html"
  lay() { ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
  lay "${BIG_F[0]}" "$root/blobs/${BIG_D[0]}"
  lay "$SMALL_F" "$root/blobs/$SMALL_D"
  lay "$CFG_F" "$root/blobs/$CFG_D"
  cp "$MAN_F" "$root/manifests/v1"
  echo '{"name":"bench/app","tags":["v1"]}' > "$root/tags/list"
  chmod -R a+rX "$1"
  for try in 1 2 3; do
    port=$(pick_port) || return 1; BASE=http://127.0.0.1:$port
    cat > "$1/nginx.conf" <<EOF
worker_processes 2; daemon off; pid $1/nginx.pid; error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy; fastcgi_temp_path $1/tmp/fcgi;
  uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;
  server { listen 127.0.0.1:$port; root $1/root; }
}
EOF
    nginx -c "$1/nginx.conf" -e "$1/error.log" >> "$1/server.log" 2>&1 &
    SRV_PID=$!; PIDS+=("$SRV_PID")
    wait_ready && return 0
    log "nginx: attempt $try on port $port failed"; stop_pid "$SRV_PID"
  done
  return 1
}
start_berth() { # DIR: Berth binds 127.0.0.1:0 and prints the address, so there is no race
  local i addr=
  (cd "$1" && exec env RUST_LOG="${BERTH_RUST_LOG:-info}" "$W/berth-bin" serve \
      --listen 127.0.0.1:0 --data-dir "$1/data" --access-log false > "$1/stdout" 2>> "$1/server.log") &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  for ((i = 0; i < 300; i++)); do
    addr=$(sed -n 's|^berth listening on http://||p' "$1/stdout" 2>/dev/null | head -1)
    [[ -n $addr ]] && break
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $addr ]] || { stop_pid "$SRV_PID"; return 1; }
  BASE=http://$addr
  wait_ready || { stop_pid "$SRV_PID"; return 1; }
}
procs() { echo "$1" $(pgrep -P "$1" || true); }  # PID and its children (nginx workers)
peak_rss_mib() { # the largest VmHWM among PID and its children
  local p kb max=0
  for p in $(procs "$1"); do
    kb=$(awk '/^VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    (( ${kb:-0} > max )) && max=$kb
  done
  nums "printf \"%.1f\", $max / 1024"
}
cpu_ticks() { # user + system CPU of PID and its children, in clock ticks
  local p t=0 s
  for p in $(procs "$1"); do
    s=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0); t=$((t + s))
  done
  echo "$t"
}

# ------------------------------------------------------------------------ measurement steps
# in_child CMD...: CMD in a background subshell with errexit on; its status in CHILD_RC. The
# script waits for it with `wait`, which a signal interrupts, so the trap runs at once. Never
# call it from a condition (`if`, `||`): bash would then ignore errexit inside CMD.
in_child() {
  set +e
  (set -e; "$@") &
  STEP_PID=$!
  wait "$STEP_PID"; CHILD_RC=$?
  STEP_PID=
  set -e
}
# Each step runs for one registry (NAME, BASE, PID, OUT set by `step`) and appends "key value"
# lines to $OUT/runs (many per key) or $OUT/metrics. A failed step retires its registry.
declare -A BASE_OF PID_OF DEAD
step() { # REG FUNCTION ARGS...
  local reg=$1; shift
  [[ -z ${DEAD[$reg]:-} ]] || return 0
  NAME=$reg BASE=${BASE_OF[$reg]} PID=${PID_OF[$reg]} OUT=$RES/$reg
  in_child "$@"
  if (( CHILD_RC )); then
    log "$reg: step '$*' failed (exit $CHILD_RC); $reg sits out the remaining steps"
    DEAD[$reg]=1; echo "bench_failed $1" >> "$RES/$reg/metrics"
  fi
}
metric() { echo "$1 $2" >> "$OUT/metrics"; log "  $NAME $1 = $2"; }
sample() { echo "$1 $2" >> "$OUT/runs"; log "  $NAME $1 = $2"; }

# Timed pushes go through bench/push.py: one client process and one keep-alive connection
# for the whole push, as real clients do (see push.py for why not curl per PATCH).
timed_push() { # MODE BYTES METRIC FILES...: the push's MiB/s, sampled as METRIC
  local mode=$1 bytes=$2 metric=$3 digest=$4 secs; shift 4
  secs=$(python3 "$HERE/push.py" "$BASE" "$REPO" "$digest" "$mode" "$@") || return 1
  sample "$metric" "$(nums "printf \"%.1f\", $bytes / 1048576 / $secs")"
}
m_push_mono() { # I
  sync  # another server's unflushed writes must not land on this push's clock
  timed_push mono $((BIG_MB << 20)) push_mono_MiBps "${BIG_D[$1]}" "${BIG_F[$1]}"
}
m_push_chunked() { # I
  sync
  timed_push chunked $((CHUNKED_MB << 20)) push_chunked_MiBps "${CH_D[$1]}" "${CH_DIR[$1]}"/c.*
}
m_push_rest() { # the small layer, the config and the manifest, untimed
  push_mono "$BASE" "$SMALL_F" "$SMALL_D"
  push_mono "$BASE" "$CFG_F" "$CFG_D"
  call 201 -X PUT -H "Content-Type: $MT" --data-binary @"$MAN_F" "$BASE/v2/$REPO/manifests/v1"
}
m_check() { # the same bytes come back, before anything is timed: a fast wrong answer is no result
  local ok=ok got
  got=$(curl -sSf -H "Accept: $MT" "$BASE/v2/$REPO/manifests/v1" | sha256_hex) || true
  [[ sha256:$got == "$MAN_D" ]] || { ok=FAIL; log "$NAME: manifest bytes differ"; }
  got=$(curl -sSf "$BASE/v2/$REPO/blobs/$CFG_D" | sha256_hex) || true
  [[ sha256:$got == "$CFG_D" ]] || { ok=FAIL; log "$NAME: config blob differs"; }
  got=$(curl -sSf "$BASE/v2/$REPO/blobs/${BIG_D[0]}" | sha256_hex) || true
  [[ sha256:$got == "${BIG_D[0]}" ]] || { ok=FAIL; log "$NAME: big blob differs"; }
  curl -sSf "$BASE/v2/$REPO/tags/list" | grep -q '"v1"' || { ok=FAIL; log "$NAME: tag list lacks v1"; }
  metric content_check "$ok"
}
m_pull() {
  local code size speed
  read -r code size speed < <(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download}\n' \
    "$BASE/v2/$REPO/blobs/${BIG_D[0]}")
  [[ $code == 200 && $size == $((BIG_MB << 20)) ]] || { log "$NAME: pull got $code, $size bytes"; return 1; }
  sample pull_single_MiBps "$(nums "printf \"%.1f\", $speed / 1048576")"
}
to_ms() { # wrk latency (850.00us, 1.20ms, 2.01s, 1.00m) -> ms
  awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
    if (f < 0) print "?"; else printf "%.2f", n * f }'
}
m_wrk() { # KEY
  local url accept out c0 c1 n
  case $1 in
    manifest) url=$BASE/v2/$REPO/manifests/v1; accept=$MT;;
    config) url=$BASE/v2/$REPO/blobs/$CFG_D; accept='*/*';;
    tags) url=$BASE/v2/$REPO/tags/list; accept=application/json;;
  esac
  printf 'wrk.method = "GET"\nwrk.headers["Accept"] = "%s"\n' "$accept" > "$W/wrk.lua"
  if (( WRK_WARMUP_S > 0 )); then
    wrk -t"$WRK_T" -c"$WRK_C" -d"${WRK_WARMUP_S}s" -s "$W/wrk.lua" "$url" > /dev/null
  fi
  c0=$(cpu_ticks "$PID")
  out=$(wrk -t"$WRK_T" -c"$WRK_C" -d"${WRK_S}s" --latency -s "$W/wrk.lua" "$url")
  c1=$(cpu_ticks "$PID")
  echo "$out" > "$OUT/wrk_$1.txt"
  n=$(echo "$out" | awk '/requests in/{print $1}')
  metric "${1}_rps" "$(echo "$out" | awk '/^Requests\/sec/{printf "%.0f", $2}')"
  metric "${1}_p99_ms" "$(to_ms "$(echo "$out" | awk '$1 == "99%" {print $2}')")"
  metric "${1}_cpu_us" "$(nums "printf \"%.0f\", ($c1 - $c0) * 1000000 / $CLK_TCK / ($n > 0 ? $n : 1)")"
  sample errors "$(echo "$out" | awk '/Non-2xx/{n += $NF} /Socket errors/{gsub(/,/, ""); n += $4 + $6 + $8 + $10} END{print n + 0}')"
}
m_conc() {
  local i t0 t1 good total=$((CONC * CONC_PULLS))
  for ((i = 0; i < total; i++)); do
    printf 'url = "%s"\noutput = "/dev/null"\n' "$BASE/v2/$REPO/blobs/$SMALL_D"
  done > "$W/conc.cfg"
  t0=$(now)
  curl -sS --no-progress-meter -Z --parallel-max "$CONC" --parallel-immediate -K "$W/conc.cfg" \
    -w '%{http_code} %{size_download}\n' > "$OUT/conc.txt" 2> "$OUT/conc.err" || true
  t1=$(now)
  good=$(awk -v n=$((SMALL_MB << 20)) '$1 == 200 && $2 == n' "$OUT/conc.txt" | wc -l)
  metric pull_conc_MiBps "$(mibps $((good * (SMALL_MB << 20))) "$t0" "$t1")"
  sample errors $((total - good))
}

# note_rss PHASE: each server's peak RSS so far, to see which phase set it (rss.txt).
note_rss() {
  local r
  for r in $LIVE; do echo "$1 $(peak_rss_mib "${PID_OF[$r]}")" >> "$RES/$r/rss.txt"; done
}
# rotate I: the registries in a different order on each round, so none is always first.
rotate() {
  local -a a=($LIVE); local n=${#a[@]} j
  for ((j = 0; j < n; j++)); do echo "${a[(j + $1) % n]}"; done
}

# ----------------------------------------------------------------------- RSS flatness (Berth)
# A fresh Berth; a BIG_MB blob streamed up and back, VmHWM read; then a BIG_RSS_GB one. The
# bytes come from /dev/urandom through a pipe, hashed on the way: never in a file or in memory.
stream_push_pull() { # BASE MIB -> "push_MiBps pull_MiBps"
  local mib=$2 L t0 t1 t2 digest got shapid
  rm -f "$W/fifo"; mkfifo "$W/fifo"
  sha256_hex < "$W/fifo" > "$W/stream.dg" &
  shapid=$!
  t0=$(now)
  L=$(start_upload "$1")
  head -c "${mib}M" /dev/urandom | tee "$W/fifo" | call 202 -X PATCH "${OCTET[@]}" -T - "$L"
  wait "$shapid"; digest=sha256:$(cat "$W/stream.dg")
  L=$(abs "$1" "$(hdr location)")
  call 201 -X PUT "${OCTET[@]}" --data-binary '' "$L$(sep "$L")digest=$digest"
  t1=$(now)
  got=$(curl -sSf "$1/v2/$REPO/blobs/$digest" | sha256_hex)
  t2=$(now)
  [[ sha256:$got == "$digest" ]] || { log "streamed ${mib} MiB blob came back different"; return 1; }
  echo "$(mibps $((mib << 20)) "$t0" "$t1") $(mibps $((mib << 20)) "$t1" "$t2")"
}
flatness_body() { # BIG_MIB
  local r a b
  r=$(stream_push_pull "$BASE" "$BIG_MB")
  echo "rss_after_small_MiB $(peak_rss_mib "$SRV_PID")" >> "$OUT/metrics"
  r=$(stream_push_pull "$BASE" "$1"); read -r a b <<< "$r"
  echo "rss_after_big_MiB $(peak_rss_mib "$SRV_PID")" >> "$OUT/metrics"
  echo "stream_big_push_MiBps $a" >> "$OUT/metrics"
  echo "stream_big_pull_MiBps $b" >> "$OUT/metrics"
}
berth_flatness() {
  local dir=$W/berth-flat big=$((BIG_RSS_GB * 1024)) want
  OUT=$RES/berth; mkdir -p "$OUT" "$dir"
  want=$((big + BIG_MB + 1024))
  if (( $(avail_mib) < want )); then
    log "skipping the ${BIG_RSS_GB} GiB RSS step: need ${want} MiB free, have $(avail_mib)"
    echo "rss_flat skipped-for-disk" >> "$OUT/metrics"; return 0
  fi
  log "== berth RSS flatness: fresh server, ${BIG_MB} MiB then ${BIG_RSS_GB} GiB streamed up and back"
  start_berth "$dir" || { log "berth did not start"; echo "rss_flat no-start" >> "$OUT/metrics"; return 0; }
  in_child flatness_body "$big"
  (( CHILD_RC == 0 )) || { log "berth RSS step failed"; echo "rss_flat failed" >> "$OUT/metrics"; }
  stop_pid "$SRV_PID"
  cp "$dir/server.log" "$OUT/server-flat.log" 2>/dev/null || true
  rm -rf "$dir"
}

# ------------------------------------------------------------------------------------- main
{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "tmp: $W ($(df -Ph "$W" | awk 'NR==2{print $1}'))"
  has distribution && echo "distribution: $(docker-registry --version 2>&1)"
  has nginx && echo "nginx: $(nginx -v 2>&1)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "curl: $(curl --version | head -1)"
  if has berth; then
    echo "berth: $BERTH_BIN, built $(date -r "$BERTH_BIN" -Is), sha256 $(sha256_hex "$BERTH_BIN" | cut -c1-16)"
    if git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
      echo "berth tree: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo ' (uncommitted changes)')"
    fi
  fi
  echo "knobs: BIG_MB=$BIG_MB CHUNKED_MB=$CHUNKED_MB CHUNK_MB=$CHUNK_MB SMALL_MB=$SMALL_MB PUSH_RUNS=$PUSH_RUNS PULL_RUNS=$PULL_RUNS WRK_S=$WRK_S WRK_WARMUP_S=$WRK_WARMUP_S WRK_T=$WRK_T WRK_C=$WRK_C CONC=$CONC CONC_PULLS=$CONC_PULLS BIG_RSS_GB=$BIG_RSS_GB"
} > "$RES/env.txt"
# A copy, so that a rebuild during the run does not change what is measured.
if has berth; then cp "$BERTH_BIN" "$W/berth-bin"; fi

LIVE=""
for r in $REGISTRIES; do
  mkdir -p "$RES/$r" "$W/$r"; : > "$RES/$r/metrics"; : > "$RES/$r/runs"
  if "start_$r" "$W/$r"; then
    BASE_OF[$r]=$BASE; PID_OF[$r]=$SRV_PID; LIVE+="$r "
    log "$r: pid $SRV_PID at $BASE"
  else
    cp "$W/$r/server.log" "$RES/$r/" 2>/dev/null || true
    log "$r did not start; see $RES/$r/server.log"; echo "bench_failed start" >> "$RES/$r/metrics"
  fi
done
PUSHERS=$(for r in $LIVE; do [[ $r == nginx ]] || echo "$r"; done)
note_rss started

log "== monolithic push: ${PUSH_RUNS} rounds of ${BIG_MB} MiB"
for ((i = 0; i < PUSH_RUNS; i++)); do for r in $(LIVE=$PUSHERS rotate "$i"); do step "$r" m_push_mono "$i"; done; done
log "== chunked push: ${PUSH_RUNS} rounds of ${CHUNKED_MB} MiB in ${CHUNK_MB} MiB PATCHes"
for ((i = 0; i < PUSH_RUNS; i++)); do for r in $(LIVE=$PUSHERS rotate "$i"); do step "$r" m_push_chunked "$i"; done; done
for r in $PUSHERS; do step "$r" m_push_rest; done
note_rss pushes
log "== content check"
for r in $LIVE; do step "$r" m_check; done
log "== single-stream pull: ${PULL_RUNS} rounds of ${BIG_MB} MiB"
for ((i = 0; i < PULL_RUNS; i++)); do for r in $(rotate "$i"); do step "$r" m_pull; done; done
note_rss pulls
for key in manifest config tags; do
  log "== wrk $key GET: -t$WRK_T -c$WRK_C, ${WRK_WARMUP_S}s warm-up + ${WRK_S}s"
  for r in $LIVE; do step "$r" m_wrk "$key"; done
  note_rss "wrk_$key"
done
log "== concurrent pulls: $CONC clients x $CONC_PULLS pulls of ${SMALL_MB} MiB"
for r in $LIVE; do step "$r" m_conc; done
note_rss concurrent_pulls

for r in $LIVE; do
  {
    for k in push_mono_MiBps push_chunked_MiBps pull_single_MiBps; do
      awk -v k="$k" '$1 == k { n++; if ($2 > m) m = $2 } END { if (n) print k, m }' "$RES/$r/runs"
    done
    awk '$1 == "errors" { n += $2 } END { print "errors", n + 0 }' "$RES/$r/runs"
    echo "peak_rss_MiB $(peak_rss_mib "${PID_OF[$r]}")"
  } >> "$RES/$r/metrics"
  stop_pid "${PID_OF[$r]}"
  cp "$W/$r"/server.log "$W/$r"/*.conf "$W/$r"/*.yml "$RES/$r/" 2>/dev/null || true
  rm -rf "${W:?}/$r"
done
sync

if has berth && (( BIG_RSS_GB > 0 )); then berth_flatness; fi
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RES/env.txt"

# ------------------------------------------------------------------------------------ report
declare -A M
for r in $REGISTRIES; do
  while read -r k v; do M[$r.$k]=$v; done < "$RES/$r/metrics"
done
val() { echo "${M[$1.$2]:--}"; }
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { # A B -> A/B as 1.23x
  if isnum "$1" && isnum "$2" && nums "exit !($2 > 0)"; then nums "printf \"%.2fx\", $1 / $2"; else echo -; fi
}
ROWS=(
  "push_mono_MiBps|monolithic push MiB/s (${BIG_MB} MiB)"
  "push_chunked_MiBps|chunked push MiB/s (${CHUNK_MB} MiB PATCHes)"
  "pull_single_MiBps|single-stream pull MiB/s"
  "manifest_rps|manifest GET by tag, req/s"
  "manifest_p99_ms|manifest GET p99 ms"
  "manifest_cpu_us|manifest GET server CPU us/req"
  "config_rps|config blob GET, req/s"
  "config_p99_ms|config blob GET p99 ms"
  "config_cpu_us|config blob GET server CPU us/req"
  "tags_rps|tags list, req/s"
  "tags_p99_ms|tags list p99 ms"
  "tags_cpu_us|tags list server CPU us/req"
  "pull_conc_MiBps|concurrent pulls MiB/s ($CONC clients)"
  "peak_rss_MiB|peak RSS MiB (VmHWM, whole run)"
  "errors|errors (non-2xx, socket, failed pulls)"
  "content_check|same bytes back"
)
report() {
  local row k label r rd rn
  echo "Berth vs CNCF Distribution vs nginx (static files), $(date '+%Y-%m-%d %H:%M'), $(nproc) cores;" \
    "load $(sed -n 's/^load at start: //p' "$RES/env.txt") at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
  echo
  printf '%-42s %13s %13s %13s %12s %12s\n' metric distribution nginx berth berth/dist berth/nginx
  for row in "${ROWS[@]}"; do
    k=${row%%|*}; label=${row#*|}; rd=-; rn=-
    if [[ $k != errors && $k != content_check ]]; then
      rd=$(ratio "$(val berth "$k")" "$(val distribution "$k")"); rn=$(ratio "$(val berth "$k")" "$(val nginx "$k")")
    fi
    printf '%-42s %13s %13s %13s %12s %12s\n' "$label" "$(val distribution "$k")" "$(val nginx "$k")" \
      "$(val berth "$k")" "$rd" "$rn"
  done
  for r in $REGISTRIES; do
    [[ -n ${M[$r.bench_failed]:-} ]] && echo "!! $r: failed at ${M[$r.bench_failed]}; its later numbers are missing (see $RES/$r)"
  done
  echo
  echo "Pushes: best of $PUSH_RUNS distinct blobs; single-stream pull: best of $PULL_RUNS; wrk -t$WRK_T -c$WRK_C," \
    "${WRK_S}s after a ${WRK_WARMUP_S}s warm-up. Servers ran side by side, measurements alternating."
  echo "Berth fsyncs a blob before its 201; Distribution's filesystem driver does not."
  local s b flat=n/a flat_note="not measured"
  s=$(val berth rss_after_small_MiB); b=$(val berth rss_after_big_MiB)
  if isnum "$s" && isnum "$b"; then
    echo "Berth RSS flatness (fresh server, streamed push then pull): peak ${s} MiB after ${BIG_MB} MiB," \
      "${b} MiB after ${BIG_RSS_GB} GiB ($(val berth stream_big_push_MiBps) MiB/s up, paced by /dev/urandom;" \
      "$(val berth stream_big_pull_MiBps) MiB/s down)"
    flat=$(nums "tol = ($RSS_FLAT_TOL_MIB > $s * 0.1) ? $RSS_FLAT_TOL_MIB : $s * 0.1; print (($b - $s <= tol) ? \"yes\" : \"no\")")
    flat_note="+$(nums "printf \"%.1f\", $b - $s") MiB from ${BIG_MB} MiB to ${BIG_RSS_GB} GiB"
  elif has berth; then
    echo "Berth RSS flatness: not measured ($(val berth rss_flat))"
  fi

  echo
  echo "Targets (Berth):"
  target() { printf '  %-7s %-56s %s\n' "$1" "$2" "$3"; }
  verdict() { if nums "exit !($1)"; then echo met; else echo missed; fi; }
  local mr mp pr ps rss peak v
  mr=$(ratio "$(val berth manifest_rps)" "$(val distribution manifest_rps)"); mp=$(val berth manifest_p99_ms)
  if [[ $mr != - ]] && isnum "$mp"; then
    target "$(verdict "${mr%x} >= 20 && $mp <= 10")" "manifest GET >= 20x Distribution, p99 <= 10 ms" \
      "${mr} req/s ($(ratio "$(val distribution manifest_cpu_us)" "$(val berth manifest_cpu_us)") by CPU/req), p99 ${mp} ms (nginx $(val nginx manifest_p99_ms) ms)"
  else target n/a "manifest GET >= 20x Distribution, p99 <= 10 ms" "no data"; fi
  pr=$(ratio "$(val berth pull_single_MiBps)" "$(val nginx pull_single_MiBps)")
  if [[ $pr != - ]]; then target "$(verdict "${pr%x} >= 0.9")" "single-stream pull >= 90% of nginx" "$(nums "printf \"%.0f%%\", ${pr%x} * 100")"
  else target n/a "single-stream pull >= 90% of nginx" "no data"; fi
  ps=$(ratio "$(val berth push_mono_MiBps)" "$(val distribution push_mono_MiBps)")
  if [[ $ps != - ]]; then target "$(verdict "${ps%x} >= 2.5")" "monolithic push >= 2.5x Distribution" "$ps"
  else target n/a "monolithic push >= 2.5x Distribution" "no data"; fi
  local k r what
  for k in manifest config tags; do
    case $k in manifest) what="manifest GET";; config) what="config blob GET";; tags) what="tags list";; esac
    r=$(ratio "$(val berth "${k}_rps")" "$(val nginx "${k}_rps")")
    if [[ $r != - ]]; then target "$(verdict "${r%x} >= 0.9")" "$what >= 0.9x nginx" "$r"
    else target n/a "$what >= 0.9x nginx" "no data"; fi
  done
  r=$(ratio "$(val berth push_chunked_MiBps)" "$(val berth push_mono_MiBps)")
  if [[ $r != - ]]; then target "$(verdict "${r%x} >= 0.8")" "chunked push >= 0.8x monolithic" "$r"
  else target n/a "chunked push >= 0.8x monolithic" "no data"; fi
  peak=$(val berth peak_rss_MiB); rss=$peak
  if isnum "$b" && isnum "$peak"; then rss=$(nums "print (($b > $peak) ? $b : $peak)"); fi
  if isnum "$rss"; then
    v=$(verdict "$rss <= 64")
    [[ $v == met && $flat == no ]] && v=missed
    [[ $v == met && $flat == n/a ]] && v="met?"
    target "$v" "peak RSS <= 64 MiB, flat in blob size" "peak ${rss} MiB; ${flat_note}"
  else target n/a "peak RSS <= 64 MiB, flat in blob size" "no data"; fi
  echo
  echo "Raw outputs: $RES"
}
report | tee "$RES/summary.txt"
