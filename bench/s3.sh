#!/usr/bin/env bash
# Side-by-side benchmark on S3, in one run on one machine: CNCF Distribution 2.8.2 (Debian
# `docker-registry`, s3 driver) against Berth with S3 blobs and PostgreSQL metadata, as one node
# and as two nodes sharing the same bucket prefix and database, all on the same Garage. The
# servers run at once and the measurements alternate between them. Prints a table, the CPU split
# (servers vs garage vs postgres vs client) during the manifest GETs, and the targets; raw
# outputs go under bench/results/s3-<timestamp>/. Run by hand; see bench/README.md ("On S3").
# (bench/run.sh runs its whole benchmark when sourced, so the few helpers shared with it are
# repeated here in compact form.)
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
BLOB_MB=${BLOB_MB:-256}        # monolithic push and single-stream pull blob
PUSH_RUNS=${PUSH_RUNS:-3}      # best of N pushes, each a distinct blob (Garage dedups blocks)
PULL_RUNS=${PULL_RUNS:-3}      # best of N pulls
WRK_S=${WRK_S:-10}
WRK_WARMUP_S=${WRK_WARMUP_S:-2}
WRK_T=${WRK_T:-2}
WRK_C=${WRK_C:-64}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:54329}  # server URL, no database
RESULTS_ROOT=${RESULTS_DIR:-$HERE/results}
SETUPS="distribution berth1 berth2"
REPO=bench/app
MT=application/vnd.oci.image.manifest.v1+json
EMPTY_SHA=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
nums() { awk "BEGIN{ $1 }"; }
now() { echo "$EPOCHREALTIME"; }
mibps() { nums "printf \"%.1f\", $1 / 1048576 / ($3 - $2)"; }  # BYTES T0 T1

# ---------------------------------------------------------------------------------- preflight
for c in curl wrk docker-registry psql openssl ss awk pgrep; do
  command -v "$c" >/dev/null || die "missing command: $c"
