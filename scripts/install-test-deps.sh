#!/usr/bin/env bash
# Installs, by Debian package name, what the test suite uses besides cargo:
# curl (HTTP client in shell-driven tests), iproute2 and util-linux (a private network
# namespace for the built-in-default test), slowhttptest (slowloris, slow-body and slow-read
# clients), systemd (`systemd-analyze verify` of the unit file); for the kTLS VM (scripts/ktls-vm.sh, which also fetches the linux-image-cloud-amd64
# and busybox-static packages itself and unpacks them under target/), without recommends:
# qemu-system-x86, cpio, kmod (modinfo), binutils (objcopy) and openssl (also the SNI and
# resumption tests' s_client and key-format conversion); and, from PyPI, kosoku (the Autobahn
# WebSocket fuzzing client), sslyze (the Mozilla TLS configuration check) and h2 (the HTTP/2
# frame-level client of tests/h2.rs: floods, resets, windows). Does nothing when
# all are present.
set -euo pipefail

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v slowhttptest >/dev/null 2>&1 || need+=(slowhttptest)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
vm=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || vm+=(qemu-system-x86)
command -v cpio >/dev/null 2>&1 || vm+=(cpio)
command -v objcopy >/dev/null 2>&1 || vm+=(binutils)
command -v openssl >/dev/null 2>&1 || vm+=(openssl)
PATH=$PATH:/usr/sbin:/sbin command -v modinfo >/dev/null 2>&1 || vm+=(kmod)

if [ $((${#need[@]} + ${#vm[@]})) -gt 0 ]; then
  echo "installing: ${need[*]} ${vm[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  fi
  if [ ${#vm[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${vm[@]}"
  fi
fi

if ! python3 -c 'import kosoku' >/dev/null 2>&1; then
  echo "installing kosoku (PyPI)"
  python3 -m pip install --quiet kosoku
fi

if ! python3 -c 'import sslyze' >/dev/null 2>&1; then
  echo "installing sslyze (PyPI)"
  python3 -m pip install --quiet sslyze
fi

if ! python3 -c 'import h2' >/dev/null 2>&1; then
  echo "installing h2 (PyPI)"
  python3 -m pip install --quiet h2
fi
