#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (idempotently), then
# formatting, lints, unit tests and the end-to-end tests against a real `berth` process.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real clients the end-to-end tests drive, from Debian. Install only what is missing.
declare -A pkg_for=([skopeo]=skopeo [buildah]=buildah [podman]=podman [umoci]=umoci [ctr]=containerd [curl]=curl)
missing=()
for cmd in "${!pkg_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_for[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" uidmap
fi

# oras-py (PyPI's `oras`, the ORAS Python SDK) in a venv of its own, for crates/berth/tests/it/oras.rs.
# Debian's python3 needs python3-venv (ensurepip) to make one. The version is the one verified.
oras_venv="$PWD/target/oras-venv"
oras_version=0.2.43
if ! "$oras_venv/bin/python" -c "import importlib.metadata as m; assert m.version('oras') == '$oras_version'" 2>/dev/null; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing: python3-venv" >&2
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-venv
  fi
  echo "installing oras==$oras_version into $oras_venv" >&2
  rm -rf "$oras_venv"
  python3 -m venv "$oras_venv"
  "$oras_venv/bin/pip" install -q "oras==$oras_version"
fi
export BERTH_TEST_ORAS_PYTHON="$oras_venv/bin/python"

# A scratch PostgreSQL for the metadata tests; a no-op when it is already running.
eval "$(bash scripts/postgres.sh)"

# A local single-node Garage for the S3 storage tests; exports their BERTH_TEST_S3_* and AWS_*
# variables. On a new machine this first builds garage with cargo (45 minutes once on 2 busy cores).
eval "$(bash scripts/garage.sh)"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# The `otel` feature (OpenTelemetry export): its lints, and its own tests only; the rest of the
# suite does not change with it, and running it twice would double CI's time.
cargo clippy -p berth --all-targets --features otel -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run -p berth --features otel --test it --no-fail-fast -E 'test(/^otel::/)'
else
  cargo test -p berth --features otel --test it --no-fail-fast -- otel::
fi
