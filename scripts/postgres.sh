#!/usr/bin/env bash
# A scratch PostgreSQL server for Berth's tests, idempotently: installs Debian's postgresql if
# no server binaries are present, creates a cluster in $BERTH_PG_DIR (default /tmp/berth-pg),
# starts it on 127.0.0.1:$BERTH_PG_PORT (default 54329) unless it already answers there, waits
# until it accepts connections, and prints the line to eval:
#
#   eval "$(bash scripts/postgres.sh)"     # exports BERTH_TEST_POSTGRES_URL
#   bash scripts/postgres.sh stop          # stops it (the data stays for the next start)
#
# The cluster trusts every connection from 127.0.0.1 and the owner's Unix socket, and runs with
# fsync off: it holds test databases only, never anything worth keeping. Progress goes to stderr.
set -euo pipefail

dir="${BERTH_PG_DIR:-/tmp/berth-pg}"
port="${BERTH_PG_PORT:-54329}"
url="postgres://postgres@127.0.0.1:${port}/postgres"

# initdb refuses to run as root: as root, the server runs as Debian's `postgres` user.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing postgresql" >&2
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >&2
fi
bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"

if [ "${1:-start}" = stop ]; then
  if [ -f "$dir/postmaster.pid" ]; then as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >&2; fi
  exit 0
fi

if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  echo "export BERTH_TEST_POSTGRES_URL=$url"
  exit 0
fi

if [ ! -f "$dir/PG_VERSION" ]; then
  echo "creating a PostgreSQL cluster in $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  chmod 700 "$dir"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
  as_owner "$bin/initdb" -D "$dir" -U postgres --encoding=UTF8 --locale=C.UTF-8 --no-sync \
    --auth=trust >&2
  # Only the loopback address and the owner's socket (the directory is 0700) may connect.
  printf '%s\n' 'local all all trust' 'host all all 127.0.0.1/32 trust' >"$dir/pg_hba.conf"
  cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir/pg_hba.conf"; fi
fi

echo "starting PostgreSQL on 127.0.0.1:$port" >&2
as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >&2
for _ in $(seq 1 60); do
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    echo "export BERTH_TEST_POSTGRES_URL=$url"
    exit 0
  fi
  sleep 1
done
echo "PostgreSQL did not become ready on 127.0.0.1:$port; see $dir/server.log" >&2
exit 1
