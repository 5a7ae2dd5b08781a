#!/usr/bin/env bash
# What observability costs: the same Berth binary twice at once, one with the access log and
# metrics on (the defaults; the log goes to a file at info level, as in production) and one
# with both off (`--access-log false --metrics false`). Reports manifest GET and blob GET
# rates of each, alternating rounds (best of ROUNDS), and their ratio on/off; the target is
# >= 0.9. Run by hand; never from tests. Knobs: BERTH_BIN, WRK_S, WRK_T, WRK_C, ROUNDS, ON_ARGS,
# BLOB_KB.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$ROOT/target/release/berth}
WRK_S=${WRK_S:-8}
WRK_T=${WRK_T:-2}
WRK_C=${WRK_C:-64}
ROUNDS=${ROUNDS:-3}
BLOB_KB=${BLOB_KB:-4}
MT=application/vnd.oci.image.manifest.v1+json

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in curl wrk openssl awk; do command -v "$c" >/dev/null || die "missing command: $c"; done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release)"

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-observe-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# start NAME ARGS...: starts berth, sets ADDR_<NAME> (host:port).
start() {
  local name=$1; shift
  mkdir -p "$W/$name"
  RUST_LOG=info "$BERTH_BIN" serve --listen 127.0.0.1:0 --data-dir "$W/$name/data" "$@" \
    > "$W/$name/out" 2> "$W/$name/err" &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -s $W/$name/out ]] && break; sleep 0.05; done
  local url; url=$(awk 'NR==1 {print $NF}' "$W/$name/out")
  [[ -n $url ]] || die "$name did not start: $(cat "$W/$name/err")"
  printf -v "ADDR_$name" '%s' "${url#*://}"
}

dgst() { echo "sha256:$(openssl dgst -sha256 -r "$1" | cut -d' ' -f1)"; }

# push BASE: a small image tagged `latest` in bench/app.
push() {
  local base=$1
  for f in "$W/config.json" "$W/layer"; do
    curl -sf -o /dev/null -X POST --data-binary "@$f" -H 'content-type: application/octet-stream' \
      "$base/v2/bench/app/blobs/uploads/?digest=$(dgst "$f")" || die "blob push to $base failed"
  done
  curl -sf -o /dev/null -X PUT --data-binary "@$W/manifest.json" -H "content-type: $MT" \
    "$base/v2/bench/app/manifests/latest" || die "manifest push to $base failed"
}

log "preparing data"
echo '{"architecture":"amd64","os":"linux"}' > "$W/config.json"
head -c $((BLOB_KB * 1024)) /dev/urandom > "$W/layer"
LAYER=$(dgst "$W/layer")
cat > "$W/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"$MT","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$(dgst "$W/config.json")","size":$(stat -c %s "$W/config.json")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$LAYER","size":$((BLOB_KB * 1024))}]}
JSON

start on ${ON_ARGS:-}
start off --access-log false --metrics false
push "http://$ADDR_on"
push "http://$ADDR_off"

# rate URL: requests per second of wrk, after a short warm-up.
rate() {
  wrk -t1 -c4 -d1s -H "Accept: $MT" "$1" >/dev/null 2>&1 || true
  wrk -t"$WRK_T" -c"$WRK_C" -d"${WRK_S}s" -H "Accept: $MT" "$1" | awk '/Requests\/sec/ {print $2}'
}

declare -A best
for round in $(seq "$ROUNDS"); do
  log "round $round"
  # Alternate which server goes first, so neither always gets the quieter moment.
  order="on off"; (( round % 2 == 0 )) && order="off on"
  for mode in $order; do
    addr_var=ADDR_$mode; addr=${!addr_var}
    for what in manifest blob; do
      case $what in
        manifest) url="http://$addr/v2/bench/app/manifests/latest" ;;
        blob) url="http://$addr/v2/bench/app/blobs/$LAYER" ;;
      esac
      r=$(rate "$url")
      key="$what-$mode"
      best[$key]=$(awk -v a="${best[$key]:-0}" -v b="$r" 'BEGIN{print (b>a)?b:a}')
    done
  done
done

lines=$(grep -c 'berth::access' "$W/on/err" || true)
log "access log lines written by the 'on' server: $lines"
printf '\n%-14s %14s %14s %8s\n' "req/s" "log+metrics" "both off" "on/off"
for what in manifest blob; do
  on=${best[$what-on]}; off=${best[$what-off]}
  ratio=$(awk -v a="$on" -v b="$off" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')
  verdict=$(awk -v r="$ratio" 'BEGIN{print (r>=0.9)?"met":"missed"}')
  printf '%-14s %14s %14s %8s  (target >= 0.90: %s)\n' "$what GET" "$on" "$off" "$ratio" "$verdict"
done
