#!/usr/bin/env bash
# kTLS proven in a VM. This machine's kernel has no `tls` module, so the checks run inside a
# Debian cloud kernel (CONFIG_TLS=m) booted with QEMU under TCG (KVM is not usable here),
# from an initramfs holding busybox, tls.ko and the crypto modules it needs, the server built
# with `--features ktls`, its unit tests (the `vm_` ones, #[ignore]d outside), curl and
# openssl. Everything talks over the VM's loopback.
#
# Prints one `PASS name` or `FAIL name: why` line per check, then `N passed, N failed`;
# exits 0 only when every check passed. qemu runs under a timeout: it never hangs CI.
#
# Installs by package name what it lacks (qemu-system-x86, cpio, curl, openssl, binutils, kmod,
# busybox-static's and the kernel's .deb files, which are unpacked under target/, never
# installed: the host's /boot is not touched). Caches under target/ktls-vm/: the second
# run needs no network and rebuilds only the initramfs.
#
# Environment: KTLS_VM_TIMEOUT (seconds for the VM, default 300), KTLS_VM_VERBOSE=1 to show
# the whole console.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/target/ktls-vm
mkdir -p "$WORK"
TIMEOUT=${KTLS_VM_TIMEOUT:-300}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

step() { echo "ktls-vm: $*" >&2; }

apt_updated=""
apt_update() {
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}

