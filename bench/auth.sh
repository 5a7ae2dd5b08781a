#!/usr/bin/env bash
# Access control and TLS, side by side in one run on one machine: the same Berth binary with
# access control off, with token auth (a bearer token), with basic auth (a password sent on
# every request), and, when the binary supports it, over TLS. Reports manifest GET rates and
# their ratios to auth off, token issuance latency (p50/p99, credentials cached, so argon2 is
# not in it), and single-stream pull throughput over TLS against plain HTTP. Run by hand;
# never from tests. Knobs: BERTH_BIN, WRK_S, WRK_T, WRK_C, ROUNDS, PULL_MB.
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
PULL_MB=${PULL_MB:-512}
MT=application/vnd.oci.image.manifest.v1+json

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
for c in curl wrk openssl awk; do command -v "$c" >/dev/null || die "missing command: $c"; done
[[ -x $BERTH_BIN ]] || die "no Berth binary at $BERTH_BIN (cargo build --release)"

W=$(mktemp -d "${BENCH_TMP:-/tmp}/berth-auth-bench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# start NAME ARGS...: starts berth, sets ADDR_<NAME> (host:port) and SCHEME_<NAME>.
start() {
  local name=$1; shift
  mkdir -p "$W/$name"
  "$BERTH_BIN" serve --listen 127.0.0.1:0 --data-dir "$W/$name/data" "$@" \
    > "$W/$name/out" 2> "$W/$name/err" &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -s $W/$name/out ]] && break; sleep 0.05; done
  local url; url=$(awk '{print $NF}' "$W/$name/out")
  [[ -n $url ]] || die "$name did not start: $(cat "$W/$name/err")"
  printf -v "ADDR_$name" '%s' "${url#*://}"
  printf -v "SCHEME_$name" '%s' "${url%%://*}"
}

admin() { local data=$1; shift; "$BERTH_BIN" "$@" --data-dir "$data" >/dev/null; }

# push BASE CURL_AUTH...: a small image tagged `latest` in bench/app, and a PULL_MB blob.
push() {
  local base=$1; shift
  local cfg=$W/config.json man=$W/manifest.json
  for f in "$cfg" "$W/layer" "$W/big"; do
    local d; d=sha256:$(openssl dgst -sha256 -r "$f" | cut -d' ' -f1)
    curl -sf -o /dev/null "$@" -X POST --data-binary "@$f" \
      "$base/v2/bench/app/blobs/uploads/?digest=$d" -H 'content-type: application/octet-stream' \
      || die "blob push to $base failed"
  done
  curl -sf -o /dev/null "$@" -X PUT --data-binary "@$man" -H "content-type: $MT" \
    "$base/v2/bench/app/manifests/latest" || die "manifest push to $base failed"
}

log "preparing data"
echo '{"architecture":"amd64","os":"linux"}' > "$W/config.json"
head -c 4096 /dev/urandom > "$W/layer"
head -c $((PULL_MB << 20)) /dev/urandom > "$W/big"
dgst() { echo "sha256:$(openssl dgst -sha256 -r "$1" | cut -d' ' -f1)"; }
BIG=$(dgst "$W/big")
cat > "$W/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"$MT","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$(dgst "$W/config.json")","size":$(stat -c %s "$W/config.json")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$(dgst "$W/layer")","size":4096}]}
EOF

mkdir -p "$W/on/data"
admin "$W/on/data" user add bench --admin --password-stdin <<< "bench-pw"
start off
start on --auth token
push "http://$ADDR_off"
push "http://$ADDR_on" -u bench:bench-pw

TLS=0
if "$BERTH_BIN" serve --help | grep -q -- '--tls-cert'; then
  TLS=1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
  start tls --tls-cert "$W/cert.pem" --tls-key "$W/key.pem"
  push "https://$ADDR_tls" --cacert "$W/cert.pem"
fi

TOKEN=$(curl -sf -u bench:bench-pw \
  "http://$ADDR_on/auth/token?service=berth&scope=repository:bench/app:pull" |
  sed -E 's/.*"token":"([^"]+)".*/\1/')
[[ -n $TOKEN ]] || die "no token"
BASIC=$(printf 'bench:bench-pw' | base64)

# rate URL HEADER...: requests per second of wrk, after a short warm-up.
rate() {
  local url=$1; shift
  local hs=(-H "Accept: $MT")
  for h in "$@"; do hs+=(-H "$h"); done
  wrk -t1 -c4 -d1s "${hs[@]}" "$url" >/dev/null 2>&1 || true
  wrk -t"$WRK_T" -c"$WRK_C" -d"${WRK_S}s" "${hs[@]}" "$url" | awk '/Requests\/sec/ {print $2}'
}

