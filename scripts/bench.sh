#!/usr/bin/env bash
# Side-by-side benchmark: zerocopy-server and nginx on the same machine, same work, same run.
#
#   bash scripts/bench.sh [seconds per run, default 8] [rounds, default 3]
#   ONLY=proxy-ka,idle-http bash scripts/bench.sh 2 1     # a subset
#
# Scenarios (ONLY= takes these names, comma-separated):
#   proxy-ka        proxied GET, keep-alive
#   proxy-close     proxied GET, a new client connection each (Connection: close)
#   static1k-ka     static 1 KiB file, keep-alive
#   static1k-close  static 1 KiB file, a new connection each
#   static1m        static 1 MiB file, keep-alive
#   https-ka        HTTPS static 1 KiB, keep-alive
#   https-close     HTTPS static 1 KiB, a full TLS handshake each (Connection: close)
#   h2-static       HTTP/2 (TLS, ALPN h2) static 1 KiB: h2load, 100 streams over 10 connections
#   h2-proxy        HTTP/2 proxied GET, the same (nginx with `http2` on its TLS listener)
#   idle-http       IDLE (5,000) keep-alive connections that each sent one GET and stay open
#   idle-https      the same over TLS
#
# Each server under test runs with all its processes on CPU 0 and one worker; wrk, the idle
# client and the backend (a second nginx answering `200 hello`) run on CPU 1. Within a round
# the two servers alternate on each scenario (which one goes first alternates by round). For
# each run: requests/s, p50 and p99 from `wrk --latency`, and the CPU the server spent per
# request: utime+stime of all its processes (master, workers, health checker: the whole
# process tree) from /proc/PID/stat, sampled before and after wrk, divided by wrk's request
# count. Idle memory: on a freshly restarted server, Pss (/proc/PID/smaps_rollup) of the whole
# tree with the connections open minus the same just before they were opened, divided by the
# connections held (each sent one GET of the 1 KiB file and read the response).
# The h2 scenarios are driven by h2load (-c10 -m10, Debian nghttp2-client), which reports no
# latency percentiles: their p50/p99 columns are nan.
# Prints each run, then medians of the rounds and the ratios zerocopy/nginx as Markdown
# tables, with the machine.
#
# Environment: ONLY, CONNECTIONS (wrk, default 50), IDLE (default 5000), ZEROCOPY_BIN (a
# binary to measure instead of building this checkout's release binary).
# wrk runs with scripts/wrk_no_resume.c preloaded: stock wrk resumes TLS sessions when it
# reconnects, and "a full handshake each" must be one. A check before the rounds counts the
# resumed handshakes (ServerHellos with a pre-shared key, seen on lo) against each server.
#
# Installs nginx, wrk, h2load, curl, openssl, python3, gcc (Debian packages) if missing. Uses 127.0.0.1
# and free ports only; stops every process it started on exit, Ctrl+C included.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-8}
ROUNDS=${2:-3}
CONNECTIONS=${CONNECTIONS:-50}
IDLE=${IDLE:-5000}
ONLY=${ONLY:-}
LOAD_SCENARIOS=(proxy-ka proxy-close static1k-ka static1k-close static1m https-ka https-close h2-static h2-proxy)
IDLE_SCENARIOS=(idle-http idle-https)
SERVERS=(nginx zerocopy)
HELPER_PY=$PWD/scripts/bench_helper.py
helper() { python3 "$HELPER_PY" "$@"; }