# ---- host tools ----
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
command -v modinfo >/dev/null 2>&1 || [ -x /usr/sbin/modinfo ] || [ -x /sbin/modinfo ] || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- kernel and busybox, unpacked from their packages ----
# Downloads go to a directory apt's sandbox user may write.
fetch_deb() { # package, destination dir
  local pkg=$1 dest=$2 tmp
  tmp=$(mktemp -d)
  chmod 777 "$tmp"
  (cd "$tmp" && apt-get download -qq "$pkg") || { apt_update; (cd "$tmp" && apt-get download -qq "$pkg"); }
  mkdir -p "$dest"
  dpkg-deb -x "$tmp"/*.deb "$dest"
  rm -rf "$tmp"
}
if [ ! -f "$WORK/kernel/.done" ]; then
  apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt_update
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kpkg" ] || { echo "FAIL setup: no kernel behind linux-image-cloud-amd64"; exit 1; }
  step "unpacking $kpkg"
  rm -rf "$WORK/kernel"
  fetch_deb "$kpkg" "$WORK/kernel"
  touch "$WORK/kernel/.done"
fi
if [ ! -f "$WORK/busybox/.done" ]; then
  step "unpacking busybox-static"
  rm -rf "$WORK/busybox"
  fetch_deb busybox-static "$WORK/busybox"
  touch "$WORK/busybox/.done"
fi
BUSYBOX=$WORK/busybox/bin/busybox
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=$WORK/kernel/lib/modules/$KVER

# ---- the binaries: a target dir of their own, so the suite's (featureless) binary stays ----
export CARGO_TARGET_DIR=$WORK/cargo
if [ ! -d "$CARGO_TARGET_DIR/debug/deps" ] && [ -d "$ROOT/target/debug/deps" ]; then
  # Start from the suite's compiled dependencies: only this crate is built again.
  step "seeding $CARGO_TARGET_DIR from target/debug"
  mkdir -p "$CARGO_TARGET_DIR/debug/deps"
  cp -a "$ROOT/target/debug/.fingerprint" "$ROOT/target/debug/build" "$CARGO_TARGET_DIR/debug/"
  cp -a "$ROOT"/target/debug/deps/lib* "$CARGO_TARGET_DIR/debug/deps/" 2>/dev/null || true
fi
step "building with --features ktls"
nice cargo build --locked --quiet --features ktls --bin zerocopy-server
SERVER=$CARGO_TARGET_DIR/debug/zerocopy-server
TESTS=$(nice cargo test --locked --quiet --features ktls --bin zerocopy-server --no-run --message-format=json \
  | grep -o '"executable":"[^"]*"' | tail -1 | sed 's/"executable":"//; s/"$//')
[ -x "$TESTS" ] || { echo "FAIL setup: no unit-test binary"; exit 1; }

# ---- certificate (cached) ----
CERTS=$WORK/certs
if [ ! -f "$CERTS/server.key" ]; then
  mkdir -p "$CERTS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj /CN=ktls.test -addext subjectAltName=DNS:ktls.test \
    -keyout "$CERTS/server.key" -out "$CERTS/server.crt" 2>/dev/null
fi

# ---- the initramfs ----
step "building the initramfs"
IMG=$WORK/root
rm -rf "$IMG"
mkdir -p "$IMG"/{bin,sbin,etc/ktls,proc,sys,dev,tmp,srv/www,lib/modules}
cp "$BUSYBOX" "$IMG/bin/busybox"

# Modules: tls and the AEADs it asks the crypto API for (gcm(aes), rfc7539(chacha20,poly1305)),
# each with what `modinfo` says it depends on, in load order.
declare -A KO=()
while IFS= read -r f; do
  n=${f##*/}
  n=${n%.ko}
  KO[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko')
ORDER=()
resolve() {
  local m=${1//-/_} d
  [[ " ${ORDER[*]} " == *" $m "* ]] && return 0
  [ -n "${KO[$m]:-}" ] || { echo "FAIL setup: module $m not in $KVER"; exit 1; }
  for d in $(PATH=$PATH:/usr/sbin:/sbin modinfo -F depends "${KO[$m]}" | tr ',' ' '); do
    resolve "$d"
  done
  ORDER+=("$m")
}
for m in tls gcm ctr ghash_generic aesni_intel ghash_clmulni_intel \
  chacha20poly1305 chacha_generic chacha_x86_64 poly1305_generic poly1305_x86_64; do
  resolve "$m"
done
mkdir -p "$IMG/lib/modules/$KVER"
for m in "${ORDER[@]}"; do
  cp "${KO[$m]}" "$IMG/lib/modules/$KVER/$m.ko"
done
printf '%s\n' "${ORDER[@]}" >"$IMG/etc/ktls/modules"

# Programs with their shared libraries (and the loader): the Rust ones without debug info.
copy_libs() {
  local lib
  for lib in $(ldd "$1" | grep -o '/[^ ]*'); do
    [ -e "$IMG$lib" ] || { mkdir -p "$IMG${lib%/*}"; cp -L "$lib" "$IMG$lib"; }
  done
}
objcopy --strip-debug "$SERVER" "$IMG/bin/zerocopy-server"
objcopy --strip-debug "$TESTS" "$IMG/bin/ktls-tests"
cp "$(command -v curl)" "$IMG/bin/curl"
cp "$(command -v openssl)" "$IMG/bin/openssl"
for b in zerocopy-server ktls-tests curl openssl; do
  copy_libs "$IMG/bin/$b"
done

cp "$CERTS/server.crt" "$CERTS/server.key" "$IMG/etc/ktls/"
echo 'root:x:0:0:root:/:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$IMG/etc/passwd"
echo 'root:x:0:
nogroup:x:65534:' >"$IMG/etc/group"
echo '127.0.0.1 localhost ktls.test' >"$IMG/etc/hosts"
echo 'hello over TLS' >"$IMG/srv/www/hello.txt"
# debug: the server logs each offloaded connection with getsockopt(TCP_ULP), and why one ends.
cat >"$IMG/etc/ktls/server.toml" <<'EOF'
[server]
listen = "127.0.0.1:8443"
threads = 1
shutdown_timeout_secs = 2

[logging]
level = "debug"

[tls]
cert_path = "/etc/ktls/server.crt"
key_path = "/etc/ktls/server.key"
ktls_enabled = true

[path_routes."*"."/proxied/"]
type = "Proxy"
url = "http://127.0.0.1:8080"

[path_routes."*"."/"]
path = "/srv/www"
EOF
# The backend of /proxied/: a second server, plain HTTP.
cat >"$IMG/etc/ktls/backend.toml" <<'EOF'
[server]
listen = "127.0.0.1:8080"
threads = 1
pid_file = "/tmp/backend.pid"

[path_routes."*"."/"]
path = "/srv/www"
EOF

cat >"$IMG/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
echo "KTLS-VM: kernel $(uname -r)"
passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

ok=1
for m in $(cat /etc/ktls/modules); do
  insmod "/lib/modules/$(uname -r)/$m.ko" || { ok=""; echo "insmod $m failed"; }
done
if [ -n "$ok" ] && grep -q '^tls ' /proc/modules && [ -r /proc/net/tls_stat ]; then
  pass "tls module loaded ($(wc -l < /etc/ktls/modules) modules)"
else
  fail "tls module loaded"
fi

# The offload on real sockets: probe, both ends offloaded, kernel against rustls, control
# records (close_notify, a TLS 1.3 key update) never read as data.
# --test-threads=1: one test counts /proc/net/tls_stat's offloaded sockets.
if /bin/ktls-tests --ignored --test-threads=1 --show-output vm_ > /tmp/tests.log 2>&1 &&
  grep -q '^test result: ok\. [1-9]' /tmp/tests.log; then
  pass "offload tests on real sockets: $(grep -o '[0-9]* passed' /tmp/tests.log | tail -1)"
  grep -E '^(test |kTLS support|TLSv)' /tmp/tests.log | sed 's/^/  /'
else
  fail "offload unit tests in the VM"
  sed 's/^/  | /' /tmp/tests.log | tail -60
fi

# The server built with --features ktls: its probe finds the ULP and every cipher.
/bin/zerocopy-server -c /etc/ktls/server.toml > /tmp/server.log 2>&1 &
server=$!
i=0
while ! grep -q 'serving (pid' /tmp/server.log && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
want='kTLS: TLS connections are handed to the kernel after their handshake (TLS 1.2: AES-GCM-128, AES-GCM-256, ChaCha20-Poly1305; TLS 1.3: AES-GCM-128, AES-GCM-256, ChaCha20-Poly1305)'
if grep -qF "$want" /tmp/server.log; then
  pass "server probe finds the TLS ULP and every cipher"
  grep -F 'kTLS' /tmp/server.log | head -1 | sed 's/^/  /'
else
  fail "server probe finds the TLS ULP and every cipher"
  sed 's/^/  | /' /tmp/server.log | tail -20
fi

# HTTPS through the server, each connection handed to the kernel after its handshake.
stat() { awk -v k="$1" '$1 == k {print $2}' /proc/net/tls_stat; }
tx0=$(stat TlsTxSw)
rx0=$(stat TlsRxSw)
for v in 1.2 1.3; do
  got=$(curl -sS --max-time 30 --cacert /etc/ktls/server.crt --tlsv$v --tls-max $v \
    https://ktls.test:8443/hello.txt 2>&1)
  if [ "$got" = "hello over TLS" ]; then
    pass "curl HTTPS GET, TLS $v"
  else
    fail "curl HTTPS GET, TLS $v: $got"
  fi
done
got=$(curl -sS --max-time 30 --cacert /etc/ktls/server.crt --tlsv1.3 \
  --tls13-ciphers TLS_CHACHA20_POLY1305_SHA256 https://ktls.test:8443/hello.txt 2>&1)
if [ "$got" = "hello over TLS" ]; then
  pass "curl HTTPS GET, TLS 1.3 ChaCha20-Poly1305"
else
  fail "curl HTTPS GET, TLS 1.3 ChaCha20-Poly1305: $got"
fi
got=$(printf 'GET /hello.txt HTTP/1.1\r\nHost: ktls.test\r\nConnection: close\r\n\r\n' |
  timeout 30 openssl s_client -quiet -tls1_3 -servername ktls.test -verify_return_error \
    -CAfile /etc/ktls/server.crt -connect 127.0.0.1:8443 2>/dev/null | tail -1)
if [ "$got" = "hello over TLS" ]; then
  pass "openssl s_client HTTPS GET, TLS 1.3"
else
  fail "openssl s_client HTTPS GET, TLS 1.3: $got"
fi
offloaded=$(grep -c 'kTLS: connection offloaded.*TCP_ULP "tls"' /tmp/server.log)
# The log is written asynchronously: the kernel's counters count every connection, the log
# lines show TCP_ULP for those written by now.
if [ "$offloaded" -ge 1 ] && [ "$(stat TlsTxSw)" -ge $((tx0 + 4)) ] && [ "$(stat TlsRxSw)" -ge $((rx0 + 4)) ]; then
  pass "connections run in kTLS: tls_stat TlsTxSw $tx0 -> $(stat TlsTxSw), TlsRxSw $rx0 -> $(stat TlsRxSw)"
  grep -o 'kTLS: connection offloaded.*' /tmp/server.log | sort | uniq -c | sed 's/^/  /'
else
  fail "connections run in kTLS: $offloaded offloaded, TlsTxSw $tx0 -> $(stat TlsTxSw), TlsRxSw $rx0 -> $(stat TlsRxSw)"
  sed 's/^/  | /' /tmp/server.log | tail -20
fi

# 100 MB, static (sendfile through the kernel's TLS) and proxied, byte-exact.
/bin/zerocopy-server -c /etc/ktls/backend.toml > /tmp/backend.log 2>&1 &
backend=$!
dd if=/dev/urandom of=/srv/www/big.bin bs=1M count=100 2>/dev/null
want=$(sha256sum < /srv/www/big.bin | cut -d' ' -f1)
i=0
while ! grep -q 'serving (pid' /tmp/backend.log && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
for what in big.bin proxied/big.bin; do
  t0=$(date +%s)
  got=$(curl -sS --max-time 120 --cacert /etc/ktls/server.crt https://ktls.test:8443/$what |
    sha256sum | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then
    pass "100 MB over HTTPS in kTLS, byte-exact: /$what ($(($(date +%s) - t0)) s)"
  else
    fail "100 MB over HTTPS in kTLS, byte-exact: /$what: sha256 $got, want $want"
    sed 's/^/  | /' /tmp/server.log | tail -5
  fi
done
rm -f /srv/www/big.bin

# A TLS 1.3 key update from the client: the stream goes on or closes cleanly, and neither
# the update nor what follows under the new keys is ever read as data.
out=$( (printf 'GET /hello.txt HTTP/1.1\r\nHost: ktls.test\r\n\r\n'; sleep 2; echo k; sleep 2
  printf 'GET /hello.txt HTTP/1.1\r\nHost: ktls.test\r\nConnection: close\r\n\r\n'; sleep 2) |
  timeout 30 openssl s_client -tls1_3 -servername ktls.test -CAfile /etc/ktls/server.crt \
    -connect 127.0.0.1:8443 2>&1)
answers=$(echo "$out" | grep -c '^hello over TLS')
after=$(curl -sS --max-time 30 --cacert /etc/ktls/server.crt https://ktls.test:8443/hello.txt 2>&1)
if echo "$out" | grep -q KEYUPDATE && [ "$answers" -ge 1 ] && ! echo "$out" | grep -q 'HTTP/1.1 4' &&
  { [ "$answers" -eq 2 ] || grep -q 'kTLS connection ends: .*updated its TLS 1.3 keys' /tmp/server.log; } &&
  [ "$after" = "hello over TLS" ]; then
  if [ "$answers" -eq 2 ]; then how="re-keyed, the second request answered"; else how="closed cleanly after the first answer"; fi
  pass "TLS 1.3 key update from the client: $how"
  grep -o 'kTLS connection ends: .*' /tmp/server.log | head -1 | sed 's/^/  /'
else
  fail "TLS 1.3 key update from the client ($answers answers, then: $after)"
  echo "$out" | tail -30 | sed 's/^/  | /'
  sed 's/^/  | /' /tmp/server.log | tail -10
fi

# The metric counts the connections by mode (this request is one more).
metrics=$(curl -sS --max-time 30 --cacert /etc/ktls/server.crt https://ktls.test:8443/__metrics 2>&1)
ktls=$(echo "$metrics" | awk '/^zerocopy_proxy_tls_connections_total\{mode="ktls"\}/ {print $2}')
rustls=$(echo "$metrics" | awk '/^zerocopy_proxy_tls_connections_total\{mode="rustls"\}/ {print $2}')
if [ "${ktls:-0}" -ge 8 ] && [ "${rustls:-0}" -eq 0 ]; then
  pass "metric: tls_connections_total ktls $ktls, rustls $rustls"
else
  fail "metric: tls_connections_total ktls ${ktls:-none}, rustls ${rustls:-none}"
  echo "$metrics" | grep tls_connections | sed 's/^/  | /'
fi
kill "$backend" 2>/dev/null
kill "$server" 2>/dev/null

echo "KTLS-VM: $passed passed, $failed failed"
poweroff -f
EOF
chmod +x "$IMG/init"
(cd "$IMG" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initrd.gz"
step "initramfs $(du -h "$WORK/initrd.gz" | cut -f1), booting $KVER (TCG, timeout ${TIMEOUT}s)"

# ---- boot ----
LOG=$WORK/console.log
start=$(date +%s)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 1024 -nographic \
  -no-reboot -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" </dev/null >"$LOG" 2>&1
qemu_status=$?
set -e
tr -d '\r' <"$LOG" >"$LOG.txt"
if [ "${KTLS_VM_VERBOSE:-}" = 1 ]; then
  cat "$LOG.txt"
else
  grep -E '^(PASS|FAIL|KTLS-VM|  )' "$LOG.txt" || true
fi
echo "ktls-vm: VM ran $(($(date +%s) - start)) s (console: $LOG.txt)"
summary=$(grep -E '^KTLS-VM: [0-9]+ passed, [0-9]+ failed' "$LOG.txt" | tail -1 || true)
if [ -z "$summary" ]; then
  echo "FAIL VM finished its checks (qemu status $qemu_status; see $LOG.txt)"
  exit 1
fi
if grep -q '^FAIL' "$LOG.txt" || ! echo "$summary" | grep -q ' 0 failed'; then
  exit 1
fi