done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release, or set BERTH_BIN)"
if newer=$(find "$ROOT/crates" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BERTH_BIN" -type f \
    -print -quit 2>/dev/null) && [[ -n $newer ]]; then
  log "warning: $BERTH_BIN is older than $newer; benchmarking it anyway"
fi
# The store: S3_ENDPOINT/S3_BUCKET/AWS_* if all set, else the scratch Garage of scripts/garage.sh.
if [[ -z ${S3_ENDPOINT:-} || -z ${S3_BUCKET:-} || -z ${AWS_ACCESS_KEY_ID:-} ]]; then
  eval "$(bash "$ROOT/scripts/garage.sh")"
  S3_ENDPOINT=$BERTH_TEST_S3_ENDPOINT; S3_BUCKET=$BERTH_TEST_S3_BUCKET
fi
S3_REGION=${AWS_REGION:-garage}
psql "$PG_ADMIN_URL/postgres" -Atqc 'select 1' >/dev/null || die "PostgreSQL not reachable at $PG_ADMIN_URL"

sha256_hex() { openssl dgst -sha256 -r "$@" | cut -d' ' -f1; }
dg() { echo "sha256:$(sha256_hex "$1")"; }
CLK_TCK=$(getconf CLK_TCK)

RUN=$(date +%Y%m%d%H%M%S)-$$
DB_PREFIX=berth_bench_${RUN//-/_}
W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-s3bench.XXXXXX")
RES=$RESULTS_ROOT/s3-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RES"
ln -sfn "$(basename "$RES")" "$RESULTS_ROOT/latest-s3"

# ------------------------------------------------------------------------------ S3 (curl)
# curl 7.88's --aws-sigv4 signs the query as given: parameters must come sorted and encoded.
s3() { # METHOD PATH_AND_QUERY [curl args]: one signed request to the store
  local m=$1 p=$2; shift 2
  curl -sS -X "$m" --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
    -H "x-amz-content-sha256: $EMPTY_SHA" "$@" "$S3_ENDPOINT/$S3_BUCKET$p"
}
urlenc() { local s=$1 o="" c i; for ((i = 0; i < ${#s}; i++)); do c=${s:i:1}
  case $c in [A-Za-z0-9._~-]) o+=$c;; *) o+=$(printf '%%%02X' "'$c");; esac; done; echo "$o"; }
s3_purge() { # PREFIX: delete every object and abort every multipart upload under PREFIX/
  local k u tok="" out
  while :; do
    out=$(s3 GET "?${tok:+continuation-token=$tok&}list-type=2&prefix=$(urlenc "$1/")")
    grep -q '<ListBucketResult' <<< "$out" || { log "warning: cannot list $1/ to delete it: ${out:0:200}"; return 0; }
    for k in $(grep -o '<Key>[^<]*</Key>' <<< "$out" | sed 's/<[^>]*>//g'); do s3 DELETE "/$k" >/dev/null; done
    tok=$(grep -o '<NextContinuationToken>[^<]*' <<< "$out" | cut -d'>' -f2 || true)
    tok=$(urlenc "$tok")
    [[ -n $tok ]] || break
  done
  out=$(s3 GET "?prefix=$(urlenc "$1/")&uploads=")
  paste -d' ' <(grep -o '<Key>[^<]*</Key>' <<< "$out" | sed 's/<[^>]*>//g') \
              <(grep -o '<UploadId>[^<]*</UploadId>' <<< "$out" | sed 's/<[^>]*>//g') |
    while read -r k u; do [[ -n $u ]] && s3 DELETE "/$k?uploadId=$(urlenc "$u")" >/dev/null; done
  return 0
}

# ---------------------------------------------------------------------------- process hygiene
PIDS=()      # servers this script started; the trap stops exactly these
CREATED_DBS=()
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
STEP_PID=
kill_tree() { local c; for c in $(pgrep -P "$1" || true); do kill_tree "$c"; done; kill -TERM "$1" 2>/dev/null || true; }
cleanup() {
  local rc=$? p d
  trap - EXIT INT TERM
  if [[ -n $STEP_PID ]]; then kill_tree "$STEP_PID"; wait "$STEP_PID" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  if [[ -n ${KEEP_DATA:-} ]]; then
    log "kept S3 prefixes */$RUN and databases ${CREATED_DBS[*]}"
  else
    for d in "${CREATED_DBS[@]}"; do psql "$PG_ADMIN_URL/postgres" -qc "drop database if exists $d with (force)" || true; done
    for p in dist berth1 berth2; do s3_purge "$p-$RUN" || true; done
  fi
  rm -rf "$W"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------------------- data
# Distinct bytes for every push of every setup: Garage stores blocks by content hash, so a
# second push of the same bytes would skip its writes. AES-CTR keystream: fast, incompressible.
(( $(df -Pm "$W" | awk 'NR==2{print $4}') > PUSH_RUNS * 3 * BLOB_MB + 1024 )) || die "not enough space under $W"
log "generating $((PUSH_RUNS * 3)) blobs of ${BLOB_MB} MiB under $W"
declare -A BLOB_F BLOB_D
for s in $SETUPS; do
  for ((i = 0; i < PUSH_RUNS; i++)); do
    f=$W/blob_${s}_$i.bin
    openssl enc -aes-128-ctr -nosalt -pass "pass:$RUN-$s-$i-$RANDOM" -pbkdf2 < /dev/zero 2>/dev/null |
      head -c "${BLOB_MB}M" > "$f" || true
    [[ $(stat -c %s "$f") == $((BLOB_MB << 20)) ]] || die "could not generate $f"
    BLOB_F[$s.$i]=$f; BLOB_D[$s.$i]=$(dg "$f")
  done
done
CFG_F=$W/config.json
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' > "$CFG_F"
CFG_D=$(dg "$CFG_F")
manifest_for() { # SETUP -> manifest file referencing the setup's blobs
  local layers="" i f=$W/manifest_$1.json
  for ((i = 0; i < PUSH_RUNS; i++)); do
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"${BLOB_D[$1.$i]}\",\"size\":$((BLOB_MB << 20))}"
  done
  printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
    "$MT" "$CFG_D" "$(stat -c %s "$CFG_F")" "$layers" > "$f"
  echo "$f"
}
sync

# ------------------------------------------------------------------------------ HTTP helpers
H=$W/headers
call() { # WANT_STATUS CURL_ARGS...; response headers in $H
  local want=$1 got; shift
  got=$(curl -sS -D "$H" -o "$W/body" -w '%{http_code}' "$@") || { log "curl failed: $*"; return 1; }
  [[ $got == "$want" ]] || { log "want $want, got $got: $* :: $(head -c 300 "$W/body")"; return 1; }
}
hdr() { tr -d '\r' < "$H" | awk -v h="$1" 'tolower($1) == h ":" { v = $2 } END { print v }'; }
abs() { case $2 in http*) echo "$2";; *) echo "$1$2";; esac; }
sep() { case $1 in *\?*) echo '&';; *) echo '?';; esac; }
OCTET=(-H 'Content-Type: application/octet-stream' -H 'Expect:')
push_mono() { # BASE FILE DIGEST
  local L
  call 202 -X POST "$1/v2/$REPO/blobs/uploads/" || return 1
  L=$(abs "$1" "$(hdr location)")
  call 201 -X PUT "${OCTET[@]}" -T "$2" "$L$(sep "$L")digest=$3"
}