declare -A LABEL=(
  [proxy-ka]="proxied GET, keep-alive"
  [proxy-close]="proxied GET, new connection each"
  [static1k-ka]="static 1 KiB, keep-alive"
  [static1k-close]="static 1 KiB, new connection each"
  [static1m]="static 1 MiB"
  [https-ka]="HTTPS 1 KiB, keep-alive"
  [https-close]="HTTPS, full handshake each"
  [h2-static]="HTTP/2 1 KiB, 100 streams"
  [h2-proxy]="HTTP/2 proxied, 100 streams"
  [idle-http]="HTTP keep-alive"
  [idle-https]="HTTPS keep-alive"
)
declare -A SELECTED=()
for s in ${ONLY//,/ }; do
  [ -n "${LABEL[$s]:-}" ] || { echo "ONLY: unknown scenario '$s' (one of: ${LOAD_SCENARIOS[*]} ${IDLE_SCENARIOS[*]})" >&2; exit 2; }
  SELECTED[$s]=1
done
selected() { [ -z "$ONLY" ] || [ -n "${SELECTED[$1]:-}" ]; }
[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || { echo "seconds per run must be a whole number ≥ 1, not '$DURATION'" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "rounds must be a whole number ≥ 1, not '$ROUNDS'" >&2; exit 2; }

install_missing() {
  local need=() cmd pkg
  for pair in nginx:nginx wrk:wrk h2load:nghttp2-client curl:curl openssl:openssl python3:python3 taskset:util-linux cc:gcc; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ "$(nproc)" -lt 2 ]; then
  echo "warning: one core only: the servers, the load and the backend share it" >&2
  LOAD_CORE=0
else
  LOAD_CORE=1
fi

if [ -n "${ZEROCOPY_BIN:-}" ]; then
  BIN=$(realpath "$ZEROCOPY_BIN")   # compare another build (e.g. an older commit's) against nginx
else
  cargo build --release --quiet
  BIN=$PWD/target/release/zerocopy-server
fi

# Everything started is recorded here; cleanup stops each tree by pid, whatever happened.
WORK=$(mktemp -d)
STARTED=()
WRK_PID=
HOLD_PID=
# stop_tree PID...: stops each process and everything below it, by pid.
stop_tree() {
  local pids=() p
  for p in "$@"; do
    # shellcheck disable=SC2207
    pids+=($(helper tree "$p" 2>/dev/null || true))
    kill -TERM "$p" 2>/dev/null || true
  done
  # zerocopy drains on the first TERM and stops at once on the second; nginx stops on one.
  sleep 0.3
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
cleanup() {
  trap - EXIT INT TERM
  local p
  for p in $WRK_PID $HOLD_PID; do kill -TERM "$p" 2>/dev/null || true; done
  stop_tree "${STARTED[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT
# A command that fails under `set -e` says where, instead of ending the run without a word.
trap 'echo "bench.sh: line $LINENO failed (exit $?)" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port)
declare -A PORT=([nginx]=$(free_port) [zerocopy]=$(free_port))
declare -A TLS_PORT=([nginx]=$(free_port) [zerocopy]=$(free_port))
declare -A ROOT_PID=()

# Workers of both servers run unprivileged: the files and their directories must be readable.
mkdir -p "$WORK/www" "$WORK/backend" "$WORK/nginx" "$WORK/zerocopy"
chmod 755 "$WORK" "$WORK/www"
head -c 1024 /dev/urandom > "$WORK/www/1k.bin"
head -c $((1024 * 1024)) /dev/urandom > "$WORK/www/1m.bin"
chmod 644 "$WORK"/www/*
cc -shared -fPIC -O2 -o "$WORK/wrk_no_resume.so" scripts/wrk_no_resume.c -ldl
# One certificate for both servers: RSA 2048, what most sites still serve.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# The backend: nginx answering a short body, on the load core.
cat > "$WORK/backend/nginx.conf" <<EOF
daemon off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "hello\n"; } }
}
EOF

# nginx under test, tuned as its users tune it. No TLS session cache; session tickets issued
# (nginx's default, and zerocopy issues them too: a client pays for taking them), never used,
# since wrk runs with the no-resume preload: every new TLS connection is a full handshake.
cat > "$WORK/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
worker_cpu_affinity 1;
worker_rlimit_nofile 65536;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  ssl_certificate $WORK/cert.pem;
  ssl_certificate_key $WORK/key.pem;
  ssl_session_cache off;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:${PORT[nginx]};
    # "ssl http2" rather than "http2 on": nginx before 1.25.1 (Debian 12's) knows only this.
    listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2;
    location /proxy/ { proxy_pass http://backend/; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /static/ { alias $WORK/www/; }
  }
}
EOF

cat > "$WORK/zerocopy/zc.toml" <<EOF
[server]
listen = "127.0.0.1:${TLS_PORT[zerocopy]}"
http_listen = "127.0.0.1:${PORT[zerocopy]}"
threads = 1
shutdown_timeout_secs = 3
[logging]
level = "warn"
[tls]
cert_path = "$WORK/cert.pem"
key_path = "$WORK/key.pem"
[path_routes."*"."/proxy/"]
type = "Proxy"
url = "http://127.0.0.1:$BACKEND_PORT/"
  [path_routes."*"."/proxy/".security]
  max_idle_connections_per_host = 64
[path_routes."*"."/static/"]
path = "$WORK/www"
EOF

# 5,000 idle connections and 50 busy ones need more descriptors than a shell's default.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
taskset -c "$LOAD_CORE" "$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>>"$WORK/backend/error.log" &
STARTED+=($!)

wait_answering() {
  for _ in $(seq 100); do
    curl -skf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "not answering: $1" >&2
  tail -n 20 "$WORK"/*/error.log "$WORK/zerocopy/log" >&2
  exit 1
}

# start_server SERVER: starts it (stopping the running one first) and waits until every
# route answers.
start_server() {
  local old=${ROOT_PID[$1]:-} p kept=()
  if [ -n "$old" ]; then
    stop_tree "$old"
    for p in "${STARTED[@]}"; do [ "$p" = "$old" ] || kept+=("$p"); done
    STARTED=("${kept[@]}")
  fi
  if [ "$1" = nginx ]; then
    taskset -c 0 "$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>>"$WORK/nginx/error.log" &
  else
    taskset -c 0 "$BIN" -c "$WORK/zerocopy/zc.toml" >>"$WORK/zerocopy/log" 2>&1 &
  fi
  STARTED+=($!)
  ROOT_PID[$1]=$!
  for p in /proxy/x /static/1k.bin /static/1m.bin; do
    wait_answering "http://127.0.0.1:${PORT[$1]}$p"
  done
  wait_answering "https://127.0.0.1:${TLS_PORT[$1]}/static/1k.bin"
}
for server in "${SERVERS[@]}"; do start_server "$server"; done

# url SERVER SCENARIO
url() {
  case $2 in
    https-* | h2-static) echo "https://127.0.0.1:${TLS_PORT[$1]}/static/1k.bin" ;;
    h2-proxy) echo "https://127.0.0.1:${TLS_PORT[$1]}/proxy/x" ;;
    proxy-*) echo "http://127.0.0.1:${PORT[$1]}/proxy/x" ;;
    static1m) echo "http://127.0.0.1:${PORT[$1]}/static/1m.bin" ;;
    *) echo "http://127.0.0.1:${PORT[$1]}/static/1k.bin" ;;
  esac
}

