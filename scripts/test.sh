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
