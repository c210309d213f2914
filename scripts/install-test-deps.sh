#!/usr/bin/env bash
# Installs, by Debian package name, what the test suite uses besides cargo:
# curl (HTTP client in shell-driven tests), iproute2 and util-linux (a private network
# namespace for the built-in-default test), slowhttptest (slowloris, slow-body and slow-read
# clients), systemd (`systemd-analyze verify` of the unit file); and, from PyPI, kosoku (the Autobahn WebSocket
# fuzzing client). Does nothing when all are present.
set -euo pipefail

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v slowhttptest >/dev/null 2>&1 || need+=(slowhttptest)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

if ! python3 -c 'import kosoku' >/dev/null 2>&1; then
  echo "installing kosoku (PyPI)"
  python3 -m pip install --quiet kosoku
fi