# wrk_run URL SECONDS CLOSE(0|1): wrk's report in $WORK/wrk.out. In the background, so that
# Ctrl+C reaches the traps at once.
wrk_run() {
  local header=()
  [ "$3" = 1 ] && header=(-H 'Connection: close')
  taskset -c "$LOAD_CORE" env LD_PRELOAD="$WORK/wrk_no_resume.so" wrk -t1 -c"$CONNECTIONS" -d"$2s" --latency "${header[@]}" "$1" >"$WORK/wrk.out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { echo "wrk failed:" >&2; cat "$WORK/wrk.out" >&2; exit 1; }
  WRK_PID=
}

# Prints "requests rps p50_ms p99_ms errors" from $WORK/wrk.out.
wrk_parse() {
  awk '
    function ms(v) {
      if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
      if (v ~ /ms$/) { sub(/ms$/, "", v); return v }
      if (v ~ /m$/) { sub(/m$/, "", v); return v * 60000 }
      if (v ~ /s$/) { sub(/s$/, "", v); return v * 1000 }
      return v
    }
    / requests in / { requests = $1 }
    /^Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Socket errors/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
    /Non-2xx/ { errors += $NF }
    END { printf "%d %.0f %.3f %.3f %d\n", requests, rps, p50, p99, errors }
  ' "$WORK/wrk.out"
}

# h2load_run URL SECONDS: 100 streams over 10 connections; its report in $WORK/wrk.out.
h2load_run() {
  taskset -c "$LOAD_CORE" h2load -t1 -c10 -m10 -D "$2" "$1" >"$WORK/wrk.out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { echo "h2load failed:" >&2; cat "$WORK/wrk.out" >&2; exit 1; }
  WRK_PID=
}