declare -A best
for round in $(seq "$ROUNDS"); do
  log "manifest GET round $round"
  for mode in off token basic; do
    case $mode in
      off) r=$(rate "http://$ADDR_off/v2/bench/app/manifests/latest") ;;
      token) r=$(rate "http://$ADDR_on/v2/bench/app/manifests/latest" "Authorization: Bearer $TOKEN") ;;
      basic) r=$(rate "http://$ADDR_on/v2/bench/app/manifests/latest" "Authorization: Basic $BASIC") ;;
    esac
    best[$mode]=$(awk -v a="${best[$mode]:-0}" -v b="$r" 'BEGIN{print (b>a)?b:a}')
  done
done

log "token issuance latency"
ISSUE=$(wrk -t1 -c4 -d"${WRK_S}s" --latency -H "Authorization: Basic $BASIC" \
  "http://$ADDR_on/auth/token?service=berth&scope=repository:bench/app:pull,push" )
P50=$(awk '$1=="50%" {print $2}' <<< "$ISSUE")
P99=$(awk '$1=="99%" {print $2}' <<< "$ISSUE")
ISSUE_RATE=$(awk '/Requests\/sec/ {print $2}' <<< "$ISSUE")

pull_mibs() { # URL CURL_ARGS...: best MiB/s of 3 pulls
  local url=$1; shift; local b=0
  for _ in 1 2 3; do
    local s; s=$(curl -sf -o /dev/null -w '%{speed_download}' "$@" "$url")
    b=$(awk -v a="$b" -v s="$s" 'BEGIN{x=s/1048576; print (x>a)?x:a}')
  done
  echo "$b"
}
PLAIN_PULL=$(pull_mibs "http://$ADDR_off/v2/bench/app/blobs/$BIG")
if (( TLS )); then
  TLS_PULL=$(pull_mibs "https://$ADDR_tls/v2/bench/app/blobs/$BIG" --cacert "$W/cert.pem")
fi

# The limit: nginx (OpenSSL, sendfile) serving the same file over plain HTTP and over TLS.
# On loopback the client decrypts on the same cores the server encrypts on, so TLS costs
# throughput even in nginx; its ratio is what the machine allows.
NGINX_PLAIN=-; NGINX_TLS=-
if (( TLS )) && command -v nginx >/dev/null; then
  mkdir -p "$W/nginx/www" && chmod 755 "$W" "$W/nginx" "$W/nginx/www"
  cp "$W/big" "$W/nginx/www/big" && chmod 644 "$W/nginx/www/big"
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  NP=$(free_port); NS=$(free_port)
  cat > "$W/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log warn;
events {}
http { access_log off; sendfile on;
  server { listen 127.0.0.1:$NP; root $W/nginx/www; }
  server { listen 127.0.0.1:$NS ssl; ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
           root $W/nginx/www; }
}
EOF
  nginx -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log" > /dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$NP/big" && break; sleep 0.1; done
  NGINX_PLAIN=$(pull_mibs "http://127.0.0.1:$NP/big")
  NGINX_TLS=$(pull_mibs "https://127.0.0.1:$NS/big" --cacert "$W/cert.pem")
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2fx", a/b; else print "-" }'; }
echo
echo "| measurement | value | ratio | target |"
echo "|---|---|---|---|"
echo "| manifest GET, auth off | ${best[off]} req/s | 1.00x | |"
echo "| manifest GET, bearer token | ${best[token]} req/s | $(ratio "${best[token]}" "${best[off]}") | >= 0.85x |"
echo "| manifest GET, basic auth | ${best[basic]} req/s | $(ratio "${best[basic]}" "${best[off]}") | |"
echo "| token issuance (cached credentials) | p50 $P50, p99 $P99, $ISSUE_RATE req/s | | p99 <= 5 ms |"
echo "| single-stream pull, plain HTTP | $PLAIN_PULL MiB/s | 1.00x | |"
if (( TLS )); then
  echo "| single-stream pull, TLS | $TLS_PULL MiB/s | $(ratio "$TLS_PULL" "$PLAIN_PULL") | >= 0.8x |"
  echo "| nginx pull, plain HTTP (the limit) | $NGINX_PLAIN MiB/s | 1.00x | |"
  echo "| nginx pull, TLS (the limit) | $NGINX_TLS MiB/s | $(ratio "$NGINX_TLS" "$NGINX_PLAIN") | |"
fi