# ---------------------------------------------------------------------------------- servers
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p i
  for ((i = 0; i < 100; i++)); do p=$((20000 + RANDOM % 12000)); port_free "$p" && { echo "$p"; return; }; done
  die "no free port found"
}
wait_ready() { # BASE PID: GET /v2/ answers 200, from PID
  local i code port=${1##*:} owners
  for ((i = 0; i < 300; i++)); do
    kill -0 "$2" 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$1/v2/" || true)
    if [[ $code == 200 ]]; then
      owners=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 || true)
      [[ -z $owners || " $owners " == *" $2 "* ]] && return 0
      log "port $port answers, but not from pid $2"; return 1
    fi
    sleep 0.1
  done
  return 1
}
start_distribution() { # DIR -> BASE, SRV_PID
  local try port
  for try in 1 2 3; do
    port=$(pick_port); BASE=http://127.0.0.1:$port
    # As bench/run.sh (Debian's packaged config minus auth, no request logs), with the s3
    # driver. 2.8.2 has no `forcepathstyle`: it uses path-style URLs whenever regionendpoint is
    # set. Redirects off: blob GETs stream through the registry, as Berth's do by default.
    cat > "$1/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  cache: {blobdescriptor: inmemory}
  s3:
    accesskey: $AWS_ACCESS_KEY_ID
    secretkey: $AWS_SECRET_ACCESS_KEY
    region: $S3_REGION
    regionendpoint: $S3_ENDPOINT
    bucket: $S3_BUCKET
    rootdirectory: /dist-$RUN
    secure: false
    v4auth: true
  delete: {enabled: true}
  redirect: {disable: true}
http: {addr: 127.0.0.1:$port, headers: {X-Content-Type-Options: [nosniff]}}
health: {storagedriver: {enabled: true, interval: 10s, threshold: 3}}
EOF
    # Its aws-sdk panics on AWS_CA_BUNDLE ("HTTPClient's transport unsupported type").
    env -u AWS_CA_BUNDLE docker-registry serve "$1/config.yml" >> "$1/server.log" 2>&1 &
    SRV_PID=$!; PIDS+=("$SRV_PID")
    wait_ready "$BASE" "$SRV_PID" && return 0
    log "distribution: attempt $try on port $port failed"; stop_pid "$SRV_PID"
  done
  return 1
}
start_berth() { # DIR PREFIX DB -> BASE, SRV_PID; binds 127.0.0.1:0 and prints the address
  local i addr=
  mkdir -p "$1"
  (cd "$1" && exec env RUST_LOG="${BERTH_RUST_LOG:-info}" BERTH_S3_ENDPOINT="$S3_ENDPOINT" \
      BERTH_S3_REGION="$S3_REGION" BERTH_S3_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" \
      BERTH_S3_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" "$W/berth-bin" serve \
      --listen 127.0.0.1:0 --data-dir "$1/data" --storage "s3://$S3_BUCKET/$2" \
      --metadata "$PG_ADMIN_URL/$3" > "$1/stdout" 2>> "$1/server.log") &
  SRV_PID=$!; PIDS+=("$SRV_PID")
  for ((i = 0; i < 300; i++)); do
    addr=$(sed -n 's|^berth listening on http://||p' "$1/stdout" 2>/dev/null | head -1)
    [[ -n $addr ]] && break
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $addr ]] || return 1
  BASE=http://$addr
  wait_ready "$BASE" "$SRV_PID"
}
peak_rss_mib() { # the largest VmHWM among PIDS...
  local p kb max=0
  for p in "$@"; do
    kb=$(awk '/^VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    (( ${kb:-0} > max )) && max=$kb
  done
  nums "printf \"%.1f\", $max / 1024"
}

# ------------------------------------------------------------------------------ CPU accounting
# Ticks (utime + stime) per group, for the split printed with the manifest GETs: the servers of
# the setup measured, garage, postgres (postmaster and its backends), the client (wrk/curl: the
# measuring subshell's reaped children), and the whole machine from /proc/stat.
GARAGE_PID=$( (cat "${BERTH_GARAGE_DIR:-/tmp/berth-garage}/garage.pid" 2>/dev/null || pgrep -xo garage) | head -1 || true)
PG_PORT=${PG_ADMIN_URL##*:}; PG_PORT=${PG_PORT%%/*}
PG_PID=$(ss -ltnpH "sport = :$PG_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
[[ -n $PG_PID ]] || PG_PID=$(head -1 "${BERTH_PG_DIR:-/tmp/berth-pg}/postmaster.pid" 2>/dev/null || true)
ticks() { # PIDS... and their children -> CPU ticks, with reaped children's (postgres backends)
  local p t=0 s
  for p in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
    s=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$p/stat" 2>/dev/null || echo 0); t=$((t + s))
  done
  echo "$t"
}
self_child_ticks() { awk '{print $16 + $17}' "/proc/${ME:-$BASHPID}/stat"; }  # ME: the step's subshell
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
cpu_snap() { # SERVER_PIDS... -> "server garage postgres client busy total"
  echo "$(ticks "$@") $(ticks ${GARAGE_PID:-}) $(ticks ${PG_PID:-}) $(self_child_ticks) $(machine_ticks)"
}
cpu_split() { # SNAP0 SNAP1 -> percent of one core per group, over the interval
  local -a a=($1) b=($2)
  nums "tot = ($((b[5] - a[5])) > 0 ? $((b[5] - a[5])) : 1) / $(nproc)
    printf \"%.0f %.0f %.0f %.0f %.0f\", 100 * $((b[0] - a[0])) / tot, 100 * $((b[1] - a[1])) / tot,
      100 * $((b[2] - a[2])) / tot, 100 * $((b[3] - a[3])) / tot, 100 * $((b[4] - a[4])) / tot"
}

# ------------------------------------------------------------------------ measurement steps
# Each step runs for one setup (NAME, BASES = its nodes' URLs, SPIDS = their pids, OUT set by
# `step`) in a subshell with errexit on; a failed step retires the setup.
declare -A BASES_OF SPIDS_OF DEAD
in_child() { set +e; (set -e; ME=$BASHPID; "$@") & STEP_PID=$!; wait "$STEP_PID"; CHILD_RC=$?; STEP_PID=; set -e; }
step() { # SETUP FUNCTION ARGS...
  local s=$1; shift
  [[ -z ${DEAD[$s]:-} ]] || return 0
  NAME=$s; read -r -a BASES <<< "${BASES_OF[$s]}"; read -r -a SPIDS <<< "${SPIDS_OF[$s]}"; OUT=$RES/$s
  in_child "$@"
  if (( CHILD_RC )); then
    log "$s: step '$*' failed (exit $CHILD_RC); $s sits out the remaining steps"
    DEAD[$s]=1; echo "bench_failed $1" >> "$OUT/metrics"
  fi
}
metric() { echo "$1 $2" >> "$OUT/metrics"; log "  $NAME $1 = $2"; }
sample() { echo "$1 $2" >> "$OUT/runs"; log "  $NAME $1 = $2"; }
node() { echo "${BASES[$1 % ${#BASES[@]}]}"; }   # I -> one of the setup's nodes, round-robin

m_push() { # I: push I goes to node I (of 2: alternating)
  sync
  local t0 t1 c0 c1
  c0=$(cpu_snap "${SPIDS[@]}"); t0=$(now)
  push_mono "$(node "$1")" "${BLOB_F[$NAME.$1]}" "${BLOB_D[$NAME.$1]}"
  t1=$(now); c1=$(cpu_snap "${SPIDS[@]}")
  sample push_MiBps "$(mibps $((BLOB_MB << 20)) "$t0" "$t1")"
  echo "push $1 $(cpu_split "$c0" "$c1")" >> "$OUT/cpu.txt"
}
m_push_rest() { # config and manifest, untimed, to the first node
  local man; man=$(manifest_for "$NAME")
  push_mono "${BASES[0]}" "$CFG_F" "$CFG_D"
  call 201 -X PUT -H "Content-Type: $MT" --data-binary @"$man" "${BASES[0]}/v2/$REPO/manifests/v1"
}
m_check() { # through the last node (for two nodes: not the one that took blob 0 and the manifest)
  local ok=ok got b=${BASES[-1]} man=$W/manifest_$NAME.json
  got=$(curl -sSf -H "Accept: $MT" "$b/v2/$REPO/manifests/v1" | sha256_hex) || true
  [[ sha256:$got == "$(dg "$man")" ]] || { ok=FAIL; log "$NAME: manifest bytes differ"; }
  got=$(curl -sSf "$b/v2/$REPO/blobs/$CFG_D" | sha256_hex) || true
  [[ sha256:$got == "$CFG_D" ]] || { ok=FAIL; log "$NAME: config blob differs"; }
  got=$(curl -sSf "$b/v2/$REPO/blobs/${BLOB_D[$NAME.0]}" | sha256_hex) || true
  [[ sha256:$got == "${BLOB_D[$NAME.0]}" ]] || { ok=FAIL; log "$NAME: blob differs"; }
  curl -sSf "$b/v2/$REPO/tags/list" | grep -q '"v1"' || { ok=FAIL; log "$NAME: tag list lacks v1"; }
  metric content_check "$ok"
}
m_pull() { # I: blob 0 (pushed through node 0) from node I+1
  local code size speed c0 c1
  c0=$(cpu_snap "${SPIDS[@]}")
  read -r code size speed < <(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{speed_download}\n' \
    "$(node $(($1 + 1)))/v2/$REPO/blobs/${BLOB_D[$NAME.0]}")
  c1=$(cpu_snap "${SPIDS[@]}")
  [[ $code == 200 && $size == $((BLOB_MB << 20)) ]] || { log "$NAME: pull got $code, $size bytes"; return 1; }
  sample pull_MiBps "$(nums "printf \"%.1f\", $speed / 1048576")"
  echo "pull $1 $(cpu_split "$c0" "$c1")" >> "$OUT/cpu.txt"
}
to_ms() {
  awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
    if (f < 0) print "?"; else printf "%.2f", n * f }'
}
m_wrk() { # manifest GET by tag; with N nodes, N wrk at once, each -t T/N -c C/N on its node
  local n=${#BASES[@]} t c i c0 c1 rps=0 p99=0 reqs=0 errs=0 f v
  t=$(( WRK_T / n > 0 ? WRK_T / n : 1 )); c=$(( WRK_C / n ))
  printf 'wrk.method = "GET"\nwrk.headers["Accept"] = "%s"\n' "$MT" > "$W/wrk.lua"
  if (( WRK_WARMUP_S > 0 )); then
    for ((i = 0; i < n; i++)); do
      wrk -t"$t" -c"$c" -d"${WRK_WARMUP_S}s" -s "$W/wrk.lua" "${BASES[i]}/v2/$REPO/manifests/v1" > /dev/null &
    done
    wait
  fi
  c0=$(cpu_snap "${SPIDS[@]}")
  for ((i = 0; i < n; i++)); do
    wrk -t"$t" -c"$c" -d"${WRK_S}s" --latency -s "$W/wrk.lua" "${BASES[i]}/v2/$REPO/manifests/v1" > "$OUT/wrk_$i.txt" &
  done
  wait
  c1=$(cpu_snap "${SPIDS[@]}")
  for ((i = 0; i < n; i++)); do
    f=$OUT/wrk_$i.txt
    rps=$(nums "print $rps + $(awk '/^Requests\/sec/{print $2}' "$f")")
    reqs=$((reqs + $(awk '/requests in/{print $1}' "$f")))
    v=$(to_ms "$(awk '$1 == "99%" {print $2}' "$f")"); p99=$(nums "print ($v > $p99) ? $v : $p99")
    errs=$((errs + $(awk '/Non-2xx/{n += $NF} /Socket errors/{gsub(/,/, ""); n += $4 + $6 + $8 + $10} END{print n + 0}' "$f")))
  done
  local -a a=($c0) b=($c1) s
  metric manifest_rps "$(nums "printf \"%.0f\", $rps")"
  metric manifest_p99_ms "$(nums "printf \"%.2f\", $p99")"   # the worse node's p99
  metric manifest_cpu_us "$(nums "printf \"%.0f\", $((b[0] - a[0])) * 1000000 / $CLK_TCK / ($reqs > 0 ? $reqs : 1)")"
  s=($(cpu_split "$c0" "$c1"))
  metric manifest_cpu_split "server=${s[0]}%,garage=${s[1]}%,postgres=${s[2]}%,wrk=${s[3]}%,other=$((s[4] - s[0] - s[1] - s[2] - s[3]))%,machine=${s[4]}%/$(( $(nproc) * 100 ))%"
  echo "wrk $(cpu_split "$c0" "$c1")" >> "$OUT/cpu.txt"
  sample errors "$errs"
}
rotate() { # I: the live setups in a different order every round
  local -a a=($LIVE); local n=${#a[@]} j
  for ((j = 0; j < n; j++)); do echo "${a[(j + $1) % n]}"; done
}

# ------------------------------------------------------------------------------------- main
{
  echo "date: $(date -Is)"
  echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "distribution: $(docker-registry --version 2>&1)"
  echo "garage: $(garage --version 2>/dev/null || echo '?') at $S3_ENDPOINT, bucket $S3_BUCKET (pid ${GARAGE_PID:-?})"
  echo "postgres: $(psql "$PG_ADMIN_URL/postgres" -Atc 'show server_version') at $PG_ADMIN_URL (pid ${PG_PID:-?})"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "berth: $BERTH_BIN, built $(date -r "$BERTH_BIN" -Is), sha256 $(sha256_hex "$BERTH_BIN" | cut -c1-16)"
  echo "berth tree: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || echo ' (uncommitted changes)')"
  echo "run: $RUN (prefixes dist-$RUN, berth1-$RUN, berth2-$RUN; databases ${DB_PREFIX}_1, _2)"
  echo "knobs: BLOB_MB=$BLOB_MB PUSH_RUNS=$PUSH_RUNS PULL_RUNS=$PULL_RUNS WRK_S=$WRK_S WRK_WARMUP_S=$WRK_WARMUP_S WRK_T=$WRK_T WRK_C=$WRK_C"
} > "$RES/env.txt"
cp "$BERTH_BIN" "$W/berth-bin"  # a rebuild during the run does not change what is measured

for n in 1 2; do
  psql "$PG_ADMIN_URL/postgres" -qc "create database ${DB_PREFIX}_$n" || die "cannot create database ${DB_PREFIX}_$n"
  CREATED_DBS+=("${DB_PREFIX}_$n")
done
LIVE=""
for s in $SETUPS; do
  mkdir -p "$RES/$s"; : > "$RES/$s/metrics"; : > "$RES/$s/runs"; bases=""; spids=""; ok=1
  case $s in
    distribution) nodes=(d); start() { mkdir -p "$W/$s"; start_distribution "$W/$s"; };;
    berth1) nodes=(a); start() { start_berth "$W/$s-$1" "berth1-$RUN" "${DB_PREFIX}_1"; };;
    berth2) nodes=(a b); start() { start_berth "$W/$s-$1" "berth2-$RUN" "${DB_PREFIX}_2"; };;
  esac
  for nd in "${nodes[@]}"; do
    if start "$nd"; then bases+="$BASE "; spids+="$SRV_PID "; log "$s node $nd: pid $SRV_PID at $BASE"
    else ok=; log "$s node $nd did not start"; fi
  done
  if [[ -n $ok ]]; then BASES_OF[$s]=$bases; SPIDS_OF[$s]=$spids; LIVE+="$s "
  else echo "bench_failed start" >> "$RES/$s/metrics"; cp "$W/$s"*/server.log "$RES/$s/" 2>/dev/null || true; fi