# Prints "requests rps nan nan errors" from h2load's report: "requests: N total, N started,
# N done, N succeeded, F failed, E errored, T timeout" and "finished in 1.00s, R req/s, …".
h2load_parse() {
  awk '
    /^requests:/ { requests = $8; errors = $10 + $12 + $14 }
    /^finished in/ { rps = $4 }
    /^status codes:/ { gsub(/,/, ""); errors += $5 + $7 + $9 }
    END { printf "%d %.0f nan nan %d\n", requests, rps, errors }
  ' "$WORK/wrk.out"
}

declare -A RPS=() P50=() P99=() CPU=() KIB=()

# load_run SERVER SCENARIO ROUND
load_run() {
  local close=0 before after requests rps p50 p99 errors cpu
  case $2 in *-close) close=1 ;; esac
  before=$(helper cpu "${ROOT_PID[$1]}")
  if [[ $2 == h2-* ]]; then
    h2load_run "$(url "$1" "$2")" "$DURATION"
    after=$(helper cpu "${ROOT_PID[$1]}")
    read -r requests rps p50 p99 errors < <(h2load_parse)
  else
    wrk_run "$(url "$1" "$2")" "$DURATION" "$close"
    after=$(helper cpu "${ROOT_PID[$1]}")
    read -r requests rps p50 p99 errors < <(wrk_parse)
  fi
  [ "$requests" -gt 0 ] || { echo "no request completed:" >&2; cat "$WORK/wrk.out" >&2; exit 1; }
  cpu=$(awk -v d=$((after - before)) -v n="$requests" 'BEGIN { printf "%.1f", d / n }')
  printf "%-5s %-15s %-9s %10s %10s %10s %10s %8s\n" "$3" "$2" "$1" "$rps" "$p50" "$p99" "$cpu" "$errors"
  RPS[$2.$1]+="$rps " P50[$2.$1]+="$p50 " P99[$2.$1]+="$p99 " CPU[$2.$1]+="$cpu "
}

# idle_run SERVER SCENARIO ROUND. On a freshly started server: memory that an earlier run
# left in the allocator's free lists would otherwise be reused and hide the cost.
idle_run() {
  local tls=0 port=${PORT[$1]} before after held failed kib
  if [ "$2" = idle-https ]; then tls=1; port=${TLS_PORT[$1]}; fi
  start_server "$1"
  sleep 1 # the workers have finished starting
  before=$(helper pss "${ROOT_PID[$1]}")
  taskset -c "$LOAD_CORE" python3 "$HELPER_PY" hold "$port" "$IDLE" "$tls" /static/1k.bin >"$WORK/hold.out" 2>"$WORK/hold.err" &
  HOLD_PID=$!
  until grep -q '^ready' "$WORK/hold.out"; do
    kill -0 "$HOLD_PID" 2>/dev/null || { echo "the idle client died:" >&2; cat "$WORK/hold.err" >&2; exit 1; }
    sleep 0.2
  done
  sleep 1 # let the server settle after the last response
  after=$(helper pss "${ROOT_PID[$1]}")
  read -r _ held failed <"$WORK/hold.out"
  kill -TERM "$HOLD_PID" 2>/dev/null || true; wait "$HOLD_PID" || true; HOLD_PID=
  [ "$held" -gt 0 ] || { echo "no idle connection opened:" >&2; cat "$WORK/hold.err" >&2; exit 1; }
  kib=$(awk -v d=$((after - before)) -v n="$held" 'BEGIN { printf "%.2f", d / n }')
  printf "%-5s %-15s %-9s %10s %10s %10s %10s %8s\n" "$3" "$2" "$1" "$held" "$before" "$after" "$kib" "$failed"
  KIB[$2.$1]+="$kib "
}

# Checks that wrk (with the preload) resumes no TLS session: counts the ServerHellos that
# take a resumption and those that do not.
tls_resumption_check() {
  local server full resumed
  # HOLD_PID: the sniffer, so that cleanup stops it too.
  for server in "${SERVERS[@]}"; do
    python3 "$HELPER_PY" sniff "${TLS_PORT[$server]}" 3 >"$WORK/sniff.out" &
    HOLD_PID=$!
    sleep 0.5
    wrk_run "$(url "$server" https-close)" 2 1
    wait "$HOLD_PID" || true
    HOLD_PID=
    read -r full resumed <"$WORK/sniff.out"
    echo "TLS resumption check, $server (wrk, Connection: close, 2 s): $resumed of $((full + resumed)) handshakes resumed"
    [ "$resumed" = 0 ] || echo "warning: $server resumed TLS sessions: 'full handshake each' is not" >&2
  done
}

