#!/usr/bin/env bash
# The test suite: installs what the tests need, then runs every test against the real binary.
# Tests start servers, fork workers and drop privileges: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "the integration tests need root (privilege dropping, network namespaces)" >&2
  exit 1
fi
# The kTLS feature must keep building.
cargo check --locked --quiet --features ktls --bin zerocopy-server
cargo test --locked "$@"