done

log "== monolithic push: ${PUSH_RUNS} rounds of ${BLOB_MB} MiB (berth2 alternates nodes)"
for ((i = 0; i < PUSH_RUNS; i++)); do for s in $(rotate "$i"); do step "$s" m_push "$i"; done; done
for s in $LIVE; do step "$s" m_push_rest; done
log "== content check"
for s in $LIVE; do step "$s" m_check; done
log "== single-stream pull: ${PULL_RUNS} rounds of ${BLOB_MB} MiB (berth2: from the node that did not take it)"
for ((i = 0; i < PULL_RUNS; i++)); do for s in $(rotate "$i"); do step "$s" m_pull "$((2 * i))"; done; done
log "== wrk manifest GET by tag: -t$WRK_T -c$WRK_C in total, ${WRK_WARMUP_S}s warm-up + ${WRK_S}s"
for s in $LIVE; do step "$s" m_wrk; done

for s in $LIVE; do
  {
    for k in push_MiBps pull_MiBps; do
      awk -v k="$k" '$1 == k { n++; if ($2 > m) m = $2 } END { if (n) print k, m }' "$RES/$s/runs"
    done
    awk '$1 == "errors" { n += $2 } END { print "errors", n + 0 }' "$RES/$s/runs"
    echo "peak_rss_MiB $(peak_rss_mib ${SPIDS_OF[$s]})"
  } >> "$RES/$s/metrics"
