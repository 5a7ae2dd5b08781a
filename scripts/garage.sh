#!/usr/bin/env bash
# A scratch single-node Garage (S3-compatible object store) for Berth's S3 tests, idempotently:
# installs garage with `cargo install` if it is missing (a long build: 45 minutes once on two
# busy cores), writes a config under $BERTH_GARAGE_DIR (default /tmp/berth-garage), starts
# `garage server` on 127.0.0.1 unless it already answers, gives the node its storage role,
# creates the bucket and imports a fixed test key, then prints the lines to eval:
#
#   eval "$(bash scripts/garage.sh)"   # exports BERTH_TEST_S3_ENDPOINT, BERTH_TEST_S3_BUCKET,
#                                      # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION
#   bash scripts/garage.sh stop        # stops it (the data stays for the next start)
#
# It holds test data only: fsync is off, and the key below is public. Progress goes to stderr.
set -euo pipefail

dir="${BERTH_GARAGE_DIR:-/tmp/berth-garage}"
s3_port="${BERTH_GARAGE_S3_PORT:-3900}"
rpc_port="${BERTH_GARAGE_RPC_PORT:-3901}"
version="${BERTH_GARAGE_VERSION:-2.5.0}"
bucket=berth-test
key_name=berth-test-key
# Garage key ids are "GK" and 24 hex digits, secrets 64 hex digits. Fixed, so that the
# credentials survive a wiped $dir and match whatever a developer exported earlier.
key_id=GK6265727468746573746b6579
secret=6265727468207465737420736563726574206b65792c206e6f74206120736563
region=garage
conf="$dir/garage.toml"
log="$dir/garage.log"
pidfile="$dir/garage.pid"

say() { echo "garage.sh: $*" >&2; }

exports() {
  echo "export BERTH_TEST_S3_ENDPOINT=http://127.0.0.1:${s3_port}"
  echo "export BERTH_TEST_S3_BUCKET=${bucket}"
  echo "export AWS_ACCESS_KEY_ID=${key_id}"
  echo "export AWS_SECRET_ACCESS_KEY=${secret}"
  echo "export AWS_REGION=${region}"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

if [ "${1:-start}" = stop ]; then
  if running; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 100); do running || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
  exit 0
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v garage >/dev/null 2>&1; then
  say "installing garage $version with cargo (this takes a while)"
  start=$(date +%s)
  # A test fixture, not a production server: optimise lightly and skip debug info to
  # shorten the build (the default profile took 45 minutes on two busy cores).
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install garage --locked --version "$version" >&2
  say "garage built in $(($(date +%s) - start)) s"
fi
g() { garage -c "$conf" "$@"; }

mkdir -p "$dir/meta" "$dir/data"
if [ ! -f "$conf" ]; then
  cat >"$conf" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:${rpc_port}"
rpc_public_addr = "127.0.0.1:${rpc_port}"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "${region}"
api_bind_addr = "127.0.0.1:${s3_port}"
root_domain = ".s3.garage.localhost"
EOF
fi

if ! running; then
  say "starting garage server (log: $log)"
  # setsid: the server outlives this script and the shell that ran it.
  setsid nohup garage -c "$conf" server >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
fi
for i in $(seq 300); do
  if g status >/dev/null 2>&1; then break; fi
  if ! running; then say "garage server exited; last lines of $log:"; tail -n 20 "$log" >&2; exit 1; fi
  [ "$i" -lt 300 ] || { say "garage did not answer within 30 s"; exit 1; }
  sleep 0.1
done

if g layout show 2>/dev/null | grep -q 'Current cluster layout version: 0'; then
  node="$(g node id -q 2>/dev/null | cut -d@ -f1)"
  say "assigning the storage role to node $node"
  g layout assign -z dc1 -c 10G "$node" >&2
  g layout apply --version 1 >&2
fi

if ! g key info "$key_name" >/dev/null 2>&1; then
  g key import -n "$key_name" --yes "$key_id" "$secret" >&2
fi
if ! g bucket info "$bucket" >/dev/null 2>&1; then
  g bucket create "$bucket" >&2
fi
g bucket allow --read --write --owner "$bucket" --key "$key_name" >/dev/null

for i in $(seq 300); do
  if (exec 3<>"/dev/tcp/127.0.0.1/${s3_port}") 2>/dev/null; then break; fi
  [ "$i" -lt 300 ] || { say "the S3 API on port $s3_port did not answer within 30 s"; exit 1; }
  sleep 0.1
done

exports