echo "warming up"
for server in "${SERVERS[@]}"; do
  wrk_run "$(url "$server" proxy-ka)" 1 0
  wrk_run "$(url "$server" static1k-ka)" 1 0
done
selected https-close && tls_resumption_check

echo
printf "%-5s %-15s %-9s %10s %10s %10s %10s %8s\n" round scenario server "req/s" "p50 ms" "p99 ms" "µs CPU/req" errors
for round in $(seq 1 "$ROUNDS"); do
  order=("${SERVERS[@]}")
  [ $((round % 2)) = 0 ] && order=(zerocopy nginx)
  for scenario in "${LOAD_SCENARIOS[@]}"; do
    selected "$scenario" || continue
    for server in "${order[@]}"; do load_run "$server" "$scenario" "$round"; done
  done
done
if selected idle-http || selected idle-https; then
  echo
  printf "%-5s %-15s %-9s %10s %10s %10s %10s %8s\n" round scenario server held "Pss0 KiB" "Pss KiB" "KiB each" failed
  for round in $(seq 1 "$ROUNDS"); do
    order=("${SERVERS[@]}")
    [ $((round % 2)) = 0 ] && order=(zerocopy nginx)
    for scenario in "${IDLE_SCENARIOS[@]}"; do
      selected "$scenario" || continue
      for server in "${order[@]}"; do idle_run "$server" "$scenario" "$round"; done
    done
  done
fi

median() { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
ratio() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { if (b > 0) printf f, a / b; else printf "n/a" }'; }
thousands() { awk -v n="$1" 'BEGIN { s = sprintf("%.0f", n); r = ""; while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }; print s r }'; }

echo
echo "Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores, Linux $(uname -r);" \
  "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), zerocopy-server $(git rev-parse --short HEAD 2>/dev/null || echo '?')." \
  "Medians of $ROUNDS rounds of ${DURATION} s, wrk -t1 -c$CONNECTIONS; one worker each on CPU 0; wrk and the backend on CPU $LOAD_CORE."
echo
if [ ${#RPS[@]} -gt 0 ]; then
  echo "| scenario | nginx req/s | zerocopy req/s | ratio | nginx p50 / p99 ms | zerocopy p50 / p99 ms | p99 ratio | nginx µs CPU/req | zerocopy µs CPU/req | CPU ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for scenario in "${LOAD_SCENARIOS[@]}"; do
    selected "$scenario" || continue
    nr=$(median <<<"${RPS[$scenario.nginx]}"); zr=$(median <<<"${RPS[$scenario.zerocopy]}")
    n50=$(median <<<"${P50[$scenario.nginx]}"); z50=$(median <<<"${P50[$scenario.zerocopy]}")
    n99=$(median <<<"${P99[$scenario.nginx]}"); z99=$(median <<<"${P99[$scenario.zerocopy]}")
    nc=$(median <<<"${CPU[$scenario.nginx]}"); zc=$(median <<<"${CPU[$scenario.zerocopy]}")
    printf "| %s | %s | %s | %s | %.2f / %.2f | %.2f / %.2f | %s | %.1f | %.1f | %s |\n" "${LABEL[$scenario]}" \
      "$(thousands "$nr")" "$(thousands "$zr")" "$(ratio "$zr" "$nr" %.2f)" "$n50" "$n99" "$z50" "$z99" \
      "$(ratio "$z99" "$n99" %.2f)" "$nc" "$zc" "$(ratio "$zc" "$nc" %.2f)"
  done
  echo
fi
if [ ${#KIB[@]} -gt 0 ]; then
  echo "| idle connections ($(thousands "$IDLE"); Pss of all server processes) | nginx KiB each | zerocopy KiB each | ratio |"
  echo "|---|---:|---:|---:|"
  for scenario in "${IDLE_SCENARIOS[@]}"; do
    selected "$scenario" || continue
    nk=$(median <<<"${KIB[$scenario.nginx]}"); zk=$(median <<<"${KIB[$scenario.zerocopy]}")
    printf "| %s | %.2f | %.2f | %s |\n" "${LABEL[$scenario]}" "$nk" "$zk" "$(ratio "$zk" "$nk" %.1f)"
  done
fi