done
for p in "${PIDS[@]}"; do stop_pid "$p"; done
PIDS=()
for s in $SETUPS; do cp "$W/$s"*/server.log "$RES/$s/" 2>/dev/null || true; done
cp "$W/distribution/config.yml" "$RES/distribution/" 2>/dev/null || true
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RES/env.txt"

# ------------------------------------------------------------------------------------ report
declare -A M
for s in $SETUPS; do while read -r k v; do M[$s.$k]=$v; done < "$RES/$s/metrics"; done
val() { echo "${M[$1.$2]:--}"; }
isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { if isnum "$1" && isnum "$2" && nums "exit !($2 > 0)"; then nums "printf \"%.2fx\", $1 / $2"; else echo -; fi; }
ROWS=(
  "push_MiBps|monolithic push MiB/s (${BLOB_MB} MiB)"
  "pull_MiBps|single-stream pull MiB/s"
  "manifest_rps|manifest GET by tag, req/s"
  "manifest_p99_ms|manifest GET p99 ms"
  "manifest_cpu_us|manifest GET server CPU us/req"
  "peak_rss_MiB|peak RSS MiB (VmHWM, per process)"
  "errors|errors (wrk non-2xx + socket)"
  "content_check|same bytes back"
)
report() {
  local row k label s
  echo "Berth (S3 + PostgreSQL) vs CNCF Distribution (s3 driver), same Garage; $(date '+%Y-%m-%d %H:%M')," \
    "$(nproc) cores; load $(sed -n 's/^load at start: //p' "$RES/env.txt") at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
  echo
  printf '%-38s %12s %12s %12s %10s %10s %9s\n' metric distribution "berth 1 node" "berth 2 nodes" b1/dist b2/dist b2/b1
  for row in "${ROWS[@]}"; do
    k=${row%%|*}; label=${row#*|}
    printf '%-38s %12s %12s %12s' "$label" "$(val distribution "$k")" "$(val berth1 "$k")" "$(val berth2 "$k")"
    if [[ $k == errors || $k == content_check ]]; then echo
    else printf ' %10s %10s %9s\n' "$(ratio "$(val berth1 "$k")" "$(val distribution "$k")")" \
      "$(ratio "$(val berth2 "$k")" "$(val distribution "$k")")" "$(ratio "$(val berth2 "$k")" "$(val berth1 "$k")")"; fi
  done
  for s in $SETUPS; do
    [[ -n ${M[$s.bench_failed]:-} ]] && echo "!! $s: failed at ${M[$s.bench_failed]}; its later numbers are missing (see $RES/$s)"
  done
  echo
  echo "CPU during the manifest GETs (% of one core; the machine has $(( $(nproc) * 100 ))%):"
  for s in $SETUPS; do printf '  %-13s %s\n' "$s" "$(val "$s" manifest_cpu_split | tr ',' ' ')"; done
  echo
  echo "Pushes: best of $PUSH_RUNS distinct blobs; pull: best of $PULL_RUNS; wrk -t$WRK_T -c$WRK_C in total for ${WRK_S}s" \
    "after ${WRK_WARMUP_S}s (two nodes: one wrk per node at once, -t$((WRK_T / 2 > 0 ? WRK_T / 2 : 1)) -c$((WRK_C / 2)) each;" \
    "req/s summed, p99 the worse node's). berth2 pushes alternate nodes and pulls from the node that did not take the blob."
  echo
  echo "Targets (Berth, one node; two nodes in brackets):"
  local mr ps pr
  verdict() { if [[ $1 != - ]] && nums "exit !(${1%x} >= $2)"; then echo met; elif [[ $1 == - ]]; then echo n/a; else echo missed; fi; }
  mr=$(ratio "$(val berth1 manifest_rps)" "$(val distribution manifest_rps)")
  printf '  %-7s %-42s %s [%s]\n' "$(verdict "$mr" 2)" "manifest GET >= 2x Distribution" "$mr" "$(ratio "$(val berth2 manifest_rps)" "$(val distribution manifest_rps)")"
  ps=$(ratio "$(val berth1 push_MiBps)" "$(val distribution push_MiBps)")
  printf '  %-7s %-42s %s [%s]\n' "$(verdict "$ps" 2)" "monolithic push >= 2x Distribution" "$ps" "$(ratio "$(val berth2 push_MiBps)" "$(val distribution push_MiBps)")"
  pr=$(ratio "$(val berth1 pull_MiBps)" "$(val distribution pull_MiBps)")
  printf '  %-7s %-42s %s [%s]\n' "$(verdict "$pr" 1)" "single-stream pull >= Distribution" "$pr" "$(ratio "$(val berth2 pull_MiBps)" "$(val distribution pull_MiBps)")"
  echo
  echo "Raw outputs: $RES"
}
report | tee "$RES/summary.txt"
